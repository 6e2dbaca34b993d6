#pragma once
// The common part of what host and device share: the fixed sizes every mode uses, the error record
// kernels fill for the host, the common section of each rank's NVLink-buffer header (barrier
// signals, error claim, peer table), and the peer table and error sink every kernel receives.
// Each mode adds its own header section and mailbox section in its contract.hpp; the runtime's
// memory_map.hpp assembles them. Plain structs: included by host code and kernels alike.
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

enum ErrorCode : int {
  kErrNone = 0,
  kErrTimeout = 1,
  kErrWorstTokensOverflow = 2,
  kErrBadExpertId = 3,
};

// Wait steps are numbered per mode (runtime/wait_steps.hpp holds the table that names them):
// common 0..15, layout 16..31, intranode 32..63, then the modes to come.
enum CommonWaitStep : int {
  kStepBarrier = 0,
};

struct ErrorRecord {
  int code;  // ErrorCode; written last
  int rank;
  int peer;
  int step;  // wait step; for kErrBadExpertId the token index is in detail
  int channel;
  int barrier_tag;  // which barrier (sync, destroy, op) for kStepBarrier
  long long detail;
};

enum BarrierTag : int { kBarrierSync = 0, kBarrierDestroy = 1, kBarrierOp = 2, kBarrierUser = 3 };

// Common section of each rank's NVLink-buffer header.
struct alignas(128) CommonHeader {
  int barrier_signal[kMaxNvlRanks];  // [src]: last barrier epoch src reached, written by src
  int barrier_epoch;                 // this rank's own epoch counter (only this rank touches it)
  int error_claim;                   // device-side claim word for ErrorRecord
  int pad[32 - kMaxNvlRanks - 2];
  void* peer_data[kMaxNvlRanks];     // peer-pointer table: each peer's data region, in this process
};

// Each NVLink peer's header and data region, mapped into this process.
struct PeerTable {
  CommonHeader* header[kMaxNvlRanks];
  void* data[kMaxNvlRanks];
};

// Where a kernel reports a failure, and how long it may wait for a peer.
struct ErrorSink {
  ErrorRecord* record;  // host-mapped
  int* claim;           // in this rank's header
  int rank;
  uint64_t timeout_ns;
};

}  // namespace moelink::kernels
