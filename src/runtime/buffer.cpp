// Buffer: allocation, bootstrap, lifecycle and the host side of every operation.
#include "moelink/buffer.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "kernels/launch.hpp"
#include "runtime/buffer_impl.hpp"
#include "runtime/env.hpp"
#include "runtime/errors.hpp"
#include "transport/cuda_ipc.hpp"
#include "transport/nvshmem.hpp"

namespace moelink {

using detail::raise;
using kernels::HostMailbox;
using kernels::NvlHeader;


namespace {

const char* barrier_name(int tag) {
  switch (tag) {
    case kernels::kBarrierSync: return "the sync barrier";
    case kernels::kBarrierDestroy: return "the destroy barrier";
    case kernels::kBarrierOp: return "the barrier that opens an operation";
    default: return "a barrier";
  }
}

const char* step_name(int step) {
  switch (step) {
    case kernels::kStepNotify: return "dispatch notify";
    case kernels::kStepDispatchSend: return "dispatch (sender waiting for ring space at";
    case kernels::kStepDispatchRecv: return "dispatch (receiver waiting for rows from";
    case kernels::kStepDispatchTarget: return "dispatch (sender waiting for the output addresses of";
    case kernels::kStepCombineSource: return "combine (receiver waiting for the input address of";
    case kernels::kStepCombinePull: return "combine (waiting for the reads of its input by";
    case kernels::kStepCombineSend: return "combine (sender waiting for ring space at";
    case kernels::kStepCombineRecv: return "combine (receiver waiting for rows from";
    default: return "an operation";
  }
}

void check_shape(const TensorRef& t, std::initializer_list<int64_t> shape, DType dtype, int device, const char* arg) {
  check::defined(t, arg);
  check::dtype(t, dtype, arg);
  check::shape(t, std::vector<int64_t>(shape), arg);
  check::contiguous(t, arg);
  check::on_device(t, device, arg);
}

}  // namespace

Buffer::Buffer(const BufferOptions& o) : impl_(std::make_unique<Impl>()) {
  if (o.num_ranks < 1) raise(ErrorKind::kValue, "num_ranks: expected >= 1, got ", o.num_ranks);
  if (o.rank < 0 || o.rank >= o.num_ranks)
    raise(ErrorKind::kValue, "rank: expected 0..", o.num_ranks - 1, ", got ", o.rank);
  if (o.num_nvl_bytes < 0) raise(ErrorKind::kValue, "num_nvl_bytes: expected >= 0, got ", o.num_nvl_bytes);
  if (o.num_rdma_bytes < 0) raise(ErrorKind::kValue, "num_rdma_bytes: expected >= 0, got ", o.num_rdma_bytes);
  if (o.num_arena_bytes < 0) raise(ErrorKind::kValue, "num_arena_bytes: expected >= 0, got ", o.num_arena_bytes);
  if (o.num_qps_per_rank < 1) raise(ErrorKind::kValue, "num_qps_per_rank: expected >= 1, got ", o.num_qps_per_rank);
  topo_ = Topology::make(o.rank, o.num_ranks, o.num_nvl_ranks);
  num_nvl_bytes_ = o.num_nvl_bytes;
  num_rdma_bytes_ = o.num_rdma_bytes;
  low_latency_mode_ = o.low_latency_mode;
  explicitly_destroy_ = o.explicitly_destroy;
  timeout_s_ = o.timeout_s > 0 ? o.timeout_s : env::timeout_seconds();
  if (num_rdma_bytes_ > 0 && !transport::nvshmem_compiled())
    raise(ErrorKind::kState, "num_rdma_bytes > 0 needs NVSHMEM, but this build has none (pip install "
          "nvidia-nvshmem-cu13 or set NVSHMEM_HOME, then rebuild)");

  if (o.device >= 0) {
    MOELINK_CUDA_CHECK(cudaSetDevice(o.device));
    device_ = o.device;
  } else {
    MOELINK_CUDA_CHECK(cudaGetDevice(&device_));
  }
  MOELINK_CUDA_CHECK(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking));
  MOELINK_CUDA_CHECK(cudaEventCreateWithFlags(&impl_->order_event, cudaEventDisableTiming));

