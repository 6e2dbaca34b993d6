#pragma once
// Row bookkeeping both intranode kernels share: where a source's rows of a channel sit in the
// receive order, and each batch token's position in the per-rank ring streams.
#include "common/primitives.cuh"
#include "modes/intranode/ring_layout.hpp"
#include "moelink/topology.hpp"

namespace moelink::intranode {

using kernels::lane_id;
using kernels::valid_token_flags;

// Rows `rank` received from `source` on `channel`: `count` rows starting at `base` in recv order
// (source rank major, then channel, then token).
struct RowSpan {
  int base, count;
};

__device__ __forceinline__ RowSpan received_rows(const int* rank_prefix_matrix, const int* recv_channel_prefix_matrix,
                                                 int num_ranks, int num_channels, int rank, int source, int channel) {
  const int R = num_ranks, C = num_channels;
  const int rank_base = source ? rank_prefix_matrix[(source - 1) * R + rank] : 0;
  const int from_source = rank_prefix_matrix[source * R + rank] - rank_base;
  const int first = recv_channel_prefix_matrix[source * C + channel];
  const int end = channel + 1 < C ? recv_channel_prefix_matrix[source * C + channel + 1] : from_source;
  return {rank_base + first, end - first};
}

// batch_positions from routing bits already loaded: lane i holds token begin + i's (0 past the batch).
__device__ __forceinline__ void positions_from_flags(unsigned flags, int batch, int num_ranks, const int* base,
                                                     int (*position)[kMaxNvlRanks], int* batch_count) {
  const int lane = lane_id();
  for (int d = 0; d < num_ranks; ++d) {
    const bool routed = (flags >> d) & 1u;
    const unsigned mask = __ballot_sync(0xffffffffu, routed);
    if (lane < batch) position[lane][d] = routed ? base[d] + __popc(mask & ((1u << lane) - 1)) : -1;
    if (lane == 0) batch_count[d] = __popc(mask);
  }
}

// Called by one warp for tokens [begin, begin + batch) of a channel ending at `end` (batch <= 32).
// position[i][d] = base[d] + (earlier batch tokens routed to d) for token begin + i when it is
// routed to d, else -1; batch_count[d] = batch tokens routed to d. Rings carry a channel's rows in
// token order, so base[d] + position is the token's place in rank d's stream.
__device__ __forceinline__ void batch_positions(const bool* is_token_in_rank, int begin, int end, int batch,
                                                int num_ranks, const int* base, int (*position)[kMaxNvlRanks],
                                                int* batch_count) {
  const int lane = lane_id(), t = begin + lane;
  const unsigned flags = valid_token_flags(is_token_in_rank, t, lane < batch && t < end, num_ranks);
  positions_from_flags(flags, batch, num_ranks, base, position, batch_count);
}

// Called by the whole block: adds to count[d], for every rank d < num_ranks, the tokens of
// [begin, end) routed to d, one atomic per warp and rank. A channel whose tokens two blocks split
// (all direct, or all pulled) starts its second block's positions after the first block's tokens.
template <int kRanks>
__device__ __forceinline__ void add_token_counts(const bool* is_token_in_rank, int begin, int end, int num_ranks,
                                                 int* count) {
  unsigned counts[kRanks] = {};
  for (int t = begin + static_cast<int>(threadIdx.x); t < end; t += blockDim.x) {
    const unsigned flags = valid_token_flags(is_token_in_rank, t, true, num_ranks);
#pragma unroll
    for (int d = 0; d < kRanks; ++d) counts[d] += (flags >> d) & 1u;
  }
  const int lane = lane_id();
#pragma unroll
  for (int d = 0; d < kRanks; ++d) {
    const unsigned total = __reduce_add_sync(0xffffffffu, counts[d]);
    if (lane == 0 && d < num_ranks && total) atomicAdd(&count[d], static_cast<int>(total));
  }
}

// A channel split over its two blocks: part 0 takes the first half of its tokens, part 1 the rest,
// with its positions counted past part 0's tokens in count[d] (ring positions for dispatch, rows of
// each rank's input for combine). Part 1 reads `count` after the block's barrier.
template <int kRanks>
__device__ __forceinline__ void take_half(ChannelRange& range, int part, const bool* is_token_in_rank, int num_ranks,
                                          int* count) {
  const int mid = range.begin + (range.end - range.begin + 1) / 2;
  if (part == 0) {
    range.end = mid;
    return;
  }
  add_token_counts<kRanks>(is_token_in_rank, range.begin, mid, num_ranks, count);
  __syncthreads();
  range.begin = mid;
}

// A token's routing row loaded a batch ahead: the loads go out now and nothing reads them until
// flags() (valid_token_flags' bits), so their latency hides behind whatever the warp does between.
template <int kRanks>
struct RoutingAhead {
  unsigned char routed[kRanks];  // the bytes as stored, tested as valid_token_flags tests them

  __device__ __forceinline__ void load(const bool* is_token_in_rank, int t, bool valid, int num_ranks) {
    const unsigned char* row = reinterpret_cast<const unsigned char*>(is_token_in_rank) + static_cast<int64_t>(t) * num_ranks;
#pragma unroll
    for (int d = 0; d < kRanks; ++d) {
      routed[d] = 0;
      if (valid && d < num_ranks) routed[d] = row[d];
    }
  }
  __device__ __forceinline__ unsigned flags() const {
    unsigned bits = 0;
#pragma unroll
    for (int d = 0; d < kRanks; ++d) bits |= (routed[d] != 0 ? 1u : 0u) << d;
    return bits;
  }
};

}  // namespace moelink::intranode
