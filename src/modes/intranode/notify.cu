// Intranode notify: every rank learns how many rows it will receive, from whom, in which channel,
// and for which local expert, before any row moves.
//
// Protocol (one block per rank):
//   1. barrier: every peer has finished its previous operation (so it no longer reads its inbox
//      and has reset its ring counters).
//   2. count my tokens per (destination, channel) from is_token_in_rank; write into each
//      destination's header inbox: my per-rank totals, my per-channel counts to it, and my
//      per-expert counts for its experts.
//   3. barrier: all inboxes are written (release/acquire at system scope through the barrier).
//   4. read my inbox: rank_prefix_matrix, recv_channel_prefix_matrix, per-expert counts; publish
//      them to the host-mapped mailbox and set ready_seq last. The host polls ready_seq.
#include <cuda_runtime.h>

#include "common/barrier.cuh"
#include "common/launch.cuh"
#include "modes/intranode/contract.hpp"

namespace moelink::intranode {

using namespace kernels;

namespace {

constexpr int kNotifyThreads = 512;

__global__ void __launch_bounds__(kNotifyThreads) notify_kernel(NotifyArgs a) {
  const int R = a.num_ranks, C = a.num_channels, rank = a.err.rank;
  const int warp = threadIdx.x / 32, lane = lane_id(), num_warps = blockDim.x / 32;
  __shared__ int counts[kMaxNvlRanks * kMaxChannels];
  __shared__ int totals[kMaxNvlRanks];
  __shared__ bool failed;

  if (threadIdx.x == 0) failed = !barrier_one_thread(a.peers, a.peers.header[rank], rank, R, kBarrierOp, a.err);
  // Count my tokens per (destination, channel): one warp per pair, lanes stride the tokens.
  for (int pair = warp; pair < R * C; pair += num_warps) {
    const int d = pair / C, c = pair % C;
    const ChannelRange range = channel_range(a.num_tokens, C, c);
    int n = 0;
    for (int t = range.begin + lane; t < range.end; t += 32) n += a.is_token_in_rank[static_cast<int64_t>(t) * R + d];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) n += __shfl_xor_sync(0xffffffffu, n, off);
    if (lane == 0) counts[pair] = n;
  }
  __syncthreads();
  if (failed) return;

  if (threadIdx.x < R) {
    const int d = threadIdx.x;
    int acc = 0;
    for (int c = 0; c < C; ++c) {
      acc += counts[d * C + c];
      a.channel_prefix_matrix[d * C + c] = acc;
    }
    totals[d] = acc;
  }
  __syncthreads();

  // Fill every destination's inbox slot for me.
  for (int d = 0; d < R; ++d) {
    HeaderSection* dst = a.sections[d];
    for (int i = threadIdx.x; i < R; i += blockDim.x) dst->inbox_rank_counts[rank][i] = totals[i];
    for (int c = threadIdx.x; c < C; c += blockDim.x) dst->inbox_channel_counts[rank][c] = counts[d * C + c];
    for (int j = threadIdx.x; j < a.num_local_experts; j += blockDim.x)
      dst->inbox_expert_counts[rank][j] = a.num_tokens_per_expert[d * a.num_local_experts + j];
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) failed = !barrier_one_thread(a.peers, a.peers.header[rank], rank, R, kBarrierOp, a.err);
  __syncthreads();
  if (failed) return;

  const HeaderSection* self = a.sections[rank];
  if (threadIdx.x < R) {
    const int d = threadIdx.x;
    int acc = 0;
    for (int s = 0; s < R; ++s) {
      acc += ld_volatile(&self->inbox_rank_counts[s][d]);
      a.rank_prefix_matrix[s * R + d] = acc;
    }
    if (d == rank) {
      a.mailbox->num_recv_tokens = acc;
      if (a.num_worst_tokens > 0 && acc > a.num_worst_tokens)
        report_error(a.err, kErrWorstTokensOverflow, -1, kStepNotify, -1, acc);
    }
  }
  if (threadIdx.x >= 32 && threadIdx.x < 32 + R) {
    const int s = threadIdx.x - 32;
    int acc = 0;
    for (int c = 0; c < C; ++c) {
      a.recv_channel_prefix_matrix[s * C + c] = acc;
      acc += ld_volatile(&self->inbox_channel_counts[s][c]);
    }
  }
  for (int j = threadIdx.x; j < a.num_local_experts; j += blockDim.x) {
    int n = 0;
    for (int s = 0; s < R; ++s) n += ld_volatile(&self->inbox_expert_counts[s][j]);
    const int align = a.expert_alignment;
    a.mailbox->num_recv_tokens_per_expert[j] = (n + align - 1) / align * align;
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) *reinterpret_cast<volatile int*>(a.ready_seq) = a.seq;
}

const KernelRegistration registration(reinterpret_cast<const void*>(&notify_kernel), "intranode notify",
                                      kNotifyThreads, 0);

}  // namespace

void launch_notify(const NotifyArgs& a, cudaStream_t stream) {
  launch("intranode notify", &notify_kernel, LaunchShape{1, kNotifyThreads, 0}, stream, a);
}

}  // namespace moelink::intranode
