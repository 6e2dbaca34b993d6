// Low-latency mode, host side: argument checks against the region's layout, and the launches. There
// is no host wait and no opening barrier: a call's signals carry its number, so the kernels need
// no agreement step, and a call can be captured in a CUDA graph and replayed.
//
// With the default order (no previous_event, no async_finish) a call launches on the caller's
// stream, as DeepEP's hook calls do: the caller's stream would wait for its end anyway, and the four
// event calls of the comm-stream path (~14 µs on the host under MPS at 8 ranks) and the cross-stream
// dependency go away. Its order with the Buffer's other work, on whatever stream, is
// Context::queue_on's (runtime/launch_order.hpp); with any other order it keeps the comm stream.
#include "modes/low_latency/host.hpp"

#include <algorithm>

#include "common/poison.hpp"
#include "modes/low_latency/contract.hpp"
#include "runtime/context.hpp"
#include "runtime/errors.hpp"
#include "runtime/host_stamps.hpp"
#include "runtime/wait_steps.hpp"
#include "window/nvshmem.hpp"

namespace moelink::low_latency {

using detail::raise;
using kernels::poison_list;
using runtime::Context;

namespace {

const runtime::WaitStepRegistration wait_steps{
    {kStepDispatchRecv, "low-latency dispatch (a local expert waiting for the rows of"},
    {kStepCombineRecv, "low-latency combine (a token waiting for the rows of the expert on"},
    {kStepLocal, "low-latency send (a signalling warp waiting for this rank's own writes,"},
    {kStepGate, "low-latency send (waiting for a peer to finish receiving the call two before this one: at most two "
                "low-latency calls may be outstanding between their send and their hook;"},
};

// Blocks of the low-latency kernels unless fewer fit (every rank's must be resident at once).
constexpr int kDefaultBlocks = 24;

void expect(const TensorRef& t, const std::vector<int64_t>& shape, DType dtype, int device, const char* arg) {
  check::defined(t, arg);
  check::dtype(t, dtype, arg);
  check::shape(t, shape, arg);
  check::contiguous(t, arg);
  check::on_device(t, device, arg);
}

// [E_local, R * M, C] with the last two dims column-major, as fp8 grouped GEMMs read scales.
void expect_column_major(const TensorRef& t, const std::vector<int64_t>& shape, DType dtype, int device,
                         const char* arg) {
  check::defined(t, arg);
  check::dtype(t, dtype, arg);
  check::shape(t, shape, arg);
  check::on_device(t, device, arg);
  const int64_t rows = shape[1], cols = shape[2];
  if (t.stride(0) != rows * cols || t.stride(1) != 1 || t.stride(2) != rows)
    raise(ErrorKind::kValue, arg, ": expected column-major last two dims (strides ", rows * cols, ", 1, ", rows,
          "), got (", t.stride(0), ", ", t.stride(1), ", ", t.stride(2), ")");
}

Layout checked_layout(const Context& ctx, int max_tokens, int hidden, int num_experts, const char* op) {
  const int R = ctx.topo.num_ranks;
  if (ctx.low_latency_bytes == 0) {
    if (!ctx.low_latency_mode)
      raise(ErrorKind::kState, op, ": the Buffer was not built with low_latency_mode=True");
    if (R > kMaxNvlRanks)
      raise(ErrorKind::kState, op, ": low-latency mode supports up to ", kMaxNvlRanks, " ranks so far (its kernels' "
            "per-rank tables), got ", R);
    raise(ErrorKind::kValue, "num_rdma_bytes: a low-latency Buffer needs num_rdma_bytes > 0 (size it with "
          "Buffer.get_low_latency_rdma_size_hint)");
  }
  if (max_tokens < 1 || max_tokens > kMaxTokensPerRank)
    raise(ErrorKind::kValue, "num_max_dispatch_tokens_per_rank: expected 1..", kMaxTokensPerRank, ", got ", max_tokens);
  if (hidden <= 0 || hidden % kScaleBlock != 0)
    raise(ErrorKind::kValue, "x: low-latency mode needs a hidden size that is a positive multiple of ", kScaleBlock,
          ", got ", hidden);
  if (num_experts < R || num_experts % R != 0 || num_experts > kMaxExperts)
    raise(ErrorKind::kValue, "num_experts: expected a multiple of num_ranks (", R, ") up to ", kMaxExperts, ", got ",
          num_experts);
  const Layout layout = Layout::make(max_tokens, hidden, R, num_experts);
  if (layout.total_bytes() > ctx.low_latency_bytes)
    raise(ErrorKind::kValue, "num_rdma_bytes: this ", op, " needs ", layout.total_bytes(), " bytes (M = ", max_tokens,
          ", hidden = ", hidden, ", ", num_experts, " experts) but the Buffer has ", ctx.low_latency_bytes,
          "; size it with Buffer.get_low_latency_rdma_size_hint");
  return layout;
}

// The checks every call starts with; the hidden size is x's last dim.
Layout begin_call(Context& ctx, const TensorRef& x, int dims, int max_tokens, int num_experts, const char* op) {
  ctx.require_usable(op);
  // Faults only: a data error (left by a normal-mode operation on this Buffer) is raised at the end
  // of the call, after its launch, as the normal-mode collectives do (runtime/pending_errors.hpp).
  ctx.check_on_entry(true);
  check::defined(x, "x");
  check::dtype(x, DType::kBFloat16, "x");
  check::dim(x, dims, "x");
  return checked_layout(ctx, max_tokens, static_cast<int>(x.size(dims - 1)), num_experts, op);
}

// topk_idx [T, K] with T <= max_tokens; returns K.
int64_t checked_topk(const TensorRef& topk_idx, int max_tokens, int device) {
  check::defined(topk_idx, "topk_idx");
  check::dim(topk_idx, 2, "topk_idx");
  const int64_t T = topk_idx.size(0), K = topk_idx.size(1);
  if (T > max_tokens)
    raise(ErrorKind::kValue, "topk_idx: ", T, " tokens, more than num_max_dispatch_tokens_per_rank (", max_tokens, ")");
  if (K < 1 || K > kMaxTopK) raise(ErrorKind::kValue, "topk_idx: expected 1..", kMaxTopK, " columns, got ", K);
  expect(topk_idx, {T, K}, DType::kInt64, device, "topk_idx");
  return K;
}

int launch_blocks(const Context& ctx, int blocks_per_sm) {
  return std::max(1, std::min(kDefaultBlocks, ctx.sm_count * blocks_per_sm / ctx.ranks_per_gpu));
}

int phase_bits(LowLatencyPhase phase) {
  switch (phase) {
    case LowLatencyPhase::kSend: return kPhaseSend;
    case LowLatencyPhase::kReceive: return kPhaseRecv;
    default: return kPhaseBoth;
  }
}

// The arguments both kernels take from the context. Ranks are global (one NVLink domain, or the
// PEs of the symmetric region, in order); a rank with no mapped region is reached by puts.
template <class Args>
void fill_call(Args& a, const Context& ctx, const Layout& L, LowLatencyPhase phase) {
  a.layout = L;
  a.phase = phase_bits(phase);
  a.rank = ctx.topo.rank;
  for (int p = 0; p < ctx.topo.num_ranks; ++p) {
    a.regions[p] = ctx.low_latency_regions[p];
    a.peers[p] = ctx.low_latency_headers[p];
    a.put.pe[p] = ctx.low_latency_pes[p];
  }
  a.self = ctx.low_latency_header();
  a.put.state = ctx.low_latency_symmetric ? &static_cast<SymmetricHeader*>(ctx.low_latency_allocation)->put : nullptr;
  a.put.any = ctx.low_latency_puts;
  a.err = ctx.error_sink();
  a.shrink = ctx.enable_shrink;
}

// The store-only kernels of libmoelink unless some rank is reached by puts (then the plugin's).
int blocks_per_sm(const Context& ctx, int (*stores)()) {
  return ctx.low_latency_puts ? window::nvshmem_low_latency_blocks_per_sm() : stores();
}

}  // namespace

int64_t rdma_size_hint(int max_tokens, int hidden, int num_ranks, int num_experts) {
  if (max_tokens < 1) raise(ErrorKind::kValue, "num_max_dispatch_tokens_per_rank: expected >= 1, got ", max_tokens);
  if (hidden <= 0 || hidden % kScaleBlock != 0)
    raise(ErrorKind::kValue, "hidden: expected a positive multiple of ", kScaleBlock, ", got ", hidden);
  if (num_ranks < 1) raise(ErrorKind::kValue, "num_ranks: expected >= 1, got ", num_ranks);
  if (num_experts < num_ranks || num_experts % num_ranks != 0)
    raise(ErrorKind::kValue, "num_experts: expected a multiple of num_ranks (", num_ranks, "), got ", num_experts);
  return Layout::make(max_tokens, hidden, num_ranks, num_experts).hint_bytes();
}

EventHandle dispatch(Context& ctx, const LowLatencyDispatchInputs& in, const LowLatencyDispatchOutputs& out,
                     LowLatencyPhase phase, const StreamOrder& order) {
  host_stamps::begin();
  const int R = ctx.topo.num_ranks, M = in.num_max_dispatch_tokens_per_rank;
  const Layout L = begin_call(ctx, in.x, 2, M, in.num_experts, "low_latency_dispatch");
  const int64_t T = in.x.size(0), H = in.x.size(1);
  if (T > M) raise(ErrorKind::kValue, "x: ", T, " tokens, more than num_max_dispatch_tokens_per_rank (", M, ")");
  expect(in.x, {T, H}, DType::kBFloat16, ctx.device, "x");
  const int64_t K = checked_topk(in.topk_idx, M, ctx.device);
  if (in.topk_idx.size(0) != T)
    raise(ErrorKind::kValue, "topk_idx: expected ", T, " rows (one per token of x), got ", in.topk_idx.size(0));
  if (in.use_ue8m0 && !in.round_scale) raise(ErrorKind::kValue, "use_ue8m0: needs round_scale=True");
  if (in.use_ue8m0 && !in.use_fp8) raise(ErrorKind::kValue, "use_ue8m0: needs use_fp8=True");
  if (in.use_ue8m0 && L.num_scales % kUe8m0PerInt != 0)
    raise(ErrorKind::kValue, "x: use_ue8m0 needs a hidden size that is a multiple of ", kScaleBlock * kUe8m0PerInt,
          ", got ", H);
  const int E_local = L.num_local_experts, RM = R * M;
  expect(out.recv_x, {E_local, RM, H}, in.use_fp8 ? DType::kFloat8E4M3 : DType::kBFloat16, ctx.device, "recv_x");
  int64_t scale_bytes = 0;
  if (in.use_fp8) {
    const int64_t columns = in.use_ue8m0 ? L.num_scales / kUe8m0PerInt : L.num_scales;
    expect_column_major(out.recv_x_scales, {E_local, RM, columns}, in.use_ue8m0 ? DType::kInt32 : DType::kFloat32,
                        ctx.device, "recv_x_scales");
    scale_bytes = E_local * RM * columns * 4;
  }
  expect(out.recv_count, {E_local}, DType::kInt32, ctx.device, "recv_count");
  expect(out.src_info, {E_local, RM}, DType::kInt32, ctx.device, "src_info");
  expect(out.layout_range, {E_local, R}, DType::kInt64, ctx.device, "layout_range");
  expect(out.state, {2}, DType::kInt64, ctx.device, "state");
  if (in.cumulative_local_expert_recv_stats.defined())
    expect(in.cumulative_local_expert_recv_stats, {E_local}, DType::kInt32, ctx.device,
           "cumulative_local_expert_recv_stats");
  if (in.dispatch_wait_recv_cost_stats.defined())
    expect(in.dispatch_wait_recv_cost_stats, {R}, DType::kInt64, ctx.device, "dispatch_wait_recv_cost_stats");
  const int blocks = launch_blocks(ctx, blocks_per_sm(ctx, dispatch_blocks_per_sm));
  host_stamps::mark("ll_dispatch.checks");

  const cudaStream_t stream = ctx.begin_op_on_caller(order);
  host_stamps::mark("ll_dispatch.begin_op");
  DispatchArgs a{};
  a.x = in.x.data;
  a.topk_idx = static_cast<const int64_t*>(in.topk_idx.data);
  a.num_tokens = static_cast<int>(T);
  a.num_topk = static_cast<int>(K);
  a.fp8 = in.use_fp8;
  a.round_scale = in.round_scale;
  a.ue8m0 = in.use_ue8m0;
  a.recv_x = out.recv_x.data;
  a.recv_scales = out.recv_x_scales.data;
  a.recv_count = static_cast<int*>(out.recv_count.data);
  a.src_info = static_cast<int*>(out.src_info.data);
  a.layout_range = static_cast<long long*>(out.layout_range.data);
  a.cumulative_recv_stats = static_cast<int*>(in.cumulative_local_expert_recv_stats.data);
  a.wait_recv_cost_stats = static_cast<long long*>(in.dispatch_wait_recv_cost_stats.data);
  a.state = static_cast<long long*>(out.state.data);
  fill_call(a, ctx, L, phase);
  // The put path stages in the send area that is not the next combine's zero-copy buffer, which
  // the user may be filling while this dispatch runs (two micro-batches: dispatch A, fill A's
  // buffer, dispatch B, combine A).
  a.put.staging_area = static_cast<int>((ctx.low_latency_combines + 1) & 1);
  a.poison = poison_list({{&out.recv_x, E_local * RM * H * (in.use_fp8 ? 1 : 2)},
                          {&out.recv_x_scales, scale_bytes},
                          {&out.recv_count, E_local * 4LL},
                          {&out.src_info, E_local * RM * 4LL},
                          {&out.layout_range, E_local * R * 8LL}});
  host_stamps::mark("ll_dispatch.args");
  if (ctx.low_latency_puts)
    window::nvshmem_low_latency_dispatch(a, blocks, stream);
  else
    launch_dispatch(a, blocks, stream);
  host_stamps::mark("ll_dispatch.launch");
  EventHandle done = ctx.end_op_on_caller(order);
  host_stamps::mark("ll_dispatch.end_op");
  // After a send phase the caller still owes the receive phase, which keeps the ranks' calls in
  // step: the receive's end raises.
  if (phase != LowLatencyPhase::kSend) ctx.raise_at_end(order.compute_stream);
  host_stamps::mark("ll_dispatch.raise_at_end");
  return done;
}

EventHandle combine(Context& ctx, const LowLatencyCombineInputs& in, const LowLatencyCombineOutputs& out,
                    LowLatencyPhase phase, const StreamOrder& order) {
  host_stamps::begin();
  const int R = ctx.topo.num_ranks, M = in.num_max_dispatch_tokens_per_rank;
  const Layout L = begin_call(ctx, in.x, 3, M, in.num_experts, "low_latency_combine");
  const int64_t H = in.x.size(2);
  const int E_local = L.num_local_experts, RM = R * M;
  expect(in.x, {E_local, RM, H}, DType::kBFloat16, ctx.device, "x");
  const int64_t K = checked_topk(in.topk_idx, M, ctx.device), T = in.topk_idx.size(0);
  expect(in.topk_weights, {T, K}, DType::kFloat32, ctx.device, "topk_weights");
  expect(in.src_info, {E_local, RM}, DType::kInt32, ctx.device, "handle src_info");
  expect(in.layout_range, {E_local, R}, DType::kInt64, ctx.device, "handle layout_range");
  if (in.dispatch_state.defined()) expect(in.dispatch_state, {2}, DType::kInt64, ctx.device, "handle state");
  expect(out.combined_x, {T, H}, DType::kBFloat16, ctx.device, "out");
  expect(out.state, {2}, DType::kInt64, ctx.device, "state");
  if (in.combine_wait_recv_cost_stats.defined())
    expect(in.combine_wait_recv_cost_stats, {R}, DType::kInt64, ctx.device, "combine_wait_recv_cost_stats");
  // Zero-copy: x is the send area of either parity (get_next_low_latency_combine_buffer). The put
  // path then puts its rows from where they are; otherwise it stages them in this call's send area.
  const char* x_begin = static_cast<const char*>(in.x.data);
  const int64_t x_bytes = E_local * RM * H * 2;
  bool x_in_send_area = false;
  for (int which = 0; which < 2; ++which) {
    const char* area = ctx.low_latency_base() + L.send(which);
    x_in_send_area |= x_begin >= area && x_begin + x_bytes <= area + L.send_bytes;
  }
  if (ctx.low_latency_puts && x_in_send_area && in.use_logfmt)
    raise(ErrorKind::kValue, "use_logfmt: a zero-copy LogFMT combine is not supported where ranks are reached by "
          "NVSHMEM puts yet (its rows would be encoded in place, in x); pass x outside the low-latency buffer");
  const int blocks = launch_blocks(ctx, blocks_per_sm(ctx, combine_blocks_per_sm));
  host_stamps::mark("ll_combine.checks");

  const cudaStream_t stream = ctx.begin_op_on_caller(order);
  host_stamps::mark("ll_combine.begin_op");
  CombineArgs a{};
  a.x = in.x.data;
  a.src_info = static_cast<const int*>(in.src_info.data);
  a.layout_range = static_cast<const long long*>(in.layout_range.data);
  a.topk_idx = static_cast<const int64_t*>(in.topk_idx.data);
  a.topk_weights = static_cast<const float*>(in.topk_weights.data);
  a.dispatch_state = static_cast<const long long*>(in.dispatch_state.data);
  a.num_tokens = static_cast<int>(T);
  a.num_topk = static_cast<int>(K);
  a.logfmt = in.use_logfmt;
  a.combined_x = out.combined_x.data;
  a.wait_recv_cost_stats = static_cast<long long*>(in.combine_wait_recv_cost_stats.data);
  a.state = static_cast<long long*>(out.state.data);
  fill_call(a, ctx, L, phase);
  a.put.x_in_send_area = x_in_send_area;
  // A combine stages in its own zero-copy area (combine_buffer), never the next combine's.
  a.put.staging_area = static_cast<int>(ctx.low_latency_combines & 1);
  a.poison = poison_list({{&out.combined_x, T * H * 2}});
  host_stamps::mark("ll_combine.args");
  if (ctx.low_latency_puts)
    window::nvshmem_low_latency_combine(a, blocks, stream);
  else
    launch_combine(a, blocks, stream);
  host_stamps::mark("ll_combine.launch");
  if (phase != LowLatencyPhase::kReceive) ++ctx.low_latency_combines;
  EventHandle done = ctx.end_op_on_caller(order);
  host_stamps::mark("ll_combine.end_op");
  // After a send phase the caller still owes the receive phase, which keeps the ranks' calls in
  // step: the receive's end raises.
  if (phase != LowLatencyPhase::kSend) ctx.raise_at_end(order.compute_stream);
  host_stamps::mark("ll_combine.raise_at_end");
  return done;
}

void clean(Context& ctx, int max_tokens, int hidden, int num_experts) {
  ctx.require_usable("clean_low_latency_buffer");
  const Layout L = checked_layout(ctx, max_tokens, hidden, num_experts, "clean_low_latency_buffer");
  // The first barrier: no peer still runs a call that writes into this region. The second: no peer
  // starts one before the zeroing is done. A data error is raised after the second, which every
  // rank then has joined (runtime/pending_errors.hpp).
  // Across nodes the device barrier reaches this node only; NVSHMEM's host barrier the rest.
  const bool other_nodes = ctx.low_latency_symmetric && !ctx.topo.is_intranode();
  ctx.barrier(kernels::kBarrierUser, -1, false);
  // NVSHMEM's host barrier is not ordered on the comm stream: drain it first, so that this rank's
  // earlier kernels (and their puts, quieted in them) are done before any rank zeroes.
  if (other_nodes) {
    MOELINK_CUDA_CHECK(cudaStreamSynchronize(ctx.comm_stream));
    window::nvshmem_barrier_all();
  }
  // The barrier entered the comm stream (Context::queue_on), so the zeroing follows this rank's
  // low-latency kernels on whatever stream they ran.
  MOELINK_CUDA_CHECK(cudaMemsetAsync(ctx.low_latency_base(), 0, 2 * L.signal_bytes, ctx.comm_stream));
  // The put path's row counters (written by peers) and running totals (this rank's own, as a
  // sender) start again together on every rank, between the two barriers.
  if (ctx.low_latency_symmetric)
    MOELINK_CUDA_CHECK(cudaMemsetAsync(&static_cast<SymmetricHeader*>(ctx.low_latency_allocation)->put, 0,
                                       sizeof(PutSection), ctx.comm_stream));
  ctx.barrier(kernels::kBarrierUser);
  if (other_nodes) {
    MOELINK_CUDA_CHECK(cudaStreamSynchronize(ctx.comm_stream));  // the zeroing, before any rank goes on
    window::nvshmem_barrier_all();
  }
}

EventHandle mask_call(Context& ctx, int op, int rank, int value, const TensorRef* out, const StreamOrder& order) {
  static const char* const names[] = {"low_latency_update_mask_buffer", "low_latency_query_mask_buffer",
                                      "low_latency_clean_mask_buffer"};
  const char* name = names[op];
  ctx.require_usable(name);
  if (!ctx.enable_shrink) raise(ErrorKind::kState, name, ": the Buffer was not built with enable_shrink=True");
  const int R = ctx.topo.num_ranks;
  if (op == kMaskSet && (rank < 0 || rank >= R))
    raise(ErrorKind::kValue, "rank_to_mask: expected 0..", R - 1, ", got ", rank);
  if (op == kMaskSet && rank == ctx.topo.rank)
    raise(ErrorKind::kValue, "rank_to_mask: rank ", rank, " cannot mask itself");
  if (op == kMaskQuery) expect(*out, {R}, DType::kInt32, ctx.device, "mask_status");
  const cudaStream_t stream = ctx.begin_op_on_caller(order);
  launch_mask(static_cast<MaskOp>(op), ctx.low_latency_header(), rank, value,
              out != nullptr ? static_cast<int*>(out->data) : nullptr, R, stream);
  return ctx.end_op_on_caller(order);
}

void* combine_buffer(const Context& ctx, int max_tokens, int hidden, int num_experts, int which) {
  const Layout L = checked_layout(ctx, max_tokens, hidden, num_experts, "get_next_low_latency_combine_buffer");
  // With the symmetric region the staging areas of the put path follow the combines this rank has
  // launched (host.cpp's count, which also counts a combine that raised at its end); the IPC path
  // keeps the caller's count.
  const int area = ctx.low_latency_symmetric ? static_cast<int>(ctx.low_latency_combines & 1) : (which & 1);
  return ctx.low_latency_base() + L.send(area);
}

}  // namespace moelink::low_latency
