// Buffer: the lifecycle (construct -> sync -> destroy) and thin forwards to the modes. Everything
// the operations share is in the runtime context (runtime/context.hpp).
#include "moelink/buffer.hpp"

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>

#include "modes/intranode/host.hpp"
#include "modes/layout/host.hpp"
#include "modes/low_latency/contract.hpp"
#include "modes/low_latency/host.hpp"
#include "runtime/context.hpp"
#include "runtime/errors.hpp"
#include "runtime/knobs.hpp"
#include "window/nvshmem.hpp"

namespace moelink {

using detail::raise;

Buffer::Buffer(const BufferOptions& options) : ctx_(std::make_unique<runtime::Context>(options)) {}

namespace {

// How long a Buffer that is dropped without destroy() waits for its peers: bounded, so that
// interpreter exit with a peer already gone never hangs.
constexpr double kDropTimeoutS = 10.0;

std::array<uint8_t, 16> device_uuid(int device) {
  cudaDeviceProp props;
  MOELINK_CUDA_CHECK(cudaGetDeviceProperties(&props, device));
  std::array<uint8_t, 16> uuid;
  std::memcpy(uuid.data(), props.uuid.bytes, uuid.size());
  return uuid;
}

}  // namespace

Buffer::~Buffer() {
  runtime::Context& c = *ctx_;
  if (c.destroyed) return;
  if (c.explicitly_destroy && c.available)
    std::fprintf(stderr, "moelink: rank %d: Buffer(explicitly_destroy=True) was never destroy()ed; freeing without a barrier\n",
                 c.topo.rank);
  if (!c.explicitly_destroy && c.available && c.broken.empty()) {
    // As destroy() does, so that no peer still writes into this memory when it is freed; both
    // waits are bounded, and a failure only means the peers are gone already.
    try {
      const double timeout = std::min(c.timeout_s, kDropTimeoutS);
      if (cudaSetDevice(c.device) == cudaSuccess && c.drain(c.timeout_s + 5.0))
        c.barrier(kernels::kBarrierDestroy, timeout);
    } catch (const Error&) {
    }
    cudaGetLastError();
  } else if (!c.broken.empty()) {
    c.drain(c.timeout_s + 5.0);
  }
  c.release();
}

const Topology& Buffer::topology() const { return ctx_->topo; }
int Buffer::device_id() const { return ctx_->device; }
int64_t Buffer::num_nvl_bytes() const { return ctx_->num_nvl_bytes; }
int64_t Buffer::num_rdma_bytes() const { return ctx_->num_rdma_bytes; }
bool Buffer::low_latency_mode() const { return ctx_->low_latency_mode; }
bool Buffer::explicitly_destroy() const { return ctx_->explicitly_destroy; }
double Buffer::timeout_s() const { return ctx_->timeout_s; }
cudaStream_t Buffer::comm_stream() const { return ctx_->comm_stream; }
bool Buffer::is_available() const { return ctx_->available; }

void* Buffer::local_nvl_buffer() const {
  ctx_->require_usable("local_nvl_buffer");
  return ctx_->data();
}

void* Buffer::local_rdma_buffer() const {
  ctx_->require_usable("local_rdma_buffer");
  return ctx_->low_latency_bytes > 0 ? ctx_->low_latency_base() : ctx_->rdma;
}

int64_t Buffer::num_arena_bytes() const { return ctx_->arena ? ctx_->arena->capacity() : 0; }

int64_t Buffer::arena_bytes_in_use() const { return ctx_->arena ? ctx_->arena->bytes_in_use() : 0; }

int64_t Buffer::arena_largest_free() const { return ctx_->arena ? ctx_->arena->largest_free() : 0; }

std::optional<ArenaBlock> Buffer::arena_allocate(int64_t bytes, cudaStream_t stream) {
  ctx_->require_usable("arena_allocate");
  if (bytes < 0) raise(ErrorKind::kValue, "bytes: expected >= 0, got ", bytes);
  if (!ctx_->arena) return std::nullopt;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cudaGraph_t graph = nullptr;
  MOELINK_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &capture, nullptr, &graph));
  const bool capturing = capture == cudaStreamCaptureStatusActive;
  auto block = ctx_->arena->allocate(std::max<int64_t>(bytes, 1), stream, ctx_->comm_stream, capturing);
  if (!block) return std::nullopt;
  if (capturing && graph != nullptr) {
    // Every replay writes this block again, so the graph keeps it until the graph is destroyed.
    auto* held = new std::shared_ptr<void>(block->owner);
    cudaUserObject_t object = nullptr;
    const auto drop = [](void* p) {
      detail::RecvArena::set_in_cuda_callback(true);
      delete static_cast<std::shared_ptr<void>*>(p);
      detail::RecvArena::set_in_cuda_callback(false);
    };
    // CUDA releases a graph's references only once the work of its launches has completed, so the
    // range is free for the arena again when the callback runs (the one flag CUDA defines is required).
    const cudaError_t status = cudaUserObjectCreate(&object, held, drop, 1, cudaUserObjectNoDestructorSync);
    if (status != cudaSuccess) delete held;
    MOELINK_CUDA_CHECK(status);
    MOELINK_CUDA_CHECK(cudaGraphRetainUserObject(graph, object, 1, cudaGraphUserObjectMove));
  }
  return ArenaBlock{block->data, bytes, std::move(block->owner)};
}

