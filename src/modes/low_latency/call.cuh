#pragma once
// What both low-latency kernels do around their halves: number the call, handle a known fault,
// publish the number.
#include "common/poison.cuh"
#include "common/waits.cuh"
#include "modes/low_latency/contract.hpp"

namespace moelink::low_latency {

// A send half numbers a new call (the device counter + 1); a hook's receive half runs the call its
// send half numbered, which left the number in the call's state tensor. Thread 0 reads it once
// for the block.
__device__ __forceinline__ kernels::Epoch call_number(int phase, const HeaderSection* self, const long long* state) {
  __shared__ kernels::Epoch seq;
  if (threadIdx.x == 0)
    seq = (phase & kPhaseSend) ? kernels::ld_volatile(&self->seq) + 1
                               : static_cast<kernels::Epoch>(kernels::ld_volatile(reinterpret_cast<const kernels::Epoch*>(state)));
  __syncthreads();
  return seq;
}

// A kernel's body: number the call, run its halves (or, with a fault known, only poison the
// outputs), end the block (common/poison.cuh). Only the last block of a send half publishes the
// number: every block has read the old one by then. send and recv take (seq, parity).
template <class Args, class Send, class Recv>
__device__ __forceinline__ void run_call(Args& a, Send send, Recv recv) {
  const kernels::Epoch seq = call_number(a.phase, a.self, a.state);
  const int parity = static_cast<int>(seq & 1);
  if (kernels::fault_word(a.err) != 0) {
    if (a.phase & kPhaseRecv) kernels::poison_grid_share(a.poison);
  } else {
    if (a.phase & kPhaseSend) send(seq, parity);
    if (a.phase & kPhaseRecv) recv(seq, parity);
  }
  if (kernels::finish_block(a.err, a.poison) && threadIdx.x == 0 && (a.phase & kPhaseSend)) {
    a.self->seq = seq;
    a.state[0] = static_cast<long long>(seq);
  }
}

}  // namespace moelink::low_latency
