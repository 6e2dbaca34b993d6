#include "common/barrier.cuh"
#include "common/barrier.hpp"
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

const KernelRegistration registrations[] = {
    {reinterpret_cast<const void*>(&barrier_kernel<window::Stores>), "barrier", 32, 0},
    {reinterpret_cast<const void*>(&barrier_kernel<window::FakePuts>), "barrier (lane, fake puts)", 32, 0},
};

}  // namespace

void launch_barrier(const PeerTable& peers, int rank, int num_ranks, int tag, const ErrorSink& err,
                    window::Policy policy, cudaStream_t stream) {
  const LaunchShape shape{1, 32, 0};
  if (policy == window::Policy::kFakePuts)
    launch("barrier", &barrier_kernel<window::FakePuts>, shape, stream, peers, rank, num_ranks, tag, err);
  else
    launch("barrier", &barrier_kernel<window::Stores>, shape, stream, peers, rank, num_ranks, tag, err);
}

}  // namespace moelink::kernels
