#pragma once
// Intranode combine: every row a rank received in dispatch goes back to its source rank, which sums
// the rows of each of its tokens (fp32 accumulation, bf16 out) and adds the optional biases.
//
// Protocol (2 blocks per channel; block 2c sends channel c, block 2c+1 receives channel c):
//   Sender (the expert side), warp group per source rank s: the rows from s in channel c are
//     contiguous in x (dispatch put them there), so it copies them chunk by chunk into ring(c, me)
//     in s's buffer, with their top-k weights; same space/tail handshake as dispatch.
//   Receiver (the token side): walks its own channel-c tokens in batches of B tokens. For a batch it
//     computes, per token and rank d, the ring position of that token's row from d: d sends rows in
//     my token order, so the position is the count of earlier channel-c tokens routed to d. One
//     warp per token waits for those rows, sums them, adds the biases and writes the output; then
//     head[c][me] in each d's buffer is released by the batch's count.
//   Rows a rank sent itself are read straight from its own x, never through a ring.
//   Pull: when a rank's input (x, and its weights) lies in its receive arena, or in caching-allocator
//     segments every token owner has mapped (window/peer_segments.hpp), the owners read its rows in
//     place instead (publish_source, pull_done) and its sender blocks only wait for them to finish.
//     For segments the input's rank names each one's key and IPC handle in its CombineSource and
//     combine_offers; every owner says at its kernel's start which of that rank's segments it has
//     mapped (segments_opened, the table dispatch uses), and the input's rank publishes pull = 1 only
//     when every owner has all of them. That one word is what the input's senders and every owner
//     act on. Owners tell their host, last, which keys the rank named and the handles of those they
//     lack (combine_segment_news), so the host maps them before a later combine.
//   Pulled everywhere (every peer pulls this rank's input, and this rank pulls every peer's): no
//     ring in either direction, so nothing orders a channel's tokens and block 2c receives too,
//     the second half of them (its positions start after the first half's, counted per rank), before
//     it waits as a pulled sender does. pull_done is per (owner part, channel, owner) and the input's
//     rank waits for both parts; an owner that did not split raises both. Both blocks decide from the
//     same published words (every peer's pull, and agreed_pull for this rank), so they cannot
//     disagree; a block whose wait for one failed has recorded a fault, at which every wait ends.
//     A halting combine (test hook) always pushes, so it never splits. A split channel's short last
//     batch shares each of its tokens among several warps, a slice of the row apiece.
//   The put path (W::kPuts; the internode lane with MOELINK_DEBUG_LANE_FORCE_PUT=fake or nvshmem,
//     whose host never lets a rank be pulled): a sender group copies each chunk into its own mirror
//     of s's ring, and after the group barrier its first thread puts the chunk into s's ring and
//     adds n to the ring's 64-bit tail (ring_puts.cuh). The receiver waits for that tail in its own
//     memory and returns credit with W::credit; no peer's source or segments are read or
//     published. The kernel's opening runs over the same window (its digest and epoch put to each
//     peer: common/barrier.cuh).
//   No deadlock: B <= slots - chunk, so the rows a batch waits for always fit beside a chunk the
//   sender may still be writing. Counters reset themselves as in dispatch.
//   The kernel opens its operation itself (open_in_kernel, common/opening.cuh), which gates it:
//   every rank agrees on the operation, config, row layout, top-k and handle, and has at least
//   the rows its handle names, or every rank skips and poisons combined_x.
//
// NOTES: segments_opened[owner] in a rank's header is written by dispatch and combine alike, each
// with its own sequence number. Sharing is safe because the word for the next operation is written
// only after that operation's opening barrier, which no rank passes before its kernels of this one
// (on the same stream) have ended, so publish_target / publish_source have read it by then. For the
// same reason combine_source and combine_offers stay as published while owners report them to
// their hosts at the kernel's end.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "common/bf16x8.cuh"
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

