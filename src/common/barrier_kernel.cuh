#pragma once
// The barrier kernel over a window (barrier.cuh): libmoelink builds it over stores and FakePuts
// (barrier.cu), the NVSHMEM plugin over puts (window/nvshmem/lane.cu).
#include "common/barrier.cuh"
#include "common/launch.cuh"

namespace moelink::kernels {

namespace {

// A rank that already knows of a fault does not arrive (its peers learned of the fault where it
// did); it records the fault as its own so that the host raises it.
template <class W>
__global__ void barrier_kernel(PeerTable peers, int rank, int num_ranks, int tag, ErrorSink err) {
  if (threadIdx.x != 0) return;
  const int word = fault_word(err);
  if (word != 0) {
    report_aborted(err, word);
    return;
  }
  bool ok;
  barrier_one_thread<W>(peers, rank, num_ranks, tag, err, nullptr, &ok);
}

}  // namespace

}  // namespace moelink::kernels
