// NVSHMEM symmetric heap for the RDMA buffer (contract in window/nvshmem.hpp): the body of
// libmoelink_nvshmem.so, which the core opens on first use (window/nvshmem.cpp, nvshmem/ops.hpp).
//
// The plugin's kernels call NVSHMEM device functions (self_test.cu, and the put-path builds of the
// low-latency kernels, low_latency_*.cu, and of the internode lane's, lane*.cu), so it is built with
// separable compilation against libnvshmem_device.a, and initialisation must go through
// nvshmemi_init_thread from that library (it also fills the device state of this module). The
// header-inline nvshmemx_init_attr wraps the same call but exit()s the process on failure; calling
// it directly returns the status instead, which join() reports. Without the device library
// (MOELINK_NVSHMEM_DEVICE_LIB=0) the host-library init is used and device functions are unusable.
#include "window/nvshmem/ops.hpp"

#include <string>

#include "common/barrier.hpp"
#include "common/opening.hpp"
#include "moelink/error.hpp"

#include <cuda_runtime.h>
// The host-only umbrella: nvshmem.h would also pull in the device API, which a g++ translation unit
// cannot use.
#include <nvshmem_host.h>

#include <algorithm>
#include <cstring>
#include <mutex>

namespace moelink::window::nvshmem_plugin {

namespace {

// The unique id crosses process boundaries as raw bytes; nvshmem.hpp promises 128 of them.
static_assert(sizeof(nvshmemx_uniqueid_t) == 128, "nvshmemx_uniqueid_t is no longer 128 bytes");

// NVSHMEM is a per-process singleton: one membership at a time, guarded here so that a second
// Buffer in the same process gets a kState error instead of undefined behaviour inside NVSHMEM.
struct Membership {
  std::mutex mutex;
  bool joined = false;
  int pe = -1;
  int num_pes = 0;
  int device = -1;
  uint64_t* barrier_words = nullptr;  // symmetric [num_pes], the bounded barrier's (world_barrier.cu)
  uint64_t barrier_epoch = 0;
  bool abandoned = false;  // left without finalize after a lost PE: NVSHMEM stays initialised
};

Membership& membership() {
  static Membership state;
  return state;
}

std::string where(const Membership& state) {
  if (!state.joined) return "(not joined)";
  return "(pe " + std::to_string(state.pe) + " of " + std::to_string(state.num_pes) + ", device " +
         std::to_string(state.device) + ")";
}

[[noreturn]] void fail(const std::string& call, const std::string& detail, const std::string& context) {
  throw Error(ErrorKind::kCuda, "moelink: nvshmem " + call + " failed with " + detail + " " + context);
}

void check_status(int status, const char* call, const std::string& context) {
  if (status != 0) fail(call, std::to_string(status), context);
}

void require_joined(const Membership& state, const char* operation) {
  if (!state.joined) {
    throw Error(ErrorKind::kState,
                std::string("moelink: nvshmem ") + operation + " called before nvshmem_join (or after nvshmem_leave)");
  }
}

// The init's counterpart: the device-library finalize also unregisters this module's device state.
void finalize() {
#if MOELINK_NVSHMEM_DEVICE_LIB
  ::nvshmem_finalize();
#else
  ::nvshmemx_hostlib_finalize();
#endif
}

std::vector<uint8_t> unique_id() {
  // No membership needed: the root creates the id before anyone (itself included) has joined.
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  check_status(nvshmemx_get_uniqueid(&id), "nvshmemx_get_uniqueid", "(root, before join)");
  std::vector<uint8_t> bytes(sizeof(id));
  std::memcpy(bytes.data(), &id, sizeof(id));
  return bytes;
}

void join(int pe, int num_pes, const std::vector<uint8_t>& root_unique_id) {
  const std::string context = "(pe " + std::to_string(pe) + " of " + std::to_string(num_pes) + ")";
  if (num_pes <= 0 || pe < 0 || pe >= num_pes) {
    throw Error(ErrorKind::kValue, "moelink: nvshmem_join needs 0 <= pe < num_pes, got " + context);
  }
  if (root_unique_id.size() != sizeof(nvshmemx_uniqueid_t)) {
    throw Error(ErrorKind::kValue, "moelink: nvshmem_join root_unique_id must be " +
                                       std::to_string(sizeof(nvshmemx_uniqueid_t)) + " bytes, got " +
                                       std::to_string(root_unique_id.size()) + " " + context);
  }

  Membership& state = membership();
  std::lock_guard<std::mutex> lock(state.mutex);
  if (state.joined) {
    throw Error(ErrorKind::kState, "moelink: nvshmem_join called while this process is already " + where(state) +
                                       "; call nvshmem_leave first");
  }
  if (state.abandoned) {
    throw Error(ErrorKind::kState, "moelink: this process left an NVSHMEM world that had lost a PE, without "
                                   "NVSHMEM's finalize (it would wait for that PE forever); NVSHMEM cannot be joined "
                                   "again in this process: restart it " + context);
  }

  // NVSHMEM binds to whatever device is current at init; the caller chose it with cudaSetDevice and
  // it is only read here. cudaFree(nullptr) makes sure its primary context exists, so init does not
  // fall into NVSHMEM's deferred two-stage mode.
  int device = -1;
  const cudaError_t device_status = cudaGetDevice(&device);
  if (device_status != cudaSuccess) {
    fail("join (cudaGetDevice)", cudaGetErrorString(device_status), context);
  }
  const cudaError_t context_status = cudaFree(nullptr);
  if (context_status != cudaSuccess) {
    fail("join (cudaFree(nullptr) to create the context)", cudaGetErrorString(context_status), context);
  }
  const std::string device_context = "(pe " + std::to_string(pe) + " of " + std::to_string(num_pes) +
                                     ", device " + std::to_string(device) + ")";

  // libnvshmem_host.so.3 is one copy per process whatever loaded it (RTLD_LOCAL does not isolate a
  // soname): if another library (a DeepEP beside us) initialised it, joining would silently enter
  // that library's job and heap.
  if (nvshmemx_init_status() >= NVSHMEM_STATUS_IS_INITIALIZED) {
    throw Error(ErrorKind::kState, "moelink: NVSHMEM is already initialised in this process by another library; "
                                   "moelink cannot share it " + context);
  }

  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  std::memcpy(&id, root_unique_id.data(), sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  check_status(nvshmemx_set_attr_uniqueid_args(pe, num_pes, &id, &attr), "nvshmemx_set_attr_uniqueid_args",
               device_context);
#if MOELINK_NVSHMEM_DEVICE_LIB
  nvshmemx_init_init_attr_ver_only(attr);
  const nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                      NVSHMEM_VENDOR_PATCH_VERSION};
  int provided = 0;
  check_status(nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr, version),
               "nvshmemi_init_thread", device_context);
#else
  check_status(nvshmemx_hostlib_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr), "nvshmemx_hostlib_init_attr",
               device_context);
#endif

