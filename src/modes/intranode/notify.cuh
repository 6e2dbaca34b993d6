#pragma once
// Intranode notify: every rank learns how many rows it will receive, from whom, in which channel,
// and for which local expert, before any row moves; and every rank reaches the same verdict on
// whether the dispatch may run at all.
//
// Protocol (one block per rank):
//   1. opening barrier with the digest (common/opening.cuh): every peer has finished its previous
//      operation (so it no longer reads its inbox and has reset its ring counters), and all ranks
//      agree on the operation, config, row layout, top-k and experts, or all skip it. Meanwhile the
//      other threads count my tokens per (destination, channel) from is_token_in_rank and look for
//      expert ids outside [-1, E) in topk_idx.
//   2. write into each destination's header inbox: my per-rank totals, my per-channel counts to it,
//      my per-expert counts for its experts, my first bad expert id and my num_worst_tokens.
//   3. barrier: all inboxes are written (release/acquire at system scope through the barrier).
//   4. read my inbox. Every rank sees every rank's totals, bad id and num_worst_tokens, so every
//      rank finds the same data error (a bad id on the lowest rank, else the lowest rank that would
//      receive more rows than its num_worst_tokens) and skips with it. Otherwise:
//      rank_prefix_matrix, recv_channel_prefix_matrix, per-expert counts. The handle's matrices
//      and its info (the dispatch id, i.e. the opening epoch, and its status) go to this rank's
//      NotifyResults, from which the dispatch kernel copies them into the handle's tensors; the
//      gate is left for the dispatch kernel; the mailbox gets the counts, whether every rank
//      skips, and ready_seq last. The host polls ready_seq. A skipped notify (step 1) writes the
//      status and ready_seq too.
//
// The put path (W::kPuts; the internode lane with MOELINK_DEBUG_LANE_FORCE_PUT=fake): the opening
// puts its digest and epoch (common/barrier.cuh). Steps 2 and 3 become one: the block stages what
// it tells each destination d in its own header (HeaderSection::inbox_stage[d]), then thread d puts
// d's stage into d's inbox row for this rank and, after it, the barrier's epoch as the puts' one
// signal; thread 0 then waits for every peer's epoch as the barrier does.
#include <cuda_runtime.h>

#include "common/launch.cuh"
#include "common/opening.cuh"
#include "modes/intranode/contract.hpp"
#include "window/device.cuh"

namespace moelink::intranode {

using namespace kernels;

namespace {

constexpr int kNotifyThreads = 512;

// token * kMaxTopK + slot of this thread's first expert id outside [-1, E), or ~0. 16-byte loads,
// eight in flight per thread: one block reads a 4096 x 8 topk_idx in a few microseconds.
__device__ unsigned long long first_bad_expert(const NotifyArgs& a) {
  const int64_t slots = static_cast<int64_t>(a.num_tokens) * a.num_topk;
  unsigned long long bad = ~0ull;
  const auto check = [&](int64_t i, long long e) {
    if (e < -1 || e >= a.num_experts) {
      const int64_t t = i / a.num_topk;
      bad = min(bad, static_cast<unsigned long long>(t * kMaxTopK + (i - t * a.num_topk)));
    }
  };
  int64_t scalar_from = 0;
  if ((reinterpret_cast<uintptr_t>(a.topk_idx) & 15) == 0) {
    const int4* pairs = reinterpret_cast<const int4*>(a.topk_idx);
    const int64_t num_pairs = slots / 2;
    constexpr int kUnroll = 8;
    for (int64_t base = threadIdx.x; base < num_pairs; base += static_cast<int64_t>(blockDim.x) * kUnroll) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (base + u * blockDim.x < num_pairs) v[u] = ld_nc_stream(pairs + base + u * blockDim.x);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t p = base + u * blockDim.x;
        if (p >= num_pairs) continue;
        check(2 * p, static_cast<long long>((static_cast<unsigned long long>(static_cast<unsigned>(v[u].y)) << 32) |
                                            static_cast<unsigned>(v[u].x)));
        check(2 * p + 1, static_cast<long long>((static_cast<unsigned long long>(static_cast<unsigned>(v[u].w)) << 32) |
                                                static_cast<unsigned>(v[u].z)));
      }
    }
    scalar_from = num_pairs * 2;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < slots; i += blockDim.x) check(i, a.topk_idx[i]);
  return bad;
}

