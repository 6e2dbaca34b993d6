// The core's side of the NVSHMEM transport (contract in nvshmem.hpp): opens libmoelink_nvshmem.so,
// which sits beside libmoelink, the first time the RDMA buffer is used, and calls through its table
// (nvshmem/ops.hpp). A machine without NVSHMEM can then still load moelink and run intranode; only
// an RDMA buffer needs the plugin, and its error says what to install.
#include "window/nvshmem.hpp"

#include <dlfcn.h>
#include <unistd.h>

#include <mutex>
#include <string>

#include "moelink/error.hpp"
#include "window/nvshmem/ops.hpp"
#include "window/nvshmem_world.hpp"

namespace moelink::window {

namespace {

using nvshmem_plugin::Ops;

struct Loaded {
  const Ops* ops = nullptr;
  std::string error;  // why the plugin could not be used, when ops is null
};

std::string beside_this_library(const char* file) {
  Dl_info info{};
  if (dladdr(reinterpret_cast<const void*>(&nvshmem_compiled), &info) == 0 || info.dli_fname == nullptr) return file;
  std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? std::string(file) : path.substr(0, slash + 1) + file;
}

Loaded load() {
  Loaded result;
  if (!nvshmem_compiled()) {
    result.error = "moelink: built without NVSHMEM (set NVSHMEM_HOME or pip install nvidia-nvshmem-cu13, and rebuild)";
    return result;
  }
  const std::string path = beside_this_library(nvshmem_plugin::kLibrary);
  if (access(path.c_str(), F_OK) != 0) {
    result.error = "moelink: the RDMA buffer needs the NVSHMEM plugin " + path +
                   ", which is missing from this installation; reinstall moelink";
    return result;
  }
  // NOTES: RTLD_LOCAL keeps the plugin's symbols out of the global scope (it exports only its entry;
  // the static device library's are hidden), so no other library binds to them. It does not
  // isolate libnvshmem_host.so.3, of which a process has one copy: join refuses one that another
  // library initialised.
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    result.error = std::string("moelink: the RDMA buffer needs NVSHMEM, which could not be loaded (") +
                   (why ? why : path) + "); install it with `pip install nvidia-nvshmem-cu13==3.4.5`, or put "
                   "libnvshmem_host.so.3 on the loader path";
    return result;
  }
  auto entry = reinterpret_cast<const Ops* (*)()>(dlsym(handle, nvshmem_plugin::kEntry));
  const Ops* ops = entry != nullptr ? entry() : nullptr;
  if (ops == nullptr || ops->abi != nvshmem_plugin::kAbi) {
    result.error = "moelink: " + path + " is not the NVSHMEM plugin of this libmoelink (stale build?); reinstall moelink";
    return result;
  }
  result.ops = ops;
  return result;
}

const Ops& ops() {
  static std::once_flag once;
  static Loaded loaded;
  std::call_once(once, [] { loaded = load(); });
  if (loaded.ops == nullptr) throw Error(ErrorKind::kState, loaded.error);
  return *loaded.ops;
}

struct World {
  std::mutex mutex;
  NvshmemWorld record;
};

World& world() {
  static World w;
  return w;
}

}  // namespace

bool nvshmem_compiled() { return MOELINK_NVSHMEM_PLUGIN != 0; }

void nvshmem_require() { ops(); }

std::vector<uint8_t> nvshmem_unique_id() { return ops().unique_id(); }
void nvshmem_join(int pe, int num_pes, const std::vector<uint8_t>& root_unique_id) {
  World& w = world();
  std::lock_guard<std::mutex> lock(w.mutex);
  if (w.record.admit(pe, num_pes, root_unique_id) == NvshmemWorld::Join::kInit) ops().join(pe, num_pes, root_unique_id);
  w.record.joined(pe, num_pes, root_unique_id);
}
NvshmemWorldInfo nvshmem_world() {
  World& w = world();
  std::lock_guard<std::mutex> lock(w.mutex);
  return {w.record.id(), w.record.pe(), w.record.num_pes()};
}
void* nvshmem_alloc(int64_t bytes) { return ops().alloc(bytes); }
void nvshmem_release(void* ptr) { ops().release(ptr); }
void nvshmem_barrier_all() { ops().barrier_all(); }
void nvshmem_leave() {
  World& w = world();
  std::lock_guard<std::mutex> lock(w.mutex);
  const bool lost = w.record.lost();
  if (w.record.left()) ops().leave();
  else if (lost && w.record.members() == 0) ops().abandon();
}
int nvshmem_world_barrier(double timeout_s) {
  World& w = world();
  std::lock_guard<std::mutex> lock(w.mutex);
  if (w.record.lost()) return w.record.lost_pe();  // a PE known gone: no collective can complete
  const int missing = ops().world_barrier(timeout_s);
  if (missing != -1) w.record.lose(missing);
  return missing;
}
void* nvshmem_peer_pointer(void* symmetric, int pe) { return ops().peer_pointer(symmetric, pe); }
void nvshmem_low_latency_dispatch(const low_latency::DispatchArgs& args, int blocks, cudaStream_t stream) {
  ops().low_latency_dispatch(args, blocks, stream);
}
void nvshmem_low_latency_combine(const low_latency::CombineArgs& args, int blocks, cudaStream_t stream) {
  ops().low_latency_combine(args, blocks, stream);
}
int nvshmem_low_latency_blocks_per_sm() { return ops().low_latency_blocks_per_sm(); }
void nvshmem_lane_peers(const std::vector<int>& pes) { ops().lane_peers(pes); }
void nvshmem_lane_notify(const intranode::NotifyArgs& args, cudaStream_t stream) { ops().lane_notify(args, stream); }
void nvshmem_lane_dispatch(const intranode::DispatchArgs& args, cudaStream_t stream) {
  ops().lane_dispatch(args, stream);
}
void nvshmem_lane_combine(const intranode::CombineArgs& args, cudaStream_t stream) { ops().lane_combine(args, stream); }
void nvshmem_lane_opening(const kernels::PeerTable& peers, int rank, int num_ranks, const kernels::Opening& opening,
                          const kernels::ErrorSink& err, cudaStream_t stream) {
  ops().lane_opening(peers, rank, num_ranks, opening, err, stream);
}
void nvshmem_lane_barrier(const kernels::PeerTable& peers, int rank, int num_ranks, int tag,
                          const kernels::ErrorSink& err, cudaStream_t stream) {
  ops().lane_barrier(peers, rank, num_ranks, tag, err, stream);
}
int nvshmem_lane_blocks_per_sm() { return ops().lane_blocks_per_sm(); }
bool nvshmem_self_test() {
  bool mapped = false;
  const std::string error = ops().self_test(&mapped);
  if (!error.empty()) throw Error(ErrorKind::kCuda, "moelink: " + error);
  return mapped;
}

}  // namespace moelink::window