__device__ __forceinline__ void accumulate_bf16x8(float (&acc)[8], const int4& v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] += f.x;
    acc[2 * i + 1] += f.y;
  }
}

// kHalt: the test hook's variant (Buffer::debug_halt_next_sends), instantiated apart as in dispatch.
// Only for an input that is pushed (CombineSource::pull agreed 0). W: the window policy.
template <class W, bool kHalt>
__device__ void send_channel(const CombineArgs& a, Epoch seq, int channel) {
  const RingLayout& L = a.layout;
  const int R = L.num_ranks, C = L.num_channels, rank = a.rank;
  // One warp group per remote token owner; my own rows are read from x by my receiver.
  const int warps_per_group = kNumWarps / max(R - 1, 1);
  const int warp = threadIdx.x / 32, lane = lane_id();
  const int group = warp / warps_per_group, gw = warp % warps_per_group;
  __shared__ bool abort_group[kMaxNvlRanks];
  if (group >= R - 1) return;
  const int s = peer_of_group(group, rank);

  const RowSpan rows = received_rows(a.rank_prefix_matrix, a.recv_channel_prefix_matrix, R, C, rank, s, channel);
  const int row_base = rows.base, total = rows.count;
  auto* tail_remote = ring_tail<W>(L, a.peers.data[s], channel, rank);
  const int* head_local = L.head(a.peers.data[rank], channel, s);
  char* ring = L.ring(a.peers.data[s], channel, rank);
  const int group_threads = warps_per_group * 32;
  const int4* x = static_cast<const int4*>(a.x);
  const int K = L.num_topk;
  if (threadIdx.x % group_threads == 0) abort_group[group] = false;

  const uint64_t policy = evict_first_policy();
  // The put path: the chunk is staged in this rank's mirror of s's ring, laid out as the ring.
  char* staged = ring;
  if constexpr (W::kPuts) staged = L.mirror(a.peers.data[rank], channel, s);
  int quiet_lap = 0;  // the put path: before_staging's, in the putting thread
  int sent = 0;
  while (sent < total) {
    const int n = min(a.chunk, total - sent);
    if (gw == 0 && lane == 0) {
      if (!window::wait(head_local, sent + n - L.slots, a.err, s, kStepCombineSend, channel)) abort_group[group] = true;
      if constexpr (W::kPuts) before_staging<W>(&quiet_lap, sent, n, L.slots);
    }
    group_barrier(1 + group, group_threads);
    if (abort_group[group]) return;
    const int thread = threadIdx.x % group_threads;
    // The chunk's rows are consecutive in x, and in the ring up to its wrap (slots are H4 words
    // apart, n <= slots): one flat copy, whose addresses need no row / word split per load (that
    // split's registers made this path spill).
    const int4* src = x + static_cast<int64_t>(row_base + sent) * L.hidden_int4;
    int4* ring_x = L.slot_x(staged, 0);
    const int first = (sent % L.slots) * L.hidden_int4, wrap = L.slots * L.hidden_int4;
    group_transfer<8>(
        n * L.hidden_int4, thread, group_threads,
        [&](int e) { return a.l2_hints ? ld_nc_stream(src + e, policy) : ld_nc_stream(src + e); },
        [&](int e, const int4& v) {
          const int at = first + e;
          ring_x[at < wrap ? at : at - wrap] = v;
        });
    group_transfer<4>(
        n * K, thread, group_threads, [&](int e) { return a.topk_weights[static_cast<int64_t>(row_base + sent) * K + e]; },
        [&](int e, float v) { L.slot_weights(staged, (sent + e / K) % L.slots)[e % K] = v; });
    group_barrier(1 + group, group_threads);
    // A rank dying mid-kernel: the chunk landed (on the put path, in the mirror), its tail never moves.
    if (kHalt) return;
    if constexpr (W::kPuts) {
      // The group barrier above ordered the group's mirror writes before this thread's copy.
      if (gw == 0 && lane == 0)
        put_batch<W>(L, K > 0 ? kRingCombineFields : kRingX, ring, staged, sent, n, tail_remote, s);
      sent += n;
    } else {
      sent += n;
      if (gw == 0 && lane == 0) window::signal(tail_remote, sent);
    }
  }
}

