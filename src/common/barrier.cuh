#pragma once
// Cross-rank barrier on epochs, optionally carrying a digest. Each rank counts its own barriers;
// arriving writes its digest into every peer's slot for this barrier's parity, then publishes the
// new epoch into every peer's signal slot for this rank (release: the digest is visible first),
// then waits until every peer's slot in its own header reached that epoch. Signals only grow, so
// nothing is ever reset, and a peer that is already one barrier ahead still satisfies the wait.
// NOTES: a peer can be at most one barrier ahead (its next barrier needs our signal), so two digest
// slots per source, by epoch parity, are never overwritten before they are read.
// The wait is bounded by the ErrorSink's timeout and reports the first peer that never arrived.
#include "common/waits.cuh"

namespace moelink::kernels {

// Called by one thread. Returns the barrier's epoch, or 0 with `*ok` false on timeout (reported).
__device__ __forceinline__ Epoch barrier_one_thread(const PeerTable& peers, int rank, int num_ranks, int tag,
                                                    const ErrorSink& err, const Digest* digest, bool* ok) {
  CommonHeader* self = peers.header[rank];
  const Epoch epoch = self->epoch + 1;
  self->epoch = epoch;
  if (digest != nullptr) {
    for (int p = 0; p < num_ranks; ++p) {
      volatile unsigned long long* slot = peers.header[p]->digest[epoch & 1][rank].w;
      for (int w = 0; w < kDigestWords; ++w) slot[w] = digest->w[w];
    }
  }
  __threadfence_system();
  for (int p = 0; p < num_ranks; ++p) st_release_sys(&peers.header[p]->barrier_signal[rank], epoch);
  *ok = true;
  for (int p = 0; p < num_ranks && *ok; ++p)
    *ok = wait_epoch(&self->barrier_signal[p], epoch, err, p, kStepBarrier, -1, tag);
  return epoch;
}

}  // namespace moelink::kernels