void Buffer::arena_record_stream(const void* data, cudaStream_t stream) {
  if (ctx_->arena && !ctx_->destroyed) ctx_->arena->record_stream(data, stream);
}

// The bootstrap bytes: this GPU's UUID (so that sync() knows which ranks share a GPU), then what the
// NVLink window exports.
std::vector<uint8_t> Buffer::local_ipc_handle() const {
  if (ctx_->destroyed) raise(ErrorKind::kState, "local_ipc_handle: the Buffer on rank ", ctx_->topo.rank, " was destroyed");
  const auto uuid = device_uuid(ctx_->device);
  std::vector<uint8_t> bytes(uuid.begin(), uuid.end());
  const std::vector<uint8_t> exported = ctx_->nvl_window.export_local();
  bytes.insert(bytes.end(), exported.begin(), exported.end());
  return bytes;
}

bool Buffer::uses_nvshmem() const { return ctx_->uses_nvshmem; }
bool Buffer::low_latency_puts() const { return ctx_->low_latency_puts; }
bool Buffer::last_dispatch_direct() const {
  return ctx_->mailbox != nullptr && static_cast<volatile int&>(ctx_->mailbox->intranode.last_direct) != 0;
}
bool Buffer::last_combine_pulled() const {
  return ctx_->mailbox != nullptr && static_cast<volatile int&>(ctx_->mailbox->intranode.last_pulled) != 0;
}
int Buffer::peer_segments_mapped() const {
  int n = 0;
  if (ctx_->peer_segments)
    for (int p = 0; p < ctx_->topo.num_nvl_ranks; ++p) n += ctx_->peer_segments->mapped(p);
  return n;
}

long long Buffer::peer_segments_closed() const { return ctx_->peer_segments ? ctx_->peer_segments->closes() : 0; }

std::vector<uint8_t> Buffer::local_nvshmem_unique_id() const {
  if (!ctx_->uses_nvshmem)
    raise(ErrorKind::kState, "local_nvshmem_unique_id: this Buffer uses no NVSHMEM (num_rdma_bytes == 0, or a "
          "low-latency Buffer within one NVLink domain)");
  return ctx_->unique_id;
}