  // The header (barrier signals, peer table, notify inbox) always exists so barriers work even
  // for a Buffer with no NVLink data region.
  const int64_t bytes = kernels::kNvlHeaderBytes + kernels::align_up(num_nvl_bytes_, 128);
  const int64_t arena_at = kernels::kNvlHeaderBytes + Impl::arena_offset(num_nvl_bytes_);
  void* memory = nullptr;
  MOELINK_CUDA_CHECK(cudaMalloc(&memory, o.num_arena_bytes > 0 ? arena_at + o.num_arena_bytes : bytes));
  impl_->nvl_memory = std::shared_ptr<void>(memory, [](void* p) { cudaFree(p); });
  impl_->nvl_base = static_cast<char*>(memory);
  if (o.num_arena_bytes > 0)
    impl_->arena = std::make_shared<detail::RecvArena>(impl_->nvl_memory, impl_->nvl_base + arena_at, o.num_arena_bytes);
  // The arena needs no zeroing: every output row is written before it is read.
  MOELINK_CUDA_CHECK(cudaMemsetAsync(impl_->nvl_base, 0, bytes, comm_stream_));
  MOELINK_CUDA_CHECK(cudaStreamSynchronize(comm_stream_));

  MOELINK_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&impl_->mailbox), sizeof(HostMailbox), cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(impl_->mailbox, 0, sizeof(HostMailbox));
  MOELINK_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&impl_->mailbox_dev), impl_->mailbox, 0));

  if (num_rdma_bytes_ > 0) impl_->unique_id = transport::nvshmem_unique_id();
}

Buffer::~Buffer() {
  if (destroyed_) return;
  if (explicitly_destroy_ && available_)
    std::fprintf(stderr, "moelink: rank %d: Buffer(explicitly_destroy=True) was never destroy()ed; freeing without a barrier\n",
                 topo_.rank);
  // No barrier here: peers may already be gone at interpreter exit, and a destructor must not hang.
  for (size_t p = 0; p < impl_->peer_base.size(); ++p)
    if (static_cast<int>(p) != topo_.nvl_rank) transport::ipc_close(impl_->peer_base[p]);
  if (impl_->nvshmem_joined) {
    try {
      transport::nvshmem_release(impl_->rdma);
      transport::nvshmem_leave();
    } catch (const Error&) {
    }
  }
  // Outputs still allocated in the arena keep the allocation alive until they are freed.
  impl_->arena.reset();
  impl_->nvl_memory.reset();
  cudaFreeHost(impl_->mailbox);
  cudaEventDestroy(impl_->order_event);
  cudaStreamDestroy(comm_stream_);
}

void* Buffer::local_nvl_buffer() const {
  require_usable("local_nvl_buffer");
  return impl_->data();
}

int64_t Buffer::num_arena_bytes() const { return impl_->arena ? impl_->arena->capacity() : 0; }

int64_t Buffer::arena_bytes_in_use() const { return impl_->arena ? impl_->arena->bytes_in_use() : 0; }

int64_t Buffer::arena_largest_free() const { return impl_->arena ? impl_->arena->largest_free() : 0; }

std::optional<ArenaBlock> Buffer::arena_allocate(int64_t bytes) {
  require_usable("arena_allocate");
  if (bytes < 0) raise(ErrorKind::kValue, "bytes: expected >= 0, got ", bytes);
  if (!impl_->arena) return std::nullopt;
  auto block = impl_->arena->allocate(std::max<int64_t>(bytes, 1));
  if (!block) return std::nullopt;
  return ArenaBlock{block->data, bytes, std::move(block->owner)};
}

void* Buffer::local_rdma_buffer() const {
  require_usable("local_rdma_buffer");
  return impl_->rdma;
}

std::vector<uint8_t> Buffer::local_ipc_handle() const {
  if (destroyed_) raise(ErrorKind::kState, "local_ipc_handle: the Buffer on rank ", topo_.rank, " was destroyed");
  return transport::ipc_export(impl_->nvl_base);
}

std::vector<uint8_t> Buffer::local_nvshmem_unique_id() const {
  if (num_rdma_bytes_ == 0)
    raise(ErrorKind::kState, "local_nvshmem_unique_id: this Buffer uses no RDMA buffer (num_rdma_bytes == 0)");
  return impl_->unique_id;
}

