// Intranode dispatch: rows move from each source rank's x into each destination's recv_x through a
// ring per (channel, source) in the destination's NVLink buffer.
//
// Protocol (2 blocks per channel; block 2c sends channel c, block 2c+1 receives channel c):
//   Sender, warp group per destination d: scans channel c's tokens for those routed to d, in token
//     order, and copies them chunk by chunk into ring(c, me) in d's buffer (row, source index,
//     top-k ids and weights, scales). Before a chunk it waits until d has consumed enough
//     (head[c][d] in my buffer, written by d) for the chunk to fit; after the chunk the group
//     leader publishes tail[c][me] in d's buffer with a system-scope release.
//   Receiver, warp group per source s: waits (acquire) until tail[c][s] covers the next chunk,
//     copies the chunk to recv_x rows rank_prefix(s) + recv_channel_prefix[s][c] + i, so rows land
//     ordered by source rank then source token, and releases head[c][me] in s's buffer.
//   Rows a rank sends to itself skip the ring: its receiver group copies them from x directly.
//   Both sides use the same chunk size, so tail values are exactly the chunk boundaries.
//   Counters reset themselves: the receiver writes head = 0 instead of the final count (the sender
//   never waits after its last chunk) and zeroes its own tail after the last chunk. The barrier
//   that opens every operation guarantees nobody touches a ring before its owner reset it.
//   Every wait is bounded by the timeout and reports (rank, peer, step, channel).
#include <cuda_runtime.h>

#include "kernels/common/device_errors.cuh"

