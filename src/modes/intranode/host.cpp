// Host side of intranode dispatch and combine: argument checks, buffer-size checks, launches, and
// the host wait on the notify mailbox.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <chrono>
#include <thread>
#include <utility>

#include "modes/intranode/host.hpp"
#include "runtime/host_stamps.hpp"

#include "common/poison.hpp"
#include "modes/intranode/contract.hpp"
#include "runtime/context.hpp"
#include "runtime/errors.hpp"
#include "runtime/knobs.hpp"
#include "runtime/wait_steps.hpp"

namespace moelink::intranode {

using detail::raise;
using kernels::poison_list;
using runtime::Context;

namespace {

const runtime::WaitStepRegistration wait_steps{
    {kStepNotify, "dispatch notify"},
    {kStepDispatchSend, "dispatch (sender waiting for ring space at"},
    {kStepDispatchRecv, "dispatch (receiver waiting for rows from"},
    {kStepDispatchTarget, "dispatch (sender waiting for the output addresses of"},
    {kStepCombineSource, "combine (receiver waiting for the input address of"},
    {kStepCombinePull, "combine (waiting for the reads of its input by"},
    {kStepDispatchOpened, "dispatch (receiver waiting for the mapped segments of"},
    {kStepCombineSegments, "combine (waiting for the mapped segments of"},
    {kStepCombineSend, "combine (sender waiting for ring space at"},
    {kStepCombineRecv, "combine (receiver waiting for rows from"},
};

int blocks_per_sm(const Context& ctx);

// Whether the kernels run the put path (FakePuts or Puts), whose ring layout the host must size and
// hand them: its tails and mirrors are not where the stores path has rings.
bool put_path(const Context& ctx) { return ctx.window_policy() != window::Policy::kStores; }

struct DispatchShape {
  int64_t num_tokens = 0, hidden = 0, row_bytes = 0;
  int num_topk = 0, num_scales = 0, num_channels = 0, num_experts = 0;
  bool fp8 = false;
  DType scales_dtype = DType::kFloat32;  // or kInt32: packed UE8M0 exponents (moved as opaque 4-byte words)
};

void expect(const TensorRef& t, const std::vector<int64_t>& shape, DType dtype, int device, const char* arg,
            bool contiguous = true) {
  check::defined(t, arg);
  check::dtype(t, dtype, arg);
  check::shape(t, shape, arg);
  if (contiguous) check::contiguous(t, arg);
  check::on_device(t, device, arg);
}

void expect_scales_layout(const TensorRef& t, const char* arg) {
  // Row-major [T, S] or column-major (the transpose of a contiguous [S, T]).
  const bool row_major = t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) == t.size(1));
  const bool col_major = t.stride(0) == 1 && (t.size(1) <= 1 || t.stride(1) == t.size(0));
  if (!row_major && !col_major)
    raise(ErrorKind::kValue, arg, ": expected a row-major or column-major [tokens, scales] tensor, got strides (",
          t.stride(0), ", ", t.stride(1), ")");
}

// The checks of an operation's arguments. When they reject them this rank still opens the
// operation, with that verdict, so that its peers skip it instead of waiting for it to time out.
template <class Checks>
auto checked(Context& ctx, Checks&& checks) {
  try {
    return checks();
  } catch (const Error& e) {
    if (e.kind() == ErrorKind::kValue || e.kind() == ErrorKind::kType) ctx.abstain();
    throw;
  }
}