void Buffer::sync(const std::vector<int>& device_ids, const std::vector<std::vector<uint8_t>>& ipc_handles,
                  const std::vector<uint8_t>& root_unique_id) {
  runtime::Context& c = *ctx_;
  if (c.destroyed) raise(ErrorKind::kState, "sync: the Buffer on rank ", c.topo.rank, " was destroyed");
  if (c.available) raise(ErrorKind::kState, "sync: the Buffer on rank ", c.topo.rank, " is already synced");
  const int R = c.topo.num_ranks;
  if (static_cast<int>(device_ids.size()) != R)
    raise(ErrorKind::kValue, "device_ids: expected one entry per rank (", R, "), got ", device_ids.size());
  if (static_cast<int>(ipc_handles.size()) != R)
    raise(ErrorKind::kValue, "ipc_handles: expected one entry per rank (", R, "), got ", ipc_handles.size());

  if (device_ids[c.topo.rank] != c.device)
    raise(ErrorKind::kValue, "device_ids: entry ", c.topo.rank, " (this rank) is ", device_ids[c.topo.rank],
          ", but this Buffer uses device ", c.device);

  MOELINK_CUDA_CHECK(cudaSetDevice(c.device));
  const auto uuid = device_uuid(c.device);
  std::vector<std::vector<uint8_t>> node_handles;
  std::vector<int> node_ranks;
  c.ranks_per_gpu = 0;
  for (int p = 0; p < c.topo.num_nvl_ranks; ++p) {
    const int global = c.topo.global_rank(c.topo.rdma_rank, p);
    const std::vector<uint8_t>& bytes = ipc_handles[global];
    if (bytes.size() <= uuid.size())
      raise(ErrorKind::kValue, "ipc_handles[", global, "]: expected the bytes local_ipc_handle() returned on rank ", global,
            ", got ", bytes.size(), " bytes");
    if (std::equal(uuid.begin(), uuid.end(), bytes.begin())) ++c.ranks_per_gpu;
    node_handles.emplace_back(bytes.begin() + uuid.size(), bytes.end());
    node_ranks.push_back(global);
  }
  c.nvl_window.open(node_handles, node_ranks);
  for (int p = 0; p < c.topo.num_nvl_ranks; ++p) {
    c.peers.header[p] = static_cast<kernels::CommonHeader*>(c.nvl_window.member(p));
    c.fault_peers[p] = c.peers.header[p];
    c.peers.data[p] = static_cast<char*>(c.nvl_window.member(p)) + runtime::kNvlHeaderBytes;
    if (c.ipc_low_latency_bytes() > 0) {
      c.low_latency_regions[p] = static_cast<char*>(c.peers.data[p]) + runtime::low_latency_offset(c.num_nvl_bytes);
      c.low_latency_headers[p] = &static_cast<runtime::NvlHeader*>(c.nvl_window.member(p))->low_latency;
    }
  }
  MOELINK_CUDA_CHECK(cudaMemcpy(c.header()->common.peer_data, c.peers.data, sizeof(c.peers.data),
                                cudaMemcpyHostToDevice));

  if (c.uses_nvshmem) {
    // Low-latency mode: all ranks form one NVSHMEM job. Normal mode: one job per NVL lane,
    // one PE per node, so a rank only ever talks RDMA to its own lane on other nodes.
    const int pe = c.low_latency_mode ? c.topo.rank : c.topo.rdma_rank;
    const int num_pes = c.low_latency_mode ? c.topo.num_ranks : c.topo.num_rdma_ranks;
    if (root_unique_id.empty()) raise(ErrorKind::kValue, "root_unique_id: required when num_rdma_bytes > 0");
    window::nvshmem_join(pe, num_pes, root_unique_id);
    c.nvshmem_joined = true;
    if (c.low_latency_symmetric)
      c.open_symmetric_low_latency();
    else
      c.rdma = window::nvshmem_alloc(c.num_rdma_bytes);
    window::nvshmem_barrier_all();
  }
  c.available = true;
  c.barrier(kernels::kBarrierSync);
}

void Buffer::barrier(const char* step) {
  ctx_->require_usable(step);
  ctx_->barrier(kernels::kBarrierUser);
}

void Buffer::destroy() {
  runtime::Context& c = *ctx_;
  if (c.destroyed) return;
  std::string failure;
  ErrorKind failure_kind = ErrorKind::kState;
  if (!c.broken.empty() && !c.drain(c.timeout_s + 5.0)) {
    // Kernels behind a fault stop at once; one still running after every wait bound has passed may
    // still touch peer memory, so the mappings stay (leaked) rather than vanish under it.
    std::fprintf(stderr, "moelink: rank %d: destroy(): the comm stream did not drain in %g s; leaving the peer "
                 "mappings in place\n", c.topo.rank, c.timeout_s + 5.0);
    c.destroyed = true;
    c.available = false;
    return;
  }
  if (c.available && c.broken.empty()) {
    try {
      MOELINK_CUDA_CHECK(cudaSetDevice(c.device));
      MOELINK_CUDA_CHECK(cudaStreamSynchronize(c.comm_stream));
      c.barrier(kernels::kBarrierDestroy);
    } catch (const Error& e) {
      failure = e.what();
      failure_kind = e.kind();
    }
  }
  c.release();
  if (!failure.empty()) throw Error(failure_kind, failure);
}

