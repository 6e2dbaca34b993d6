#pragma once
// Cross-rank barrier on epochs, optionally carrying a digest. Each rank counts its own barriers;
// arriving writes its digest into every peer's slot for this barrier's parity, then publishes the
// new epoch into every peer's signal slot for this rank (release: the digest is visible first),
// then waits until every peer's slot in its own header reached that epoch. Signals only grow, so
// nothing is ever reset, and a peer that is already one barrier ahead still satisfies the wait.
// NOTES: a peer can be at most one barrier ahead (its next barrier needs our signal), so two digest
// slots per source, by epoch parity, are never overwritten before they are read.
// The wait is bounded by the ErrorSink's timeout and reports the first peer that never arrived.
//
// The put path (W::kPuts; the internode lane with MOELINK_DEBUG_LANE_FORCE_PUT=fake): the digest
// is staged in this rank's own slot, which sits at the same offset as its slot in every peer's
// header, and put from there to each peer, followed by the epoch as that put's signal (one thread
// issues both, so the signal lands after the digest); the wait is the same local wait. A kernel
// that puts more before the signal (notify's inbox) takes the halves apart: barrier_next_epoch,
// its own puts with W::signal_set, barrier_wait.
#include "common/waits.cuh"
#include "window/device.cuh"

namespace moelink::kernels {

// One thread: this rank's next barrier epoch, counted (only this rank touches the count).
__device__ __forceinline__ Epoch barrier_next_epoch(CommonHeader* self) {
  const Epoch epoch = self->epoch + 1;
  self->epoch = epoch;
  return epoch;
}

// One thread: waits until every peer signalled `epoch` here (as barrier_one_thread does); false
// after reporting the first that never did.
__device__ __forceinline__ bool barrier_wait(const PeerTable& peers, int rank, int num_ranks, int tag,
                                             const ErrorSink& err, Epoch epoch) {
  CommonHeader* self = peers.header[rank];
  bool ok = true;
  for (int p = 0; p < num_ranks && ok; ++p)
    ok = wait_epoch(&self->barrier_signal[p], epoch, err, p, kStepBarrier, -1, tag);
  return ok;
}

// Called by one thread. Returns the barrier's epoch, or 0 with `*ok` false on timeout (reported).
template <class W = window::Stores>
__device__ __forceinline__ Epoch barrier_one_thread(const PeerTable& peers, int rank, int num_ranks, int tag,
                                                    const ErrorSink& err, const Digest* digest, bool* ok) {
  CommonHeader* self = peers.header[rank];
  const Epoch epoch = barrier_next_epoch(self);
  if constexpr (W::kPuts) {
    unsigned long long* staged = self->digest[epoch & 1][rank].w;
    if (digest != nullptr)
      for (int w = 0; w < kDigestWords; ++w) reinterpret_cast<volatile unsigned long long*>(staged)[w] = digest->w[w];
    // This rank's earlier writes (its previous operation's, which the barrier says are over) and
    // the staged digest before any peer hears of the epoch.
    __threadfence_system();
    for (int p = 0; p < num_ranks; ++p) {
      if (digest != nullptr && p != rank) W::put(peers.header[p]->digest[epoch & 1][rank].w, staged, sizeof(Digest), p);
      W::signal_set(&peers.header[p]->barrier_signal[rank], epoch, p);
    }
    // The staged slot is rewritten two barriers on; Puts must have read it by then.
    W::quiet();
  } else {
    if (digest != nullptr) {
      for (int p = 0; p < num_ranks; ++p) {
        volatile unsigned long long* slot = peers.header[p]->digest[epoch & 1][rank].w;
        for (int w = 0; w < kDigestWords; ++w) slot[w] = digest->w[w];
      }
    }
    __threadfence_system();
    for (int p = 0; p < num_ranks; ++p) st_release_sys(&peers.header[p]->barrier_signal[rank], epoch);
  }
  *ok = true;
  for (int p = 0; p < num_ranks && *ok; ++p)
    *ok = wait_epoch(&self->barrier_signal[p], epoch, err, p, kStepBarrier, -1, tag);
  return epoch;
}

}  // namespace moelink::kernels