void Buffer::sync(const std::vector<int>& device_ids, const std::vector<std::vector<uint8_t>>& ipc_handles,
                  const std::vector<uint8_t>& root_unique_id) {
  if (destroyed_) raise(ErrorKind::kState, "sync: the Buffer on rank ", topo_.rank, " was destroyed");
  if (available_) raise(ErrorKind::kState, "sync: the Buffer on rank ", topo_.rank, " is already synced");
  const int R = topo_.num_ranks;
  if (static_cast<int>(device_ids.size()) != R)
    raise(ErrorKind::kValue, "device_ids: expected one entry per rank (", R, "), got ", device_ids.size());
  if (static_cast<int>(ipc_handles.size()) != R)
    raise(ErrorKind::kValue, "ipc_handles: expected one entry per rank (", R, "), got ", ipc_handles.size());

  MOELINK_CUDA_CHECK(cudaSetDevice(device_));
  impl_->peer_base.assign(topo_.num_nvl_ranks, nullptr);
  for (int p = 0; p < topo_.num_nvl_ranks; ++p) {
    const int global = topo_.global_rank(topo_.rdma_rank, p);
    impl_->peer_base[p] = p == topo_.nvl_rank ? impl_->nvl_base : transport::ipc_open(ipc_handles[global], global);
    impl_->peers.header[p] = static_cast<NvlHeader*>(impl_->peer_base[p]);
    impl_->peers.data[p] = static_cast<char*>(impl_->peer_base[p]) + kernels::kNvlHeaderBytes;
  }
  MOELINK_CUDA_CHECK(cudaMemcpy(impl_->header()->peer_data, impl_->peers.data, sizeof(impl_->peers.data),
                                cudaMemcpyHostToDevice));

  if (num_rdma_bytes_ > 0) {
    // Low-latency mode: all ranks form one NVSHMEM job. Normal mode: one job per NVL lane,
    // one PE per node, so a rank only ever talks RDMA to its own lane on other nodes.
    const int pe = low_latency_mode_ ? topo_.rank : topo_.rdma_rank;
    const int num_pes = low_latency_mode_ ? topo_.num_ranks : topo_.num_rdma_ranks;
    if (root_unique_id.empty()) raise(ErrorKind::kValue, "root_unique_id: required when num_rdma_bytes > 0");
    transport::nvshmem_join(pe, num_pes, root_unique_id);
    impl_->nvshmem_joined = true;
    impl_->rdma = transport::nvshmem_alloc(num_rdma_bytes_);
    transport::nvshmem_barrier_all();
  }
  available_ = true;
  barrier_tagged(kernels::kBarrierSync);
}

void Buffer::barrier(const char* step) {
  require_usable(step);
  barrier_tagged(kernels::kBarrierUser);
}

void Buffer::barrier_tagged(int tag) {
  kernels::launch_barrier(impl_->peers, topo_.nvl_rank, topo_.num_nvl_ranks, tag, error_sink(), comm_stream_);
  MOELINK_CHECK_LAUNCH();
  MOELINK_CUDA_CHECK(cudaStreamSynchronize(comm_stream_));
  check_device_errors();
}

void Buffer::destroy() {
  if (destroyed_) return;
  std::string failure;
  ErrorKind failure_kind = ErrorKind::kState;
  if (available_ && impl_->broken.empty()) {
    try {
      MOELINK_CUDA_CHECK(cudaSetDevice(device_));
      MOELINK_CUDA_CHECK(cudaStreamSynchronize(comm_stream_));
      barrier_tagged(kernels::kBarrierDestroy);
    } catch (const Error& e) {
      failure = e.what();
      failure_kind = e.kind();
    }
  }
  for (int p = 0; p < static_cast<int>(impl_->peer_base.size()); ++p)
    if (p != topo_.nvl_rank) transport::ipc_close(impl_->peer_base[p]);
  impl_->peer_base.clear();
  if (impl_->nvshmem_joined) {
    transport::nvshmem_release(impl_->rdma);
    transport::nvshmem_leave();
    impl_->nvshmem_joined = false;
  }
  impl_->arena.reset();
  impl_->nvl_memory.reset();
  cudaFreeHost(impl_->mailbox);
  cudaEventDestroy(impl_->order_event);
  cudaStreamDestroy(comm_stream_);
  impl_->nvl_base = nullptr;
  impl_->mailbox = nullptr;
  comm_stream_ = nullptr;
  destroyed_ = true;
  available_ = false;
  if (!failure.empty()) throw Error(failure_kind, failure);
}

kernels::ErrorSink Buffer::error_sink() const {
  return kernels::ErrorSink{&impl_->mailbox_dev->error, &impl_->header()->error_claim, topo_.nvl_rank,
                            static_cast<uint64_t>(timeout_s_ * 1e9)};
}

void Buffer::require_usable(const char* op) const {
  if (destroyed_) raise(ErrorKind::kState, op, ": the Buffer on rank ", topo_.rank, " was destroyed");
  if (!available_) raise(ErrorKind::kState, op, ": the Buffer on rank ", topo_.rank, " is not synced yet (call sync())");
  if (!impl_->broken.empty())
    raise(ErrorKind::kState, op, ": the Buffer on rank ", topo_.rank, " is unusable after an earlier failure (",
          impl_->broken, "); destroy it and create a new one");
}

