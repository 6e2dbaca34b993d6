#pragma once
// What both low-latency kernels do around their halves: number the call, stop at a known fault,
// keep a peer's parity from being reused while it still reads it, publish the number.
#include "common/poison.cuh"
#include "common/waits.cuh"
#include "modes/low_latency/contract.hpp"

namespace moelink::low_latency {

// Whether lane's id (slot `lane` of a token, one slot per lane) repeats a valid id of an earlier
// lane. Every lane of the warp must call it.
__device__ __forceinline__ bool names_earlier_slot(long long e, int num_experts, int lane) {
  const bool valid = e >= 0 && e < num_experts;
  const unsigned same = __match_any_sync(0xffffffffu, valid ? static_cast<int>(e) : -2 - lane);
  return valid && (same & ((1u << lane) - 1)) != 0;
}

struct CallStart {
  kernels::Epoch seq;
  bool fault;       // known at the start: the block only poisons
  unsigned masked;  // bit r: rank r is masked for this call (shrink)
};

__device__ __forceinline__ bool is_masked(unsigned masked, int rank) { return (masked >> rank) & 1u; }

enum PeerWait : int {
  kPeerArrived = 0,
  kPeerMasked = 1,  // shrink: the peer never answered; treat it as having sent nothing
  kPeerFailed = 2,  // a fault (reported): the call is off
};

// A wait on `peer`. A peer that does not answer in time is masked from the next call on when
// shrink is on, else it is a fault as everywhere else (this rank itself is never masked).
template <class Args, class Done>
__device__ __forceinline__ PeerWait wait_peer(const Args& a, int peer, int step, int channel, long long detail,
                                              Done done) {
  // Once one wait of this call gave up on the peer, the others stop at once instead of each
  // sitting out its own timeout.
  const int* pending = &a.self->pending_mask[peer];
  const bool may_mask = a.shrink && peer != a.rank;
  const kernels::WaitResult result =
      kernels::wait_for([&] { return done() || (may_mask && kernels::ld_volatile(pending) != 0); }, a.err);
  if (result == kernels::kArrived) return done() ? kPeerArrived : kPeerMasked;
  if (result == kernels::kAborted) return kPeerFailed;
  if (a.shrink && peer != a.rank) {
    if (atomicExch(&a.self->pending_mask[peer], 1) == 0)
      kernels::report_local(a.err, kernels::kErrLowLatencyMaskedPeer, 0, peer);  // the host warns
    return kPeerMasked;
  }
  kernels::report_fault(a.err, kernels::kErrTimeout, peer, step, channel, detail);
  return kPeerFailed;
}

// A send half numbers a new call (the device counter + 1); a hook's receive half runs the call its
// send half numbered, which left the number in the call's state tensor. Thread 0 reads the number
// and the fault word (and, with shrink, the mask) once for the block, so that every thread of a
// block takes the same branch.
// Extra ranks a call must treat as masked: for a combine, those its dispatch masked (their rows never
// came, so nothing may be signalled to them as sent).
__device__ __forceinline__ unsigned extra_masked(const DispatchArgs&) { return 0; }
__device__ __forceinline__ unsigned extra_masked(const CombineArgs& a) {
  return a.dispatch_state != nullptr ? static_cast<unsigned>(kernels::ld_volatile(
                                           reinterpret_cast<const unsigned long long*>(a.dispatch_state) + 1))
                                     : 0u;
}

template <class Args>
__device__ __forceinline__ CallStart start_call(const Args& a) {
  __shared__ CallStart start;
  if (threadIdx.x == 0) {
    const bool send = (a.phase & kPhaseSend) != 0;
    const auto* state = reinterpret_cast<const unsigned long long*>(a.state);
    start.seq = send ? kernels::ld_volatile(&a.self->seq) + 1 : kernels::ld_volatile(state);
    const int word = kernels::fault_word(a.err);
    start.fault = word != 0;
    // A call that starts after a peer's fault records it as its own reason (claim-guarded, so once
    // per rank), as openings and barriers do: its host then raises instead of returning poison.
    if (word != 0) kernels::report_aborted(a.err, word);
    start.masked = 0;
    if (a.shrink && send) {
      // Ranks masked here, ranks that masked this one, and (combine) those its dispatch skipped.
      // Never this rank itself.
      for (int r = 0; r < a.layout.num_ranks; ++r)
        if (kernels::ld_volatile(&a.self->masked[r]) != 0 || kernels::ld_volatile(&a.self->masked_by[r]) != 0)
          start.masked |= 1u << r;
      start.masked = (start.masked | extra_masked(a)) & ~(1u << a.rank);
    } else if (a.shrink) {
      start.masked = static_cast<unsigned>(kernels::ld_volatile(state + 1));  // the hook: what its send used
    }
  }
  __syncthreads();
  return start;
}

// Before a send writes into peers' regions: each peer has finished receiving the call two before
// this one, the last that used this parity (contract.hpp). Returns false when a wait gave up.
template <class Args>
__device__ __forceinline__ bool wait_for_parity(const Args& a, kernels::Epoch seq, unsigned masked) {
  __shared__ bool ok;
  if (threadIdx.x == 0) ok = true;
  __syncthreads();
  // Self too: with one rank, or rows routed to self, this rank's own receive is what must be done.
  // A masked peer is not written to, so not waited for; one that never answers is masked (shrink).
  // A gate that times out is a fault even with shrink: it means too many calls outstanding (or a
  // peer lost between a send and its hook), and writing into that peer could overwrite what it reads.
  const int p = threadIdx.x;
  if (p < a.layout.num_ranks && !is_masked(masked, p)) {
    const kernels::Epoch* done = &a.self->recv_done[seq & 1][p];
    if (!kernels::wait_until([&] { return kernels::epoch_reached(kernels::ld_acquire_sys(done), seq - 2); }, a.err, p,
                             kStepGate, -1, static_cast<long long>(seq)))
      ok = false;
  }
  __syncthreads();
  return ok;
}

// A kernel's body: number the call, run its halves (or, with a fault known, only poison the
// outputs), end the block (common/poison.cuh). The last block of a send half publishes the
// number (every block has read the old one by then); the last block of a receive half tells every
// peer that this rank is done reading this call's parity. send and recv take (seq, parity).
// W is the window policy (window/device.cuh): a peer with no mapped section gets its state words by
// puts, each after a fence for this rank's own reads before it.
template <class W, class Args, class Send, class Recv>
__device__ __forceinline__ void run_call(Args& a, Send send, Recv recv) {
  const CallStart start = start_call(a);
  const kernels::Epoch seq = start.seq;
  const int parity = static_cast<int>(seq & 1);
  if (start.fault) {
    if (a.phase & kPhaseRecv) kernels::poison_grid_share(a.poison);
  } else {
    if ((a.phase & kPhaseSend) && wait_for_parity(a, seq, start.masked)) send(seq, parity, start.masked);
    if (a.phase & kPhaseRecv) recv(seq, parity, start.masked);
  }
  if (kernels::finish_block(a.err, a.poison) && threadIdx.x == 0) {
    if (a.phase & kPhaseSend) {
      a.self->seq = seq;
      a.state[0] = static_cast<long long>(seq);
      a.state[1] = static_cast<long long>(start.masked);
    }
    // Peers that timed out in this call are masked from the next one on (all blocks are done), and
    // told so: a slow peer that is still alive then stops writing into this rank too.
    unsigned lost = 0;
    if (a.shrink)
      for (int p = 0; p < a.layout.num_ranks; ++p)
        if (atomicExch(&a.self->pending_mask[p], 0) != 0) {
          lost |= 1u << p;
          a.self->masked[p] = 1;
          if constexpr (W::kPuts) {
            if (a.peers[p] == nullptr) {
              __threadfence_system();
              W::put_int(&a.self->masked_by[a.rank], 1, a.put.pe[p]);
              continue;
            }
          }
          kernels::st_release_sys(&a.peers[p]->masked_by[a.rank], 1);
        }
    // Per parity, so receives of two outstanding calls may finish in either order. Not to a peer
    // given up on: it must not be let into this rank's region again.
    if (a.phase & kPhaseRecv)
      for (int p = 0; p < a.layout.num_ranks; ++p)
        if (!is_masked(start.masked | lost, p)) {
          if constexpr (W::kPuts) {
            if (a.peers[p] == nullptr) {
              // The fence orders this rank's reads of the receive area (every block's, made before
              // finish_block) before the peer may write it again.
              __threadfence_system();
              W::put_epoch(&a.self->recv_done[seq & 1][a.rank], seq, a.put.pe[p]);
              continue;
            }
          }
          kernels::st_release_sys(&a.peers[p]->recv_done[seq & 1][a.rank], seq);
        }
    // The state words just put (recv_done, masked_by) complete before the kernel ends: NVSHMEM
    // promises delivery only at a quiet, and a peer's gate waits on recv_done.
    if constexpr (W::kPuts) {
      if (a.put.any) W::quiet();
    }
  }
}

}  // namespace moelink::low_latency