// Steps 2 and 3 on the put path, by every thread: stage, put with one signal per destination, wait.
// counts / totals: this rank's per-(destination, channel) and per-destination token counts (shared).
template <class W>
__device__ __forceinline__ void put_inboxes(const NotifyArgs& a, const int* counts, const int* totals,
                                            unsigned long long first_bad, int* verdict) {
  const int R = a.num_ranks, C = a.num_channels, rank = a.err.rank, E = a.num_local_experts;
  __shared__ Epoch barrier_epoch;
  if (threadIdx.x == 0) barrier_epoch = barrier_next_epoch(a.peers.header[rank]);
  InboxStage* stage = a.sections[rank]->inbox_stage;
  for (int d = 0; d < R; ++d) {
    for (int i = threadIdx.x; i < R; i += blockDim.x) stage[d].rank_counts[i] = totals[i];
    for (int c = threadIdx.x; c < C; c += blockDim.x) stage[d].channel_counts[c] = counts[d * C + c];
    for (int j = threadIdx.x; j < E; j += blockDim.x) stage[d].expert_counts[j] = a.num_tokens_per_expert[d * E + j];
    if (threadIdx.x == 0) {
      stage[d].bad_expert = first_bad == ~0ull ? 0 : static_cast<long long>(first_bad) + 1;
      stage[d].worst_tokens = a.num_worst_tokens;
    }
  }
  // The block's staged words before the putting threads read them; the system fence also puts
  // this rank's earlier writes (its previous operation's) before any signal, as the barrier's does.
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x < R) {
    // One thread per destination: its puts to d, then the epoch, which lands after them.
    const int d = threadIdx.x;
    HeaderSection* dst = a.sections[d];
    W::put(dst->inbox_rank_counts[rank], stage[d].rank_counts, 4LL * R, d);
    W::put(dst->inbox_channel_counts[rank], stage[d].channel_counts, 4LL * C, d);
    if (E > 0) W::put(dst->inbox_expert_counts[rank], stage[d].expert_counts, 4LL * E, d);
    W::put(&dst->inbox_bad_expert[rank], &stage[d].bad_expert, sizeof(long long), d);
    W::put(&dst->inbox_worst_tokens[rank], &stage[d].worst_tokens, sizeof(int), d);
    W::signal_set(&a.peers.header[d]->barrier_signal[rank], barrier_epoch, d);
    // The stage is rewritten by the next notify; Puts must have read it by then.
    W::quiet();
  }
  __syncthreads();
  if (threadIdx.x == 0 && !barrier_wait(a.peers, rank, R, kBarrierOp, a.err, barrier_epoch)) *verdict = kGateSkip;
  __syncthreads();
}

