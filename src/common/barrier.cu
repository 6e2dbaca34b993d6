// The barrier kernel's libmoelink builds (common/barrier_kernel.cuh).
#include "common/barrier.hpp"
#include "common/barrier_kernel.cuh"
#include "window/nvshmem.hpp"

namespace moelink::kernels {

namespace {

const KernelRegistration registrations[] = {
    {reinterpret_cast<const void*>(&barrier_kernel<window::Stores>), "barrier", 32, 0},
    {reinterpret_cast<const void*>(&barrier_kernel<window::FakePuts>), "barrier (lane, fake puts)", 32, 0},
};

}  // namespace

void launch_barrier(const PeerTable& peers, int rank, int num_ranks, int tag, const ErrorSink& err,
                    window::Policy policy, cudaStream_t stream) {
  const LaunchShape shape{1, 32, 0};
  if (policy == window::Policy::kPuts)
    window::nvshmem_lane_barrier(peers, rank, num_ranks, tag, err, stream);
  else if (policy == window::Policy::kFakePuts)
    launch("barrier", &barrier_kernel<window::FakePuts>, shape, stream, peers, rank, num_ranks, tag, err);
  else
    launch("barrier", &barrier_kernel<window::Stores>, shape, stream, peers, rank, num_ranks, tag, err);
}

}  // namespace moelink::kernels