// A notify step may have no handle yet (h == nullptr): its tensors are the dispatch step's outputs.
DispatchShape validate_dispatch(Context& ctx, const DispatchInputs& in, const DispatchHandle* h, const Config& config,
                                bool cached, bool notify_step, const char* op) {
  if (!ctx.topo.is_intranode())
    raise(ErrorKind::kState, op, ": internode normal mode is not implemented yet (num_rdma_ranks = ", ctx.topo.num_rdma_ranks, ")");
  config.validate();
  ctx.require_coresident(config.num_sms, blocks_per_sm(ctx), "config");
  const int R = ctx.topo.num_ranks;
  DispatchShape s;
  s.num_channels = config.num_channels();
  check::defined(in.x, "x");
  check::dim(in.x, 2, "x");
  check::contiguous(in.x, "x");
  check::on_device(in.x, ctx.device, "x");
  s.fp8 = in.x.dtype == DType::kFloat8E4M3;
  if (!s.fp8 && in.x.dtype != DType::kBFloat16)
    raise(ErrorKind::kType, "x: expected bfloat16 or (float8_e4m3fn, float32 or packed UE8M0 int32 scales), got ",
          dtype_name(in.x.dtype));
  s.num_tokens = in.x.size(0);
  s.hidden = in.x.size(1);
  s.row_bytes = s.hidden * dtype_size(in.x.dtype);
  if (s.hidden <= 0 || s.row_bytes % 16 != 0)
    raise(ErrorKind::kValue, "x: the row size (hidden * element size = ", s.row_bytes, " bytes) must be a positive multiple of 16");
  if (s.fp8) {
    check::defined(in.x_scales, "x_scales");
    if (in.x_scales.dtype != DType::kFloat32 && in.x_scales.dtype != DType::kInt32)
      raise(ErrorKind::kType, "x_scales: expected float32 (one scale per 128 values) or int32 (packed UE8M0, four "
            "exponent bytes per int), got ", dtype_name(in.x_scales.dtype));
    s.scales_dtype = in.x_scales.dtype;
    check::dim(in.x_scales, 2, "x_scales");
    if (in.x_scales.size(0) != s.num_tokens)
      raise(ErrorKind::kValue, "x_scales: expected ", s.num_tokens, " rows (one per token of x), got ", in.x_scales.size(0));
    check::on_device(in.x_scales, ctx.device, "x_scales");
    expect_scales_layout(in.x_scales, "x_scales");
    s.num_scales = static_cast<int>(in.x_scales.size(1));
    // One scale per 128-wide block of each row, what fp8 grouped GEMMs produce and read: float32,
    // or UE8M0 exponents packed four to an int32 (the last int padded).
    if (s.hidden % 128 != 0)
      raise(ErrorKind::kValue, "x: an fp8 x needs a hidden size that is a multiple of 128 (one scale per 128 values), got ",
            s.hidden);
    const bool packed = s.scales_dtype == DType::kInt32;
    const int64_t want = packed ? (s.hidden / 128 + 3) / 4 : s.hidden / 128;
    if (s.num_scales != want)
      raise(ErrorKind::kValue, "x_scales: expected ", packed ? "ceil(hidden / 512) = " : "hidden / 128 = ", want,
            packed ? " packed UE8M0 ints" : " scales", " per token, got ", s.num_scales);
  } else if (in.x_scales.data) {
    raise(ErrorKind::kValue, "x_scales: only fp8 x carries scales");
  }
  expect(in.is_token_in_rank, {s.num_tokens, R}, DType::kBool, ctx.device, "is_token_in_rank");
  if (h != nullptr) {
    expect(h->rank_prefix_matrix, {R, R}, DType::kInt32, ctx.device, "rank_prefix_matrix");
    if (cached && h->channel_prefix_matrix.defined() && h->channel_prefix_matrix.dim() == 2 &&
        h->channel_prefix_matrix.size(1) != s.num_channels)
      raise(ErrorKind::kValue, "config: num_sms = ", config.num_sms, " gives ", s.num_channels,
            " channels, but the handle was made with ", h->channel_prefix_matrix.size(1),
            " (num_sms = ", 2 * h->channel_prefix_matrix.size(1), "); use the same num_sms as the dispatch that made it");
    expect(h->channel_prefix_matrix, {R, s.num_channels}, DType::kInt32, ctx.device, "channel_prefix_matrix");
    expect(h->recv_channel_prefix_matrix, {R, s.num_channels}, DType::kInt32, ctx.device, "recv_channel_prefix_matrix");
  }
  if (!cached) {
    // The notify step gets the layout counts; the dispatch step after it only gets num_experts.
    if (notify_step) {
      expect(in.num_tokens_per_rank, {R}, DType::kInt32, ctx.device, "num_tokens_per_rank");
      check::defined(in.num_tokens_per_expert, "num_tokens_per_expert");
      check::dim(in.num_tokens_per_expert, 1, "num_tokens_per_expert");
      s.num_experts = static_cast<int>(in.num_tokens_per_expert.size(0));
    } else {
      s.num_experts = in.num_experts;
    }
    if (s.num_experts <= 0 || s.num_experts % R != 0 || s.num_experts / R > kernels::kMaxLocalExperts)
      raise(ErrorKind::kValue, "num_tokens_per_expert: expected a positive multiple of num_ranks (", R, ") with at most ",
            kernels::kMaxLocalExperts, " experts per rank, got ", s.num_experts);
    if (notify_step) expect(in.num_tokens_per_expert, {s.num_experts}, DType::kInt32, ctx.device, "num_tokens_per_expert");
    // Without topk_idx rows are routed by is_token_in_rank alone and carry no expert ids.
    if (in.topk_idx.defined()) {
      check::dtype(in.topk_idx, DType::kInt64, "topk_idx");
      check::dim(in.topk_idx, 2, "topk_idx");
      s.num_topk = static_cast<int>(in.topk_idx.size(1));
      if (s.num_topk < 1 || s.num_topk > kernels::kMaxTopK)
        raise(ErrorKind::kValue, "topk_idx: expected 1..", kernels::kMaxTopK, " columns, got ", s.num_topk);
      expect(in.topk_idx, {s.num_tokens, s.num_topk}, DType::kInt64, ctx.device, "topk_idx");
      if (in.topk_weights.data || in.topk_weights.dim() > 0)
        expect(in.topk_weights, {s.num_tokens, s.num_topk}, DType::kFloat32, ctx.device, "topk_weights");
    } else if (in.topk_weights.defined()) {
      raise(ErrorKind::kValue, "topk_weights: given without topk_idx");
    }
    if (in.expert_alignment < 1) raise(ErrorKind::kValue, "expert_alignment: expected >= 1, got ", in.expert_alignment);
    if (in.num_worst_tokens < 0) raise(ErrorKind::kValue, "num_worst_tokens: expected >= 0, got ", in.num_worst_tokens);
  }
  const bool mirrors = put_path(ctx);
  const auto layout = RingLayout::make(R, s.num_channels, config.num_max_nvl_chunked_recv_tokens, s.row_bytes,
                                                s.num_scales, s.num_topk, mirrors);
  if (layout.total_bytes(mirrors) > ctx.num_nvl_bytes)
    raise(ErrorKind::kValue, "num_nvl_bytes: this ", op, " needs ", layout.total_bytes(mirrors), " bytes of NVLink buffer (",
          R, " ranks, ", s.num_channels, " channels, ", config.num_max_nvl_chunked_recv_tokens, " ring slots, ",
          s.row_bytes, "-byte rows", mirrors ? ", and a mirror of every ring for the put path" : "",
          ") but the Buffer has ", ctx.num_nvl_bytes, "; size it with Config.get_nvl_buffer_size_hint");
  return s;
}