void Buffer::check_device_errors() const {
  ctx_->check_device_errors();
  const std::vector<std::string> local = ctx_->take_local_errors();
  if (local.empty()) return;
  std::string message = local.front();
  for (size_t i = 1; i < local.size(); ++i) message += "; then " + local[i];
  throw Error(ErrorKind::kValue, message);
}

std::vector<std::string> Buffer::take_local_errors() { return ctx_->take_local_errors(); }

void Buffer::check_faults() const { ctx_->check_faults(); }

void Buffer::raise_pending_errors() const { ctx_->raise_at_end(); }

void Buffer::defer_data_errors(bool defer) { ctx_->defer_data_errors = defer; }

std::vector<uint8_t> Buffer::prepare_nvshmem_lane(bool world_root) const {
  ctx_->require_usable("prepare_nvshmem_lane");
  window::nvshmem_require();
  return world_root ? window::nvshmem_unique_id() : std::vector<uint8_t>{};
}

Buffer::NvshmemWorld Buffer::nvshmem_world() {
  window::NvshmemWorldInfo info = window::nvshmem_world();
  return {std::move(info.id), info.pe, info.num_pes};
}

void Buffer::serve_as_internode_lane(const std::vector<uint8_t>& root_unique_id, int world_pe, int world_size,
                                     const std::vector<int>& lane_pes) {
  ctx_->require_usable("serve_as_internode_lane");
  if (ctx_->peer_segments)
    detail::raise(ErrorKind::kState, "serve_as_internode_lane: this Buffer already ran an operation that could map "
                  "peer segments; make it a lane before its first dispatch or combine");
  const knobs::LanePut put = knobs::debug_lane_force_put();
  if (put == knobs::LanePut::kNvshmem && root_unique_id.empty())
    detail::raise(ErrorKind::kValue, "root_unique_id: MOELINK_DEBUG_LANE_FORCE_PUT=nvshmem needs the unique id "
                  "prepare_nvshmem_lane() returned on lane rank 0");
  if (put != knobs::LanePut::kNvshmem && !root_unique_id.empty())
    detail::raise(ErrorKind::kValue, "root_unique_id: only a lane with MOELINK_DEBUG_LANE_FORCE_PUT=nvshmem takes "
                  "one (is the knob set on some ranks only?)");
  if (put == knobs::LanePut::kNvshmem) {
    const int R = ctx_->topo.num_ranks;
    if (world_size < R || world_pe < 0 || world_pe >= world_size)
      detail::raise(ErrorKind::kValue, "world_pe: expected 0 <= world_pe < world_size and world_size >= the lane's ",
                    R, " ranks, got ", world_pe, " of ", world_size);
    if (static_cast<int>(lane_pes.size()) != R)
      detail::raise(ErrorKind::kValue, "lane_pes: expected one PE per lane rank (", R, "), got ", lane_pes.size());
    for (int p = 0; p < R; ++p) {
      if (lane_pes[p] < 0 || lane_pes[p] >= world_size)
        detail::raise(ErrorKind::kValue, "lane_pes[", p, "]: expected a PE in [0, ", world_size, "), got ", lane_pes[p]);
      for (int q = 0; q < p; ++q)
        if (lane_pes[q] == lane_pes[p])
          detail::raise(ErrorKind::kValue, "lane_pes: lane ranks ", q, " and ", p, " are both PE ", lane_pes[p]);
    }
    if (lane_pes[ctx_->topo.rank] != world_pe)
      detail::raise(ErrorKind::kValue, "lane_pes[", ctx_->topo.rank, "]: this lane rank is PE ", world_pe,
                    ", the table says ", lane_pes[ctx_->topo.rank]);
    ctx_->open_symmetric_lane(root_unique_id, world_pe, world_size, lane_pes);
  }
  ctx_->ring_only = true;
  ctx_->peer_segments_enabled = false;
  ctx_->lane_fake_puts = put == knobs::LanePut::kFake;
}

