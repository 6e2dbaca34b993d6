#pragma once
// The communication buffer of one rank: topology, the NVLink buffer shared with the node's peers by
// CUDA IPC, the NVSHMEM (RDMA) buffer, host-mapped counters and a communication stream.
//
// Lifecycle: Buffer(...) allocates -> caller exchanges local_ipc_handle() / local_nvshmem_unique_id()
// with its peers (any bootstrap: bytes in, bytes out) -> sync(...) opens the peers -> operations ->
// destroy() (a device barrier across ranks, so no peer is still writing, then free).
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "moelink/config.hpp"
#include "moelink/event.hpp"
#include "moelink/tensor.hpp"
#include "moelink/topology.hpp"

namespace moelink {

namespace kernels {
struct ErrorSink;
struct DirectTarget;
}

struct BufferOptions {
  int rank = 0;
  int num_ranks = 1;
  int64_t num_nvl_bytes = 0;
  int64_t num_rdma_bytes = 0;
  // Receive arena: extra IPC-shared bytes that dispatch outputs may be allocated from
  // (arena_allocate). When every output of a dispatch lives there, peers write rows straight into
  // them instead of staging them in the rings: half the memory traffic. 0 = no arena.
  int64_t num_arena_bytes = 0;
  bool low_latency_mode = false;
  bool explicitly_destroy = false;
  int num_nvl_ranks = 0;       // GPUs per node; 0 = min(num_ranks, 8)
  int num_qps_per_rank = 24;
  double timeout_s = -1;       // device/host wait limit; < 0 = MOELINK_TIMEOUT_S or 100 s
  int device = -1;             // CUDA ordinal; -1 = the current device
};

// How an operation orders itself against the caller's stream.
struct StreamOrder {
  cudaStream_t compute_stream = nullptr;
  std::optional<EventHandle> previous_event;  // comm stream waits for this instead of compute_stream
  bool async_finish = false;                  // return without making compute_stream wait
  bool allocate_on_comm_stream = false;       // outputs were allocated on the comm stream
};

struct LayoutOutputs {
  TensorRef num_tokens_per_rank;       // [R] int32
  TensorRef num_tokens_per_rdma_rank;  // [num_rdma_ranks] int32, undefined when intranode
  TensorRef num_tokens_per_expert;     // [E] int32
  TensorRef is_token_in_rank;          // [T, R] bool
};

// ---- intranode dispatch -------------------------------------------------------------------------
struct DispatchInputs {
  TensorRef x;                 // [T, H] bf16, or fp8 e4m3 [T, H]
  TensorRef x_scales;          // fp8 only: float32 [T, S], row- or column-major
  TensorRef topk_idx;          // [T, K] int64, -1 = none (undefined in cached mode)
  TensorRef topk_weights;      // [T, K] float32 (optional)
  TensorRef is_token_in_rank;  // [T, R] bool
  TensorRef num_tokens_per_rank;    // [R] int32 (uncached)
  TensorRef num_tokens_per_expert;  // [E] int32 (uncached)
  int num_experts = 0;              // uncached: E; cached: 0
  int expert_alignment = 1;
  int num_worst_tokens = 0;
};

// Handle tensors, allocated by the caller before notify (shapes from handle_shapes()).
struct DispatchHandle {
  TensorRef rank_prefix_matrix;          // [R, R] int32: [s][d] = rows d receives from ranks <= s
  TensorRef channel_prefix_matrix;       // [R, C] int32: [d][c] = my tokens to d in channels <= c
  TensorRef recv_channel_prefix_matrix;  // [R, C] int32: [s][c] = rows I get from s in channels < c
  TensorRef recv_src_idx;                // [num_recv] int32: source token index of each row
  TensorRef is_token_in_rank;            // [T, R] bool
};

struct DispatchPlan {
  int num_recv_tokens = 0;                         // rows recv_x needs (num_worst_tokens if > 0)
  std::vector<int> num_recv_tokens_per_expert;     // aligned; empty when num_worst_tokens > 0
};

struct DispatchOutputs {
  TensorRef recv_x;             // [N, H] same dtype as x
  TensorRef recv_x_scales;      // fp8: [N, S] float32, same majorness as x_scales
  TensorRef recv_topk_idx;      // [N, K] int64 (uncached only): local expert ids, -1 elsewhere
  TensorRef recv_topk_weights;  // [N, K] float32 (when topk_weights given)
};

struct CombineInputs {
  TensorRef x;             // [N, H] bf16, the rows this rank received in dispatch
  TensorRef topk_weights;  // [N, K] float32 (optional)
  TensorRef bias_0;        // [T, H] bf16 (optional)
  TensorRef bias_1;        // [T, H] bf16 (optional)
};

struct CombineOutputs {
  TensorRef combined_x;             // [T, H] bf16
  TensorRef combined_topk_weights;  // [T, K] float32 (when topk_weights given)
};

// A block of the receive arena. The range goes back to the arena when the last copy of `owner`
// dies, which may be after the Buffer is destroyed (the memory stays valid until then).
struct ArenaBlock {
  void* data = nullptr;
  int64_t bytes = 0;
  std::shared_ptr<void> owner;
};

class Buffer {
 public:
  explicit Buffer(const BufferOptions& options);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  // ---- topology and resources ----
  const Topology& topology() const { return topo_; }
  int device_id() const { return device_; }
  int64_t num_nvl_bytes() const { return num_nvl_bytes_; }
  int64_t num_rdma_bytes() const { return num_rdma_bytes_; }
  bool low_latency_mode() const { return low_latency_mode_; }
  bool explicitly_destroy() const { return explicitly_destroy_; }
  double timeout_s() const { return timeout_s_; }
  cudaStream_t comm_stream() const { return comm_stream_; }
  void* local_nvl_buffer() const;   // num_nvl_bytes of user-visible NVLink buffer
  void* local_rdma_buffer() const;  // num_rdma_bytes of NVSHMEM symmetric memory (after sync)
  int64_t num_arena_bytes() const;
  int64_t arena_bytes_in_use() const;
  int64_t arena_largest_free() const;  // the largest block arena_allocate can return now
  // `bytes` of the receive arena, or nullopt when no free range is large enough (allocate the
  // output elsewhere: the dispatch then stages rows through the rings, correct but slower).
  std::optional<ArenaBlock> arena_allocate(int64_t bytes);