// The owners read my rows in place; my input must stay untouched until both parts of every owner's
// channel are done (an owner that did not split raises both). One thread per (part, owner).
__device__ void wait_pulled(const CombineArgs& a, Epoch seq, int channel) {
  const int s = threadIdx.x % kMaxNvlRanks, part = threadIdx.x / kMaxNvlRanks;
  if (part < 2 && s < a.layout.num_ranks && s != a.rank)
    window::wait(&a.sections[a.rank]->pull_done[part][channel][s], seq, a.err, s, kStepCombinePull, channel);
}

enum RecvResult { kReceived, kNotNeeded, kFailed };  // kNotNeeded: part 1 when the channel is not split

// The token side of channel c. Part 0 is the channel's receiver block; part 1 its sender block,
// which calls it only when this rank's own input is pulled. self_pulled: agreed_pull said 1. W: as
// the senders'; on the put path no peer is pulled, the tails are this rank's 64-bit words and the
// credits puts.
template <int kRanks, class W>
__device__ RecvResult recv_channel(const CombineArgs& a, Epoch seq, int channel, int part, bool self_pulled) {
  const RingLayout& L = a.layout;
  const int R = L.num_ranks, C = L.num_channels, rank = a.rank;
  const int warp = threadIdx.x / 32, lane = lane_id();
  const int batch = min(kNumWarps, L.slots - a.chunk);
  __shared__ int position[kNumWarps][kMaxNvlRanks];
  __shared__ int batch_count[kMaxNvlRanks];
  __shared__ int consumed[kMaxNvlRanks];
  __shared__ int channel_total[kMaxNvlRanks];
  __shared__ bool failed;
  __shared__ const int4* rows_smem[kNumWarps][kMaxNvlRanks];
  __shared__ const float* weights_smem[kNumWarps][kMaxNvlRanks];
  // Peers whose input rows are read in place (pull), and where this channel's rows start there.
  __shared__ bool pull[kMaxNvlRanks];
  __shared__ const int4* pull_x[kMaxNvlRanks];
  __shared__ const float* pull_weights[kMaxNvlRanks];

  ChannelRange range = channel_range(a.num_tokens, C, channel);
  if (threadIdx.x < R) {
    const int d = threadIdx.x;
    consumed[d] = 0;
    channel_total[d] = a.channel_prefix_matrix[d * C + channel] - (channel ? a.channel_prefix_matrix[d * C + channel - 1] : 0);
    pull[d] = false;
  }
  if (threadIdx.x == 0) failed = false;
  __syncthreads();
  // The put path's peers (a lane's, whose host never lets a rank be pulled) are not read.
  if (!W::kPuts && threadIdx.x < R && threadIdx.x != rank) {
    const int d = threadIdx.x;
    const CombineSource* source = &a.sections[d]->combine_source;
    const volatile CombineSource* v = source;  // volatile: an earlier combine's values may sit in L1
    if (!window::wait_published(&source->seq, seq, a.err, d, kStepCombineSource, channel)) {
      failed = true;
    } else if (v->pull) {
      // d holds my channel-c rows after the rows of lower ranks and of my earlier channels.
      const int first = (rank ? a.rank_prefix_matrix[(rank - 1) * R + d] : 0) + (channel ? a.channel_prefix_matrix[d * C + channel - 1] : 0);
      // Each field's base: d's data region (its arena), or one of its segments I have mapped.
      char* data = static_cast<char*>(a.peers.data[d]);
      const unsigned long long key_x = v->key[kSourceX], key_w = v->key[kSourceWeights];
      char* base_x = key_x == 0 ? data : mapped_segment(a.segments, d, key_x);
      char* base_w = key_w == 0 ? data : mapped_segment(a.segments, d, key_w);
      if (base_x == nullptr || (v->weights >= 0 && base_w == nullptr)) {
        // d saw my SegmentsOpened name every key; a miss means the two disagree, and reading
        // anywhere would be worse than stopping.
        report_fault(a.err, kErrSegmentMissing, d, kStepCombineSource, channel, 0);
        failed = true;
      } else {
        pull[d] = true;
        pull_x[d] = reinterpret_cast<const int4*>(base_x + v->x) + static_cast<int64_t>(first) * L.hidden_int4;
        pull_weights[d] = v->weights < 0 ? nullptr : reinterpret_cast<const float*>(base_w + v->weights) + static_cast<int64_t>(first) * L.num_topk;
      }
    }
  }
  __syncthreads();
  if (failed) return kFailed;
  // Pulled everywhere (every peer reads my input in place and I read every peer's): no ring in
  // either direction, so nothing orders the channel's tokens and both of its blocks take half of
  // them, as dispatch's senders do. Both blocks decide from the same published words.
  bool split = self_pulled;
  for (int d = 0; d < R; ++d) split &= d == rank || pull[d];
  if (part == 1 && !split) return kNotNeeded;
  if (split) take_half<kRanks>(range, part, a.is_token_in_rank, R, consumed);

  const int4* bias_0 = static_cast<const int4*>(a.bias_0);
  const int4* bias_1 = static_cast<const int4*>(a.bias_1);
  int4* out = static_cast<int4*>(a.combined_x);
  const int K = L.num_topk, H4 = L.hidden_int4;
  const int4* x = static_cast<const int4*>(a.x);
  const uint64_t policy = evict_first_policy();
  const int self_row_base =
      received_rows(a.rank_prefix_matrix, a.recv_channel_prefix_matrix, R, C, rank, rank, channel).base;
  // A row in 512-byte columns (32 lanes x 16 bytes): what warps that share a token divide (below).
  const int columns = (H4 + 31) / 32;

  // Up to 4 ranks, a batch's routing and a token's weights are loaded ahead of their use, their
  // round trips behind the rows'; 8 ranks' rows alone fill the registers that would take.
  constexpr bool kAhead = kRanks <= 4;
  // Warp 0 loads each batch's routing while the batch before is summed.
  RoutingAhead<kRanks> ahead;
  if (kAhead && warp == 0) ahead.load(a.is_token_in_rank, range.begin + lane, lane < batch && range.begin + lane < range.end, R);
  for (int begin = range.begin; begin < range.end; begin += batch) {
    if (warp == 0) {
      if constexpr (kAhead)
        positions_from_flags(ahead.flags(), batch, R, consumed, position, batch_count);
      else
        batch_positions(a.is_token_in_rank, begin, range.end, batch, R, consumed, position, batch_count);
    }
    __syncthreads();
    if (kAhead && warp == 0) {
      const int next = begin + batch + lane;
      ahead.load(a.is_token_in_rank, next, lane < batch && next < range.end, R);
    }

    // A split channel's short last batch would leave most warps idle while a few sum whole rows:
    // there (no ring, so no slot to release or discard) several warps share each token, a slice of
    // its columns apiece.
    const int n = min(batch, range.end - begin);
    const int share = split && n < batch ? batch / n : 1;
    const int slot = warp / share, piece = warp - slot * share;
    const int t = begin + slot;
    if (slot < n) {
      // Where each contributing row is: a ring slot, or my own x for rows I sent to myself. Lane d
      // resolves (and waits for) rank d's row, so the waits for different ranks overlap.
      bool ok = true;
      if (lane < kMaxNvlRanks) {
        const int d = lane;
        const int pos = d < R ? position[slot][d] : -1;
        const int4* row_ptr = nullptr;
        const float* weight_ptr = nullptr;
        if (pos >= 0 && d == rank) {
          const int64_t row = self_row_base + pos;
          row_ptr = x + row * H4;
          weight_ptr = a.topk_weights ? a.topk_weights + row * K : nullptr;
        } else if (pos >= 0 && pull[d]) {
          row_ptr = pull_x[d] + static_cast<int64_t>(pos) * H4;
          weight_ptr = pull_weights[d] ? pull_weights[d] + static_cast<int64_t>(pos) * K : nullptr;
        } else if (pos >= 0) {
          char* ring = L.ring(a.peers.data[rank], channel, d);
          row_ptr = L.slot_x(ring, pos % L.slots);
          weight_ptr = L.slot_weights(ring, pos % L.slots);
          ok = window::wait(ring_tail<W>(L, a.peers.data[rank], channel, d), pos + 1, a.err, d, kStepCombineRecv,
                            channel);
        }
        rows_smem[warp][d] = row_ptr;
        weights_smem[warp][d] = weight_ptr;
      }
      __syncwarp();
      if (!__all_sync(0xffffffffu, ok)) {
        if (lane == 0) failed = true;
      } else {
        // In registers (kAhead): the stores below clobber memory, so every round would reload them.
        const int4* rows_ahead[kRanks];
        if constexpr (kAhead)
#pragma unroll
          for (int d = 0; d < kRanks; ++d) rows_ahead[d] = rows_smem[warp][d];
        const auto row = [&](int d) -> const int4* {
          if constexpr (kAhead) return rows_ahead[d];
          else return rows_smem[warp][d];
        };
        const bool sum_weights = a.combined_topk_weights && lane < K && piece == 0;
        float w[kRanks];
#pragma unroll
        for (int d = 0; d < kRanks; ++d) {
          w[d] = 0.f;
          if (kAhead && sum_weights && weights_smem[warp][d]) w[d] = ld_cg(weights_smem[warp][d] + lane);
        }
        const int64_t out_row = static_cast<int64_t>(t) * H4;
        const int lo = 32 * (piece * columns / share), hi = min(H4, 32 * ((piece + 1) * columns / share));
        // kSlices hidden slices per lane per step: up to kSlices x ranks 16-byte loads in flight
        // before the sums, as many as the registers allow (80 a thread at 24 warps).
        constexpr int kSlices = kRanks == 2 ? 4 : kRanks <= 4 ? 2 : 1;
        for (int i0 = lo + lane; i0 < hi; i0 += 32 * kSlices) {
          float acc[kSlices][8];
          int4 v[kSlices][kRanks];
#pragma unroll
          for (int u = 0; u < kSlices; ++u)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[u][e] = 0.f;
#pragma unroll
          for (int d = 0; d < kRanks; ++d)
#pragma unroll
            for (int u = 0; u < kSlices; ++u)
              if (row(d) && i0 + 32 * u < hi) v[u][d] = ld_cg(row(d) + i0 + 32 * u);
#pragma unroll
          for (int u = 0; u < kSlices; ++u) {
            const int i = i0 + 32 * u;
            if (i >= hi) continue;
#pragma unroll
            for (int d = 0; d < kRanks; ++d)
              if (row(d)) accumulate_bf16x8(acc[u], v[u][d]);
            if (bias_0) accumulate_bf16x8(acc[u], ld_nc_stream(bias_0 + out_row + i));
            if (bias_1) accumulate_bf16x8(acc[u], ld_nc_stream(bias_1 + out_row + i));
            if (a.l2_hints)
              st_na(out + out_row + i, pack_bf16x8(acc[u]), policy);
            else
              st_na(out + out_row + i, pack_bf16x8(acc[u]));
          }
        }
        if (sum_weights) {
          float sum = 0.f;  // absent ranks add +0, which leaves the sum as the present ones make it
#pragma unroll
          for (int d = 0; d < kRanks; ++d) {
            if constexpr (kAhead)
              sum += w[d];
            else if (weights_smem[warp][d])
              sum += ld_cg(weights_smem[warp][d] + lane);
          }
          a.combined_topk_weights[static_cast<int64_t>(t) * K + lane] = sum;
        }
        if (a.l2_discard) {
          // Every lane's loads of these rows fed the sums stored above; the ring lines are dead
          // until their sender's next lap, so drop them from L2 instead of writing them back.
          __syncwarp();
          for (int d = 0; d < kRanks; ++d)
            if (row(d) && d != rank && !pull[d])  // never a peer's input, only ring lines
              group_discard_rows(1, static_cast<int64_t>(H4) * 16, lane, 32, [&](int) { return row(d); });
        }
      }
    }
    __syncthreads();
    if (failed) return kFailed;
    if (threadIdx.x < R) {
      const int d = threadIdx.x;
      consumed[d] += batch_count[d];
      if (batch_count[d] > 0 && d != rank && !pull[d])
        return_credit<W>(L.head(a.peers.data[d], channel, rank), consumed[d] == channel_total[d] ? 0 : consumed[d], d);
    }
    __syncthreads();
  }
  if (threadIdx.x < R && threadIdx.x != rank && channel_total[threadIdx.x] > 0) {
    st_volatile(ring_tail<W>(L, a.peers.data[rank], channel, threadIdx.x), 0);
    // The last credit (the head's reset) complete before the next opening, as in dispatch's receiver.
    if constexpr (W::kPuts) W::quiet();
  }
  // Every read of a pulled peer's rows fed a store before the last barrier: release its input,
  // this part's half of it, or both halves when the channel is not split.
  if (!W::kPuts && threadIdx.x < R && pull[threadIdx.x])
    for (int p = split ? part : 0; p <= (split ? part : 1); ++p)
      window::signal(&a.sections[threadIdx.x]->pull_done[p][channel][rank], seq);
  return kReceived;
}

