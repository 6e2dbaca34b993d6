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

int combine_blocks_per_sm() {
  // Asked once per process (every device here is a Hopper of one kind): a combine is a decode-step
  // call, and two occupancy queries per call are host time it does not need.
  static const int blocks =
      std::min(max_blocks_per_sm(reinterpret_cast<const void*>(&combine_kernel<Window, false>), kThreads, 0),
               max_blocks_per_sm(reinterpret_cast<const void*>(&combine_kernel<Window, true>), kThreads, 0));
  return blocks;
}

void launch_combine(const CombineArgs& a, int blocks, cudaStream_t stream) {
  const LaunchShape shape{blocks, kThreads, 0};
  if (a.logfmt)
    launch("low-latency combine", &combine_kernel<Window, true>, shape, stream, a);
  else
    launch("low-latency combine", &combine_kernel<Window, false>, shape, stream, a);
}

}  // namespace moelink::low_latency
