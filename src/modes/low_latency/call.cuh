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
  bool fault;  // known at the start: the block only poisons
};

// A send half numbers a new call (the device counter + 1); a hook's receive half runs the call its
// send half numbered, which left the number in the call's state tensor. Thread 0 reads the number
// and the fault word once for the block, so that every thread of a block takes the same branch.
__device__ __forceinline__ CallStart start_call(int phase, const HeaderSection* self, const long long* state,
                                                const kernels::ErrorSink& err) {
  __shared__ CallStart start;
  if (threadIdx.x == 0) {
    start.seq = (phase & kPhaseSend) ? kernels::ld_volatile(&self->seq) + 1
                                     : static_cast<kernels::Epoch>(kernels::ld_volatile(
                                           reinterpret_cast<const kernels::Epoch*>(state)));
    start.fault = kernels::fault_word(err) != 0;
  }
  __syncthreads();
  return start;
}

// Before a send writes into peers' regions: each peer has finished receiving the call two before
// this one, the last that used this parity (contract.hpp). Returns false when a wait gave up.
template <class Args>
__device__ __forceinline__ bool wait_for_parity(const Args& a, kernels::Epoch seq) {
  __shared__ bool ok;
  if (threadIdx.x == 0) ok = true;
  __syncthreads();
  // Self too: with one rank, or rows routed to self, this rank's own receive is what must be done.
  const int p = threadIdx.x;
  if (p < a.layout.num_ranks) {
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
template <class Args, class Send, class Recv>
__device__ __forceinline__ void run_call(Args& a, Send send, Recv recv) {
  const CallStart start = start_call(a.phase, a.self, a.state, a.err);
  const kernels::Epoch seq = start.seq;
  const int parity = static_cast<int>(seq & 1);
  if (start.fault) {
    if (a.phase & kPhaseRecv) kernels::poison_grid_share(a.poison);
  } else {
    if ((a.phase & kPhaseSend) && wait_for_parity(a, seq)) send(seq, parity);
    if (a.phase & kPhaseRecv) recv(seq, parity);
  }
  if (kernels::finish_block(a.err, a.poison) && threadIdx.x == 0) {
    if (a.phase & kPhaseSend) {
      a.self->seq = seq;
      a.state[0] = static_cast<long long>(seq);
    }
    // Per parity, so receives of two outstanding calls may finish in either order.
    if (a.phase & kPhaseRecv)
      for (int p = 0; p < a.layout.num_ranks; ++p) kernels::st_release_sys(&a.peers[p]->recv_done[seq & 1][a.rank], seq);
  }
}

}  // namespace moelink::low_latency
