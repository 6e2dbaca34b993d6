#pragma once
// The layout mode's contract: get_dispatch_layout's kernel arguments. Layout is local to a rank
// (no peer is touched), so it has no header section and no wait step; a bad expert id it finds is
// left in the common header for the next collective operation to report.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/header.hpp"

namespace moelink::layout {


struct LayoutArgs {
  const int64_t* topk_idx;  // [T, K]
  int num_tokens, num_topk, num_experts, num_ranks, num_nvl_ranks;
  int* num_tokens_per_rank;       // [R]
  int* num_tokens_per_rdma_rank;  // [R / num_nvl_ranks] or nullptr
  int* num_tokens_per_expert;     // [E]
  bool* is_token_in_rank;         // [T, R]
  kernels::ErrorSink err;
};
void launch_layout(const LayoutArgs& args, cudaStream_t stream);

}  // namespace moelink::layout