  const int init_status = nvshmemx_init_status();
  if (init_status < NVSHMEM_STATUS_IS_INITIALIZED) {
    fail("nvshmemx_init_status", "status " + std::to_string(init_status) + " (expected initialized)",
         device_context);
  }
  // A mismatch means two PEs passed the same rank or the id came from another job. Leave again, so
  // that a later join starts from nothing.
  if (nvshmem_my_pe() != pe || nvshmem_n_pes() != num_pes) {
    const std::string got = "membership pe " + std::to_string(nvshmem_my_pe()) + " of " + std::to_string(nvshmem_n_pes());
    finalize();
    fail("join", got, device_context);
  }

  // Every PE is in this init together, so the barrier's words are one more collective of it.
  state.barrier_words = static_cast<uint64_t*>(::nvshmem_calloc(static_cast<size_t>(num_pes), sizeof(uint64_t)));
  if (state.barrier_words == nullptr) {
    finalize();
    fail("nvshmem_calloc (the world barrier's words)", "a null pointer", device_context);
  }
  state.barrier_epoch = 0;
  state.joined = true;
  state.pe = pe;
  state.num_pes = num_pes;
  state.device = device;
}

int checked_world_barrier(double timeout_s) {
  Membership& state = membership();
  std::lock_guard<std::mutex> lock(state.mutex);
  require_joined(state, "the world barrier");
  return world_barrier(state.barrier_words, ++state.barrier_epoch, timeout_s);
}

void abandon() {
  Membership& state = membership();
  std::lock_guard<std::mutex> lock(state.mutex);
  require_joined(state, "nvshmem_abandon");
  state.joined = false;
  state.abandoned = true;
  state.barrier_words = nullptr;
}

