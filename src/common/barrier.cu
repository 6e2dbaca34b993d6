#include "common/barrier.cuh"
#include "common/barrier.hpp"
#include "common/launch.cuh"

namespace moelink::kernels {

namespace {

__global__ void barrier_kernel(PeerTable peers, int rank, int num_ranks, int tag, ErrorSink err) {
  if (threadIdx.x == 0) barrier_one_thread(peers, peers.header[rank], rank, num_ranks, tag, err);
}

const KernelRegistration registration(reinterpret_cast<const void*>(&barrier_kernel), "barrier", 32, 0);

}  // namespace

void launch_barrier(const PeerTable& peers, int rank, int num_ranks, int tag, const ErrorSink& err,
                    cudaStream_t stream) {
  launch("barrier", &barrier_kernel, LaunchShape{1, 32, 0}, stream, peers, rank, num_ranks, tag, err);
}

}  // namespace moelink::kernels