  // ---- bootstrap (bytes in, bytes out) ----
  std::vector<uint8_t> local_ipc_handle() const;
  // The NVSHMEM unique id; only meaningful on the rank whose rdma_rank == 0 and when RDMA is used.
  std::vector<uint8_t> local_nvshmem_unique_id() const;
  // device_ids / ipc_handles: one entry per global rank. root_unique_id: empty when no RDMA.
  void sync(const std::vector<int>& device_ids, const std::vector<std::vector<uint8_t>>& ipc_handles,
            const std::vector<uint8_t>& root_unique_id);
  bool is_available() const { return available_; }
  // Barrier across ranks, then free everything. Idempotent.
  void destroy();

  // ---- operations ----
  // Every operation runs on the comm stream after `order` (previous_event or the compute stream),
  // and returns the event recorded at its end; without async_finish the compute stream waits on it.
  EventHandle get_dispatch_layout(const TensorRef& topk_idx, int num_experts, const LayoutOutputs& out,
                                  const StreamOrder& order);

  // Intranode dispatch is two steps so the caller can allocate outputs in between:
  // notify exchanges the counts (and, unless num_worst_tokens > 0, waits on the host for them),
  // dispatch moves the rows. A cached dispatch (handle from an earlier call) skips notify.
  DispatchPlan intranode_notify(const DispatchInputs& in, const DispatchHandle& handle, const Config& config,
                                const StreamOrder& order);
  EventHandle intranode_dispatch(const DispatchInputs& in, const DispatchHandle& handle,
                                 const DispatchOutputs& out, const Config& config, const StreamOrder& order,
                                 bool cached);
  EventHandle intranode_combine(const CombineInputs& in, const DispatchHandle& handle, const CombineOutputs& out,
                                const Config& config, const StreamOrder& order);

  // Raises the first error a kernel recorded (timeout, routing overflow, bad expert id) and marks the
  // Buffer unusable for timeouts. Every operation calls it on entry.
  void check_device_errors() const;

  // Device barrier across the NVLink peers (the same one destroy() uses). Blocks the host.
  void barrier(const char* step);

 private:
  struct Impl;
  void require_usable(const char* op) const;
  void barrier_tagged(int tag);
  kernels::ErrorSink error_sink() const;
  struct DispatchShape;
  DispatchShape validate_dispatch(const DispatchInputs& in, const DispatchHandle& handle, const Config& config,
                                  bool cached, bool notify_step, const char* op) const;
  void begin_op(const StreamOrder& order) const;
  kernels::DirectTarget direct_target(const DispatchOutputs& out, const DispatchHandle& h, const DispatchShape& s,
                                      int64_t num_rows, bool cached) const;
  EventHandle end_op(const StreamOrder& order) const;

  Topology topo_;
  int device_ = 0;
  int64_t num_nvl_bytes_ = 0;
  int64_t num_rdma_bytes_ = 0;
  bool low_latency_mode_ = false;
  bool explicitly_destroy_ = false;
  double timeout_s_ = 100.0;
  bool available_ = false;
  bool destroyed_ = false;
  cudaStream_t comm_stream_ = nullptr;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moelink
