#include "common/launch.cuh"
#include "common/opening.cuh"
#include "common/opening.hpp"

namespace moelink::kernels {

namespace {

__global__ void opening_kernel(PeerTable peers, int rank, int num_ranks, Opening opening, ErrorSink err) {
  if (threadIdx.x == 0) {
    Epoch epoch;
    open_operation(peers, rank, num_ranks, opening, err, &epoch);
  }
}

const KernelRegistration registration(reinterpret_cast<const void*>(&opening_kernel), "opening", 32, 0);

}  // namespace

void launch_opening(const PeerTable& peers, int rank, int num_ranks, const Opening& opening, const ErrorSink& err,
                    cudaStream_t stream) {
  launch("opening", &opening_kernel, LaunchShape{1, 32, 0}, stream, peers, rank, num_ranks, opening, err);
}

}  // namespace moelink::kernels
