#pragma once
// Host-side entry points of every kernel. The runtime fills these argument structs; kernels never
// see a Buffer. All pointers are device pointers (host-mapped memory through its device alias).
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/common/mailbox.hpp"
#include "kernels/intranode/ring_layout.hpp"

namespace moelink::kernels {

struct PeerTable {
  NvlHeader* header[kMaxNvlRanks];  // each NVLink peer's header, mapped into this process
  void* data[kMaxNvlRanks];         // each peer's data region (header + kNvlHeaderBytes)
};

// Where a kernel reports a failure, and how long it may wait for a peer.
struct ErrorSink {
  ErrorRecord* record;  // host-mapped
  int* claim;           // in this rank's header
  int rank;
  uint64_t timeout_ns;
};

enum BarrierTag : int { kBarrierSync = 0, kBarrierDestroy = 1, kBarrierOp = 2, kBarrierUser = 3 };

void launch_barrier(const PeerTable& peers, int rank, int num_ranks, int tag, const ErrorSink& err,
                    cudaStream_t stream);

struct LayoutArgs {
  const int64_t* topk_idx;  // [T, K]
  int num_tokens, num_topk, num_experts, num_ranks, num_nvl_ranks;
  int* num_tokens_per_rank;       // [R]
  int* num_tokens_per_rdma_rank;  // [R / num_nvl_ranks] or nullptr
  int* num_tokens_per_expert;     // [E]
  bool* is_token_in_rank;         // [T, R]
  ErrorSink err;
};
void launch_dispatch_layout(const LayoutArgs& args, cudaStream_t stream);

struct NotifyArgs {
  const bool* is_token_in_rank;     // [T, R]
  const int* num_tokens_per_expert; // [E]
  int num_tokens, num_ranks, num_channels, num_local_experts;
  int expert_alignment, num_worst_tokens;
  int* rank_prefix_matrix;          // [R, R]
  int* channel_prefix_matrix;       // [R, C]
  int* recv_channel_prefix_matrix;  // [R, C]
  HostMailbox* mailbox;             // host-mapped
  int seq;
  PeerTable peers;
  NvlHeader* self;
  ErrorSink err;
};
void launch_intranode_notify(const NotifyArgs& args, cudaStream_t stream);

struct DispatchArgs {
  // inputs
  const void* x;  // [T, row bytes]
  const float* x_scales;
  int64_t x_scales_stride_token, x_scales_stride_scale;
  const int64_t* topk_idx;  // [T, K] or nullptr (cached)
  const float* topk_weights;
  const bool* is_token_in_rank;
  const int* rank_prefix_matrix;
  const int* channel_prefix_matrix;
  const int* recv_channel_prefix_matrix;
  int num_tokens, num_experts, num_local_experts;
  // outputs
  void* recv_x;
  float* recv_x_scales;
  int64_t recv_scales_stride_token, recv_scales_stride_scale;
  int64_t* recv_topk_idx;
  float* recv_topk_weights;
  int* recv_src_idx;
  int num_out_rows;  // rows allocated in the outputs
  bool write_src_idx;
  // protocol
  RingLayout layout;
  int chunk;
  bool l2_hints;  // evict-first policy on x and recv_x (MOELINK_L2_HINTS)
  bool l2_discard;  // discard consumed ring lines from L2 (MOELINK_L2_DISCARD)
  // Direct dispatch: this rank's outputs as offsets from its data region (target.direct = 0: its
  // rows come through the rings), and this dispatch's sequence number, the same on every rank.
  DirectTarget target;
  int seq;
  int rank;
  PeerTable peers;
  ErrorSink err;
};
void launch_intranode_dispatch(const DispatchArgs& args, cudaStream_t stream);

struct CombineArgs {
  const void* x;  // [N, H] bf16
  const float* topk_weights;  // [N, K] or nullptr
  const void* bias_0;         // [T, H] bf16 or nullptr
  const void* bias_1;
  const bool* is_token_in_rank;
  const int* rank_prefix_matrix;
  const int* channel_prefix_matrix;
  const int* recv_channel_prefix_matrix;
  int num_tokens;  // T of this rank
  void* combined_x;
  float* combined_topk_weights;
  RingLayout layout;
  int chunk;
  bool l2_hints;
  bool l2_discard;
  // Pull combine: this rank's input as offsets from its data region (source.pull = 0: it pushes
  // its rows through the rings), and this combine's sequence number, the same on every rank.
  CombineSource source;
  int seq;
  int rank;
  PeerTable peers;
  ErrorSink err;
};
void launch_intranode_combine(const CombineArgs& args, cudaStream_t stream);

// 24 warps: at most 80 registers per thread; 32 warps (64 registers) spilled and measured slower.
inline constexpr int kIntranodeThreads = 768;

}  // namespace moelink::kernels
