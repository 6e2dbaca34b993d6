#pragma once
// Device-side failure reporting and bounded waiting. A kernel that gives up (a peer never arrived,
// a routing overflow, a bad expert id) claims the record once (atomicCAS on a device word) and
// fills the host-mapped record; the host reads it without any CUDA call, so checking is free.
#include <cstdint>

#include "common/header.hpp"
#include "common/primitives.cuh"

namespace moelink::kernels {

__device__ __forceinline__ void report_error(const ErrorSink& err, int code, int peer, int step, int channel,
                                             long long detail, int barrier_tag = -1) {
  if (atomicCAS(err.claim, 0, 1) != 0) return;
  err.record->rank = err.rank;
  err.record->peer = peer;
  err.record->step = step;
  err.record->channel = channel;
  err.record->barrier_tag = barrier_tag;
  err.record->detail = detail;
  __threadfence_system();
  *reinterpret_cast<volatile int*>(&err.record->code) = code;
  __threadfence_system();
}

// Spins until ld_acquire_sys(counter) >= target. Returns false (after reporting) on timeout.
__device__ __forceinline__ bool wait_at_least(const int* counter, int target, const ErrorSink& err, int peer,
                                              int step, int channel) {
  if (ld_acquire_sys(counter) >= target) return true;
  const uint64_t start = global_timer_ns();
  while (ld_acquire_sys(counter) < target) {
    if (global_timer_ns() - start > err.timeout_ns) {
      report_error(err, kErrTimeout, peer, step, channel, target);
      return false;
    }
  }
  return true;
}

}  // namespace moelink::kernels
