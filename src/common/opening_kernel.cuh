#pragma once
// The opening kernel over a window (opening.cuh), for an operation whose own kernel does not open
// it: libmoelink builds it over stores and FakePuts (opening.cu), the NVSHMEM plugin over puts
// (window/nvshmem/lane.cu).
#include "common/launch.cuh"
#include "common/opening.cuh"

namespace moelink::kernels {

namespace {

template <class W>
__global__ void opening_kernel(PeerTable peers, int rank, int num_ranks, Opening opening, ErrorSink err) {
  if (threadIdx.x == 0) {
    Epoch epoch;
    open_operation<W>(peers, rank, num_ranks, opening, err, &epoch);
  }
}

}  // namespace

}  // namespace moelink::kernels