void* alloc(int64_t bytes) {
  Membership& state = membership();
  std::lock_guard<std::mutex> lock(state.mutex);
  require_joined(state, "nvshmem_alloc");
  if (bytes <= 0) {
    throw Error(ErrorKind::kValue, "moelink: nvshmem_alloc needs a positive byte count, got " +
                                       std::to_string(bytes) + " " + where(state));
  }
  // calloc, not malloc: the contract promises zeroed memory, and NVSHMEM clears it before the
  // collective returns, so no PE can read a peer's stale bytes.
  // NOTES: one element of `bytes`, not `bytes` elements of one: NVSHMEM 3.4's growable (CUDA VMM)
  // heap maps new memory for a calloc that does not fit by the element size alone, rounded up to
  // one step of its granularity (NVSHMEM_CUMEM_GRANULARITY), so a larger calloc(bytes, 1) comes
  // back null whatever NVSHMEM_SYMMETRIC_SIZE says (that heap does not read it; 3.7 maps
  // count x size).
  void* ptr = ::nvshmem_calloc(1, static_cast<size_t>(bytes));
  if (ptr == nullptr) {
    fail("nvshmem_calloc(" + std::to_string(bytes) + " bytes)",
         "a null pointer (symmetric heap exhausted? raise NVSHMEM_SYMMETRIC_SIZE)", where(state));
  }
  return ptr;
}

void release(void* ptr) {
  Membership& state = membership();
  std::lock_guard<std::mutex> lock(state.mutex);
  require_joined(state, "nvshmem_release");
  if (ptr == nullptr) return;
  ::nvshmem_free(ptr);
}

void barrier_all() {
  Membership& state = membership();
  std::lock_guard<std::mutex> lock(state.mutex);
  require_joined(state, "nvshmem_barrier_all");
  ::nvshmem_barrier_all();
}

void leave() {
  Membership& state = membership();
  std::lock_guard<std::mutex> lock(state.mutex);
  require_joined(state, "nvshmem_leave");
  ::nvshmem_free(state.barrier_words);
  state.barrier_words = nullptr;
  finalize();
  state.joined = false;
  state.pe = -1;
  state.num_pes = 0;
  state.device = -1;
}


std::string checked_self_test(bool* mapped) {
  Membership& state = membership();
  std::lock_guard<std::mutex> lock(state.mutex);
  require_joined(state, "the device self-test");
  return self_test(mapped);
}

void* peer_pointer(void* symmetric, int pe) {
  Membership& state = membership();
  std::lock_guard<std::mutex> lock(state.mutex);
  require_joined(state, "nvshmem_ptr");
  return ::nvshmem_ptr(symmetric, pe);
}

int low_latency_blocks_per_sm() {
  return std::min(low_latency::dispatch_blocks_per_sm_puts(), low_latency::combine_blocks_per_sm_puts());
}

void lane_peers(const std::vector<int>& pes) {
  Membership& state = membership();
  std::lock_guard<std::mutex> lock(state.mutex);
  require_joined(state, "the lane's peers");
  for (const int pe : pes) {
    if (pe < 0 || pe >= state.num_pes)
      throw Error(ErrorKind::kValue, "moelink: a lane peer's PE must be in [0, " + std::to_string(state.num_pes) +
                                         "), got " + std::to_string(pe) + " " + where(state));
  }
  set_lane_peers(pes.data(), static_cast<int>(pes.size()));
}

int lane_blocks_per_sm() {
  return std::min(intranode::dispatch_blocks_per_sm_puts(), intranode::combine_blocks_per_sm_puts());
}

const Ops ops{kAbi,
              unique_id,
              join,
              alloc,
              release,
              barrier_all,
              leave,
              checked_self_test,
              peer_pointer,
              low_latency::launch_dispatch_puts,
              low_latency::launch_combine_puts,
              low_latency_blocks_per_sm,
              lane_peers,
              intranode::launch_notify_puts,
              intranode::launch_dispatch_puts,
              intranode::launch_combine_puts,
              kernels::launch_opening_puts,
              kernels::launch_barrier_puts,
              lane_blocks_per_sm,
              checked_world_barrier,
              abandon};

}  // namespace

}  // namespace moelink::window::nvshmem_plugin

extern "C" __attribute__((visibility("default"))) const moelink::window::nvshmem_plugin::Ops* moelink_nvshmem_ops() {
  return &moelink::window::nvshmem_plugin::ops;
}
