#pragma once
// Memory shared between host and device (host-mapped, pinned) and the fixed header at the start
// of every rank's NVLink buffer. Plain structs: included by host code and kernels alike.
#include <cstdint>

#include "moelink/topology.hpp"

namespace moelink::kernels {

inline constexpr int kMaxChannels = 128;        // num_sms / 2 for num_sms <= 256
inline constexpr int kMaxLocalExperts = 1024;   // experts per rank
inline constexpr int kMaxExperts = 8192;        // layout histogram lives in shared memory
inline constexpr int kMaxTopK = 32;

enum ErrorCode : int {
  kErrNone = 0,
  kErrTimeout = 1,
  kErrWorstTokensOverflow = 2,
  kErrBadExpertId = 3,
};

enum WaitStep : int {
  kStepBarrier = 0,
  kStepNotify = 1,
  kStepDispatchSend = 2,  // sender waiting for ring space
  kStepDispatchRecv = 3,  // receiver waiting for rows
  kStepCombineSend = 4,
  kStepCombineRecv = 5,
  kStepLayout = 6,
  kStepDispatchLayoutCheck = 7,
  kStepDispatchTarget = 8,  // sender waiting for a receiver to say where its outputs are
  kStepCombineSource = 9,   // token owner waiting for a peer to say where its combine input is
  kStepCombinePull = 10,    // a rank waiting for token owners to finish reading its input
};

struct ErrorRecord {
  int code;  // ErrorCode; written last
  int rank;
  int peer;
  int step;  // WaitStep; for kErrBadExpertId the token index is in detail
  int channel;
  int barrier_tag;  // which barrier (sync, destroy, op) for kStepBarrier
  long long detail;
};

// Host-mapped results of a notify: the host polls `ready_seq` instead of synchronising the stream.
struct HostMailbox {
  int ready_seq;  // = op sequence number once the fields below are valid
  int num_recv_tokens;
  int num_recv_tokens_per_expert[kMaxLocalExperts];
  ErrorRecord error;
};

// Published by a receiving rank at the start of each dispatch: byte offsets into its receive arena
// (-1 = that output is not written), so senders write rows straight into its outputs. `direct` = 0
// means "use the rings": this rank's outputs are not in its arena. Valid once `seq` equals the
// dispatch's sequence number.
struct DirectTarget {
  long long x, scales, topk_idx, topk_weights, src_idx;
  long long scales_stride_token, scales_stride_scale;  // in floats
  int num_rows;  // rows the outputs hold; rows past it are dropped (num_worst_tokens overflow)
  int direct;
  int seq;       // written last, with release semantics
  int pad;
};

// Published by every rank at the start of each combine: where its input rows are, as offsets from
// its data region, when they live in its receive arena (`pull` = 1). Token owners then read those
// rows in place instead of having them pushed through the rings. Valid once `seq` equals the
// combine's sequence number.
struct CombineSource {
  long long x, weights;  // weights: -1 when the combine has no top-k weights
  int pull;
  int seq;  // written last, with release semantics
};

// Fixed header of each rank's NVLink buffer; the user-visible num_nvl_bytes follow it.
struct alignas(128) NvlHeader {
  int barrier_signal[kMaxNvlRanks];  // [src]: last barrier epoch src reached, written by src
  int barrier_epoch;                 // this rank's own epoch counter (only this rank touches it)
  int error_claim;                   // device-side claim word for ErrorRecord
  int pad[32 - kMaxNvlRanks - 2];
  void* peer_data[kMaxNvlRanks];     // peer-pointer table: each peer's data region, in this process
  // notify inbox: [src] -> what src tells this rank
  int inbox_rank_counts[kMaxNvlRanks][kMaxNvlRanks];       // src's tokens per destination rank
  int inbox_channel_counts[kMaxNvlRanks][kMaxChannels];    // src's tokens to me per channel
  int inbox_expert_counts[kMaxNvlRanks][kMaxLocalExperts]; // src's (token, k) pairs per my expert
  // Direct dispatch: where this rank wants the current dispatch's rows (see DirectTarget), and,
  // per (sender part, channel, source), the sequence number of the last dispatch whose rows that
  // part of that source's channel has finished writing here. Sequence-valued, so nothing ever needs resetting.
  DirectTarget direct_target;
  int direct_done[2][kMaxChannels][kMaxNvlRanks];  // [sender part][channel][source]
  // Pull combine: this rank's input rows (see CombineSource), and per (channel, token owner) the
  // sequence number of the last combine whose reads of them that owner has finished.
  CombineSource combine_source;
  int pull_done[kMaxChannels][kMaxNvlRanks];
};

inline constexpr int64_t kNvlHeaderBytes = ((sizeof(NvlHeader) + 4095) / 4096) * 4096;

}  // namespace moelink::kernels
