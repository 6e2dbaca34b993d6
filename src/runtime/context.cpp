#include "runtime/context.hpp"

#include <atomic>
#include <cstring>

#include "common/barrier.hpp"
#include "common/launch.hpp"
#include "runtime/errors.hpp"
#include "runtime/knobs.hpp"
#include "runtime/wait_steps.hpp"
#include "window/nvshmem.hpp"

namespace moelink::runtime {

using detail::raise;

namespace {

const char* barrier_name(int tag) {
  switch (tag) {
    case kernels::kBarrierSync: return "the sync barrier";
    case kernels::kBarrierDestroy: return "the destroy barrier";
    case kernels::kBarrierOp: return "the barrier that opens an operation";
    default: return "a barrier";
  }
}

}  // namespace

Context::Context(const BufferOptions& o) {
  if (o.num_ranks < 1) raise(ErrorKind::kValue, "num_ranks: expected >= 1, got ", o.num_ranks);
  if (o.rank < 0 || o.rank >= o.num_ranks)
    raise(ErrorKind::kValue, "rank: expected 0..", o.num_ranks - 1, ", got ", o.rank);
  if (o.num_nvl_bytes < 0) raise(ErrorKind::kValue, "num_nvl_bytes: expected >= 0, got ", o.num_nvl_bytes);
  if (o.num_rdma_bytes < 0) raise(ErrorKind::kValue, "num_rdma_bytes: expected >= 0, got ", o.num_rdma_bytes);
  if (o.num_arena_bytes < 0) raise(ErrorKind::kValue, "num_arena_bytes: expected >= 0, got ", o.num_arena_bytes);
  if (o.num_qps_per_rank < 1) raise(ErrorKind::kValue, "num_qps_per_rank: expected >= 1, got ", o.num_qps_per_rank);
  knobs::log_once();
  topo = Topology::make(o.rank, o.num_ranks, o.num_nvl_ranks);
  num_nvl_bytes = o.num_nvl_bytes;
  num_rdma_bytes = o.num_rdma_bytes;
  low_latency_mode = o.low_latency_mode;
  explicitly_destroy = o.explicitly_destroy;
  timeout_s = o.timeout_s > 0 ? o.timeout_s : knobs::timeout_seconds();
  if (num_rdma_bytes > 0 && !window::nvshmem_compiled())
    raise(ErrorKind::kState, "num_rdma_bytes > 0 needs NVSHMEM, but this build has none (pip install "
          "nvidia-nvshmem-cu13 or set NVSHMEM_HOME, then rebuild)");

  if (o.device >= 0) {
    MOELINK_CUDA_CHECK(cudaSetDevice(o.device));
    device = o.device;
  } else {
    MOELINK_CUDA_CHECK(cudaGetDevice(&device));
  }
  // Loaded now, not at a first launch: with lazy module loading that launch would block the host.
  kernels::preload_kernels();
  MOELINK_CUDA_CHECK(cudaStreamCreateWithFlags(&comm_stream, cudaStreamNonBlocking));
  MOELINK_CUDA_CHECK(cudaEventCreateWithFlags(&order_event, cudaEventDisableTiming));

  // The header (barrier signals, peer table, notify inbox) always exists so barriers work even
  // for a Buffer with no NVLink data region.
  const int64_t bytes = kNvlHeaderBytes + kernels::align_up(num_nvl_bytes, 128);
  const int64_t arena_at = kNvlHeaderBytes + arena_offset(num_nvl_bytes);
  void* memory = nullptr;
  MOELINK_CUDA_CHECK(cudaMalloc(&memory, o.num_arena_bytes > 0 ? arena_at + o.num_arena_bytes : bytes));
  nvl_memory = std::shared_ptr<void>(memory, [](void* p) { cudaFree(p); });
  nvl_base = static_cast<char*>(memory);
  if (o.num_arena_bytes > 0)
    arena = std::make_shared<detail::RecvArena>(nvl_memory, nvl_base + arena_at, o.num_arena_bytes, kArenaAlignment);
  // The arena needs no zeroing: every output row is written before it is read.
  MOELINK_CUDA_CHECK(cudaMemsetAsync(nvl_base, 0, bytes, comm_stream));
  MOELINK_CUDA_CHECK(cudaStreamSynchronize(comm_stream));
  nvl_window = window::Window(window::cuda_ipc(), nvl_base, topo.nvl_rank, topo.num_nvl_ranks);

  MOELINK_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&mailbox), sizeof(HostMailbox),
                                   cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(mailbox, 0, sizeof(HostMailbox));
  MOELINK_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&mailbox_dev), mailbox, 0));

  if (num_rdma_bytes > 0) unique_id = window::nvshmem_unique_id();
}

Context::~Context() { release(); }