// Tells the token owners whether they may read this rank's input rows in place, and where. When it
// lies in segments, they may only if every owner has all of them mapped in this combine; the
// others learn of the segments (their handles are published either way).
__device__ void publish_source(const CombineArgs& a, Epoch seq) {
  HeaderSection* self = a.sections[a.rank];
  CombineSource* s = &self->combine_source;
  const CombineSource& mine = a.source;
  bool pull = mine.pull != 0;
  const bool named = publish_offers(mine.key, a.offers, self->combine_offers);
  // A timeout there is recorded; the senders and owners stop at their own waits.
  if (named && pull) pull = all_opened(self, mine.key, a.rank, a.layout.num_ranks, seq, a.err, kStepCombineSegments);
  s->x = mine.x;
  s->weights = mine.weights;
  for (int f = 0; f < kNumSourceFields; ++f) s->key[f] = mine.key[f];
  s->pull = pull;
  window::signal(&s->seq, seq);
  // For the host, after the word every owner waits for.
  a.mailbox->last_pulled = pull;
  __threadfence_system();
  a.mailbox->last_pulled_seq = seq;
}

// The agreed choice for this rank's input, for every block (senders push or wait, and whether the
// channel splits depends on it): without segments it is the host's (arena or not); with them, what
// publish_source decided. -1: the wait for it failed.
__device__ int agreed_pull(const CombineArgs& a, Epoch seq) {
  bool named = false;
  for (int f = 0; f < kNumSourceFields; ++f) named |= a.source.key[f] != 0;
  if (!a.source.pull || !named) return a.source.pull;
  __shared__ int pulled;
  if (threadIdx.x == 0) {
    const CombineSource* own = &a.sections[a.rank]->combine_source;
    const volatile CombineSource* v = own;  // volatile: an earlier combine's value may sit in L1
    pulled = window::wait_published(&own->seq, seq, a.err, a.rank, kStepCombineSource, blockIdx.x / 2) ? v->pull : -1;
  }
  __syncthreads();
  return pulled;
}