// (kNotifyThreads, 2) caps it at 64 registers, its footprint before the opening read every digest
// at once: ranks sharing a GPU under MPS need an SM with room for this one block while their peers'
// kernels hold the rest.
// W: the window policy of the opening, the inbox and the barrier (the host picks it).
template <class W>
__global__ void __launch_bounds__(kNotifyThreads, 2) notify_kernel(NotifyArgs a) {
  const int R = a.num_ranks, C = a.num_channels, rank = a.err.rank;
  const int warp = threadIdx.x / 32, lane = lane_id(), num_warps = blockDim.x / 32;
  __shared__ int counts[kMaxNvlRanks * kMaxChannels];
  __shared__ int totals[kMaxNvlRanks];
  __shared__ int gate;
  __shared__ Epoch epoch;
  __shared__ unsigned long long first_bad;  // token * kMaxTopK + slot of the first bad id, or ~0

  // Thread 0 keeps the verdict in a register and publishes it to the block once, here: a later
  // write to `gate` raced the other threads' loads of it, which the compiler hoists out of
  // `threadIdx.x == 0 && gate == ...` (compute-sanitizer racecheck, 2026-12-01).
  int verdict = kGateGo;
  if (threadIdx.x == 0) {
    first_bad = ~0ull;
    verdict = open_operation<W>(a.peers, rank, R, a.opening, a.err, &epoch);
    gate = verdict;
  }
  // Count my tokens per (destination, channel) while thread 0 waits in the opening: warps 1.. take
  // a token per lane, kCountUnroll tokens in flight each (all R flags of a token in one round trip),
  // and fold a warp's tokens per (destination, channel) with ballots. One warp per pair reading a
  // byte per load was tens of dependent round trips; the host waits for all of them.
  if (warp > 0) {
    const int counters = num_warps - 1, T = a.num_tokens;
    for (int i = threadIdx.x - 32; i < R * C; i += blockDim.x - 32) counts[i] = 0;
    group_barrier(1, blockDim.x - 32);
    constexpr int kCountUnroll = 4;
    const int stride = counters * 32;
    for (int first = (warp - 1) * 32; first < T; first += stride * kCountUnroll) {
      unsigned flags[kCountUnroll];
#pragma unroll
      for (int u = 0; u < kCountUnroll; ++u) {
        const int t = first + u * stride + lane;
        flags[u] = valid_token_flags(a.is_token_in_rank, t, t < T, R);
      }
#pragma unroll
      for (int u = 0; u < kCountUnroll; ++u) {
        if (first + u * stride >= T) break;  // warp-uniform
        const int c = channel_of(T, C, min(first + u * stride + lane, T - 1));  // lanes past T carry no flags
        const unsigned same = __match_any_sync(0xffffffffu, c);
        const bool leader = __ffs(same) - 1 == lane;
        for (int d = 0; d < R; ++d) {
          const unsigned routed = __ballot_sync(0xffffffffu, (flags[u] >> d) & 1u);
          const int n = __popc(routed & same);
          if (leader && n) atomicAdd(&counts[d * C + c], n);
        }
      }
    }
  }
  // The scan overlaps the opening barrier; the block's first bad id is folded in after it.
  const unsigned long long my_bad = a.topk_idx != nullptr ? first_bad_expert(a) : ~0ull;
  __syncthreads();  // the opening is done and first_bad initialised
  if (my_bad != ~0ull) atomicMin(&first_bad, my_bad);
  __syncthreads();
  NotifyResults* out = a.results;
  if (gate == kGateSkip) {
    // The handle of a skipped dispatch can never be used: its info says so and its matrices are -1.
    // Only the dispatch kernel behind this one reads them, in stream order (a host that waits for
    // this notify raises instead and launches none), so ready_seq need not wait for these stores.
    for (int i = threadIdx.x; i < R * R; i += blockDim.x) out->rank_prefix_matrix[i] = -1;
    for (int i = threadIdx.x; i < R * C; i += blockDim.x) out->channel_prefix_matrix[i] = out->recv_channel_prefix_matrix[i] = -1;
    if (threadIdx.x == 0) {
      out->info[0] = static_cast<long long>(epoch);
      out->info[1] = 1;
      a.mailbox->skipped = 1;
      __threadfence_system();
      *reinterpret_cast<volatile int*>(a.ready_seq) = a.seq;
    }
    return;
  }

  if (threadIdx.x < R) {
    const int d = threadIdx.x;
    int acc = 0;
    for (int c = 0; c < C; ++c) {
      acc += counts[d * C + c];
      out->channel_prefix_matrix[d * C + c] = acc;
    }
    totals[d] = acc;
  }
  __syncthreads();

  if constexpr (W::kPuts) {
    put_inboxes<W>(a, counts, totals, first_bad, &verdict);
  } else {
    // Fill every destination's inbox slot for me.
    for (int d = 0; d < R; ++d) {
      HeaderSection* dst = a.sections[d];
      for (int i = threadIdx.x; i < R; i += blockDim.x) dst->inbox_rank_counts[rank][i] = totals[i];
      for (int c = threadIdx.x; c < C; c += blockDim.x) dst->inbox_channel_counts[rank][c] = counts[d * C + c];
      for (int j = threadIdx.x; j < a.num_local_experts; j += blockDim.x)
        dst->inbox_expert_counts[rank][j] = a.num_tokens_per_expert[d * a.num_local_experts + j];
      if (threadIdx.x == 0) {
        dst->inbox_bad_expert[rank] = first_bad == ~0ull ? 0 : static_cast<long long>(first_bad) + 1;
        dst->inbox_worst_tokens[rank] = a.num_worst_tokens;
      }
    }
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) {
      bool ok;
      barrier_one_thread(a.peers, rank, R, kBarrierOp, a.err, nullptr, &ok);
      if (!ok) verdict = kGateSkip;
    }
    __syncthreads();
  }

  // The inbox is read once, a word per thread, into shared memory (counts, free since the
  // barrier, takes the channel counts); the scans below read that. A thread walking the inbox
  // itself made a dependent round trip per entry: a dozen or more, on the path the host waits on.
  const HeaderSection* self = a.sections[rank];
  __shared__ int rank_counts[kMaxNvlRanks * kMaxNvlRanks];  // [src][destination]
  __shared__ int worst_of[kMaxNvlRanks];
  __shared__ long long bad_of[kMaxNvlRanks];
  for (int i = threadIdx.x; i < R * R; i += blockDim.x) rank_counts[i] = ld_volatile(&self->inbox_rank_counts[i / R][i % R]);
  for (int i = threadIdx.x; i < R * C; i += blockDim.x) counts[i] = ld_volatile(&self->inbox_channel_counts[i / C][i % C]);
  if (threadIdx.x < R) {
    worst_of[threadIdx.x] = ld_volatile(&self->inbox_worst_tokens[threadIdx.x]);
    bad_of[threadIdx.x] = static_cast<long long>(
        ld_volatile(reinterpret_cast<const unsigned long long*>(&self->inbox_bad_expert[threadIdx.x])));
  }
  for (int j = threadIdx.x; j < a.num_local_experts; j += blockDim.x) {
    int from[kMaxNvlRanks];
#pragma unroll
    for (int s = 0; s < kMaxNvlRanks; ++s) from[s] = s < R ? ld_volatile(&self->inbox_expert_counts[s][j]) : 0;
    int n = 0;
#pragma unroll
    for (int s = 0; s < kMaxNvlRanks; ++s) n += from[s];
    const int align = a.expert_alignment;
    a.mailbox->num_recv_tokens_per_expert[j] = (n + align - 1) / align * align;
  }
  __syncthreads();
  if (threadIdx.x == 0 && verdict == kGateGo) {
    // The same scan on every rank, so the same rank is named everywhere.
    for (int s = 0; s < R && verdict == kGateGo; ++s) {
      if (bad_of[s] != 0) {
        report_data(a.err, kErrBadExpertId, s, -1, bad_of[s] - 1);
        verdict = kGateSkip;
      }
    }
    for (int d = 0; d < R && verdict == kGateGo; ++d) {
      int received = 0;
      for (int s = 0; s < R; ++s) received += rank_counts[s * R + d];
      if (worst_of[d] > 0 && received > worst_of[d]) {
        report_data(a.err, kErrWorstTokensOverflow, d, -1, received);
        verdict = kGateSkip;
      }
    }
  }
  if (threadIdx.x < R) {
    const int d = threadIdx.x;
    int acc = 0;
    for (int s = 0; s < R; ++s) {
      acc += rank_counts[s * R + d];
      out->rank_prefix_matrix[s * R + d] = acc;
    }
    if (d == rank) a.mailbox->num_recv_tokens = acc;
  }
  if (threadIdx.x >= 32 && threadIdx.x < 32 + R) {
    const int s = threadIdx.x - 32;
    int acc = 0;
    for (int c = 0; c < C; ++c) {
      out->recv_channel_prefix_matrix[s * C + c] = acc;
      acc += counts[s * C + c];
    }
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    out->info[0] = static_cast<long long>(epoch);
    out->info[1] = verdict == kGateGo ? 0 : 1;
    a.mailbox->skipped = verdict == kGateGo ? 0 : 1;
    *reinterpret_cast<volatile int*>(&a.peers.header[rank]->gate) = verdict;
    __threadfence_system();
    *reinterpret_cast<volatile int*>(a.ready_seq) = a.seq;
  }
}


}  // namespace

}  // namespace moelink::intranode
