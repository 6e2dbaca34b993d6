#pragma once
// Cross-rank barrier on epochs. Each rank counts its own barriers; arriving publishes the new
// epoch into every peer's signal slot for this rank, then waits until every peer's slot in its own
// header reached that epoch. Signals only grow, so nothing is ever reset, and a peer that is already
// one barrier ahead still satisfies the wait. The wait is bounded by the ErrorSink's timeout and
// reports the first peer that never arrived.
#include "common/waits.cuh"

namespace moelink::kernels {

// Called by one thread. Returns false on timeout (already reported).
__device__ __forceinline__ bool barrier_one_thread(const PeerTable& peers, CommonHeader* self, int rank, int num_ranks,
                                                   int tag, const ErrorSink& err) {
  const int epoch = self->barrier_epoch + 1;
  self->barrier_epoch = epoch;
  __threadfence_system();
  for (int p = 0; p < num_ranks; ++p) st_release_sys(&peers.header[p]->barrier_signal[rank], epoch);
  const uint64_t start = global_timer_ns();
  for (int p = 0; p < num_ranks; ++p) {
    while (ld_acquire_sys(&self->barrier_signal[p]) < epoch) {
      if (global_timer_ns() - start > err.timeout_ns) {
        report_error(err, kErrTimeout, p, kStepBarrier, -1, epoch, tag);
        return false;
      }
    }
  }
  return true;
}

}  // namespace moelink::kernels
