#pragma once
// Device-side failure reporting and bounded waiting.
//
// A fault (a peer that never arrived) is sticky: the reporting kernel claims the fault record once,
// fills it in host-mapped memory (the host reads it without any CUDA call), and writes the fault
// word of every rank of the node, itself included, so that every wait anywhere stops at once and
// every later kernel skips its peers and poisons its outputs. A data error (bad input every rank
// agreed on) is recorded in the data record and leaves the protocol intact; a local error (bad
// input one rank saw in a call that went on) in the local record.
#include <cstdint>

#include "common/header.hpp"
#include "common/primitives.cuh"

namespace moelink::kernels {

__device__ __forceinline__ void fill_record(ErrorRecord* record, int code, const ErrorSink& err, int peer, int step,
                                            int channel, long long detail, int barrier_tag) {
  record->rank = err.rank;
  record->peer = peer;
  record->step = step;
  record->channel = channel;
  record->barrier_tag = barrier_tag;
  record->detail = detail;
  __threadfence_system();
  *reinterpret_cast<volatile int*>(&record->code) = code;
  __threadfence_system();
}

__device__ __forceinline__ void report_fault(const ErrorSink& err, int code, int lost, int step, int channel,
                                             long long detail, int barrier_tag = -1) {
  *reinterpret_cast<volatile int*>(&err.self->op_failed) = 1;
  if (atomicCAS(&err.self->fault_claim, 0, 1) == 0) fill_record(err.fault, code, err, lost, step, channel, detail, barrier_tag);
  // NOTES: system-scope CAS so the first fault a rank hears of is the one it keeps, whichever
  // process wrote it; the reporter's own word is set the same way.
  const int word = encode_fault(lost, err.rank, step, barrier_tag);
  for (int p = 0; p < err.num_ranks; ++p)
    if (err.peers[p] != nullptr) atomicCAS_system(&err.peers[p]->fault, 0, word);
  __threadfence_system();
}

// One call per failed operation (its opening's or its notify's thread 0). The record holds one
// error until the host raises it, which may be a later call's end; an error that finds it taken is
// only counted, so that the host can say how many more it did not hear of.
__device__ __forceinline__ void report_data(const ErrorSink& err, int code, int peer, int channel, long long detail) {
  if (atomicCAS(&err.self->data_claim, 0, 1) == 0) {
    fill_record(err.data, code, err, peer, -1, channel, detail, -1);
    return;
  }
  // NOTES: counted in device memory, where the atomic is one (on mapped host memory it needs native
  // host atomics over the link), and the total copied out for the host. One thread per operation,
  // operations in stream order: a later total never lands before an earlier one (and the host
  // ignores a total below the one it has raised, should they ever race).
  const unsigned total = atomicAdd(&err.self->data_lost, 1u) + 1u;
  *reinterpret_cast<volatile unsigned*>(err.data_lost) = total;
  __threadfence_system();
}

// A local error (header.hpp): the first one since the host last read the local record is kept.
__device__ __forceinline__ void report_local(const ErrorSink& err, int code, int channel, long long detail) {
  if (atomicCAS(&err.self->local_claim, 0, 1) == 0) fill_record(err.local, code, err, err.rank, -1, channel, detail, -1);
}

__device__ __forceinline__ int fault_word(const ErrorSink& err) { return ld_volatile(&err.self->fault); }

// A wait that stops because another rank reported a fault records that fault as its own reason.
__device__ __forceinline__ void report_aborted(const ErrorSink& err, int word) {
  report_fault(err, kErrAborted, fault_lost(word), fault_step(word), -1, fault_reporter(word), fault_barrier_tag(word));
}

enum WaitResult : int { kArrived = 0, kTimedOut = 1, kAborted = 2 };

// Spins until done() holds, for at most `timeout_ns` (the sink's timeout unless given). Reports
// nothing on a timeout (the caller decides what a late peer means); when a fault was reported
// anywhere on the node meanwhile, records it as its own reason and returns kAborted.
template <typename Done>
__device__ __forceinline__ WaitResult wait_for(Done done, const ErrorSink& err, uint64_t timeout_ns = 0) {
  if (timeout_ns == 0) timeout_ns = err.timeout_ns;
  if (done()) return kArrived;
  const uint64_t start = global_timer_ns();
  for (uint32_t spins = 1;; ++spins) {
    if (done()) return kArrived;
    if (err.backoff_ns != 0 && spins > 64) __nanosleep(err.backoff_ns);
    if ((spins & 15) == 0) {
      const int word = fault_word(err);
      if (word != 0) {
        report_aborted(err, word);
        return kAborted;
      }
      if (global_timer_ns() - start > timeout_ns) return kTimedOut;
    }
  }
}

// Spins until done() holds. Returns false (after reporting) on timeout or when a fault was reported
// anywhere on the node meanwhile.
template <typename Done>
__device__ __forceinline__ bool wait_until(Done done, const ErrorSink& err, int peer, int step, int channel,
                                           long long detail, int barrier_tag = -1) {
  const WaitResult result = wait_for(done, err);
  if (result == kTimedOut) report_fault(err, kErrTimeout, peer, step, channel, detail, barrier_tag);
  return result == kArrived;
}

// A wait on a word its publisher writes only after it has heard from every rank (a dispatch's
// target, a combine's source: both wait in all_opened first). When a rank is lost, this wait and
// the publisher's wait on the lost rank time out at about the same moment, and only the
// publisher's names the lost rank: this one would name the publisher, possibly this rank itself.
// So on a timeout it gives that report a grace period (a quarter of the timeout) to arrive, and
// records its own only when none has.
template <typename Done>
__device__ __forceinline__ bool wait_until_deferring(Done done, const ErrorSink& err, int peer, int step, int channel,
                                                     long long detail) {
  WaitResult result = wait_for(done, err);
  if (result == kTimedOut) result = wait_for(done, err, err.timeout_ns / 4 + 1);
  if (result == kTimedOut) report_fault(err, kErrTimeout, peer, step, channel, detail);
  return result == kArrived;
}

// Spins until ld_acquire_sys(counter) >= target.
__device__ __forceinline__ bool wait_at_least(const int* counter, int target, const ErrorSink& err, int peer,
                                              int step, int channel) {
  return wait_until([&] { return ld_acquire_sys(counter) >= target; }, err, peer, step, channel, target);
}

// Spins until the epoch-valued counter has reached `target` (wrap-safe).
__device__ __forceinline__ bool wait_epoch(const Epoch* counter, Epoch target, const ErrorSink& err, int peer,
                                           int step, int channel, int barrier_tag = -1) {
  return wait_until([&] { return epoch_reached(ld_acquire_sys(counter), target); }, err, peer, step, channel,
                    static_cast<long long>(target), barrier_tag);
}

}  // namespace moelink::kernels