// Where peers find one of our tensors: its offset in our receive arena, or (with `segments`) its
// offset in a segment we export, whose key and handle go to `key` and `offer`; false when neither.
bool place_for_peers(Context& ctx, bool segments, const TensorRef& ref, int64_t bytes, long long& offset,
                     unsigned long long& key, SegmentOffer& offer) {
  offset = ctx.offset_in_arena(ref, bytes);
  if (offset >= 0 || !segments) return offset >= 0;
  const window::SegmentExports::Export e = ctx.segment_exports.find(ref.data, bytes, ctx.device);
  if (e.key == 0) return false;
  offset = e.offset;
  key = e.key;
  offer.key = e.key;
  offer.bytes = e.bytes;
  offer.handle = e.handle;
  return true;
}

// Peers may write this dispatch's rows straight into our outputs when every output the kernel
// writes lives in our receive arena or in a segment we can export (the kernel then also needs every
// sender to have that segment mapped); otherwise the rows come through the rings. A captured
// dispatch names no segment: its replays would outlive the senders' mappings.
DirectTarget direct_target(Context& ctx, const DispatchOutputs& out, const DispatchHandle& h, const DispatchShape& s,
                           int64_t num_rows, bool cached, bool segments, SegmentOffer (&offers)[kNumTargetFields]) {
  DirectTarget t{};
  t.x = t.scales = t.topk_idx = t.topk_weights = t.src_idx = -1;
  t.num_rows = static_cast<int>(num_rows);
  if (num_rows == 0) return t;  // nothing to receive: the rings' bookkeeping is already trivial
  if (ctx.ring_only) return t;  // the internode lane: a receiver on another node cannot be written to
  bool direct = true;
  const auto place = [&](TargetField f, const TensorRef& ref, int64_t bytes, long long& offset) {
    direct &= place_for_peers(ctx, segments, ref, bytes, offset, t.key[f], offers[f]);
  };
  place(kFieldX, out.recv_x, num_rows * s.row_bytes, t.x);
  if (s.fp8) {
    place(kFieldScales, out.recv_x_scales, num_rows * s.num_scales * 4, t.scales);
    t.scales_stride_token = out.recv_x_scales.stride(0);
    t.scales_stride_scale = out.recv_x_scales.stride(1);
  }
  if (!cached) {
    place(kFieldSrcIdx, h.recv_src_idx, num_rows * 4, t.src_idx);
    if (s.num_topk > 0) place(kFieldTopkIdx, out.recv_topk_idx, num_rows * s.num_topk * 8, t.topk_idx);
    if (out.recv_topk_weights.data) place(kFieldTopkWeights, out.recv_topk_weights, num_rows * s.num_topk * 4, t.topk_weights);
  }
  if (!direct) {
    // The segments are still named (their handles published), so the senders map them for the
    // next dispatch; but this one takes the rings.
    t.x = t.scales = t.topk_idx = t.topk_weights = t.src_idx = -1;
  }
  t.direct = direct ? 1 : 0;
  return t;
}

// Whether this dispatch or combine may name and use peer segments: not while either stream is being captured
// (a replay would outlive the mappings, and the opens and drains it may do would end the capture).
bool segments_allowed(const Context& ctx, const StreamOrder& order) {
  return ctx.peer_segments_enabled && !ctx.ring_only && ctx.topo.num_nvl_ranks > 1 && !ctx.comm_stream_capturing() &&
         !Context::stream_capturing(order.compute_stream);
}

// One peer's SegmentNews (a seqlock, contract.hpp), into this rank's table of mapped segments; a
// combine's two fields are noted as a dispatch's with the others zero. False when it was being
// rewritten (the next operation takes it).
template <int kFields>
void take_news(Context& ctx, int d, SegmentNewsOf<kFields>* news, Epoch& seen) {
  static_assert(kFields <= kNumTargetFields, "PeerSegments::note takes at most a dispatch's fields");
  if (news->busy) return;
  const Epoch seq = news->seq;
  if (seq == seen) return;
  std::atomic_thread_fence(std::memory_order_acquire);
  unsigned long long keys[kNumTargetFields] = {};
  int unmapped[kNumTargetFields] = {};
  long long bytes[kNumTargetFields] = {};
  cudaIpcMemHandle_t handles[kNumTargetFields] = {};
  for (int f = 0; f < kFields; ++f) {
    keys[f] = reinterpret_cast<volatile unsigned long long*>(news->key)[f];
    unmapped[f] = reinterpret_cast<volatile int*>(news->unmapped)[f];
    bytes[f] = reinterpret_cast<volatile long long*>(news->bytes)[f];
    std::memcpy(&handles[f], const_cast<const cudaIpcMemHandle_t*>(&news->handle[f]), sizeof(cudaIpcMemHandle_t));
  }
  std::atomic_thread_fence(std::memory_order_acquire);
  if (news->busy || news->seq != seq) return;  // rewritten meanwhile: the next operation takes it
  seen = seq;
  ctx.peer_segments->note(d, keys, unmapped, handles, bytes);
}

