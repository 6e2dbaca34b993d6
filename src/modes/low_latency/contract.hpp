#pragma once
// The low-latency mode's contract: its wait steps, its section of every rank's NVLink-buffer
// header (or of the symmetric allocation's head, with the nvshmem transport), and the argument
// structs of its two kernels. The host side (host.cpp) fills these.
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

// The put path's words (window/nvshmem/device.cuh: peers NVSHMEM cannot map get put-with-signal).
// They exist only in the symmetric allocation, after the HeaderSection (SymmetricHeader). A put's
// rows and its 64-bit ADD signal land together, but rows put by several warps are not ordered by any
// one warp's fence, so each row carries its own signal: cumulative per (parity, expert block) and
// never cleaned (64 bits do not wrap). The SENDER keeps the running total of rows it has put to each
// block and sends it, tagged with the call's number, before the block's count/format word (after a
// fence); the receiver waits until the counter reaches that total. The receiver keeps no state, so
// rows it ignores (a masked sender, a combine slot its topk_idx no longer names) can never make a
// later wait pass early. clean_low_latency_buffer zeroes both sides together.
struct alignas(128) PutSection {
  unsigned long long dispatch_rows[2][kMaxExperts];    // [parity][le * R + src]: rows src has put here
  unsigned long long combine_rows[2][kMaxExperts];     // [parity][expert]: rows that expert has put here
  unsigned long long dispatch_target[2][kMaxExperts];  // [parity][le * R + src]: put_target(seq, src's total)
  unsigned long long combine_target[2][kMaxExperts];   // [parity][expert]: put_target(seq, the expert's total)
  unsigned long long dispatch_sent[2][kMaxExperts];    // this rank's own: [parity][expert] rows it has put there
  unsigned long long combine_sent[2][kMaxExperts];     // this rank's own: [parity][le * R + dst] rows put to dst
};

// A target word: a set top bit and the low 15 bits of the call's number over a 48-bit row total,
// so a zeroed word matches no call and a word of another call is never read as this one's.
MOELINK_HOST_DEVICE unsigned long long put_target_tag(unsigned long long seq) { return 0x8000ULL | (seq & 0x7fffULL); }
MOELINK_HOST_DEVICE unsigned long long put_target(unsigned long long seq, unsigned long long total) {
  return (put_target_tag(seq) << 48) | (total & 0xffffffffffffULL);
}
MOELINK_HOST_DEVICE bool put_target_is_for(unsigned long long word, unsigned long long seq) {
  return (word >> 48) == put_target_tag(seq);
}
MOELINK_HOST_DEVICE unsigned long long put_target_total(unsigned long long word) { return word & 0xffffffffffffULL; }

// The head of the symmetric low-latency allocation; the layout's region follows at kSymmetricHeaderBytes.
struct SymmetricHeader {
  HeaderSection header;
  PutSection put;
};
inline constexpr int64_t kSymmetricHeaderBytes = (static_cast<int64_t>(sizeof(SymmetricHeader)) + 4095) / 4096 * 4096;

// What the put path needs beside the regions: regions[p] (and peers[p]) are null for a rank that
// NVSHMEM cannot map, or for every other rank with MOELINK_DEBUG_LL_FORCE_PUT. Such a rank's
// addresses are ours at the same offsets (the allocation is symmetric), reached through its PE.
// Kernels built into libmoelink never read it (they are built for stores only).
struct PutPeers {
  PutSection* state;       // this rank's (symmetric)
  int pe[kMaxNvlRanks];    // [rank]: its NVSHMEM PE
  bool any;                // some rank is reached by puts: this rank's puts are quieted at the send's end
  bool x_in_send_area;     // combine: x lies in this rank's send area (zero-copy), so its rows are put from there
  int staging_area;        // the send area (0/1) messages are staged in: a combine's own zero-copy area (the one
                           // get_next_low_latency_combine_buffer gave for it), a dispatch the other one, so
                           // neither touches the area the user may be filling for the next combine
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
  char* regions[kMaxNvlRanks];  // every rank's low-latency region, in this process (null: reached by puts)
  HeaderSection* self;
  HeaderSection* peers[kMaxNvlRanks];  // every rank's section (self included), in this process, or null as regions
  kernels::ErrorSink err;
  kernels::PoisonList poison;
  PutPeers put;  // last, so the store path's fields keep their offsets
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
  PutPeers put;
};
void launch_combine(const CombineArgs& args, int blocks, cudaStream_t stream);

// The host's mask calls (low_latency_update/query/clean_mask_buffer), ordered on the comm stream.
enum MaskOp : int { kMaskSet = 0, kMaskQuery = 1, kMaskClean = 2 };
void launch_mask(MaskOp op, HeaderSection* self, int rank, int value, int* out, int num_ranks, cudaStream_t stream);

inline constexpr int kThreads = 512;
int dispatch_blocks_per_sm();
int combine_blocks_per_sm();
// The same kernels built for the put path, defined in the NVSHMEM plugin only
// (window/nvshmem/low_latency_*.cu); the core reaches them through its table (ops.hpp).
void launch_dispatch_puts(const DispatchArgs& args, int blocks, cudaStream_t stream);
void launch_combine_puts(const CombineArgs& args, int blocks, cudaStream_t stream);
int dispatch_blocks_per_sm_puts();
int combine_blocks_per_sm_puts();

}  // namespace moelink::low_latency