std::string Buffer::lane_window() const {
  if (!ctx_->ring_only) return "";
  return ctx_->lane_puts ? "nvshmem" : ctx_->lane_fake_puts ? "fake" : "stores";
}

void Buffer::abstain(bool /*waits_on_host*/) { ctx_->abstain(); }

void Buffer::debug_halt_next_sends() { ctx_->halt_next_sends = true; }

int64_t Buffer::low_latency_rdma_size_hint(int num_max_dispatch_tokens_per_rank, int hidden, int num_ranks,
                                           int num_experts) {
  return low_latency::rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts);
}

EventHandle Buffer::low_latency_dispatch(const LowLatencyDispatchInputs& in, const LowLatencyDispatchOutputs& out,
                                         LowLatencyPhase phase, const StreamOrder& order) {
  return low_latency::dispatch(*ctx_, in, out, phase, order);
}

EventHandle Buffer::low_latency_combine(const LowLatencyCombineInputs& in, const LowLatencyCombineOutputs& out,
                                        LowLatencyPhase phase, const StreamOrder& order) {
  return low_latency::combine(*ctx_, in, out, phase, order);
}

void Buffer::clean_low_latency_buffer(int num_max_dispatch_tokens_per_rank, int hidden, int num_experts) {
  low_latency::clean(*ctx_, num_max_dispatch_tokens_per_rank, hidden, num_experts);
}

EventHandle Buffer::low_latency_update_mask(int rank, bool mask, const StreamOrder& order) {
  return low_latency::mask_call(*ctx_, low_latency::kMaskSet, rank, mask ? 1 : 0, nullptr, order);
}

EventHandle Buffer::low_latency_query_mask(const TensorRef& mask_status, const StreamOrder& order) {
  return low_latency::mask_call(*ctx_, low_latency::kMaskQuery, -1, 0, &mask_status, order);
}

EventHandle Buffer::low_latency_clean_mask(const StreamOrder& order) {
  return low_latency::mask_call(*ctx_, low_latency::kMaskClean, -1, 0, nullptr, order);
}

void* Buffer::low_latency_combine_buffer(int num_max_dispatch_tokens_per_rank, int hidden, int num_experts,
                                         int which) const {
  ctx_->require_usable("get_next_low_latency_combine_buffer");
  return low_latency::combine_buffer(*ctx_, num_max_dispatch_tokens_per_rank, hidden, num_experts, which);
}

int Buffer::max_num_sms(int ranks_per_gpu) const { return intranode::max_num_sms(*ctx_, ranks_per_gpu); }

EventHandle Buffer::get_dispatch_layout(const TensorRef& topk_idx, int num_experts, const LayoutOutputs& out,
                                        const StreamOrder& order) {
  return layout::get_dispatch_layout(*ctx_, topk_idx, num_experts, out, order);
}

DispatchPlan Buffer::intranode_notify(const DispatchInputs& in, const DispatchHandle& handle, const Config& config,
                                      const StreamOrder& order) {
  return intranode::notify(*ctx_, in, handle, config, order);
}

void Buffer::intranode_notify_launch(const DispatchInputs& in, const Config& config, const StreamOrder& order) {
  intranode::notify_launch(*ctx_, in, config, order);
}

DispatchPlan Buffer::intranode_notify_wait() { return intranode::notify_wait(*ctx_); }

EventHandle Buffer::intranode_dispatch(const DispatchInputs& in, const DispatchHandle& handle,
                                       const DispatchOutputs& out, const Config& config, const StreamOrder& order,
                                       bool cached) {
  return intranode::dispatch(*ctx_, in, handle, out, config, order, cached);
}

EventHandle Buffer::intranode_combine(const CombineInputs& in, const DispatchHandle& handle, const CombineOutputs& out,
                                      const Config& config, const StreamOrder& order) {
  return intranode::combine(*ctx_, in, handle, out, config, order);
}

}  // namespace moelink
