#pragma once
// Intranode dispatch: rows move from each source rank's x into each destination's recv_x through a
// ring per (channel, source) in the destination's NVLink buffer.
//
// Protocol (2 blocks per channel; block 2c sends channel c, block 2c+1 receives channel c):
//   Sender, token-major: channel c's tokens go in batches of B = min(warps, slots), one warp per
//     token. Per batch, ballots give each (token, destination d) its ring position (the number of
//     earlier channel tokens routed to d); the block waits until every ring it writes has room
//     (head[c][d] in my buffer, written by d, >= sent + count - slots); each warp reads its x row
//     once and writes it to all its destinations (rows for this rank go straight into recv_x);
//     the batch's fp8 scales are staged in shared memory; those for a direct receiver's column-major
//     outputs go row-major into its unused ring (stage_scales), which it writes out itself at the
//     end, or are written by the whole block after the rows; then tail[c][me] in each d's buffer is
//     released by the batch's count (system scope).
//   Receiver, warp group per source s: waits (acquire) until tail[c][s] moves, copies what landed
//     to recv_x rows rank_prefix(s) + recv_channel_prefix[s][c] + i, so rows are ordered by source
//     rank then source token, and releases head[c][me] in s's buffer.
//   Direct destinations (outputs in their receive arena, or in segments every sender has mapped)
//   get rows written straight into their outputs instead; see publish_target and the done flags.
//   Counters reset themselves: the receiver writes head = 0 instead of the final count (the sender
//   never waits after its last chunk) and zeroes its own tail after the last chunk. The barrier
//   that opens every operation guarantees nobody touches a ring before its owner reset it.
//   Sequence numbers (targets, done flags) are the operation's last barrier epoch, read on the
//   device: 64-bit, wrap-safe, and advanced by every replay of a captured graph.
//   An uncached dispatch reads its prefix matrices from the notify's results in this rank's header
//   (NotifyResults), and its last block copies them and the info into the handle's tensors first,
//   whether or not the operation runs.
//   The kernel runs only when the opening left the gate open and no fault is known; otherwise, or
//   when a block gives up, every output is poisoned (common/poison.cuh).
//   Every wait is bounded by the timeout and reports (rank, peer, step, channel).
//   The put path (W::kPuts; the internode lane with MOELINK_DEBUG_LANE_FORCE_PUT=fake or nvshmem,
//     whose host makes every destination a ring one): the sender's warps write a batch's ring rows
//     and fields into its own mirror of each destination's ring instead, and after the batch
//     barrier thread d puts d's batch into d's ring and adds its count to the ring's 64-bit tail
//     (ring_puts.cuh). The receiver waits for that tail in its own memory, as it waits for the
//     stores path's, and returns credit with W::credit. Nothing reads or writes a peer's header
//     outside W: no target is waited for (no peer is direct), no segment is published. A cached
//     dispatch's opening runs over the same window (its digest and epoch put to each peer:
//     common/barrier.cuh).
#include <cuda_runtime.h>

#include <algorithm>

#include "common/launch.cuh"
#include "common/opening.cuh"
#include "common/poison.cuh"
#include "common/waits.cuh"
#include "modes/intranode/channel_rows.cuh"
#include "modes/intranode/contract.hpp"
#include "modes/intranode/ring_puts.cuh"
#include "modes/intranode/segments.cuh"
#include "window/device.cuh"

