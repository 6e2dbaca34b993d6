// The opening kernel's libmoelink builds (common/opening_kernel.cuh).
#include "common/opening.hpp"
#include "common/opening_kernel.cuh"
#include "window/nvshmem.hpp"

namespace moelink::kernels {

namespace {

const KernelRegistration registrations[] = {
    {reinterpret_cast<const void*>(&opening_kernel<window::Stores>), "opening", 32, 0},
    {reinterpret_cast<const void*>(&opening_kernel<window::FakePuts>), "opening (lane, fake puts)", 32, 0},
};

}  // namespace

void launch_opening(const PeerTable& peers, int rank, int num_ranks, const Opening& opening, const ErrorSink& err,
                    window::Policy policy, cudaStream_t stream) {
  const LaunchShape shape{1, 32, 0};
  if (policy == window::Policy::kPuts)
    window::nvshmem_lane_opening(peers, rank, num_ranks, opening, err, stream);
  else if (policy == window::Policy::kFakePuts)
    launch("opening", &opening_kernel<window::FakePuts>, shape, stream, peers, rank, num_ranks, opening, err);
  else
    launch("opening", &opening_kernel<window::Stores>, shape, stream, peers, rank, num_ranks, opening, err);
}

}  // namespace moelink::kernels
