#pragma once
// The opening of a collective operation: every rank states what it is about to do (its digest and
// its own verdict), the opening barrier carries that to every peer, and every rank then makes the
// same decision from the same digests: go, or skip with one data error that every rank reports
// (the first rank with a verdict, else the first digest word on which some rank differs). The
// decision is left in the rank's gate for the kernels that follow on the comm stream. W: the window
// policy of the barrier's digest and signals (barrier.cuh; the host picks the instantiation).
#include "common/barrier.cuh"

namespace moelink::kernels {

__device__ __forceinline__ int verdict_error(int verdict) {
  switch (verdict) {
    case kVerdictHandleFailed: return kErrHandleFailed;
    case kVerdictInputRows: return kErrInputRows;
    case kVerdictBadExpertId: return kErrBadExpertId;
    default: return kErrPeerRejected;
  }
}

// Called by one thread. Returns the gate (also written to the rank's header) and the opening
// barrier's epoch, which numbers the operation identically on every rank.
template <class W = window::Stores>
__device__ __forceinline__ int open_operation(const PeerTable& peers, int rank, int num_ranks, const Opening& o,
                                              const ErrorSink& err, Epoch* epoch_out) {
  CommonHeader* self = peers.header[rank];
  volatile int* gate = &self->gate;
  *epoch_out = self->epoch;
  const int word = fault_word(err);
  if (word != 0) {
    report_aborted(err, word);
    *gate = kGateSkip;
    return kGateSkip;
  }
  Digest mine = o.digest;
  long long verdict = static_cast<long long>(mine.w[kDigestVerdict] & 0xff);
  long long detail = static_cast<long long>(mine.w[kDigestVerdict] >> 8);
  if (o.handle_info != nullptr) {
    mine.w[kDigestHandle] = static_cast<unsigned long long>(o.handle_info[0]);
    if (verdict == kVerdictOk && o.handle_info[1] != 0) verdict = kVerdictHandleFailed;
  }
  if (o.rank_prefix_matrix != nullptr && verdict == kVerdictOk) {
    const int needed = o.rank_prefix_matrix[(num_ranks - 1) * num_ranks + rank];
    if (needed > o.input_rows) {
      verdict = kVerdictInputRows;
      detail = needed;
    }
  }
  // A bad id layout saw is reported by the first operation this rank opens with an Ok verdict; a
  // rejecting rank leaves it for the next one (were every rank rejecting, none would report it).
  const long long pending = self->pending_bad_expert;
  if (pending != 0 && verdict == kVerdictOk) {
    self->pending_bad_expert = 0;
    verdict = kVerdictBadExpertId;
    detail = pending - 1;
  }
  mine.w[kDigestVerdict] = static_cast<unsigned long long>(verdict) | (static_cast<unsigned long long>(detail) << 8);

  bool ok = false;
  const Epoch epoch = barrier_one_thread<W>(peers, rank, num_ranks, kBarrierOp, err, &mine, &ok);
  *epoch_out = epoch;
  if (!ok) {
    *gate = kGateSkip;
    return kGateSkip;
  }
  // Every digest is read once and folded as it arrives, with selects rather than branches, so that
  // the loads of all ranks are in flight together; the decisions below then read the fold. Read
  // where each decision loop needed it, behind a branch on the previous one, the digests cost some
  // 8 dependent round trips per rank (tens of microseconds at 8 ranks) on the path every
  // operation's host waits on.
  int objector = -1;  // the first rank whose verdict is not Ok, and that verdict word
  unsigned long long objection = 0;
  int first_word = kDigestCompared, differ = -1;  // the first compared word some rank differs on,
  unsigned long long differing = 0;               // the first such rank and its value
#pragma unroll
  for (int p = 0; p < kMaxNvlRanks; ++p) {
    if (p >= num_ranks) continue;
    const volatile unsigned long long* slot = self->digest[epoch & 1][p].w;
    const unsigned long long v = p == rank ? mine.w[kDigestVerdict] : slot[kDigestVerdict];
    const bool objects = static_cast<int>(v & 0xff) != kVerdictOk && objector < 0;
    objection = objects ? v : objection;
    objector = objects ? p : objector;
    if (p == rank) continue;
#pragma unroll
    for (int w = 0; w < kDigestCompared; ++w) {
      const unsigned long long value = slot[w];
      const bool first = value != mine.w[w] && w < first_word;  // a lower rank keeps a tie
      differing = first ? value : differing;
      differ = first ? p : differ;
      first_word = first ? w : first_word;
    }
  }
  int decision = kGateGo;
  if (objector >= 0) {
    // A rank that rejected its own arguments has raised that error already and records nothing:
    // recorded, it would raise again at the end of a later call and lose that call's outputs. Its
    // peers raise at a later call than it did, but every rank opens every operation whatever it
    // has raised (a collective raises at its end), so none is left waiting for the others.
    if (verdict != kVerdictRejected)
      report_data(err, verdict_error(static_cast<int>(objection & 0xff)), objector, -1,
                  static_cast<long long>(objection >> 8));
    decision = kGateSkip;
  } else if (differ >= 0) {
    report_data(err, kErrDisagree, differ, first_word, static_cast<long long>(differing));
    decision = kGateSkip;
  }
  *gate = decision;
  return decision;
}

// The opening run by the operation's own kernel (a cached dispatch, a combine) rather than by an
// opening kernel before it: one launch less on the host path the GPU waits for. Called by every
// thread of every block, first thing. The first block to arrive claims the opening and runs it;
// the others wait (bounded) until it has left the gate, which every block then reads. All blocks
// are resident together (the runtime requires it), so the claimer always runs; finish_block's
// last block resets the claim, when every block has long passed here. Returns whether this block
// may run the operation (operation_may_run).
template <class W = window::Stores>
__device__ __forceinline__ bool open_in_kernel(const PeerTable& peers, int rank, int num_ranks, const Opening& o,
                                               const ErrorSink& err) {
  __shared__ bool may_run;
  if (threadIdx.x == 0) {
    CommonHeader* self = err.self;
    bool opened = true;
    if (atomicCAS(&self->open_claim, 0, 1) == 0) {
      Epoch epoch;
      open_operation<W>(peers, rank, num_ranks, o, err, &epoch);
      __threadfence();
      *reinterpret_cast<volatile int*>(&self->opened) = 1;
    } else {
      // The claimer's own waits are bounded by the timeout; this one by twice that, so it never
      // gives up first. Given up, the block fails the operation (its outputs are poisoned).
      const WaitResult r = wait_for([&] { return ld_volatile(&self->opened) != 0; }, err, 2 * err.timeout_ns + 1);
      opened = r == kArrived;
      if (!opened) *reinterpret_cast<volatile int*>(&self->op_failed) = 1;
      __threadfence();
    }
    may_run = opened && ld_volatile(&self->gate) == kGateGo && ld_volatile(&self->fault) == 0;
  }
  __syncthreads();
  return may_run;
}

}  // namespace moelink::kernels
