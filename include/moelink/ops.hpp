#pragma once
// The per-call values of every operation: how it orders itself against the caller's stream, and its
// named input, handle and output structs. These are small values a caller fills for one call; the
// long-lived state is the Buffer. Every tensor is described, never owned (moelink/tensor.hpp).
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "moelink/event.hpp"
#include "moelink/tensor.hpp"

namespace moelink {

// How an operation orders itself against the caller's stream.
struct StreamOrder {
  cudaStream_t compute_stream = nullptr;
  std::optional<EventHandle> previous_event;  // comm stream waits for this instead of compute_stream
  bool async_finish = false;                  // return without making compute_stream wait
  bool allocate_on_comm_stream = false;       // outputs were allocated on the comm stream
};

// ---- get_dispatch_layout ------------------------------------------------------------------------
struct LayoutOutputs {
  TensorRef num_tokens_per_rank;       // out: [R] int32
  TensorRef num_tokens_per_rdma_rank;  // out: [num_rdma_ranks] int32, undefined when intranode
  TensorRef num_tokens_per_expert;     // out: [E] int32
  TensorRef is_token_in_rank;          // out: [T, R] bool
};

// ---- normal-mode dispatch -----------------------------------------------------------------------
struct DispatchInputs {
  TensorRef x;                      // in: [T, H] bf16, or fp8 e4m3 [T, H]
  TensorRef x_scales;               // in: fp8 only: float32 [T, H / 128], row- or column-major
  TensorRef topk_idx;               // in: [T, K] int64, -1 = none (undefined in cached mode)
  TensorRef topk_weights;           // in: [T, K] float32 (optional)
  TensorRef is_token_in_rank;       // in: [T, R] bool
  TensorRef num_tokens_per_rank;    // in: [R] int32 (uncached)
  TensorRef num_tokens_per_expert;  // in: [E] int32 (uncached)
  int num_experts = 0;              // uncached: E; cached: 0
  int expert_alignment = 1;
  int num_worst_tokens = 0;
};

// Handle tensors, allocated by the caller before notify (shapes from the dispatch's arguments).
struct DispatchHandle {
  TensorRef rank_prefix_matrix;          // [R, R] int32: [s][d] = rows d receives from ranks <= s
  TensorRef channel_prefix_matrix;       // [R, C] int32: [d][c] = my tokens to d in channels <= c
  TensorRef recv_channel_prefix_matrix;  // [R, C] int32: [s][c] = rows I get from s in channels < c
  TensorRef recv_src_idx;                // [num_recv] int32: source token index of each row
  TensorRef is_token_in_rank;            // [T, R] bool
  // [2] int64, written on the device by the dispatch's notify: the dispatch's id (the same on every
  // rank) and 0, or 1 when that dispatch failed. Later operations check it on the device, so a
  // handle from another dispatch or from a failed one is refused on every rank.
  TensorRef info;
  int64_t hidden = 0;  // hidden size of the dispatch's x, when the caller knows it (0 = unknown)
};

struct DispatchPlan {
  int num_recv_tokens = 0;                      // out: rows recv_x needs (num_worst_tokens if > 0)
  std::vector<int> num_recv_tokens_per_expert;  // out: aligned; empty when num_worst_tokens > 0
};

struct DispatchOutputs {
  TensorRef recv_x;             // out: [N, H] same dtype as x
  TensorRef recv_x_scales;      // out: fp8: [N, H / 128] float32, same majorness as x_scales
  TensorRef recv_topk_idx;      // out: [N, K] int64 (uncached only): local expert ids, -1 elsewhere
  TensorRef recv_topk_weights;  // out: [N, K] float32 (when topk_weights given)
};

// ---- normal-mode combine ------------------------------------------------------------------------
struct CombineInputs {
  TensorRef x;             // in: [N, H] bf16, the rows this rank received in dispatch
  TensorRef topk_weights;  // in: [N, K] float32 (optional)
  TensorRef bias_0;        // in: [T, H] bf16 (optional)
  TensorRef bias_1;        // in: [T, H] bf16 (optional)
};

struct CombineOutputs {
  TensorRef combined_x;             // out: [T, H] bf16
  TensorRef combined_topk_weights;  // out: [T, K] float32 (when topk_weights given)
};

// ---- receive arena ------------------------------------------------------------------------------
// A block of the receive arena. The range goes back to the arena when the last copy of `owner`
// dies, which may be after the Buffer is destroyed (the memory stays valid until then).
struct ArenaBlock {
  void* data = nullptr;
  int64_t bytes = 0;
  std::shared_ptr<void> owner;
};

}  // namespace moelink
