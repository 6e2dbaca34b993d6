// Low-latency combine in libmoelink: the kernels of combine.cuh over the store window (as dispatch.cu).
#include "modes/low_latency/combine.cuh"

namespace moelink::low_latency {

namespace {

using Window = window::Stores;

const KernelRegistration registrations[] = {
    {reinterpret_cast<const void*>(&combine_kernel<Window, false>), "low-latency combine", kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<Window, true>), "low-latency combine", kThreads, 0},
};

}  // namespace

int combine_blocks_per_sm() { return combine_blocks_per_sm_of<Window>(); }

void launch_combine(const CombineArgs& a, int blocks, cudaStream_t stream) {
  launch_combine_of<Window>(a, blocks, stream, "low-latency combine");
}

}  // namespace moelink::low_latency
