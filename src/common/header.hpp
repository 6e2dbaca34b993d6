#pragma once
// The common part of what host and device share: the fixed sizes every mode uses, the error records
// kernels fill for the host, the common section of each rank's NVLink-buffer header, and the peer
// table, error sink and opening digest every operation's kernels receive. Each mode adds its own
// header section and mailbox section in its contract.hpp; runtime/memory_map.hpp assembles them.
// Plain structs: included by host code and kernels alike.
#include <cstdint>

#include "moelink/topology.hpp"

#ifdef __CUDACC__
#define MOELINK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MOELINK_HOST_DEVICE inline
#endif

namespace moelink::kernels {

inline constexpr int kMaxChannels = 128;        // num_sms / 2 for num_sms <= 256
inline constexpr int kMaxLocalExperts = 1024;   // experts per rank
inline constexpr int kMaxExperts = 8192;        // layout histogram lives in shared memory
inline constexpr int kMaxTopK = 32;

MOELINK_HOST_DEVICE int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

// Barrier epochs and operation sequence numbers: 64-bit and compared through their difference, so
// a counter that wraps (MOELINK_DEBUG_EPOCH_START starts it next to the wrap) still orders right.
using Epoch = unsigned long long;
MOELINK_HOST_DEVICE bool epoch_reached(Epoch value, Epoch target) {
  return static_cast<long long>(value - target) >= 0;
}

enum ErrorCode : int {
  kErrNone = 0,
  // faults (the fault record; the Buffer is broken afterwards)
  kErrTimeout = 1,  // peer: the rank that never arrived
  kErrAborted = 2,  // a peer gave up first: peer = the rank it lost, detail = the rank that reported it
  kErrBadSignal = 3,  // a low-latency signal word no sender writes: peer = its source; detail: the value
  kErrSegmentMissing = 4,  // a receiver named an output segment this rank had not mapped: peer = the receiver
  // data errors (the data record; every rank of the operation reports the same one)
  kErrWorstTokensOverflow = 16,  // peer: the rank that receives more rows; detail: how many
  kErrBadExpertId = 17,          // peer: the rank whose topk_idx holds it; detail: token * kMaxTopK + slot
  kErrDisagree = 18,             // peer: a rank whose digest differs; channel: the digest word; detail: its value
  kErrPeerRejected = 19,         // peer: the rank whose own checks rejected its arguments
  kErrHandleFailed = 20,         // peer: the rank whose handle comes from a failed dispatch
  kErrInputRows = 21,            // peer: the rank whose combine input has fewer rows than its handle; detail: rows needed
  // Local errors (the local record): bad input only this rank saw, mid-call, in a mode without an
  // agreement step (low latency). The call went on, its peers with it; the rows the input spoilt
  // are poisoned, and the host hears of it after the next operation (Context::end_op).
  kErrLowLatencyBadExpertId = 22,  // channel: 0 dispatch, 1 combine; detail: token * kMaxTopK + slot
  kErrLowLatencyTooManyRows = 23,  // more than M rows for one expert: detail = the expert
  kErrLowLatencyDuplicateExpert = 24,  // channel: 0 dispatch, 1 combine; detail: token * kMaxTopK + slot
  kErrLowLatencyMaskedPeer = 25,  // shrink: detail = the peer that did not answer in time and is now masked
  kErrLowLatencyFormatMismatch = 26,  // combine: an expert's rows came in the other format; detail = the expert
};

MOELINK_HOST_DEVICE bool is_fault(int code) { return code == kErrTimeout || code == kErrAborted || code == kErrBadSignal || code == kErrSegmentMissing; }

// Wait steps are numbered per mode (runtime/wait_steps.hpp holds the table that names them):
// common 0..15, layout 16..31, intranode 32..63, then the modes to come.
enum CommonWaitStep : int {
  kStepBarrier = 0,
};

struct ErrorRecord {
  int code;  // ErrorCode; written last
  int rank;
  int peer;
  int step;  // wait step
  int channel;
  int barrier_tag;  // which barrier (sync, destroy, op) for kStepBarrier
  long long detail;
};

enum BarrierTag : int { kBarrierSync = 0, kBarrierDestroy = 1, kBarrierOp = 2, kBarrierUser = 3 };

// What every rank says about the operation it is opening: the opening barrier carries it to every
// peer, and a rank whose digest differs from another's (or who names a verdict) makes every rank
// skip the operation and report the same data error. Words, by index:
enum DigestWord : int {
  kDigestOperation = 0,  // which operation (OpKind)
  kDigestConfig = 1,     // channels | ring slots << 16 | chunk << 32
  kDigestRow = 2,        // hidden | dtype << 32
  kDigestTopK = 3,       // top-k | scales per row << 16
  kDigestExperts = 4,    // num_experts
  kDigestHandle = 5,     // the dispatch id of the handle (read on the device)
  kDigestCompared = 6,   // words below this one must be equal on every rank
  kDigestVerdict = 6,    // this rank's own objection: Verdict | detail << 8
  kDigestWords = 8,
};

enum OpKind : int { kOpNone = 0, kOpDispatch = 1, kOpCachedDispatch = 2, kOpCombine = 3 };

enum Verdict : int {
  kVerdictOk = 0,
  kVerdictRejected = 1,      // this rank's checks rejected its arguments
  kVerdictHandleFailed = 2,  // its handle comes from a failed dispatch
  kVerdictInputRows = 3,     // its combine input has fewer rows than the handle needs
  kVerdictBadExpertId = 4,   // get_dispatch_layout saw a bad expert id since the last operation
};

struct Digest {
  unsigned long long w[kDigestWords];
};

// What the host knows of an operation it opens (common/opening.cuh); the device completes the
// handle and verdict words.
struct Opening {
  Digest digest;                    // every word but kDigestHandle; kDigestVerdict: host verdict
  const long long* handle_info;     // the handle's [dispatch id, status], or nullptr
  const int* rank_prefix_matrix;    // combine: the handle's matrix, to check the input's rows
  int input_rows;                   // combine: rows of x
};

// The gate an operation's opening kernel leaves for the kernels after it.
enum Gate : int { kGateSkip = 0, kGateGo = 1 };

// Common section of each rank's NVLink-buffer header.
struct alignas(128) CommonHeader {
  Epoch barrier_signal[kMaxNvlRanks];  // [src]: last barrier epoch src reached, written by src
  Digest digest[2][kMaxNvlRanks];      // [epoch parity][src]: src's digest for that barrier, written before it
  Epoch epoch;                         // this rank's barrier count (only this rank touches it)
  // Non-zero once this rank, or a peer that told it so, gave up on a lost peer (sticky): every
  // later kernel skips its peers and poisons its outputs. Peers write it; see encode_fault.
  int fault;
  int gate;                            // Gate of the current operation, written by its opening kernel
  int fault_claim, data_claim, local_claim;  // one writer per error record
  // Data errors that found data_claim taken (an earlier error not raised yet): counted here, the
  // running total copied to the host-mapped ErrorSink::data_lost. Never reset (runtime/
  // pending_errors.hpp says why the host keeps the total it has raised instead).
  unsigned data_lost;
  unsigned exit_count;                 // blocks of the running kernel that have finished
  int op_failed;                       // a block of the running kernel gave up
  // A kernel that opens its own operation (opening.cuh, open_in_kernel): the block that claimed
  // the opening, and whether it has left the gate. Reset with exit_count.
  int open_claim, opened;
  long long pending_bad_expert;        // layout: token * kMaxTopK + slot + 1 of a bad id, folded into the next operation
  void* peer_data[kMaxNvlRanks];       // peer-pointer table: each peer's data region, in this process
};

// fault word: the lost rank + 1, the reporting rank, the step and, for a barrier, which one (+ 1),
// so every survivor can name them. Never 0.
MOELINK_HOST_DEVICE int encode_fault(int lost, int reporter, int step, int barrier_tag) {
  return (lost + 1) | (reporter << 8) | ((step & 0xff) << 16) | ((barrier_tag + 1) << 24);
}
MOELINK_HOST_DEVICE int fault_lost(int word) { return (word & 0xff) - 1; }
MOELINK_HOST_DEVICE int fault_reporter(int word) { return (word >> 8) & 0xff; }
MOELINK_HOST_DEVICE int fault_step(int word) { return (word >> 16) & 0xff; }
MOELINK_HOST_DEVICE int fault_barrier_tag(int word) { return ((word >> 24) & 0x7f) - 1; }

// Each NVLink peer's header and data region, mapped into this process.
struct PeerTable {
  CommonHeader* header[kMaxNvlRanks];
  void* data[kMaxNvlRanks];
};

// Where a kernel reports a failure, how long it may wait for a peer, and whom to tell when it gives
// up on one.
struct ErrorSink {
  ErrorRecord* fault;  // host-mapped
  ErrorRecord* data;   // host-mapped
  ErrorRecord* local;  // host-mapped
  unsigned* data_lost;  // host-mapped: CommonHeader::data_lost as of the last data error it counted
  CommonHeader* self;
  CommonHeader* peers[kMaxNvlRanks];
  int rank, num_ranks;
  uint64_t timeout_ns;
  unsigned backoff_ns;  // MOELINK_SPIN_BACKOFF_NS: sleep between polls after 64 spins; 0 = spin
};

// Outputs a failed or skipped operation fills with 0xFF bytes: NaN for bf16, fp8 and float32, -1
// for integer ids, so nothing it leaves can pass as data.
inline constexpr int kMaxPoisonRegions = 6;
struct PoisonList {
  void* data[kMaxPoisonRegions];
  int64_t bytes[kMaxPoisonRegions];
};

}  // namespace moelink::kernels