// What the last dispatch and combine kernels saw each peer name (MailboxSection::segment_news and
// combine_segment_news), into this rank's one table of mapped segments, before a dispatch or a
// combine passes that table to its kernel.
void take_segment_news(Context& ctx) {
  if (!ctx.peer_segments) {
    const auto drained = [](void* c) {
      auto* context = static_cast<Context*>(c);
      return context->drain(context->host_wait_limit_s(), true);
    };
    ctx.peer_segments = std::make_unique<window::PeerSegments>(window::ipc_segment_mapper(ctx.comm_stream, drained, &ctx),
                                                               ctx.segment_limits, &ctx.header()->intranode.segment_table);
  }
  for (int d = 0; d < ctx.topo.num_nvl_ranks; ++d) {
    if (d == ctx.topo.nvl_rank) continue;
    take_news(ctx, d, &ctx.mailbox->intranode.segment_news[d], ctx.segment_news_seen[d]);
    take_news(ctx, d, &ctx.mailbox->intranode.combine_segment_news[d], ctx.combine_segment_news_seen[d]);
  }
  // One mark for every peer's drops; closes whose marks have passed, when a close (which waits for
  // the whole device) would not hold this call behind the caller's queued work: both streams were
  // idle when the operation began (its own opening is queued by now).
  ctx.peer_segments->retire(ctx.idle_at_begin);
}

// Peers read our rows in place when the input (and its weights) live in our receive arena, or in
// segments we can export that every peer has mapped (the kernel decides that); otherwise we push
// them through the rings. With no key named (arena, or segments not allowed) this is the arena-only
// choice as before. A captured combine names no segment.
CombineSource combine_source(Context& ctx, const CombineInputs& in, int64_t N, int64_t H, int K, bool segments,
                             SegmentOffer (&offers)[kNumSourceFields]) {
  CombineSource source{};
  // The internode lane pushes: a token owner on another node cannot read this rank's input.
  bool placed = N > 0 && !ctx.ring_only;
  const auto place = [&](SourceField f, const TensorRef& ref, int64_t bytes, long long& offset) {
    placed &= place_for_peers(ctx, segments && N > 0, ref, bytes, offset, source.key[f], offers[f]);
  };
  place(kSourceX, in.x, N * H * 2, source.x);
  source.weights = -1;
  if (K) place(kSourceWeights, in.topk_weights, N * K * 4, source.weights);
  if (!placed) {
    // Named segments stay named (their handles published), so the owners map them for a later
    // combine; but this one pushes, exactly as before.
    source.x = ctx.offset_in_arena(in.x, N * H * 2);
    source.weights = K ? ctx.offset_in_arena(in.topk_weights, N * K * 4) : -1;
  }
  source.pull = placed ? 1 : 0;
  return source;
}

// An operation whose kernel opens it owes its peers that opening from its begin_op on: should the
// host raise before the launch, the rank abstains instead, so that the peers skip the operation
// rather than wait for it until the timeout.
class OpeningOwed {
 public:
  OpeningOwed(Context& ctx, bool owed) : ctx_(ctx), owed_(owed) {}
  OpeningOwed(const OpeningOwed&) = delete;
  OpeningOwed& operator=(const OpeningOwed&) = delete;
  ~OpeningOwed() {
    if (owed_) ctx_.abstain();
  }
  void paid() { owed_ = false; }

 private:
  Context& ctx_;
  bool owed_;
};

void fill_peers(const Context& ctx, kernels::PeerTable& peers, HeaderSection** sections) {
  peers = ctx.peers;
  for (int p = 0; p < ctx.topo.num_nvl_ranks; ++p) sections[p] = &ctx.peer_header(p)->intranode;
}

const long long* handle_info(const DispatchHandle& h, int device) {
  expect(h.info, {2}, DType::kInt64, device, "handle[5] (the handle's dispatch id and status)");
  return static_cast<const long long*>(h.info.data);
}

// An NVSHMEM lane runs the plugin's builds, whose count the lane took when it joined.
int blocks_per_sm(const Context& ctx) {
  static const int blocks = std::min(dispatch_blocks_per_sm(), combine_blocks_per_sm());
  return ctx.lane_puts ? ctx.lane_blocks_per_sm : blocks;
}

}  // namespace

int max_num_sms(const Context& ctx, int ranks_per_gpu) {
  if (ranks_per_gpu <= 0) return ctx.max_num_sms(blocks_per_sm(ctx));
  const int fit = ctx.sm_count * blocks_per_sm(ctx) / ranks_per_gpu;
  return fit - fit % 2;
}