// What each peer's published input named, for this rank's host (combine_segment_news), once this
// rank has seen it; nothing when it named no segment. One thread per peer d.
__device__ void report_source_segments(const CombineArgs& a, int d, Epoch seq) {
  const CombineSource* source = &a.sections[d]->combine_source;
  // Acquire, as the receivers' wait: when that wait timed out just before the peer published, the
  // keys and handles below must still be the ones this seq names.
  if (ld_acquire_sys(const_cast<const Epoch*>(&source->seq)) != seq) return;  // its wait failed: the fault is recorded
  const volatile unsigned long long* keys = source->key;
  if (keys[kSourceX] == 0 && keys[kSourceWeights] == 0) return;
  report_segments<kNumSourceFields>(&a.mailbox->combine_segment_news[d], a.segments, d, keys,
                                    a.sections[d]->combine_offers, seq);
}

template <int kRanks, class W, bool kHalt>
__device__ void combine_channel(const CombineArgs& a, Epoch seq) {
  const int channel = blockIdx.x / 2;
  // First, before any wait: publish_source on every peer waits for what this rank has mapped (the
  // put path names no segment, and cannot write a peer's header).
  if (!W::kPuts && blockIdx.x == 0) publish_opened(a.segments, a.sections, a.rank, a.layout.num_ranks, seq);
  if (blockIdx.x == 1 && threadIdx.x == 0) publish_source(a, seq);
  const int pulled = agreed_pull(a, seq);
  if (blockIdx.x % 2 == 0) {
    if (pulled < 0) return;
    if (pulled == 0) {
      send_channel<W, kHalt>(a, seq, channel);
      return;
    }
    // My input is pulled: this block receives the channel's second half when every peer's input is
    // pulled too (never in a halting combine, which always pushes), then waits for the owners; a
    // failed receive only makes those waits end at the fault it recorded.
    if (!kHalt) recv_channel<kRanks, W>(a, seq, channel, 1, true);
    wait_pulled(a, seq, channel);
  } else {
    recv_channel<kRanks, W>(a, seq, channel, 0, !kHalt && pulled > 0);
    // Last, off the rows' path.
    if (!W::kPuts && blockIdx.x == 1 && threadIdx.x < a.layout.num_ranks && threadIdx.x != a.rank)
      report_source_segments(a, threadIdx.x, seq);
  }
}

