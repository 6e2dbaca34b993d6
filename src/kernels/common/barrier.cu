#include "kernels/common/barrier.cuh"

namespace moelink::kernels {

__global__ void barrier_kernel(PeerTable peers, int rank, int num_ranks, int tag, ErrorSink err) {
  if (threadIdx.x == 0) barrier_one_thread(peers, peers.header[rank], rank, num_ranks, tag, err);
}

void launch_barrier(const PeerTable& peers, int rank, int num_ranks, int tag, const ErrorSink& err,
                    cudaStream_t stream) {
  barrier_kernel<<<1, 32, 0, stream>>>(peers, rank, num_ranks, tag, err);
}

}  // namespace moelink::kernels