void notify_launch(Context& ctx, const DispatchInputs& in, const Config& config, const StreamOrder& order,
                   const DispatchHandle* h) {
  host_stamps::begin();
  ctx.notify_in_flight = {};  // a call that raises before its launch leaves nothing to wait for
  ctx.require_usable("dispatch");
  ctx.check_on_entry(true);
  host_stamps::mark("notify.check_on_entry");
  const DispatchShape s = checked(ctx, [&] {
    DispatchShape shape = validate_dispatch(ctx, in, h, config, false, true, "dispatch");
    host_stamps::mark("notify.validate");
    if (h != nullptr) handle_info(*h, ctx.device);
    ctx.begin_op(order);
    host_stamps::mark("notify.begin_op");
    return shape;
  });
  const int R = ctx.topo.num_ranks;
  NotifyArgs a{};
  a.is_token_in_rank = static_cast<const bool*>(in.is_token_in_rank.data);
  a.num_tokens_per_expert = static_cast<const int*>(in.num_tokens_per_expert.data);
  a.topk_idx = static_cast<const int64_t*>(in.topk_idx.data);
  a.num_tokens = static_cast<int>(s.num_tokens);
  a.num_topk = s.num_topk;
  a.num_experts = s.num_experts;
  a.num_ranks = R;
  a.num_channels = s.num_channels;
  a.num_local_experts = s.num_experts / R;
  a.expert_alignment = in.expert_alignment;
  a.num_worst_tokens = in.num_worst_tokens;
  a.results = &ctx.header()->intranode.notify_results;
  a.mailbox = &ctx.mailbox_dev->intranode;
  a.ready_seq = &ctx.mailbox_dev->ready_seq;
  a.seq = ++ctx.notify_seq;
  a.opening.digest = runtime::make_digest(kernels::kOpDispatch, s.num_channels, config.num_max_nvl_chunked_recv_tokens,
                                          config.num_max_nvl_chunked_send_tokens, s.hidden, in.x.dtype, s.num_topk,
                                          s.num_scales, s.num_experts, s.scales_dtype);
  fill_peers(ctx, a.peers, a.sections);
  a.err = ctx.error_sink();
  volatile int* ready = &ctx.mailbox->ready_seq;
  *ready = 0;
  host_stamps::mark("notify.args");
  launch_notify(a, ctx.window_policy(), ctx.comm_stream);
  host_stamps::mark("notify.launch");
  ctx.notify_in_flight = {a.seq, in.num_worst_tokens, a.num_local_experts, order.compute_stream,
                          order.previous_event ? order.previous_event->get() : nullptr};
}

DispatchPlan notify_wait(Context& ctx) {
  host_stamps::begin();
  const Context::NotifyInFlight n = std::exchange(ctx.notify_in_flight, {});
  if (n.seq == 0)
    raise(ErrorKind::kState, "intranode_notify_wait: no notify to wait for (intranode_notify_launch launches one, which is "
          "waited for once)");
  ctx.require_usable("dispatch");
  DispatchPlan plan;
  if (n.num_worst_tokens > 0) {
    plan.num_recv_tokens = n.num_worst_tokens;
    ctx.notify_join = {n.seq, n.compute_stream, n.previous_event};
    return plan;
  }
  // Poll the host-mapped mailbox rather than synchronising the stream: the host only waits for the
  // counts, never for unrelated work queued behind them. The device side bounds its own waits; the
  // host adds a margin in case the kernel cannot even start, short enough that the caller hears of
  // it well within timeout + 5 s.
  volatile int* ready = &ctx.mailbox->ready_seq;
  const auto start = std::chrono::steady_clock::now();
  const auto limit = std::chrono::duration<double>(ctx.host_wait_limit_s());
  for (uint64_t spins = 0; *ready != n.seq; ++spins) {
    // Faults only: a data error seen while waiting may be an earlier operation's, which is raised at
    // the end of this dispatch, after its launch (runtime/pending_errors.hpp).
    ctx.check_faults();
    if (spins > 1024) std::this_thread::yield();
    if ((spins & 1023) == 0 && std::chrono::steady_clock::now() - start > limit)
      ctx.fail_host_wait(detail::str("moelink: rank ", ctx.topo.rank, " timed out after ", ctx.host_wait_limit_s(),
                                     " s waiting for dispatch notify to run on the GPU (is the comm stream blocked by "
                                     "previous_event?)"),
                         kStepNotify);
  }
  std::atomic_thread_fence(std::memory_order_acquire);
  host_stamps::mark("notify_wait.spin");
  ctx.check_faults();
  // Every rank reaches the same verdict, so every rank raises here and none launches the dispatch
  // kernel. The record names this dispatch's error, or an earlier one whose record (its claim not
  // given back yet) kept this one's out; the message then counts this one among those not recorded.
  if (ctx.mailbox->intranode.skipped != 0) {
    ctx.raise_data_error();
    raise(ErrorKind::kValue, "rank ", ctx.topo.rank, ": every rank skipped this dispatch, but no error record was "
          "left to say why; no rank ran it");
  }
  plan.num_recv_tokens = ctx.mailbox->intranode.num_recv_tokens;
  plan.num_recv_tokens_per_expert.assign(ctx.mailbox->intranode.num_recv_tokens_per_expert,
                                         ctx.mailbox->intranode.num_recv_tokens_per_expert + n.num_local_experts);
  ctx.notify_join = {n.seq, n.compute_stream, n.previous_event};
  host_stamps::mark("notify_wait.rest");
  return plan;
}

DispatchPlan notify(Context& ctx, const DispatchInputs& in, const DispatchHandle& h, const Config& config,
                    const StreamOrder& order) {
  notify_launch(ctx, in, config, order, &h);
  return notify_wait(ctx);
}