namespace moelink::intranode {

using namespace kernels;

namespace {

constexpr int kNumWarps = kThreads / 32;


// Where a sender puts the rows (and their metadata) of one destination that takes them directly:
// this rank's own outputs, or a peer's outputs in its receive arena.
struct DirectOut {
  int4* x;
  float* scales;
  long long scales_stride_token, scales_stride_scale;
  int64_t* topk_idx;
  float* topk_weights;
  int* src_idx;
  int first_row;   // row of this channel's first token for this destination
  int num_rows;    // rows the outputs hold; later rows are dropped (num_worst_tokens overflow)
  int expert_begin;
};

template <typename T>
__device__ __forceinline__ T* at_offset(void* base, long long offset) {
  return offset < 0 || base == nullptr ? nullptr : reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}

// Token-major sender: warp w of a batch owns token t = batch + w, reads its row from x once, and
// writes it to every destination it is routed to: straight into the destination's outputs when
// they are in its receive arena (and always for this rank's own rows), else into its ring. Ring
// positions are "earlier channel tokens routed to d", found by ballots, so each ring still
// receives its rows in token order, and a direct row lands at the same place a ring row would.
//
// A token's scales are a sector apiece when x_scales or a direct output is column-major, so the
// block moves a batch's scales together: it loads them into shared memory with consecutive threads
// on consecutive tokens, and writes those of a column-major output after the batch's rows, where
// the batch's rows for d are consecutive (positions sent[d] .. sent[d] + count - 1), so consecutive
// threads store consecutive rows. Rings and row-major outputs get them per warp, as the rows.
//
// When every destination, this rank included, takes its rows directly, nothing orders the rows of a
// channel any more, so both blocks of the channel send, each half of its tokens (`part`).
enum SendResult { kSent, kNotNeeded, kFailed };  // kNotNeeded: part 1 when the channel is not split

// Scale words per token the batch stages in shared memory: up to 128 (H <= 16384 float32, 65536
// UE8M0). Wider tokens read and write their scales per warp, straight from x_scales.
constexpr int kHoistedScales = 4;

// Column-major outputs keep each scale index's rows next to each other, so a batch's consecutive
// rows for d are one coalesced run per scale index.
__device__ __forceinline__ bool column_major(const DirectOut& o) {
  return o.scales_stride_token == 1 && o.scales_stride_scale != 1;
}

// Column-major scales staged (the receiver's published stage_scales): written by the senders like
// row-major ones, each row's scales one coalesced run, into the receiver's own ring for (channel,
// sender), which a receiver that takes its rows directly leaves unused; once every sender of the
// channel is done, the channel's two blocks write them into the output, a warp per 32 rows, so
// that each scale index of them is one 128-byte store. Per batch, the senders' gather (above) held
// the block for a phase of short strided runs: 29 us of a 4x24 dispatch (bench/NOTES.md, twelfth
// session); this is one pass over 224 bytes a row at the kernel's end, on blocks that only waited.
// A ring holds staged_capacity rows of them: a (channel, source) with more has its sender write
// them into the output itself, as if nothing were staged; sender and receiver both see the count,
// so they agree.
__device__ __forceinline__ int64_t staged_capacity(const RingLayout& L) {
  return L.ring_bytes / (4LL * L.num_scales);
}

// kHalt: the test hook's variant (Buffer::debug_halt_next_sends), its own instantiation so that
// the kernel every caller runs is compiled as if the hook did not exist. W: the window policy
// (window/device.cuh); with W::kPuts the host made every destination but this rank a ring one.
template <class W, bool kHalt>
__device__ SendResult send_channel(const DispatchArgs& a, Epoch seq, int channel, int part, bool* self_direct,
                                   bool* self_stage) {
  const RingLayout& L = a.layout;
  const int R = L.num_ranks, C = L.num_channels, rank = a.rank, K = L.num_topk, S = L.num_scales, H4 = L.hidden_int4;
  const int warp = threadIdx.x / 32, lane = lane_id();
  const int batch = min(kNumWarps, L.slots);
  const bool hoisted = S <= 32 * kHoistedScales;
  __shared__ int position[kNumWarps][kMaxNvlRanks];
  // [warp][scale], when hoisted. The pad word: staging, and a column-major gather, touch one scale
  // index of many warps' tokens at once, which without it all sit in one bank (24-way conflicts).
  __shared__ float batch_scales[kNumWarps][32 * kHoistedScales + 1];
  // Warp and output row of d's j-th batch row, when gather_scales[d]: read by consecutive threads in
  // the gather, so without bank conflicts (position[w][d] would have eight-way ones).
  __shared__ int warp_of[kMaxNvlRanks][kNumWarps];
  __shared__ int gather_row[kMaxNvlRanks][kNumWarps];
  __shared__ int batch_count[kMaxNvlRanks];
  __shared__ int sent[kMaxNvlRanks];
  __shared__ int4* dst_rows[kNumWarps][kMaxNvlRanks];
  __shared__ DirectOut outs[kMaxNvlRanks];
  __shared__ bool direct[kMaxNvlRanks];
  __shared__ bool gather_scales[kMaxNvlRanks];  // d's scales are written by the block after each batch
  __shared__ bool stage_target[kMaxNvlRanks];   // d stages column-major scales (it waits for this rank's done)
  __shared__ float* stage_out[kMaxNvlRanks];    // where this channel's staged scales for d go, or nullptr
  __shared__ int stage_count[kMaxNvlRanks];     // the rows d's staged scales hold: this channel's for d
  __shared__ bool failed;

  ChannelRange range = channel_range(a.num_tokens, C, channel);
  // Where d's ring rows are written: d's ring, or on the put path this rank's mirror of it.
  const auto staged_ring = [&](int d) {
    if constexpr (W::kPuts) return L.mirror(a.peers.data[rank], channel, d);
    else return L.ring(a.peers.data[d], channel, rank);
  };
  const int4* x = static_cast<const int4*>(a.x);
  const uint64_t policy = evict_first_policy();
  int quiet_lap = 0;  // the put path: before_staging's, in thread d for destination d
  if (threadIdx.x == 0) failed = false;
  __syncthreads();
  if (threadIdx.x < R) {
    const int d = threadIdx.x;
    sent[d] = 0;
    DirectOut o{};
    bool is_direct = d == rank, stage = false;
    if (d == rank) {
      // This rank's own rows always go straight into its outputs; whether its peers' do was
      // agreed in publish_target.
      const volatile DirectTarget* t = &a.sections[d]->direct_target;
      if (!window::wait_published(&a.sections[d]->direct_target.seq, seq, a.err, d, kStepDispatchTarget, channel))
        failed = true;
      else {
        *self_direct = t->direct != 0;
        *self_stage = stage = t->direct != 0 && t->stage_scales != 0;
      }
      o.x = static_cast<int4*>(a.recv_x);
      o.scales = a.recv_x_scales;
      o.scales_stride_token = a.recv_scales_stride_token;
      o.scales_stride_scale = a.recv_scales_stride_scale;
      o.topk_idx = a.recv_topk_idx;
      o.topk_weights = a.recv_topk_weights;
      o.src_idx = a.write_src_idx ? a.recv_src_idx : nullptr;
      o.num_rows = a.num_out_rows;
    } else if constexpr (W::kPuts) {
      // The put path's receivers (a lane's, whose host is ring-only) take every row through their
      // rings, and one on another node cannot be read from here: its target is not waited for.
    } else {
      // Every receiver says, once per dispatch, whether it takes rows directly and where.
      const DirectTarget* target = &a.sections[d]->direct_target;
      // Volatile reads: an earlier dispatch's values may sit in this SM's L1.
      const volatile DirectTarget* t = target;
      if (!window::wait_published(&target->seq, seq, a.err, d, kStepDispatchTarget, channel)) {
        failed = true;
      } else {
        if (t->direct) {
          is_direct = true;
          stage = t->stage_scales != 0;
          // Each output's base: the receiver's data region (its arena), or one of its segments.
          char* base[kNumTargetFields];
          bool missing = false;
          for (int f = 0; f < kNumTargetFields; ++f) {
            const unsigned long long key = t->key[f];
            base[f] = key == 0 ? static_cast<char*>(a.peers.data[d]) : mapped_segment(a.segments, d, key);
            missing |= base[f] == nullptr;
          }
          if (missing) {
            // The receiver saw this rank's SegmentsOpened name every key; a miss means the two
            // disagree, and writing anywhere would be worse than stopping.
            report_fault(a.err, kErrSegmentMissing, d, kStepDispatchTarget, channel, 0);
            failed = true;
          }
          o.x = at_offset<int4>(base[kFieldX], t->x);
          o.scales = at_offset<float>(base[kFieldScales], t->scales);
          o.scales_stride_token = t->scales_stride_token;
          o.scales_stride_scale = t->scales_stride_scale;
          o.topk_idx = at_offset<int64_t>(base[kFieldTopkIdx], t->topk_idx);
          o.topk_weights = at_offset<float>(base[kFieldTopkWeights], t->topk_weights);
          o.src_idx = at_offset<int>(base[kFieldSrcIdx], t->src_idx);
          o.num_rows = t->num_rows;
        }
      }
    }
    // Rows from ranks before me, then my rows in earlier channels.
    o.first_row = (rank ? a.rank_prefix_matrix[(rank - 1) * R + d] : 0) + (channel ? a.channel_prefix_matrix[d * C + channel - 1] : 0);
    o.expert_begin = d * a.num_local_experts;
    outs[d] = o;
    direct[d] = is_direct;
    const int count = a.channel_prefix_matrix[d * C + channel] - (channel ? a.channel_prefix_matrix[d * C + channel - 1] : 0);
    stage_target[d] = is_direct && stage;
    stage_count[d] = count;
    stage_out[d] = stage_target[d] && count <= staged_capacity(L)
                       ? reinterpret_cast<float*>(L.ring(a.peers.data[d], channel, rank))
                       : nullptr;
    gather_scales[d] = is_direct && hoisted && column_major(o) && a.scales_mode >= 1 && stage_out[d] == nullptr;
  }
  __syncthreads();
  if (failed) return kFailed;
  bool split = *self_direct;
  for (int d = 0; d < R; ++d) split &= direct[d];
  if (part == 1 && !split) return kNotNeeded;
  if (split) take_half<kMaxNvlRanks>(range, part, a.is_token_in_rank, R, sent);

  for (int begin = range.begin; begin < range.end; begin += batch) {
    if (warp == 0) batch_positions(a.is_token_in_rank, begin, range.end, batch, R, sent, position, batch_count);
    if (hoisted) {
      // Tokens fastest: a column-major x_scales is read in runs of consecutive tokens.
      const int n = min(batch, range.end - begin);
      for (int e = threadIdx.x; e < S * n; e += blockDim.x) {
        const int i = e / n, w = e - i * n;
        batch_scales[w][i] = a.x_scales[(begin + w) * a.x_scales_stride_token + i * a.x_scales_stride_scale];
      }
    }
    __syncthreads();
    // Room in every destination ring this batch writes to: sent + count - head <= slots.
    if (threadIdx.x < R && !direct[threadIdx.x] && batch_count[threadIdx.x] > 0) {
      const int d = threadIdx.x;
      if (!window::wait(L.head(a.peers.data[rank], channel, d), sent[d] + batch_count[d] - L.slots, a.err, d,
                         kStepDispatchSend, channel))
        failed = true;
      if constexpr (W::kPuts) before_staging<W>(&quiet_lap, sent[d], batch_count[d], L.slots);
    }
    __syncthreads();
    if (failed) return kFailed;

    const int t = begin + warp;
    if (warp < batch && t < range.end) {
      if (lane < R) {
        const int d = lane, pos = position[warp][d];
        int4* row = nullptr;
        if (pos >= 0 && direct[d]) {
          const int r = outs[d].first_row + pos;
          // Past num_worst_tokens (reported by notify): the row is dropped.
          if (r < outs[d].num_rows) row = outs[d].x + static_cast<int64_t>(r) * H4;
        } else if (pos >= 0) {
          row = L.slot_x(staged_ring(d), pos % L.slots);
        }
        dst_rows[warp][d] = row;
        // sent[d] stays put until the batch's end, so pos - sent[d] is the row's place in the batch.
        if (pos >= 0 && gather_scales[d]) {
          warp_of[d][pos - sent[d]] = warp;
          gather_row[d][pos - sent[d]] = outs[d].first_row + pos;
        }
      }
      __syncwarp();
      int4* const* dst = dst_rows[warp];
      const int4* src = x + static_cast<int64_t>(t) * H4;
      constexpr int kUnroll = 8;
      for (int i0 = lane; i0 < H4; i0 += 32 * kUnroll) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (i0 + 32 * u < H4) v[u] = a.l2_hints ? ld_nc_stream(src + i0 + 32 * u, policy) : ld_nc_stream(src + i0 + 32 * u);
        for (int d = 0; d < R; ++d) {
          int4* row = dst[d];
          if (row == nullptr) continue;
          // Outputs are read by the next kernel, not by us: stream them past L2. Ring rows are
          // read back soon, so they keep the default policy.
          const bool output = direct[d] && a.l2_hints;
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
            if (i0 + 32 * u < H4) {
              if (output)
                st_na(row + i0 + 32 * u, v[u], policy);
              else
                row[i0 + 32 * u] = v[u];
            }
        }
      }
      // Metadata: final outputs for direct destinations, ring fields for the others. The token's
      // ids and weights are read once, before the destinations (its scales were staged with the
      // batch's): read per destination they cost one memory round trip each, which fp8's short
      // rows feel most.
      const int64_t id = lane < K ? a.topk_idx[static_cast<int64_t>(t) * K + lane] : -1;
      const float weight = lane < K && a.topk_weights ? a.topk_weights[static_cast<int64_t>(t) * K + lane] : 0.f;
      for (int d = 0; d < R; ++d) {
        const int pos = position[warp][d];
        if (pos < 0) continue;
        float* scales_out;
        int64_t scales_stride;
        if (direct[d]) {
          const DirectOut& o = outs[d];
          const int64_t row = o.first_row + pos;
          if (row >= o.num_rows) continue;
          if (lane == 0 && o.src_idx) o.src_idx[row] = t;
          if (lane < K) {
            const bool mine = id >= o.expert_begin && id < o.expert_begin + a.num_local_experts;
            if (o.topk_idx) o.topk_idx[row * K + lane] = mine ? id - o.expert_begin : -1;
            if (o.topk_weights) o.topk_weights[row * K + lane] = mine ? weight : 0.f;
          }
          if (stage_out[d] != nullptr) {
            // A position past the channel's count (a handle whose is_token_in_rank disagrees with
            // its matrices) would land in the next ring: dropped, as a row past num_rows is.
            if (pos >= stage_count[d]) continue;
            scales_out = stage_out[d] + static_cast<int64_t>(pos) * S;
            scales_stride = 1;
          } else {
            scales_out = o.scales + row * o.scales_stride_token;
            scales_stride = o.scales_stride_scale;
          }
        } else {
          char* ring = staged_ring(d);
          const int slot = pos % L.slots;
          if (lane == 0) *L.slot_src_idx(ring, slot) = t;
          if (lane < K) {
            L.slot_topk_idx(ring, slot)[lane] = static_cast<int>(id);
            L.slot_weights(ring, slot)[lane] = weight;
          }
          scales_out = L.slot_scales(ring, slot);
          scales_stride = 1;
        }
        if (gather_scales[d]) continue;  // the block writes them after the batch
        if (hoisted) {
          for (int i = lane; i < S; i += 32) scales_out[i * scales_stride] = batch_scales[warp][i];
        } else {
          for (int i = lane; i < S; i += 32)
            scales_out[i * scales_stride] = a.x_scales[t * a.x_scales_stride_token + i * a.x_scales_stride_scale];
        }
      }
    }
    __syncthreads();
    // The row of d's j-th batch token is the one its warp recorded, not first_row + sent[d] + j:
    // sent[d] advances below without a barrier in between. The output's fields are read into
    // registers first: a store through a generic pointer could alias shared memory, so read in the
    // loop they would be reloaded after every store.
    for (int d = 0; d < R; ++d) {
      if (!gather_scales[d]) continue;
      float* const scales = outs[d].scales;
      const int64_t stride_token = outs[d].scales_stride_token, stride_scale = outs[d].scales_stride_scale;
      const int num_rows = outs[d].num_rows, n = batch_count[d];
      for (int e = threadIdx.x; e < S * n; e += blockDim.x) {
        const int i = e / n, j = e - i * n;
        const int64_t row = gather_row[d][j];
        // Past num_worst_tokens (reported by notify): the row is dropped.
        if (row < num_rows) scales[row * stride_token + i * stride_scale] = batch_scales[warp_of[d][j]][i];
      }
    }
    // A rank dying mid-kernel, as its peers see it: this batch's rows landed, nothing says so (on
    // the put path they stay in the mirror: a peer whose puts stop is seen the same way).
    if (kHalt) return kSent;
    if (threadIdx.x < R) {
      const int d = threadIdx.x;
      if constexpr (W::kPuts) {
        // The block barrier above ordered every warp's mirror writes before this thread's copy.
        if (!direct[d] && batch_count[d] > 0)
          put_batch<W>(L, kRingDispatchFields, L.ring(a.peers.data[d], channel, rank), staged_ring(d), sent[d],
                       batch_count[d], ring_tail<W>(L, a.peers.data[d], channel, rank), d);
        sent[d] += batch_count[d];
      } else {
        sent[d] += batch_count[d];
        if (!direct[d] && batch_count[d] > 0) window::signal(L.tail(a.peers.data[d], channel, rank), sent[d]);
      }
    }
    __syncthreads();
  }
  // The put path has no direct peer and reads no peer's header: nothing below concerns it.
  if constexpr (W::kPuts) return kSent;
  // Direct destinations learn that this part's rows (possibly none) have all landed; a sender that
  // did not split also speaks for the part it did not need. This rank's own blocks wait for its
  // own parts too when it stages scales.
  if (threadIdx.x < R && direct[threadIdx.x] && (threadIdx.x != rank || stage_target[threadIdx.x])) {
    __threadfence_system();
    for (int p = split ? part : 0; p <= (split ? part : 1); ++p)
      window::signal(&a.sections[threadIdx.x]->direct_done[p][channel][rank], seq);
  }
  // Last, off the rows' path: what each receiver's target named, for this rank's host. The target
  // stays as published until every rank has passed the next operation's opening.
  if (blockIdx.x == 0 && threadIdx.x < R && threadIdx.x != rank)
    report_segments<kNumTargetFields>(&a.mailbox->segment_news[threadIdx.x], a.segments, threadIdx.x,
                                      a.sections[threadIdx.x]->direct_target.key,
                                      a.sections[threadIdx.x]->segment_offers, seq);
  return kSent;
}

// Tells the senders where this rank's outputs are (or that it takes rows through the rings). When
// they lie in segments, rows come directly only if every sender has all of them mapped in this
// dispatch; the others learn of the segments (their handles are published either way).
__device__ void publish_target(const DispatchArgs& a, Epoch seq) {
  DirectTarget* t = &a.sections[a.rank]->direct_target;
  HeaderSection* self = a.sections[a.rank];
  const DirectTarget& mine = a.target;
  bool direct = mine.direct != 0;
  const bool named = publish_offers(mine.key, a.offers, self->segment_offers);
  // A timeout there is recorded; the senders stop at their own waits.
  if (named && direct) direct = all_opened(self, mine.key, a.rank, a.layout.num_ranks, seq, a.err, kStepDispatchOpened);
  for (int f = 0; f < kNumTargetFields; ++f) t->key[f] = mine.key[f];
  t->x = mine.x;
  t->scales = mine.scales;
  t->scales_stride_token = mine.scales_stride_token;
  t->scales_stride_scale = mine.scales_stride_scale;
  t->topk_idx = mine.topk_idx;
  t->topk_weights = mine.topk_weights;
  t->src_idx = mine.src_idx;
  t->num_rows = mine.num_rows;
  t->stage_scales = direct ? mine.stage_scales : 0;
  t->direct = direct;
  window::signal(&t->seq, seq);
  // For the host, after the word every sender waits for.
  a.mailbox->last_direct = direct;
  __threadfence_system();
  a.mailbox->last_direct_seq = seq;
}

// stage_scales' receiving end, for the channel's block `part`: waits for both parts of every
// sender of the channel, this rank included, then writes the staged scales of (source, 32 rows)
// items 2 * kNumWarps apart: lane j reads row j's scales in 16-byte words and the warp stores each
// scale index of its 32 rows as one run.
__device__ void write_staged_scales(const DispatchArgs& a, Epoch seq, int channel, int part) {
  const RingLayout& L = a.layout;
  const int R = L.num_ranks, C = L.num_channels, rank = a.rank, S = L.num_scales;
  const int warp = threadIdx.x / 32, lane = lane_id();
  __shared__ bool stage_failed;
  if (threadIdx.x == 0) stage_failed = false;
  __syncthreads();
  {
    const int s = threadIdx.x % kMaxNvlRanks, p = threadIdx.x / kMaxNvlRanks;
    if (p < 2 && s < R && !window::wait(&a.sections[rank]->direct_done[p][channel][s], seq, a.err, s, kStepDispatchRecv, channel))
      stage_failed = true;
  }
  __syncthreads();
  if (stage_failed) return;
  const int64_t capacity = staged_capacity(L);
  const bool words = S % 4 == 0;
  const int64_t stride_token = a.recv_scales_stride_token, stride_scale = a.recv_scales_stride_scale;
  int item = 0;  // items of the sources before s
  for (int s = 0; s < R; ++s) {
    const RowSpan rows = received_rows(a.rank_prefix_matrix, a.recv_channel_prefix_matrix, R, C, rank, s, channel);
    if (rows.count > capacity) continue;  // its sender wrote them into the output itself
    const float* staged = reinterpret_cast<const float*>(L.ring(a.peers.data[rank], channel, s));
    const int items = (rows.count + 31) / 32;
    // The first of s's items that is this warp's: (item + k) % (2 * kNumWarps) == part * kNumWarps + warp.
    const int mine = part * kNumWarps + warp;
    for (int k = ((mine - item) % (2 * kNumWarps) + 2 * kNumWarps) % (2 * kNumWarps); k < items; k += 2 * kNumWarps) {
      const int j = k * 32 + lane;
      const int64_t row = static_cast<int64_t>(rows.base) + j;
      // Past num_worst_tokens (reported by notify): the row is dropped, as its sender dropped it.
      const bool valid = j < rows.count && row < a.num_out_rows;
      const float* src = staged + static_cast<int64_t>(j) * S;
      float* dst = a.recv_x_scales + row * stride_token;
      constexpr int kChunk = 16;
      for (int i0 = 0; i0 < S; i0 += kChunk) {
        float v[kChunk];
        if (words) {
#pragma unroll
          for (int u = 0; u < kChunk / 4; ++u)
            if (valid && i0 + 4 * u < S) {
              const int4 w = ld_cg(reinterpret_cast<const int4*>(src + i0) + u);
              v[4 * u] = __int_as_float(w.x);
              v[4 * u + 1] = __int_as_float(w.y);
              v[4 * u + 2] = __int_as_float(w.z);
              v[4 * u + 3] = __int_as_float(w.w);
            }
        } else {
#pragma unroll
          for (int u = 0; u < kChunk; ++u)
            if (valid && i0 + u < S) v[u] = ld_cg(src + i0 + u);
        }
#pragma unroll
        for (int u = 0; u < kChunk; ++u)
          if (valid && i0 + u < S) dst[(i0 + u) * stride_scale] = v[u];
      }
    }
    item += items;
  }
}

// W: as the sender's; on the put path the tail is this rank's 64-bit word and the credit a put.
template <class W>
__device__ void recv_channel(const DispatchArgs& a, Epoch seq, int channel, bool self_direct, bool stage) {
  const RingLayout& L = a.layout;
  const int R = L.num_ranks, C = L.num_channels, rank = a.rank;
  const int warps_per_group = kNumWarps / max(R - 1, 1);
  const int warp = threadIdx.x / 32, lane = lane_id();
  const int group = warp / warps_per_group, gw = warp % warps_per_group;
  __shared__ bool abort_group[kMaxNvlRanks];

  // Rows past the real count (num_worst_tokens padding) carry no expert and no source.
  const int num_recv = a.rank_prefix_matrix[(R - 1) * R + rank];
  for (int row = num_recv + (blockIdx.x / 2) * blockDim.x + threadIdx.x; row < a.num_out_rows; row += C * blockDim.x) {
    if (a.write_src_idx) a.recv_src_idx[row] = -1;
    for (int k = 0; k < L.num_topk; ++k) {
      if (a.recv_topk_idx) a.recv_topk_idx[static_cast<int64_t>(row) * L.num_topk + k] = -1;
      if (a.recv_topk_weights) a.recv_topk_weights[static_cast<int64_t>(row) * L.num_topk + k] = 0.f;
    }
  }
  if (self_direct && stage) return;  // write_staged_scales waits for the senders
  if (self_direct) {
    // The senders write straight into my outputs; the kernel ends once every one of them has
    // finished this channel.
    const int s = threadIdx.x % kMaxNvlRanks, p = threadIdx.x / kMaxNvlRanks;
    if (p < 2 && s < R && s != rank)
      window::wait(&a.sections[rank]->direct_done[p][channel][s], seq, a.err, s, kStepDispatchRecv, channel);
    return;
  }
  // One warp group per remote source; my own rows were written straight into recv_x by the sender.
  if (group >= R - 1) return;
  const int s = peer_of_group(group, rank);
  const RowSpan rows = received_rows(a.rank_prefix_matrix, a.recv_channel_prefix_matrix, R, C, rank, s, channel);
  const int row_base = rows.base, total = rows.count;
  auto* tail_local = ring_tail<W>(L, a.peers.data[rank], channel, s);
  int* head_remote = L.head(a.peers.data[s], channel, rank);
  char* ring = L.ring(a.peers.data[rank], channel, s);
  const int group_threads = warps_per_group * 32;
  int4* recv_x = static_cast<int4*>(a.recv_x);
  const int K = L.num_topk, S = L.num_scales;
  const int expert_begin = rank * a.num_local_experts;
  if (threadIdx.x % group_threads == 0) abort_group[group] = false;
  const uint64_t policy = evict_first_policy();

  __shared__ int available[kMaxNvlRanks];
  int consumed = 0;
  while (consumed < total) {
    // The sender publishes per batch; take whatever has landed, up to a bound that keeps the
    // head release frequent enough for the sender to stream.
    if (gw == 0 && lane == 0) {
      if (!window::wait(tail_local, consumed + 1, a.err, s, kStepDispatchRecv, channel)) abort_group[group] = true;
      available[group] = static_cast<int>(ld_acquire_sys(tail_local));
    }
    group_barrier(1 + group, group_threads);
    if (abort_group[group]) return;
    const int n = min(min(available[group], total) - consumed, max(a.chunk, L.slots / 2));

    // Rows past num_out_rows (a num_worst_tokens overflow, reported by notify) are dropped.
    const int m = max(0, min(n, a.num_out_rows - (row_base + consumed)));
    const int thread = threadIdx.x % group_threads;
    group_copy_rows<8>(
        m, L.hidden_int4, thread, group_threads, [&](int j) { return L.slot_x(ring, (consumed + j) % L.slots); },
        [&](int j) { return recv_x + static_cast<int64_t>(row_base + consumed + j) * L.hidden_int4; },
        [](const int4* p) { return ld_cg(p); },
        [&](int4* p, const int4& v) { a.l2_hints ? st_na(p, v, policy) : st_na(p, v); });
    const int first_row = row_base + consumed;
    if (a.write_src_idx)
      group_transfer<4>(
          m, thread, group_threads, [&](int j) { return ld_cg(L.slot_src_idx(ring, (consumed + j) % L.slots)); },
          [&](int j, int v) { a.recv_src_idx[first_row + j] = v; });
    group_transfer<4>(
        m * K, thread, group_threads,
        [&](int e) {
          const int j = e / K, slot = (consumed + j) % L.slots;
          return make_int2(ld_cg(L.slot_topk_idx(ring, slot) + (e - j * K)),
                           ld_cg(reinterpret_cast<const int*>(L.slot_weights(ring, slot) + (e - j * K))));
        },
        [&](int e, int2 v) {
          const bool mine = v.x >= expert_begin && v.x < expert_begin + a.num_local_experts;
          const int64_t at = static_cast<int64_t>(first_row) * K + e;
          if (a.recv_topk_idx) a.recv_topk_idx[at] = mine ? v.x - expert_begin : -1;
          if (a.recv_topk_weights) a.recv_topk_weights[at] = mine ? __int_as_float(v.y) : 0.f;
        });
    group_transfer<4>(
        m * S, thread, group_threads,
        [&](int e) {
          const int j = e / S;
          return ld_cg(L.slot_scales(ring, (consumed + j) % L.slots) + (e - j * S));
        },
        [&](int e, float v) {
          const int j = e / S;
          a.recv_x_scales[(first_row + j) * a.recv_scales_stride_token + (e - j * S) * a.recv_scales_stride_scale] = v;
        });
    group_barrier(1 + group, group_threads);
    if (a.l2_discard) {
      // The chunk's rows are read (their stores are issued behind the barrier); the sender's next
      // lap rewrites them, so a write-back to HBM would be wasted bandwidth.
      group_discard_rows(n, static_cast<int64_t>(L.hidden_int4) * 16, thread, group_threads,
                         [&](int j) { return L.slot_x(ring, (consumed + j) % L.slots); });
      group_barrier(1 + group, group_threads);
    }
    consumed += n;
    if (gw == 0 && lane == 0) return_credit<W>(head_remote, consumed == total ? 0 : consumed, s);
  }
  if (total > 0 && gw == 0 && lane == 0) st_volatile(tail_local, 0);
  // NOTES: the last credit (0, the head's reset) must land before this rank's next opening signals
  // its peers, or it could undo the next operation's first credit; a kernel's end does not complete
  // a put over a proxy transport, quiet does.
  if constexpr (W::kPuts)
    if (total > 0 && gw == 0 && lane == 0) W::quiet();
}

template <class W, bool kHalt>
__device__ void dispatch_channel(const DispatchArgs& a, Epoch seq) {
  const int channel = blockIdx.x / 2;
  // The put path names no segment (its host is ring-only), and cannot write a peer's header.
  if (!W::kPuts && blockIdx.x == 0) publish_opened(a.segments, a.sections, a.rank, a.layout.num_ranks, seq);
  if (blockIdx.x == 1 && threadIdx.x == 0) publish_target(a, seq);
  __shared__ bool self_direct, self_stage;
  // A halted sender (kHalt) never says it is done, so its own blocks do not wait for it: its staged
  // scales are left where they are, as a dead rank's would be.
  const int part = blockIdx.x % 2;
  const SendResult sent = send_channel<W, kHalt>(a, seq, channel, part, &self_direct, &self_stage);
  if (sent == kFailed) return;
  const bool stage = self_direct && self_stage && !kHalt;
  if (part == 1) recv_channel<W>(a, seq, channel, self_direct, stage);
  if (stage) write_staged_scales(a, seq, channel, part);
}

// An uncached dispatch's handle gets its notify's results whether or not the operation runs: a
// skipped one's handle (num_worst_tokens, no host wait) is returned, and its info must say it failed.
// The kernel itself reads the results where the notify left them, so nothing waits for the copy.
__device__ void copy_handle(const HandleCopy& h, int R, int C) {
  for (int i = threadIdx.x; i < R * R; i += blockDim.x) h.rank_prefix_matrix[i] = h.from->rank_prefix_matrix[i];
  for (int i = threadIdx.x; i < R * C; i += blockDim.x) {
    h.channel_prefix_matrix[i] = h.from->channel_prefix_matrix[i];
    h.recv_channel_prefix_matrix[i] = h.from->recv_channel_prefix_matrix[i];
  }
  if (threadIdx.x < 2) h.info[threadIdx.x] = h.from->info[threadIdx.x];
}

// The inputs this block reads a batch at a time, for its half of the channel's tokens (the half a
// split channel's part sends; unsplit, part 0 sends both and finds the other half in L2 too): the
// routing flags, top-k and scales, asked of L2 before the opening. The idea: with L2 cold each
// batch's pieces (a column-major x_scales is 56 runs of 64 bytes) are an HBM round trip ahead of
// its copy. Measured, it did not pay (4x24 cached fp8 ~40 us slower with L2 cold, 2x24 even), so
// it runs only with MOELINK_PREFETCH=1 (bench/NOTES.md, eighth session).
__device__ void prefetch_inputs(const DispatchArgs& a) {
  const int C = a.layout.num_channels, R = a.layout.num_ranks, K = a.layout.num_topk, S = a.layout.num_scales;
  const ChannelRange range = channel_range(a.num_tokens, C, blockIdx.x / 2);
  const int mid = range.begin + (range.end - range.begin + 1) / 2;
  const int b = blockIdx.x % 2 == 0 ? range.begin : mid, e = blockIdx.x % 2 == 0 ? mid : range.end;
  if (b >= e) return;
  const int n = e - b, t = threadIdx.x, nt = blockDim.x;
  prefetch_l2(a.is_token_in_rank + static_cast<int64_t>(b) * R, static_cast<int64_t>(n) * R, t, nt);
  if (a.topk_idx) prefetch_l2(a.topk_idx + static_cast<int64_t>(b) * K, static_cast<int64_t>(n) * K * 8, t, nt);
  if (a.topk_weights) prefetch_l2(a.topk_weights + static_cast<int64_t>(b) * K, static_cast<int64_t>(n) * K * 4, t, nt);
  if (a.x_scales == nullptr || S == 0) return;
  const int64_t st = a.x_scales_stride_token, ss = a.x_scales_stride_scale;
  if (st == 1) {
    // Column-major: a run of n tokens per scale index; a warp per run.
    const int warp = t / 32, num_warps = nt / 32;
    for (int i = warp; i < S; i += num_warps) prefetch_l2(a.x_scales + b + i * ss, static_cast<int64_t>(n) * 4, lane_id(), 32);
  } else if (ss == 1) {
    prefetch_l2(a.x_scales + b * st, ((n - 1) * st + S) * 4, t, nt);
  }
}

// The operation's number is its last barrier's epoch (notify's, or the cached dispatch's
// opening), the same on every rank and advanced by the device, so a replayed graph never reuses
// one. A skipped operation touches no peer memory and poisons its outputs.
template <class W, bool kHalt>
__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(DispatchArgs a) {
  // The last block is a receiver, whose first step is a wait on its peers anyway.
  if (a.handle_copy.from != nullptr && blockIdx.x == gridDim.x - 1)
    copy_handle(a.handle_copy, a.layout.num_ranks, a.layout.num_channels);
  if (a.prefetch) prefetch_inputs(a);
  const bool may_run = a.opens ? open_in_kernel<W>(a.peers, a.rank, a.layout.num_ranks, a.opening, a.err)
                                : operation_may_run(a.err);
  if (may_run)
    dispatch_channel<W, kHalt>(a, ld_volatile(&a.err.self->epoch));
  else
    poison_grid_share(a.poison);
  finish_block(a.err, a.poison);
}

template <class W>
void launch_dispatch_over(const DispatchArgs& a, const LaunchShape& shape, cudaStream_t stream) {
  if (a.halt_sends)
    launch("intranode dispatch", &dispatch_kernel<W, true>, shape, stream, a);
  else
    launch("intranode dispatch", &dispatch_kernel<W, false>, shape, stream, a);
}

}  // namespace

}  // namespace moelink::intranode
