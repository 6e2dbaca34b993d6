#pragma once
// The intranode mode's contract: its wait steps, its section of every rank's NVLink-buffer header,
// its section of the host mailbox, and the argument structs of its three kernels (notify, dispatch,
// combine). The host side (host.cpp) fills these; kernels never see a Buffer. All pointers are
// device pointers (host-mapped memory through its device alias).
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/header.hpp"
#include "modes/intranode/ring_layout.hpp"
#include "window/segment_table.hpp"
#include "window/window.hpp"

namespace moelink::intranode {

using kernels::Epoch;
using kernels::kMaxChannels;
using kernels::kMaxLocalExperts;
using window::kSegmentBuckets;
using window::SegmentTable;

enum WaitStep : int {
  kStepNotify = 32,
  kStepDispatchSend = 33,    // sender waiting for ring space
  kStepDispatchRecv = 34,    // receiver waiting for rows
  kStepCombineSend = 35,
  kStepCombineRecv = 36,
  kStepDispatchTarget = 37,  // sender waiting for a receiver to say where its outputs are
  kStepCombineSource = 38,   // token owner waiting for a peer to say where its combine input is
  kStepCombinePull = 39,     // a rank waiting for token owners to finish reading its input
  kStepDispatchOpened = 40,  // receiver waiting for a sender to say which of its segments it has mapped
  kStepCombineSegments = 41, // a rank waiting for a token owner to say which of its segments it has mapped
};

// Published by a receiving rank at the start of each dispatch: byte offsets into its receive arena
// (-1 = that output is not written), so senders write rows straight into its outputs. `direct` = 0
// means "use the rings": this rank's outputs are not in its arena. Valid once `seq` equals the
// dispatch's sequence number (its opening epoch, the same on every rank).
//
// An output may instead lie in a segment of the caching allocator (any cudaMalloc'd memory) that
// the receiver exported by legacy CUDA IPC: its offset is then from that segment's base and
// `key[field]` names the segment (its driver buffer id, unique in the receiving process for its
// lifetime; 0 = the arena). A sender maps such segments once and keeps them (window/peer_segments.hpp);
// the receiver takes rows directly only when every sender has said, in this very dispatch, that it
// has all of them mapped (SegmentsOpened), so the choice is made on the device and agreed by all.
enum TargetField : int { kFieldX, kFieldScales, kFieldTopkIdx, kFieldTopkWeights, kFieldSrcIdx, kNumTargetFields };

struct DirectTarget {
  long long x, scales, topk_idx, topk_weights, src_idx;
  long long scales_stride_token, scales_stride_scale;  // in floats
  unsigned long long key[kNumTargetFields];  // 0: the field's offset is from the data region
  int num_rows;  // rows the outputs hold; rows past it are dropped (num_worst_tokens overflow)
  int direct;    // host side: the receiver's wish; in the header: the agreed choice
  // 1: column-major scales come staged row-major in this rank's own rings, which a direct receiver
  // does not use, and this rank writes them into its output itself (dispatch.cuh, stage_scales).
  int stage_scales;
  Epoch seq;     // written last, with release semantics
};

// The IPC handle of a segment a DirectTarget names, published with it so that a sender that has not
// mapped the segment yet can hand it to its host (SegmentNews) and map it before a later dispatch.
struct SegmentOffer {
  unsigned long long key;
  long long bytes;  // the segment's size: what a mapping of it keeps alive (the senders' byte bound)
  alignas(16) cudaIpcMemHandle_t handle;  // copied in 16-byte words
};

// Written by each sender into every receiver's header at the start of each dispatch: the keys of that
// receiver's segments the sender has mapped for this dispatch, as its table's buckets hold them
// (the receiver probes them with the same hash, window/segment_table.hpp).
struct SegmentsOpened {
  unsigned long long key[kSegmentBuckets];
  Epoch seq;  // written last, with release semantics
};

// What a sender's kernel tells its host about each receiver's published segments, in the host
// mailbox: every key the receiver named (so the host knows which mappings are still in use) and the
// handles of those it has not mapped. A seqlock: the kernel sets `busy`, writes the entries, then
// `seq`, then clears `busy` (system fences between); the host takes the entries only when it read
// `busy` clear and the same `seq` before and after them (a cached dispatch's host may read while
// the previous kernel writes). Combine's token owners tell theirs the same of each peer's combine
// input (kFields = kNumSourceFields).
template <int kFields>
struct SegmentNewsOf {
  unsigned long long key[kFields];
  int unmapped[kFields];
  long long bytes[kFields];  // the segments' sizes, with the handles
  alignas(16) cudaIpcMemHandle_t handle[kFields];  // written in 16-byte words
  volatile Epoch seq;
  volatile int busy;
};
using SegmentNews = SegmentNewsOf<kNumTargetFields>;

// Published by every rank at the start of each combine: where its input rows are, when they live
// in its receive arena or in caching-allocator segments every token owner has mapped (`pull` = 1).
// Token owners then read those rows in place instead of having them pushed through the rings. An
// offset is from the data region (key 0) or from the segment `key[field]` names (as DirectTarget's).
// `pull` is the agreed choice, the one word the input's rank and every owner act on. Valid once
// `seq` equals the combine's sequence number.
enum SourceField : int { kSourceX, kSourceWeights, kNumSourceFields };
using CombineSegmentNews = SegmentNewsOf<kNumSourceFields>;

struct CombineSource {
  long long x, weights;  // weights: -1 when the combine has no top-k weights
  unsigned long long key[kNumSourceFields];  // 0: the field's offset is from the data region
  int pull;
  int pad;
  Epoch seq;  // written last, with release semantics
};

// What the notify kernel computes for this rank's handle, in its own header section (peers never
// touch it). The dispatch kernel reads the matrices from here and copies them, and the info, into
// the handle's tensors, so that the host can allocate those while the notify runs. One copy is
// enough: the comm stream runs the next notify only after this dispatch's kernel, and a notify
// whose dispatch is never launched (its host raised) leaves nothing anyone reads.
struct NotifyResults {
  long long info[2];  // the handle's info: the dispatch id (the opening epoch) and 0, or 1 if it failed
  int rank_prefix_matrix[kMaxNvlRanks * kMaxNvlRanks];          // [R, R]
  int channel_prefix_matrix[kMaxNvlRanks * kMaxChannels];       // [R, C]
  int recv_channel_prefix_matrix[kMaxNvlRanks * kMaxChannels];  // [R, C]
};

// The put path's notify (window W::kPuts): what this rank tells destination d, staged in its own
// header section before one thread puts it, field by field, into d's inbox row for this rank
// (notify.cu). The counts are 16-byte aligned, as the inbox rows they are copied to are (a put of
// fewer than 16 bytes, the two words after them, goes a word at a time).
struct alignas(16) InboxStage {
  int rank_counts[kMaxNvlRanks];
  int channel_counts[kMaxChannels];
  int expert_counts[kMaxLocalExperts];
  long long bad_expert;
  int worst_tokens;
};
static_assert(offsetof(InboxStage, channel_counts) % 16 == 0 && offsetof(InboxStage, expert_counts) % 16 == 0,
              "the put path copies the staged counts in 16-byte words");

// This mode's section of each rank's NVLink-buffer header.
struct alignas(128) HeaderSection {
  // notify inbox: [src] -> what src tells this rank
  int inbox_rank_counts[kMaxNvlRanks][kMaxNvlRanks];       // src's tokens per destination rank
  int inbox_channel_counts[kMaxNvlRanks][kMaxChannels];    // src's tokens to me per channel
  int inbox_expert_counts[kMaxNvlRanks][kMaxLocalExperts]; // src's (token, k) pairs per my expert
  // src's own data checks, which every rank needs to reach the same verdict: the first bad expert
  // id in its topk_idx (token * kMaxTopK + slot + 1, 0 = none) and its num_worst_tokens.
  long long inbox_bad_expert[kMaxNvlRanks];
  int inbox_worst_tokens[kMaxNvlRanks];
  // Direct dispatch: where this rank wants the current dispatch's rows (see DirectTarget), and,
  // per (sender part, channel, source), the sequence number of the last dispatch whose rows that
  // part of that source's channel has finished writing here. Sequence-valued, so nothing ever needs resetting.
  DirectTarget direct_target;
  Epoch direct_done[2][kMaxChannels][kMaxNvlRanks];  // [sender part][channel][source]
  // Pull combine: this rank's input rows (see CombineSource), and per (owner part, channel, token
  // owner) the sequence number of the last combine whose reads of them that part of the owner's
  // channel has finished (a channel pulled everywhere is received by both its blocks; combine.cu).
  CombineSource combine_source;
  Epoch pull_done[2][kMaxChannels][kMaxNvlRanks];  // [owner part][channel][token owner]
  // Segment targets: the handles of the segments direct_target names, and per sender what it has mapped.
  SegmentOffer segment_offers[kNumTargetFields];
  // [sender]. Combine's token owners publish theirs here too (NOTES in combine.cu: why sharing is safe).
  SegmentsOpened segments_opened[kMaxNvlRanks];
  SegmentOffer combine_offers[kNumSourceFields];  // the handles of the segments combine_source names
  NotifyResults notify_results;  // this rank's own
  // This rank's own: the peers' segments it has mapped, as its dispatch and combine kernels read
  // them (written only by copies on the comm stream between its kernels; window/peer_segments.hpp).
  SegmentTable segment_table;
  // The put path's notify only: [destination] its inbox row, staged (InboxStage).
  InboxStage inbox_stage[kMaxNvlRanks];
};
static_assert(offsetof(HeaderSection, inbox_rank_counts) % 16 == 0 && offsetof(HeaderSection, inbox_channel_counts) % 16 == 0 &&
                  offsetof(HeaderSection, inbox_expert_counts) % 16 == 0,
              "the put path's notify copies inbox rows in 16-byte words");

// This mode's section of the host-mapped mailbox: the results of a notify, valid once the
// mailbox's ready_seq equals the notify's sequence number.
struct MailboxSection {
  // 1 when every rank skips this dispatch: the host raises the notify's own error at the call then,
  // and otherwise leaves a data error it sees for the end of the dispatch (an earlier one's).
  int skipped;
  int num_recv_tokens;
  int num_recv_tokens_per_expert[kMaxLocalExperts];
  // Written by the dispatch kernel: per receiver, its published segments (SegmentNews), and this
  // rank's own agreed choice (1 = its rows came directly) with the dispatch's sequence number.
  SegmentNews segment_news[kMaxNvlRanks];
  int last_direct;
  volatile Epoch last_direct_seq;
  // Written by the combine kernel: the same per peer of its published input (read by this rank as a
  // token owner), and this rank's own agreed choice (1 = its input rows were pulled).
  CombineSegmentNews combine_segment_news[kMaxNvlRanks];
  int last_pulled;
  volatile Epoch last_pulled_seq;
};

// Notify opens the dispatch itself: its first barrier carries the digest (common/opening.cuh).
struct NotifyArgs {
  const bool* is_token_in_rank;     // [T, R]
  const int* num_tokens_per_expert; // [E]
  const int64_t* topk_idx;          // [T, K], or nullptr: checked for ids outside [-1, E)
  int num_tokens, num_topk, num_experts, num_ranks, num_channels, num_local_experts;
  int expert_alignment, num_worst_tokens;
  NotifyResults* results;           // this rank's own header section's
  int* ready_seq;                   // host-mapped: set last, to seq
  MailboxSection* mailbox;          // host-mapped
  int seq;                          // host-side number of this notify, for the host wait only
  kernels::Opening opening;
  kernels::PeerTable peers;
  HeaderSection* sections[kMaxNvlRanks];
  kernels::ErrorSink err;
};
void launch_notify(const NotifyArgs& args, window::Policy window, cudaStream_t stream);

// Where an uncached dispatch's kernel copies its notify's results: the handle's tensors, which
// the host allocated after the notify's launch. `from` is nullptr for a cached dispatch.
struct HandleCopy {
  const NotifyResults* from;
  int* rank_prefix_matrix;          // [R, R]
  int* channel_prefix_matrix;       // [R, C]
  int* recv_channel_prefix_matrix;  // [R, C]
  long long* info;                  // [2]
};

struct DispatchArgs {
  // inputs
  const void* x;  // [T, row bytes]
  const float* x_scales;
  int64_t x_scales_stride_token, x_scales_stride_scale;
  const int64_t* topk_idx;  // [T, K] or nullptr (cached)
  const float* topk_weights;
  const bool* is_token_in_rank;
  const int* rank_prefix_matrix;  // uncached: the notify's results (NotifyResults), else the handle's
  const int* channel_prefix_matrix;
  const int* recv_channel_prefix_matrix;
  int num_tokens, num_experts, num_local_experts;
  // outputs
  HandleCopy handle_copy;  // uncached: the notify's results into the handle's tensors
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
  bool prefetch;    // ask L2 for the inputs read a batch at a time (MOELINK_PREFETCH)
  int scales_mode;  // how column-major scales of direct rows are written (MOELINK_SCALES_GATHER: 0, 1, 2)
  // Direct dispatch: this rank's outputs as offsets from its data region (target.direct = 0: its
  // rows come through the rings). Its seq is filled on the device.
  DirectTarget target;
  SegmentOffer offers[kNumTargetFields];  // the handles of target.key's segments
  const SegmentTable* segments;           // peers' segments this rank has mapped; nullptr: none
  MailboxSection* mailbox;                // host-mapped: segment news, the agreed choice
  int rank;
  kernels::PeerTable peers;
  HeaderSection* sections[kMaxNvlRanks];
  kernels::ErrorSink err;
  kernels::PoisonList poison;  // every output
  bool halt_sends;  // test hook (Buffer::debug_halt_next_sends): launch the kernel whose senders stop early
  // A cached dispatch and a combine open their operation in the kernel (opening.cuh,
  // open_in_kernel) with this; an uncached dispatch was opened by its notify (opens = false).
  kernels::Opening opening;
  bool opens;
};
// `window`: how the kernels reach their peers (window/device.cuh's policies): stores straight into
// their rings and inboxes, or the put path's protocol over the same IPC mappings (the internode
// lane with MOELINK_DEBUG_LANE_FORCE_PUT=fake; its host sends every row through the rings).
void launch_dispatch(const DispatchArgs& args, window::Policy window, cudaStream_t stream);
static_assert(offsetof(SegmentOffer, handle) % 16 == 0 && offsetof(SegmentNews, handle) % 16 == 0 &&
              offsetof(HeaderSection, segment_offers) % 16 == 0 && offsetof(MailboxSection, segment_news) % 16 == 0,
              "the kernels copy IPC handles in 16-byte words");
static_assert(sizeof(DispatchArgs) <= 4096, "kernel parameters past 4 KB need CUDA 12.1 and a matching driver");

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
  // Pull combine: this rank's input as offsets from its data region or its segments (source.pull =
  // 0: it pushes its rows through the rings; 1 with keys named: it wishes to be pulled, and the
  // kernel agrees only when every owner has the segments mapped). Its seq is filled on the device.
  CombineSource source;
  SegmentOffer offers[kNumSourceFields];  // the handles of source.key's segments
  const SegmentTable* segments;           // peers' segments this rank has mapped (shared with dispatch); nullptr: none
  MailboxSection* mailbox;                // host-mapped: segment news, the agreed choice
  int rank;
  kernels::PeerTable peers;
  HeaderSection* sections[kMaxNvlRanks];
  kernels::ErrorSink err;
  kernels::PoisonList poison;  // every output
  bool halt_sends;  // test hook (Buffer::debug_halt_next_sends): launch the kernel whose senders stop early
  // A cached dispatch and a combine open their operation in the kernel (opening.cuh,
  // open_in_kernel) with this; an uncached dispatch was opened by its notify (opens = false).
  kernels::Opening opening;
  bool opens;
};
void launch_combine(const CombineArgs& args, window::Policy window, cudaStream_t stream);
static_assert(offsetof(CombineSegmentNews, handle) % 16 == 0 && offsetof(HeaderSection, combine_offers) % 16 == 0 &&
              offsetof(MailboxSection, combine_segment_news) % 16 == 0 && offsetof(CombineArgs, offers) % 16 == 0 &&
              offsetof(DispatchArgs, offers) % 16 == 0,
              "the kernels copy IPC handles in 16-byte words");
static_assert(sizeof(CombineArgs) <= 4096, "kernel parameters past 4 KB need CUDA 12.1 and a matching driver");

// Blocks of the dispatch / combine kernel that one SM holds at once (for the co-residency check).
int dispatch_blocks_per_sm();
int combine_blocks_per_sm();

// The lane's kernels built over puts (window::Policy::kPuts): the NVSHMEM plugin's
// (window/nvshmem/lane_*.cu), which the launches above reach through window/nvshmem.hpp.
void launch_notify_puts(const NotifyArgs& args, cudaStream_t stream);
void launch_dispatch_puts(const DispatchArgs& args, cudaStream_t stream);
void launch_combine_puts(const CombineArgs& args, cudaStream_t stream);
int dispatch_blocks_per_sm_puts();
int combine_blocks_per_sm_puts();

// 24 warps: at most 80 registers per thread; 32 warps (64 registers) spilled and measured slower.
inline constexpr int kThreads = 768;

}  // namespace moelink::intranode
