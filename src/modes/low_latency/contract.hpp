#pragma once
// The low-latency mode's contract: its wait steps, its section of every rank's NVLink-buffer
// header, and the argument structs of its two kernels. The host side (host.cpp) fills these.
//
// Each call (a dispatch or a combine) is numbered by a sequence number kept on the device
// (HeaderSection::seq): its send half reads seq + 1, its last block stores it back and into the
// call's state tensor, from which the receive half of a hook reads it. The number picks the parity
// (layout.hpp) and tags every signal, so nothing is ever cleaned and graph replays stay consistent.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/header.hpp"
#include "modes/low_latency/layout.hpp"

namespace moelink::low_latency {

using kernels::Epoch;

inline constexpr int kMaxExperts = 1024;  // per-expert counters live in the header
inline constexpr int kMaxTopK = 16;

enum WaitStep : int {
  kStepDispatchRecv = 64,  // a local expert waiting for a source's count
  kStepCombineRecv = 65,   // a token waiting for an expert's rows
  kStepLocal = 66,         // a signalling warp waiting for this rank's own sends (no peer involved)
  kStepGate = 67,          // a send waiting for a peer to finish receiving the call two before
};

// Which halves of a call a launch runs: both (the usual call), the send half (return_recv_hook), or
// the receive half (the hook).
enum Phase : int { kPhaseSend = 1, kPhaseRecv = 2, kPhaseBoth = 3 };

// Each call's send half waits, per peer, until that peer has finished receiving the call two
// before it (recv_done), since both use one parity of the peer's region. Any order of plain and
// hook calls stays consistent with up to two calls outstanding; a third waits, and with nobody
// receiving meanwhile times out naming kStepGate.
// Shrink (enable_shrink): a peer that stops answering is masked instead of failing the call.
// `masked` is this rank's view, read by every block at a call's start and changed only between
// calls (by the host's mask calls, or by the last block of a call, from `pending_mask`, which a
// wait that timed out on a peer sets), so all blocks of a call agree on whom to skip.
struct alignas(128) HeaderSection {
  Epoch seq;                   // the last call's sequence number
  int masked[kMaxNvlRanks];        // [rank]: non-zero = masked (skipped, not waited for)
  int pending_mask[kMaxNvlRanks];  // [rank]: timed out during the running call
  int masked_by[kMaxNvlRanks];     // [rank]: that rank masked this one (it writes here), so this one
                                   // stops writing into it too from its next call on
  Epoch recv_done[2][kMaxNvlRanks];  // [parity][src]: the last call of that parity whose receive half
                                      // src finished (src writes it; self included)
  int dispatch_slots[kMaxExperts];  // rows this rank has claimed per expert in the current dispatch
  int dispatch_done[kMaxExperts];   // rows it has finished writing per expert
  int combine_done[kMaxExperts];    // rows it has finished writing back per (local expert, source)
};

struct DispatchArgs {
  const void* x;             // [T, H] bf16
  const int64_t* topk_idx;   // [T, K]
  int num_tokens, num_topk;
  bool fp8, round_scale, ue8m0;
  void* recv_x;              // [E_local, R * M, H] bf16 or fp8
  void* recv_scales;         // fp8: float32 [E_local, R * M, S] or int32 [.., S / 4], column-major in the last two
  int* recv_count;           // [E_local]
  int* src_info;             // [E_local, R * M]
  long long* layout_range;   // [E_local, R]
  int* cumulative_recv_stats;      // [E_local] or nullptr
  long long* wait_recv_cost_stats;  // [R] or nullptr
  long long* state;          // [2]: the call's sequence number and the mask it used (written by the send half)
  Layout layout;
  int phase;
  int rank;
  bool shrink;               // enable_shrink: mask a peer that times out instead of failing
  char* regions[kMaxNvlRanks];  // every rank's low-latency region, in this process
  HeaderSection* self;
  HeaderSection* peers[kMaxNvlRanks];  // every rank's section (self included), in this process
  kernels::ErrorSink err;
  kernels::PoisonList poison;
};
void launch_dispatch(const DispatchArgs& args, int blocks, cudaStream_t stream);

struct CombineArgs {
  const void* x;             // [E_local, R * M, H] bf16: the experts' outputs, in the dispatch's layout
  const int* src_info;       // the dispatch's handle
  const long long* layout_range;
  const int64_t* topk_idx;   // [T, K]
  const float* topk_weights; // [T, K]
  const long long* dispatch_state;  // the dispatch's state tensor: [1] is the mask its call used, or nullptr
  int num_tokens, num_topk;
  bool logfmt;               // use_logfmt: rows travel in LogFMT (logfmt.cuh)
  void* combined_x;          // [T, H] bf16
  long long* wait_recv_cost_stats;  // [R] or nullptr
  long long* state;          // [2]
  Layout layout;
  int phase;
  int rank;
  bool shrink;
  char* regions[kMaxNvlRanks];
  HeaderSection* self;
  HeaderSection* peers[kMaxNvlRanks];
  kernels::ErrorSink err;
  kernels::PoisonList poison;
};
void launch_combine(const CombineArgs& args, int blocks, cudaStream_t stream);

// The host's mask calls (low_latency_update/query/clean_mask_buffer), ordered on the comm stream.
enum MaskOp : int { kMaskSet = 0, kMaskQuery = 1, kMaskClean = 2 };
void launch_mask(MaskOp op, HeaderSection* self, int rank, int value, int* out, int num_ranks, cudaStream_t stream);

inline constexpr int kThreads = 512;
int dispatch_blocks_per_sm();
int combine_blocks_per_sm();

}  // namespace moelink::low_latency
