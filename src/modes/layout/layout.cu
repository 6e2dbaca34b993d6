// Dispatch layout: from top-k expert ids to per-rank / per-node / per-expert counts and the
// token-to-rank mask. Counts are accumulated in shared memory. Up to kSingleBlockTokens tokens one
// block does everything and stores the counts directly (no memsets: under MPS each extra API call
// costs more than this kernel); beyond that, blocks fold their counts into zeroed outputs with one
// atomic per block and bin. Either way the result is exact and deterministic.
// Out-of-range ids (other than -1) are ignored for counting and left for the next collective
// operation to report on every rank (common/opening.cuh).
#include <cuda_runtime.h>

#include "common/launch.cuh"
#include "common/waits.cuh"
#include "modes/layout/contract.hpp"

namespace moelink::layout {

using namespace kernels;

namespace {

constexpr int kLayoutThreads = 256;
constexpr int kSingleBlockThreads = 1024;
constexpr int kSingleBlockTokens = 32768;

template <bool kSingleBlock>
__global__ void dispatch_layout_kernel(LayoutArgs a) {
  extern __shared__ int smem[];
  const int num_rdma = a.num_tokens_per_rdma_rank ? a.num_ranks / a.num_nvl_ranks : 0;
  int* expert_count = smem;
  int* rank_count = smem + a.num_experts;
  int* rdma_count = rank_count + a.num_ranks;
  for (int i = threadIdx.x; i < a.num_experts + a.num_ranks + num_rdma; i += blockDim.x) smem[i] = 0;
  __syncthreads();

  const int experts_per_rank = a.num_experts / a.num_ranks;
  const int stride = kSingleBlock ? blockDim.x : a.num_tokens;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < a.num_tokens; t += stride) {
    int ranks_of_token[kMaxTopK];
    const int64_t* row = a.topk_idx + static_cast<int64_t>(t) * a.num_topk;
    for (int k = 0; k < a.num_topk; ++k) {
      const int64_t e = row[k];
      ranks_of_token[k] = -1;
      if (e == -1) continue;
      if (e < -1 || e >= a.num_experts) {
        // Layout is local: the id is reported by the next collective operation, on every rank.
        atomicCAS(reinterpret_cast<unsigned long long*>(&a.err.self->pending_bad_expert), 0ull,
                  static_cast<unsigned long long>(t) * kMaxTopK + k + 1);
        continue;
      }
      atomicAdd(&expert_count[e], 1);
      ranks_of_token[k] = static_cast<int>(e / experts_per_rank);
    }
    bool* mask_row = a.is_token_in_rank + static_cast<int64_t>(t) * a.num_ranks;
    int last_rdma = -1;
    for (int r = 0; r < a.num_ranks; ++r) {
      bool in_rank = false;
      for (int k = 0; k < a.num_topk; ++k) in_rank |= ranks_of_token[k] == r;
      mask_row[r] = in_rank;
      if (!in_rank) continue;
      atomicAdd(&rank_count[r], 1);
      // Ranks are visited in order, so a node's ranks are contiguous: count each node once.
      if (num_rdma > 0 && r / a.num_nvl_ranks != last_rdma) {
        last_rdma = r / a.num_nvl_ranks;
        atomicAdd(&rdma_count[last_rdma], 1);
      }
    }
  }
  __syncthreads();
  if constexpr (kSingleBlock) {
    for (int i = threadIdx.x; i < a.num_experts; i += blockDim.x) a.num_tokens_per_expert[i] = expert_count[i];
    for (int i = threadIdx.x; i < a.num_ranks; i += blockDim.x) a.num_tokens_per_rank[i] = rank_count[i];
    for (int i = threadIdx.x; i < num_rdma; i += blockDim.x) a.num_tokens_per_rdma_rank[i] = rdma_count[i];
  } else {
    for (int i = threadIdx.x; i < a.num_experts; i += blockDim.x)
      if (expert_count[i]) atomicAdd(&a.num_tokens_per_expert[i], expert_count[i]);
    for (int i = threadIdx.x; i < a.num_ranks; i += blockDim.x)
      if (rank_count[i]) atomicAdd(&a.num_tokens_per_rank[i], rank_count[i]);
    for (int i = threadIdx.x; i < num_rdma; i += blockDim.x)
      if (rdma_count[i]) atomicAdd(&a.num_tokens_per_rdma_rank[i], rdma_count[i]);
  }
}

const KernelRegistration registrations[] = {
    {reinterpret_cast<const void*>(&dispatch_layout_kernel<true>), "dispatch layout", kSingleBlockThreads, 0},
    {reinterpret_cast<const void*>(&dispatch_layout_kernel<false>), "dispatch layout", kLayoutThreads, 0},
};

}  // namespace

void launch_layout(const LayoutArgs& a, cudaStream_t stream) {
  const int num_rdma = a.num_tokens_per_rdma_rank ? a.num_ranks / a.num_nvl_ranks : 0;
  const size_t smem = sizeof(int) * (a.num_experts + a.num_ranks + num_rdma);
  if (a.num_tokens <= kSingleBlockTokens) {
    launch("dispatch layout", &dispatch_layout_kernel<true>, LaunchShape{1, kSingleBlockThreads, smem}, stream, a);
    return;
  }
  cudaMemsetAsync(a.num_tokens_per_expert, 0, sizeof(int) * a.num_experts, stream);
  cudaMemsetAsync(a.num_tokens_per_rank, 0, sizeof(int) * a.num_ranks, stream);
  if (num_rdma) cudaMemsetAsync(a.num_tokens_per_rdma_rank, 0, sizeof(int) * num_rdma, stream);
  const int blocks = (a.num_tokens + kLayoutThreads - 1) / kLayoutThreads;
  launch("dispatch layout", &dispatch_layout_kernel<false>, LaunchShape{blocks, kLayoutThreads, smem}, stream, a);
}

}  // namespace moelink::layout