EventHandle dispatch(Context& ctx, const DispatchInputs& in, const DispatchHandle& h, const DispatchOutputs& out,
                     const Config& config, const StreamOrder& order, bool cached) {
  host_stamps::begin();
  // Taken first, so that a call raising before its launch does not leave it for a later one.
  const bool halt_sends = std::exchange(ctx.halt_next_sends, false);
  ctx.require_usable("dispatch");
  // An uncached dispatch was opened by its notify (whose wait raised what it found); a cached one
  // opens here.
  if (cached) ctx.check_on_entry(true);
  const auto checks = [&] { return validate_dispatch(ctx, in, &h, config, cached, false, "dispatch"); };
  const DispatchShape s = cached ? checked(ctx, checks) : checks();
  const int R = ctx.topo.num_ranks;
  check::defined(out.recv_x, "recv_x");
  check::dim(out.recv_x, 2, "recv_x");
  const int64_t N = out.recv_x.size(0);
  expect(out.recv_x, {N, s.hidden}, in.x.dtype, ctx.device, "recv_x");
  expect(h.recv_src_idx, {N}, DType::kInt32, ctx.device, "recv_src_idx");
  if (!cached) {
    // The kernel fills the handle's info (and its matrices, checked with the inputs).
    handle_info(h, ctx.device);
    // A dispatch without topk_idx (routed by is_token_in_rank alone) has no recv_topk_idx.
    if (s.num_topk > 0) expect(out.recv_topk_idx, {N, s.num_topk}, DType::kInt64, ctx.device, "recv_topk_idx");
    if (in.topk_weights.data) expect(out.recv_topk_weights, {N, s.num_topk}, DType::kFloat32, ctx.device, "recv_topk_weights");
  }
  if (s.fp8) {
    check::defined(out.recv_x_scales, "recv_x_scales");
    expect(out.recv_x_scales, {N, s.num_scales}, s.scales_dtype, ctx.device, "recv_x_scales", false);
    expect_scales_layout(out.recv_x_scales, "recv_x_scales");
  }
  const long long* info = cached ? checked(ctx, [&] { return handle_info(h, ctx.device); }) : nullptr;
  host_stamps::mark(cached ? "dispatch_cached.validate" : "dispatch.validate");

  if (cached)
    ctx.begin_op(order);
  else
    ctx.begin_dispatch_after_notify(order, ctx.notify_seq);
  host_stamps::mark(cached ? "dispatch_cached.begin" : "dispatch.begin");
  DispatchArgs a{};
  // A cached dispatch has no notify, whose opening barrier is what keeps this operation's first
  // ring write behind every peer's reset of the previous one (and checks that all ranks agree):
  // its kernel opens it.
  OpeningOwed owed(ctx, cached);
  if (cached) {
    a.opening.digest = runtime::make_digest(kernels::kOpCachedDispatch, s.num_channels,
                                            config.num_max_nvl_chunked_recv_tokens,
                                            config.num_max_nvl_chunked_send_tokens, s.hidden, in.x.dtype, 0,
                                            s.num_scales, 0, s.scales_dtype);
    a.opening.handle_info = info;
    a.opens = true;
  }
  a.x = in.x.data;
  if (s.fp8) {
    a.x_scales = static_cast<const float*>(in.x_scales.data);
    a.x_scales_stride_token = in.x_scales.stride(0);
    a.x_scales_stride_scale = in.x_scales.stride(1);
    a.recv_x_scales = static_cast<float*>(out.recv_x_scales.data);
    a.recv_scales_stride_token = out.recv_x_scales.stride(0);
    a.recv_scales_stride_scale = out.recv_x_scales.stride(1);
  }
  a.topk_idx = cached ? nullptr : static_cast<const int64_t*>(in.topk_idx.data);
  a.topk_weights = cached ? nullptr : static_cast<const float*>(in.topk_weights.data);
  a.is_token_in_rank = static_cast<const bool*>(in.is_token_in_rank.data);
  if (cached) {
    a.rank_prefix_matrix = static_cast<const int*>(h.rank_prefix_matrix.data);
    a.channel_prefix_matrix = static_cast<const int*>(h.channel_prefix_matrix.data);
    a.recv_channel_prefix_matrix = static_cast<const int*>(h.recv_channel_prefix_matrix.data);
  } else {
    const NotifyResults* results = &ctx.header()->intranode.notify_results;
    a.rank_prefix_matrix = results->rank_prefix_matrix;
    a.channel_prefix_matrix = results->channel_prefix_matrix;
    a.recv_channel_prefix_matrix = results->recv_channel_prefix_matrix;
    a.handle_copy.from = results;
    a.handle_copy.rank_prefix_matrix = static_cast<int*>(h.rank_prefix_matrix.data);
    a.handle_copy.channel_prefix_matrix = static_cast<int*>(h.channel_prefix_matrix.data);
    a.handle_copy.recv_channel_prefix_matrix = static_cast<int*>(h.recv_channel_prefix_matrix.data);
    a.handle_copy.info = static_cast<long long*>(h.info.data);
  }
  a.num_tokens = static_cast<int>(s.num_tokens);
  a.num_experts = s.num_experts;
  a.num_local_experts = cached ? 0 : s.num_experts / R;
  a.recv_x = out.recv_x.data;
  a.recv_topk_idx = cached ? nullptr : static_cast<int64_t*>(out.recv_topk_idx.data);
  a.recv_topk_weights = cached ? nullptr : static_cast<float*>(out.recv_topk_weights.data);
  a.recv_src_idx = static_cast<int*>(h.recv_src_idx.data);
  a.write_src_idx = !cached;
  a.num_out_rows = static_cast<int>(N);
  a.layout = RingLayout::make(R, s.num_channels, config.num_max_nvl_chunked_recv_tokens, s.row_bytes,
                                       s.num_scales, s.num_topk, put_path(ctx));
  a.chunk = config.num_max_nvl_chunked_send_tokens;
  a.l2_hints = knobs::l2_hints();
  a.l2_discard = knobs::l2_discard();
  a.prefetch = knobs::prefetch();
  // Read at every dispatch (bench/interleaved.py switches it), where the other knobs are read: a
  // bad value raises behind OpeningOwed, so a cached dispatch abstains rather than leaving its
  // peers waiting in the opening.
  a.scales_mode = knobs::scales_mode();
  const bool segments = segments_allowed(ctx, order);
  host_stamps::mark(cached ? "dispatch_cached.args" : "dispatch.args");
  if (segments) take_segment_news(ctx);
  host_stamps::mark(cached ? "dispatch_cached.news" : "dispatch.news");
  a.target = direct_target(ctx, out, h, s, N, cached, segments, a.offers);
  // A receiver that takes its rows directly has rings no sender writes to in this dispatch.
  a.target.stage_scales = a.target.direct && a.scales_mode == 2 && s.fp8 && s.num_scales > 0 &&
                          out.recv_x_scales.stride(0) == 1 && out.recv_x_scales.stride(1) != 1;
  host_stamps::mark(cached ? "dispatch_cached.direct_target" : "dispatch.direct_target");
  // After the notes: the copy of a changed table goes before this kernel, so no kernel queued after
  // a drop's mark (retire) reads a table that still holds the dropped mapping.
  a.segments = segments ? ctx.peer_segments->upload() : nullptr;
  host_stamps::mark(cached ? "dispatch_cached.upload" : "dispatch.upload");
  a.mailbox = &ctx.mailbox_dev->intranode;
  a.rank = ctx.topo.nvl_rank;
  fill_peers(ctx, a.peers, a.sections);
  a.err = ctx.error_sink();
  a.poison = poison_list({{&out.recv_x, N * s.row_bytes},
                          {&out.recv_x_scales, N * s.num_scales * 4},
                          {&out.recv_topk_idx, cached ? 0 : N * s.num_topk * 8},
                          {&out.recv_topk_weights, cached ? 0 : N * s.num_topk * 4},
                          {&h.recv_src_idx, cached ? 0 : N * 4}});
  a.halt_sends = halt_sends;
  host_stamps::mark(cached ? "dispatch_cached.fill_poison" : "dispatch.fill_poison");
  launch_dispatch(a, ctx.window_policy(), ctx.comm_stream);
  owed.paid();
  host_stamps::mark(cached ? "dispatch_cached.launch" : "dispatch.launch");
  EventHandle done = ctx.end_op(order);
  host_stamps::mark(cached ? "dispatch_cached.end_op" : "dispatch.end_op");
  ctx.raise_at_end(order.compute_stream);
  host_stamps::mark(cached ? "dispatch_cached.raise_at_end" : "dispatch.raise_at_end");
  return done;
}

