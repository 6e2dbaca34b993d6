#pragma once
// What a rank's shared memory holds, assembled from the common part and each mode's section.
//
//   NVLink buffer (one cudaMalloc, shared with the node's peers by CUDA IPC):
//     [ NvlHeader, padded to kNvlHeaderBytes ][ num_nvl_bytes of data (rings) ]
//     [ low-latency region: num_rdma_bytes, with the ipc transport (knobs.hpp) ][ receive arena ]
//   Symmetric NVSHMEM allocation (the nvshmem transport, made at sync()):
//     [ low_latency::SymmetricHeader, padded to kSymmetricHeaderBytes ][ low-latency region ]
//   Host mailbox (pinned, mapped into the device): written by kernels, polled by the host.
//
// A mode's kernels get pointers to their own section only; the runtime is the one place that
// knows every section.
#include <cstddef>
#include <cstdint>

#include "common/header.hpp"
#include "modes/intranode/contract.hpp"
#include "modes/low_latency/contract.hpp"

namespace moelink::runtime {

struct NvlHeader {
  kernels::CommonHeader common;
  intranode::HeaderSection intranode;
  low_latency::HeaderSection low_latency;
};

struct HostMailbox {
  int ready_seq;  // = the notify's sequence number once the mode sections below are valid
  kernels::ErrorRecord fault;  // a lost peer: sticky
  kernels::ErrorRecord data;   // bad input every rank of an operation agreed on: cleared once raised
  unsigned data_lost;          // data errors not recorded because `data` was taken (header.hpp)
  kernels::ErrorRecord local;  // bad input this rank alone saw (header.hpp): cleared once read
  intranode::MailboxSection intranode;
};

inline constexpr int64_t kNvlHeaderBytes = ((sizeof(NvlHeader) + 4095) / 4096) * 4096;

// Offsets from the start of the data region (what peers add to a data pointer), page-aligned.
inline int64_t low_latency_offset(int64_t num_nvl_bytes) { return kernels::align_up(num_nvl_bytes, 4096); }
inline int64_t arena_offset(int64_t num_nvl_bytes, int64_t low_latency_bytes) {
  return low_latency_offset(num_nvl_bytes) + kernels::align_up(low_latency_bytes, 4096);
}

// Every arena range (and so every output row carved from one) is this aligned: 16 bytes for vector
// stores, and 512 to match torch's own allocation granularity, so views of a block behave like any
// torch allocation. The Python layer reads it from the extension.
inline constexpr int64_t kArenaAlignment = 512;

}  // namespace moelink::runtime
