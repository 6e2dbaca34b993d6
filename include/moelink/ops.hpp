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

// Handle tensors, allocated by the caller before the dispatch step (after the notify's launch will
// do; shapes from the dispatch's arguments). An uncached dispatch's kernel fills the matrices and
// the info, and its recv_src_idx.
struct DispatchHandle {
  TensorRef rank_prefix_matrix;          // [R, R] int32: [s][d] = rows d receives from ranks <= s
  TensorRef channel_prefix_matrix;       // [R, C] int32: [d][c] = my tokens to d in channels <= c
  TensorRef recv_channel_prefix_matrix;  // [R, C] int32: [s][c] = rows I get from s in channels < c
  TensorRef recv_src_idx;                // [num_recv] int32: source token index of each row
  TensorRef is_token_in_rank;            // [T, R] bool
  // [2] int64, written on the device by the dispatch from its notify's results: the dispatch's id
  // (the same on every rank) and 0, or 1 when that dispatch failed. Later operations check it on
  // the device, so a handle from another dispatch or from a failed one is refused on every rank.
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

// ---- low-latency dispatch / combine -------------------------------------------------------------
// Which halves of a low-latency call a launch runs: the whole call, only its send (the caller
// receives later, with a second call of kReceive: deep_ep's return_recv_hook), or only its receive.
enum class LowLatencyPhase { kSendAndReceive, kSend, kReceive };

struct LowLatencyDispatchInputs {
  TensorRef x;           // in: [T, H] bf16, T <= num_max_dispatch_tokens_per_rank
  TensorRef topk_idx;    // in: [T, K] int64, -1 = none
  int num_max_dispatch_tokens_per_rank = 0;
  int num_experts = 0;
  bool use_fp8 = true;
  bool round_scale = false;  // fp8 scales rounded up to powers of two
  bool use_ue8m0 = false;    // fp8 scales as packed exponent bytes (needs round_scale)
  TensorRef cumulative_local_expert_recv_stats;  // in/out: [E_local] int32, += each expert's rows
  TensorRef dispatch_wait_recv_cost_stats;       // in/out: [R] int64, += ns waited for each source
};

struct LowLatencyDispatchOutputs {
  TensorRef recv_x;         // out: [E_local, R * M, H] bf16, or fp8 e4m3
  TensorRef recv_x_scales;  // out: fp8: float32 [E_local, R * M, H / 128], or int32 [.., H / 512] with
                            //      use_ue8m0; column-major in the last two dims
  TensorRef recv_count;     // out: [E_local] int32: valid rows per local expert
  TensorRef src_info;       // out: [E_local, R * M] int32: each row's source token
  TensorRef layout_range;   // out: [E_local, R] int64: begin << 32 | count of each source's block
  TensorRef state;          // out: [2] int64, written on the device: the call's number, for kReceive
};

struct LowLatencyCombineInputs {
  TensorRef x;              // in: [E_local, R * M, H] bf16, the experts' outputs in the dispatch's layout
  TensorRef topk_idx;       // in: [T, K] int64, the dispatch's
  TensorRef topk_weights;   // in: [T, K] float32
  TensorRef src_info;       // in: the dispatch's handle
  TensorRef layout_range;   // in: the dispatch's handle
  int num_max_dispatch_tokens_per_rank = 0;
  int num_experts = 0;
  TensorRef combine_wait_recv_cost_stats;  // in/out: [R] int64, += ns waited for each source
  TensorRef dispatch_state;  // in, optional: the dispatch's state tensor (with shrink, the ranks it skipped)
  // Rows travel in moelink's LogFMT (10-bit log codes per 128-value group, bf16 where a group holds
  // a NaN or an infinity; format and error bound in tests/reference/logfmt_reference.py): 168 of
  // 256 bytes per group. A hook's receive must be given the same value as its send.
  bool use_logfmt = false;
};

struct LowLatencyCombineOutputs {
  TensorRef combined_x;  // out: [T, H] bf16: sum over k of topk_weights * the expert's row
  TensorRef state;       // out: [2] int64, as in dispatch
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