// Numbered by the opening barrier's epoch; skipped (outputs poisoned) as in dispatch.
template <int kRanks, class W = window::Stores, bool kHalt = false>
__global__ void __launch_bounds__(kThreads, 1) combine_kernel(CombineArgs a) {
  const bool may_run = a.opens ? open_in_kernel<W>(a.peers, a.rank, a.layout.num_ranks, a.opening, a.err)
                                : operation_may_run(a.err);
  if (may_run)
    combine_channel<kRanks, W, kHalt>(a, ld_volatile(&a.err.self->epoch));
  else
    poison_grid_share(a.poison);
  finish_block(a.err, a.poison);
}

// The receivers' rank count is a template bound: the smallest instantiation that holds R.
template <class W, bool kHalt>
void launch_combine_for_ranks(const CombineArgs& a, const LaunchShape& shape, cudaStream_t stream) {
  const int R = a.layout.num_ranks;
  if (R <= 2)
    launch("intranode combine", &combine_kernel<2, W, kHalt>, shape, stream, a);
  else if (R <= 4)
    launch("intranode combine", &combine_kernel<4, W, kHalt>, shape, stream, a);
  else
    launch("intranode combine", &combine_kernel<kMaxNvlRanks, W, kHalt>, shape, stream, a);
}

}  // namespace

}  // namespace moelink::intranode