void Context::release() {
  if (destroyed) return;
  nvl_window.close();
  if (nvshmem_joined) {
    try {
      window::nvshmem_release(rdma);
      window::nvshmem_leave();
    } catch (const Error&) {
    }
    nvshmem_joined = false;
  }
  // Outputs still allocated in the arena keep the allocation alive until they are freed.
  arena.reset();
  nvl_memory.reset();
  nvl_base = nullptr;
  if (mailbox) cudaFreeHost(mailbox);
  mailbox = mailbox_dev = nullptr;
  if (order_event) cudaEventDestroy(order_event);
  order_event = nullptr;
  if (comm_stream) cudaStreamDestroy(comm_stream);
  comm_stream = nullptr;
  destroyed = true;
  available = false;
}

int64_t Context::offset_in_arena(const TensorRef& ref, int64_t bytes) const {
  if (ref.data == nullptr || !arena || !arena->contains(ref.data, bytes)) return -1;
  return static_cast<const char*>(ref.data) - static_cast<const char*>(data());
}

kernels::ErrorSink Context::error_sink() const {
  return kernels::ErrorSink{&mailbox_dev->error, &header()->common.error_claim, topo.nvl_rank,
                            static_cast<uint64_t>(timeout_s * 1e9)};
}

void Context::require_usable(const char* op) const {
  if (destroyed) raise(ErrorKind::kState, op, ": the Buffer on rank ", topo.rank, " was destroyed");
  if (!available) raise(ErrorKind::kState, op, ": the Buffer on rank ", topo.rank, " is not synced yet (call sync())");
  if (!broken.empty())
    raise(ErrorKind::kState, op, ": the Buffer on rank ", topo.rank, " is unusable after an earlier failure (", broken,
          "); destroy it and create a new one");
}

void Context::check_device_errors() {
  if (mailbox == nullptr) return;
  volatile kernels::ErrorRecord* rec = &mailbox->error;
  const int code = rec->code;
  if (code == kernels::kErrNone) return;
  std::atomic_thread_fence(std::memory_order_acquire);
  const int rank = topo.rank;
  const int peer = rec->peer >= 0 ? topo.global_rank(topo.rdma_rank, rec->peer) : -1;
  const int step = rec->step, channel = rec->channel, tag = rec->barrier_tag;
  const long long value = rec->detail;
  std::string message;
  ErrorKind kind = ErrorKind::kValue;
  if (code == kernels::kErrTimeout) {
    kind = ErrorKind::kTimeout;
    message = detail::str("moelink: rank ", rank, " timed out after ", timeout_s, " s ");
    if (step == kernels::kStepBarrier)
      message += detail::str("in ", barrier_name(tag), ": rank ", peer, " never arrived");
    else
      message += detail::str("in ", wait_step_description(step), " rank ", peer, ", channel ", channel, "): rank ",
                             peer, " stopped making progress");
    message += " (raise MOELINK_TIMEOUT_S if the peer is just slow)";
    broken = message;
  } else if (code == kernels::kErrWorstTokensOverflow) {
    message = detail::str("moelink: num_worst_tokens: rank ", rank, " received ", value,
                          " rows, more than num_worst_tokens; the extra rows were not written (raise num_worst_tokens)");
  } else if (code == kernels::kErrBadExpertId) {
    message = detail::str("moelink: topk_idx: rank ", rank, " token ", value / kernels::kMaxTopK, " slot ",
                          value % kernels::kMaxTopK, " holds an expert id outside [-1, num_experts); it was ignored");
  } else {
    message = detail::str("moelink: rank ", rank, ": device error code ", code);
  }
  if (kind != ErrorKind::kTimeout) {
    // Value errors leave the protocol intact: clear the record so the Buffer stays usable.
    rec->code = kernels::kErrNone;
    cudaMemsetAsync(&header()->common.error_claim, 0, sizeof(int), comm_stream);
  }
  throw Error(kind, message);
}

void Context::begin_op(const StreamOrder& order) {
  if (order.allocate_on_comm_stream && !(order.previous_event && order.async_finish))
    raise(ErrorKind::kValue, "allocate_on_comm_stream: requires previous_event and async_finish");
  if (order.previous_event) {
    MOELINK_CUDA_CHECK(cudaStreamWaitEvent(comm_stream, order.previous_event->get(), 0));
  } else {
    MOELINK_CUDA_CHECK(cudaEventRecord(order_event, order.compute_stream));
    MOELINK_CUDA_CHECK(cudaStreamWaitEvent(comm_stream, order_event, 0));
  }
}

EventHandle Context::end_op(const StreamOrder& order) {
  EventHandle done(comm_stream);
  if (!order.async_finish) done.stream_wait(order.compute_stream);
  return done;
}

void Context::launch_barrier(int tag) {
  kernels::launch_barrier(peers, topo.nvl_rank, topo.num_nvl_ranks, tag, error_sink(), comm_stream);
}

void Context::barrier(int tag) {
  launch_barrier(tag);
  MOELINK_CUDA_CHECK(cudaStreamSynchronize(comm_stream));
  check_device_errors();
}

}  // namespace moelink::runtime