namespace moelink::kernels {

namespace {

constexpr int kNumWarps = kIntranodeThreads / 32;
constexpr int kMaxChunkTokens = 64;  // Config allows at most this many tokens per chunk

__device__ __forceinline__ int ld_cg_int(const int* p) {
  int v;
  asm volatile("ld.global.cg.b32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ float ld_cg_float(const float* p) { return __int_as_float(ld_cg_int(reinterpret_cast<const int*>(p))); }

__device__ void send_channel(const DispatchArgs& a, int channel) {
  const RingLayout& L = a.layout;
  const int R = L.num_ranks, C = L.num_channels;
  const int warps_per_group = kNumWarps / R;
  const int warp = threadIdx.x / 32, lane = lane_id();
  const int d = warp / warps_per_group, gw = warp % warps_per_group;
  __shared__ bool abort_group[kMaxNvlRanks];
  // Spare warps when R does not divide the warp count; rows to myself never use a ring.
  if (d >= R || d == a.rank) return;

  const int total = a.channel_prefix_matrix[d * C + channel] - (channel ? a.channel_prefix_matrix[d * C + channel - 1] : 0);
  const ChannelRange range = channel_range(a.num_tokens, C, channel);
  int* tail_remote = L.tail(a.peers.data[d], channel, a.rank);
  const int* head_local = L.head(a.peers.data[a.rank], channel, d);
  char* ring = L.ring(a.peers.data[d], channel, a.rank);
  const int group_threads = warps_per_group * 32;
  const int4* x = static_cast<const int4*>(a.x);
  const int K = L.num_topk, S = L.num_scales;
  if (threadIdx.x % group_threads == 0) abort_group[d] = false;

  __shared__ int chunk_tokens[kMaxNvlRanks][kMaxChunkTokens];
  int* tokens = chunk_tokens[d];
  const int thread = threadIdx.x % group_threads;
  int cursor = range.begin, sent = 0;
  while (sent < total) {
    const int n = min(a.chunk, total - sent);
    if (gw == 0) {
      // Warp 0 of the group finds the chunk's next n tokens routed to d, in token order.
      for (int j = 0; j < n;) {
        const int t = cursor + lane;
        const bool routed = t < range.end && a.is_token_in_rank[static_cast<int64_t>(t) * R + d];
        const unsigned mask = __ballot_sync(0xffffffffu, routed);
        const int take = min(__popc(mask), n - j);
        const int rank_in_mask = __popc(mask & ((1u << lane) - 1));
        if (routed && rank_in_mask < take) tokens[j + rank_in_mask] = t;
        int last_bit = 31;
        if (take < __popc(mask)) {
          // Bit position of the take-th set bit: the chunk ends there.
          unsigned rest = mask;
          for (int q = 0; q < take; ++q) {
            last_bit = __ffs(rest) - 1;
            rest &= rest - 1;
          }
          cursor += last_bit + 1;
        } else {
          cursor += 32;
        }
        j += take;
      }
      if (lane == 0 && !wait_at_least(head_local, sent + n - L.slots, a.err, d, kStepDispatchSend, channel))
        abort_group[d] = true;
    }
    group_barrier(1 + d, group_threads);
    if (abort_group[d]) return;

    group_copy_rows<8>(
        n, L.hidden_int4, thread, group_threads,
        [&](int j) { return x + static_cast<int64_t>(tokens[j]) * L.hidden_int4; },
        [&](int j) { return L.slot_x(ring, (sent + j) % L.slots); },
        [](const int4* p) { return ld_nc_stream(p); }, [](int4* p, const int4& v) { *p = v; });
    for (int j = thread; j < n; j += group_threads) *L.slot_src_idx(ring, (sent + j) % L.slots) = tokens[j];
    for (int e = thread; e < n * K; e += group_threads) {
      const int j = e / K, k = e - j * K, token = tokens[j], slot = (sent + j) % L.slots;
      const int64_t expert = a.topk_idx[static_cast<int64_t>(token) * K + k];
      if (expert < -1 || expert >= a.num_experts)
        report_error(a.err, kErrBadExpertId, -1, kStepDispatchSend, channel, static_cast<long long>(token) * kMaxTopK + k);
      L.slot_topk_idx(ring, slot)[k] = static_cast<int>(expert);
      L.slot_weights(ring, slot)[k] = a.topk_weights ? a.topk_weights[static_cast<int64_t>(token) * K + k] : 0.f;
    }
    for (int e = thread; e < n * S; e += group_threads) {
      const int j = e / S, i = e - j * S;
      L.slot_scales(ring, (sent + j) % L.slots)[i] =
          a.x_scales[tokens[j] * a.x_scales_stride_token + i * a.x_scales_stride_scale];
    }
    group_barrier(1 + d, group_threads);
    if (gw == 0 && lane == 0) st_release_sys(tail_remote, sent + n);
    sent += n;
  }
}

__device__ void copy_own_rows(const DispatchArgs& a, int channel, int row_base, int gw, int warps_per_group) {
  const RingLayout& L = a.layout;
  const int R = L.num_ranks, K = L.num_topk, S = L.num_scales, rank = a.rank, lane = lane_id();
  const ChannelRange range = channel_range(a.num_tokens, L.num_channels, channel);
  const int4* x = static_cast<const int4*>(a.x);
  int4* recv_x = static_cast<int4*>(a.recv_x);
  const int expert_begin = rank * a.num_local_experts;
  int found = 0;
  for (int cursor = range.begin; cursor < range.end; cursor += 32) {
    const int t = cursor + lane;
    const bool routed = t < range.end && a.is_token_in_rank[static_cast<int64_t>(t) * R + rank];
    unsigned mask = __ballot_sync(0xffffffffu, routed);
    for (int q = 0; mask; ++q, mask &= mask - 1) {
      if ((found + q) % warps_per_group != gw) continue;
      const int token = cursor + __ffs(mask) - 1;
      const int row = row_base + found + q;
      if (row >= a.num_out_rows) continue;
      const int4* src = x + static_cast<int64_t>(token) * L.hidden_int4;
      int4* dst = recv_x + static_cast<int64_t>(row) * L.hidden_int4;
      warp_copy<8>(L.hidden_int4, [&](int i) { return ld_nc_stream(src + i); }, [&](int i, const int4& v) { st_na(dst + i, v); });
      if (lane == 0 && a.write_src_idx) a.recv_src_idx[row] = token;
      if (lane < K) {
        const int64_t e = a.topk_idx[static_cast<int64_t>(token) * K + lane];
        const bool mine = e >= expert_begin && e < expert_begin + a.num_local_experts;
        if (a.recv_topk_idx) a.recv_topk_idx[static_cast<int64_t>(row) * K + lane] = mine ? e - expert_begin : -1;
        if (a.recv_topk_weights)
          a.recv_topk_weights[static_cast<int64_t>(row) * K + lane] =
              mine && a.topk_weights ? a.topk_weights[static_cast<int64_t>(token) * K + lane] : 0.f;
      }
      for (int i = lane; i < S; i += 32)
        a.recv_x_scales[row * a.recv_scales_stride_token + i * a.recv_scales_stride_scale] =
            a.x_scales[token * a.x_scales_stride_token + i * a.x_scales_stride_scale];
    }
    found += __popc(__ballot_sync(0xffffffffu, routed));
  }
}

__device__ void recv_channel(const DispatchArgs& a, int channel) {
  const RingLayout& L = a.layout;
  const int R = L.num_ranks, C = L.num_channels, rank = a.rank;
  const int warps_per_group = kNumWarps / R;
  const int warp = threadIdx.x / 32, lane = lane_id();
  const int s = warp / warps_per_group, gw = warp % warps_per_group;
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
  if (s >= R) return;

  const int rank_base = s ? a.rank_prefix_matrix[(s - 1) * R + rank] : 0;
  const int from_s = a.rank_prefix_matrix[s * R + rank] - rank_base;
  const int first = a.recv_channel_prefix_matrix[s * C + channel];
  const int total = (channel + 1 < C ? a.recv_channel_prefix_matrix[s * C + channel + 1] : from_s) - first;
  const int row_base = rank_base + first;
  if (s == rank) {
    copy_own_rows(a, channel, row_base, gw, warps_per_group);
    return;
  }
  int* tail_local = L.tail(a.peers.data[rank], channel, s);
  int* head_remote = L.head(a.peers.data[s], channel, rank);
  char* ring = L.ring(a.peers.data[rank], channel, s);
  const int group_threads = warps_per_group * 32;
  int4* recv_x = static_cast<int4*>(a.recv_x);
  const int K = L.num_topk, S = L.num_scales;
  const int expert_begin = rank * a.num_local_experts;
  if (threadIdx.x % group_threads == 0) abort_group[s] = false;

  int consumed = 0;
  while (consumed < total) {
    const int n = min(a.chunk, total - consumed);
    if (gw == 0 && lane == 0) {
      if (!wait_at_least(tail_local, consumed + n, a.err, s, kStepDispatchRecv, channel)) abort_group[s] = true;
    }
    group_barrier(1 + s, group_threads);
    if (abort_group[s]) return;

    // Rows past num_out_rows (a num_worst_tokens overflow, reported by notify) are dropped.
    const int m = max(0, min(n, a.num_out_rows - (row_base + consumed)));
    const int thread = threadIdx.x % group_threads;
    group_copy_rows<8>(
        m, L.hidden_int4, thread, group_threads, [&](int j) { return L.slot_x(ring, (consumed + j) % L.slots); },
        [&](int j) { return recv_x + static_cast<int64_t>(row_base + consumed + j) * L.hidden_int4; },
        [](const int4* p) { return ld_cg(p); }, [](int4* p, const int4& v) { st_na(p, v); });
    for (int j = thread; j < m && a.write_src_idx; j += group_threads)
      a.recv_src_idx[row_base + consumed + j] = ld_cg_int(L.slot_src_idx(ring, (consumed + j) % L.slots));
    for (int e = thread; e < m * K; e += group_threads) {
      const int j = e / K, k = e - j * K, slot = (consumed + j) % L.slots;
      const int64_t row = row_base + consumed + j;
      const int expert = ld_cg_int(L.slot_topk_idx(ring, slot) + k);
      const bool mine = expert >= expert_begin && expert < expert_begin + a.num_local_experts;
      if (a.recv_topk_idx) a.recv_topk_idx[row * K + k] = mine ? expert - expert_begin : -1;
      if (a.recv_topk_weights) a.recv_topk_weights[row * K + k] = mine ? ld_cg_float(L.slot_weights(ring, slot) + k) : 0.f;
    }
    for (int e = thread; e < m * S; e += group_threads) {
      const int j = e / S, i = e - j * S;
      a.recv_x_scales[(row_base + consumed + j) * a.recv_scales_stride_token + i * a.recv_scales_stride_scale] =
          ld_cg_float(L.slot_scales(ring, (consumed + j) % L.slots) + i);
    }
    group_barrier(1 + s, group_threads);
    consumed += n;
    if (gw == 0 && lane == 0) st_release_sys(head_remote, consumed == total ? 0 : consumed);
  }
  if (total > 0 && gw == 0 && lane == 0) st_volatile(tail_local, 0);
}

__global__ void __launch_bounds__(kIntranodeThreads, 1) intranode_dispatch_kernel(DispatchArgs a) {
  const int channel = blockIdx.x / 2;
  if (blockIdx.x % 2 == 0)
    send_channel(a, channel);
  else
    recv_channel(a, channel);
}

}  // namespace

void launch_intranode_dispatch(const DispatchArgs& a, cudaStream_t stream) {
  intranode_dispatch_kernel<<<a.layout.num_channels * 2, kIntranodeThreads, 0, stream>>>(a);
}

}  // namespace moelink::kernels