void Buffer::check_device_errors() const {
  if (impl_->mailbox == nullptr) return;
  volatile kernels::ErrorRecord* rec = &impl_->mailbox->error;
  const int code = rec->code;
  if (code == kernels::kErrNone) return;
  std::atomic_thread_fence(std::memory_order_acquire);
  const int rank = topo_.rank;
  const int peer = rec->peer >= 0 ? topo_.global_rank(topo_.rdma_rank, rec->peer) : -1;
  const int step = rec->step, channel = rec->channel, tag = rec->barrier_tag;
  const long long value = rec->detail;
  std::string message;
  ErrorKind kind = ErrorKind::kValue;
  if (code == kernels::kErrTimeout) {
    kind = ErrorKind::kTimeout;
    message = detail::str("moelink: rank ", rank, " timed out after ", timeout_s_, " s ");
    if (step == kernels::kStepBarrier)
      message += detail::str("in ", barrier_name(tag), ": rank ", peer, " never arrived");
    else
      message += detail::str("in ", step_name(step), " rank ", peer, ", channel ", channel, "): rank ", peer,
                             " stopped making progress");
    message += " (raise MOELINK_TIMEOUT_S if the peer is just slow)";
    impl_->broken = message;
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
    cudaMemsetAsync(&impl_->header()->error_claim, 0, sizeof(int), comm_stream_);
  }
  throw Error(kind, message);
}

void Buffer::begin_op(const StreamOrder& order) const {
  if (order.allocate_on_comm_stream && !(order.previous_event && order.async_finish))
    raise(ErrorKind::kValue, "allocate_on_comm_stream: requires previous_event and async_finish");
  if (order.previous_event) {
    MOELINK_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, order.previous_event->get(), 0));
  } else {
    MOELINK_CUDA_CHECK(cudaEventRecord(impl_->order_event, order.compute_stream));
    MOELINK_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, impl_->order_event, 0));
  }
}

EventHandle Buffer::end_op(const StreamOrder& order) const {
  EventHandle done(comm_stream_);
  if (!order.async_finish) done.stream_wait(order.compute_stream);
  return done;
}

// ---- layout -----------------------------------------------------------------------------------

EventHandle Buffer::get_dispatch_layout(const TensorRef& topk_idx, int num_experts, const LayoutOutputs& out,
                                        const StreamOrder& order) {
  require_usable("get_dispatch_layout");
  check_device_errors();
  const int R = topo_.num_ranks;
  check::defined(topk_idx, "topk_idx");
  check::dtype(topk_idx, DType::kInt64, "topk_idx");
  check::dim(topk_idx, 2, "topk_idx");
  check::contiguous(topk_idx, "topk_idx");
  check::on_device(topk_idx, device_, "topk_idx");
  const int64_t T = topk_idx.size(0), K = topk_idx.size(1);
  if (K < 1 || K > kernels::kMaxTopK)
    raise(ErrorKind::kValue, "topk_idx: expected 1..", kernels::kMaxTopK, " columns (top-k), got ", K);
  if (num_experts <= 0 || num_experts % R != 0 || num_experts > kernels::kMaxExperts)
    raise(ErrorKind::kValue, "num_experts: expected a positive multiple of num_ranks (", R, ") up to ",
          kernels::kMaxExperts, ", got ", num_experts);
  check_shape(out.num_tokens_per_rank, {R}, DType::kInt32, device_, "num_tokens_per_rank");
  check_shape(out.num_tokens_per_expert, {num_experts}, DType::kInt32, device_, "num_tokens_per_expert");
  check_shape(out.is_token_in_rank, {T, R}, DType::kBool, device_, "is_token_in_rank");
  const bool with_rdma = out.num_tokens_per_rdma_rank.data != nullptr;
  if (with_rdma)
    check_shape(out.num_tokens_per_rdma_rank, {topo_.num_rdma_ranks}, DType::kInt32, device_, "num_tokens_per_rdma_rank");

  begin_op(order);
  kernels::LayoutArgs args{};
  args.topk_idx = static_cast<const int64_t*>(topk_idx.data);
  args.num_tokens = static_cast<int>(T);
  args.num_topk = static_cast<int>(K);
  args.num_experts = num_experts;
  args.num_ranks = R;
  args.num_nvl_ranks = topo_.num_nvl_ranks;
  args.num_tokens_per_rank = static_cast<int*>(out.num_tokens_per_rank.data);
  args.num_tokens_per_rdma_rank = with_rdma ? static_cast<int*>(out.num_tokens_per_rdma_rank.data) : nullptr;
  args.num_tokens_per_expert = static_cast<int*>(out.num_tokens_per_expert.data);
  args.is_token_in_rank = static_cast<bool*>(out.is_token_in_rank.data);
  args.err = error_sink();
  kernels::launch_dispatch_layout(args, comm_stream_);
  MOELINK_CHECK_LAUNCH();
  return end_op(order);
}

}  // namespace moelink