EventHandle combine(Context& ctx, const CombineInputs& in, const DispatchHandle& h, const CombineOutputs& out,
                    const Config& config, const StreamOrder& order) {
  host_stamps::begin();
  const bool halt_sends = std::exchange(ctx.halt_next_sends, false);  // first, as in dispatch
  ctx.require_usable("combine");
  ctx.check_on_entry(true);
  if (!ctx.topo.is_intranode())
    raise(ErrorKind::kState, "combine: internode normal mode is not implemented yet");
  const int R = ctx.topo.num_ranks;
  const int C = config.num_channels();
  int64_t H = 0, N = 0, T = 0;
  int K = 0;
  const long long* info = checked(ctx, [&] {
  config.validate();
  ctx.require_coresident(config.num_sms, blocks_per_sm(ctx), "config");
  check::defined(in.x, "x");
  check::dtype(in.x, DType::kBFloat16, "x");
  check::dim(in.x, 2, "x");
  H = in.x.size(1);
  if (H <= 0 || (H * 2) % 16 != 0) raise(ErrorKind::kValue, "x: hidden size must be a positive multiple of 8, got ", H);
  if (h.hidden > 0 && H != h.hidden)
    raise(ErrorKind::kValue, "x: its hidden size ", H, " differs from the hidden size ", h.hidden,
          " of the dispatch that made the handle");
  check::defined(h.recv_src_idx, "handle.recv_src_idx");
  check::dim(h.recv_src_idx, 1, "handle.recv_src_idx");
  N = h.recv_src_idx.size(0);
  expect(in.x, {N, H}, DType::kBFloat16, ctx.device, "x");
  check::defined(h.is_token_in_rank, "handle.is_token_in_rank");
  check::dim(h.is_token_in_rank, 2, "handle.is_token_in_rank");
  T = h.is_token_in_rank.size(0);
  expect(h.is_token_in_rank, {T, R}, DType::kBool, ctx.device, "handle.is_token_in_rank");
  expect(h.rank_prefix_matrix, {R, R}, DType::kInt32, ctx.device, "handle.rank_prefix_matrix");
  if (h.channel_prefix_matrix.dim() == 2 && h.channel_prefix_matrix.size(1) != C)
    raise(ErrorKind::kValue, "config: num_sms = ", config.num_sms, " gives ", C, " channels, but the handle was made with ",
          h.channel_prefix_matrix.size(1), " (num_sms = ", 2 * h.channel_prefix_matrix.size(1),
          "); combine must use the same num_sms as the dispatch that made the handle");
  expect(h.channel_prefix_matrix, {R, C}, DType::kInt32, ctx.device, "handle.channel_prefix_matrix");
  expect(h.recv_channel_prefix_matrix, {R, C}, DType::kInt32, ctx.device, "handle.recv_channel_prefix_matrix");
  if (in.topk_weights.data || in.topk_weights.dim() > 0) {
    check::dim(in.topk_weights, 2, "topk_weights");
    K = static_cast<int>(in.topk_weights.size(1));
    if (K < 1 || K > kernels::kMaxTopK) raise(ErrorKind::kValue, "topk_weights: expected 1..", kernels::kMaxTopK, " columns, got ", K);
    expect(in.topk_weights, {N, K}, DType::kFloat32, ctx.device, "topk_weights");
    expect(out.combined_topk_weights, {T, K}, DType::kFloat32, ctx.device, "combined_topk_weights");
  }
  if (in.bias_0.data || in.bias_0.dim() > 0) expect(in.bias_0, {T, H}, DType::kBFloat16, ctx.device, "bias[0]");
  if (in.bias_1.data || in.bias_1.dim() > 0) expect(in.bias_1, {T, H}, DType::kBFloat16, ctx.device, "bias[1]");
  expect(out.combined_x, {T, H}, DType::kBFloat16, ctx.device, "combined_x");
  const bool mirrors = put_path(ctx);
  const auto needed = RingLayout::make(R, C, config.num_max_nvl_chunked_recv_tokens, H * 2, 0, K, mirrors);
  if (needed.total_bytes(mirrors) > ctx.num_nvl_bytes)
    raise(ErrorKind::kValue, "num_nvl_bytes: this combine needs ", needed.total_bytes(mirrors),
          " bytes of NVLink buffer", mirrors ? " (rings and their put-path mirrors)" : "",
          " but the Buffer has ", ctx.num_nvl_bytes, "; size it with Config.get_nvl_buffer_size_hint");
  const long long* handle = handle_info(h, ctx.device);
  host_stamps::mark("combine.validate");
  ctx.begin_op(order);
  host_stamps::mark("combine.begin_op");
  return handle;
  });
  const auto layout = RingLayout::make(R, C, config.num_max_nvl_chunked_recv_tokens, H * 2, 0, K, put_path(ctx));

  // The opening (in the kernel) checks, on the device, that all ranks agree and that x has every
  // row the handle names: no rank reads outside any allocation.
  CombineArgs a{};
  OpeningOwed owed(ctx, true);
  a.opening.digest = runtime::make_digest(kernels::kOpCombine, C, config.num_max_nvl_chunked_recv_tokens,
                                          config.num_max_nvl_chunked_send_tokens, H, DType::kBFloat16, K, 0, 0);
  a.opening.handle_info = info;
  a.opening.rank_prefix_matrix = static_cast<const int*>(h.rank_prefix_matrix.data);
  a.opening.input_rows = static_cast<int>(N);
  a.opens = true;
  a.x = in.x.data;
  a.topk_weights = K ? static_cast<const float*>(in.topk_weights.data) : nullptr;
  a.bias_0 = in.bias_0.data;
  a.bias_1 = in.bias_1.data;
  a.is_token_in_rank = static_cast<const bool*>(h.is_token_in_rank.data);
  a.rank_prefix_matrix = static_cast<const int*>(h.rank_prefix_matrix.data);
  a.channel_prefix_matrix = static_cast<const int*>(h.channel_prefix_matrix.data);
  a.recv_channel_prefix_matrix = static_cast<const int*>(h.recv_channel_prefix_matrix.data);
  a.num_tokens = static_cast<int>(T);
  a.combined_x = out.combined_x.data;
  a.combined_topk_weights = K ? static_cast<float*>(out.combined_topk_weights.data) : nullptr;
  a.layout = layout;
  a.chunk = config.num_max_nvl_chunked_send_tokens;
  a.l2_hints = knobs::l2_hints();
  a.l2_discard = knobs::l2_discard();
  const bool segments = segments_allowed(ctx, order);
  if (segments) take_segment_news(ctx);
  host_stamps::mark("combine.news");
  // The test hook stops a rank's pushes part-way; a pulled input has no pushes to stop, and its
  // rank would end normally, so a halting combine always pushes. Without segments the offsets are
  // already the arena's (or -1), as a push wants them.
  a.source = combine_source(ctx, in, N, H, K, segments && !halt_sends, a.offers);
  if (halt_sends) a.source.pull = 0;
  a.segments = segments ? ctx.peer_segments->upload() : nullptr;  // after the notes, as in dispatch
  host_stamps::mark("combine.source+upload");
  a.mailbox = &ctx.mailbox_dev->intranode;
  a.rank = ctx.topo.nvl_rank;
  fill_peers(ctx, a.peers, a.sections);
  a.err = ctx.error_sink();
  a.poison = poison_list({{&out.combined_x, T * H * 2}, {&out.combined_topk_weights, T * K * 4}});
  a.halt_sends = halt_sends;
  host_stamps::mark("combine.fill_poison");
  launch_combine(a, ctx.window_policy(), ctx.comm_stream);
  owed.paid();
  host_stamps::mark("combine.launch");
  EventHandle done = ctx.end_op(order);
  host_stamps::mark("combine.end_op");
  ctx.raise_at_end(order.compute_stream);
  host_stamps::mark("combine.raise_at_end");
  return done;
}

}  // namespace moelink::intranode
