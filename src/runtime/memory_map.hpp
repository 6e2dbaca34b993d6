#pragma once
// What a rank's shared memory holds, assembled from the common part and each mode's section.
//
//   NVLink buffer (one cudaMalloc, shared with the node's peers by CUDA IPC):
//     [ NvlHeader, padded to kNvlHeaderBytes ][ num_nvl_bytes of data (rings) ][ receive arena ]
//   Host mailbox (pinned, mapped into the device): written by kernels, polled by the host.
//
// A mode's kernels get pointers to their own section only; the runtime is the one place that
// knows every section.
#include <cstddef>
#include <cstdint>

#include "common/header.hpp"
#include "modes/intranode/contract.hpp"

namespace moelink::runtime {

struct NvlHeader {
  kernels::CommonHeader common;
  intranode::HeaderSection intranode;
};

struct HostMailbox {
  int ready_seq;  // = the notify's sequence number once the mode sections below are valid
  kernels::ErrorRecord fault;  // a lost peer: sticky
  kernels::ErrorRecord data;   // bad input every rank of an operation agreed on: cleared once raised
  intranode::MailboxSection intranode;
};

inline constexpr int64_t kNvlHeaderBytes = ((sizeof(NvlHeader) + 4095) / 4096) * 4096;

// The arena follows the data region, page-aligned.
inline int64_t arena_offset(int64_t num_nvl_bytes) { return kernels::align_up(num_nvl_bytes, 4096); }

// Every arena range (and so every output row carved from one) is this aligned: 16 bytes for vector
// stores, and 512 to match torch's own allocation granularity, so views of a block behave like any
// torch allocation. The Python layer reads it from the extension.
inline constexpr int64_t kArenaAlignment = 512;

}  // namespace moelink::runtime
