// Low-latency dispatch in libmoelink: the kernels of dispatch.cuh over the store window (every peer
// is mapped: CUDA IPC within one NVLink domain). The NVSHMEM plugin builds the same source with puts.
#include "modes/low_latency/dispatch.cuh"

namespace moelink::low_latency {

namespace {

using Window = window::Stores;

const KernelRegistration registrations[] = {
    {reinterpret_cast<const void*>(&dispatch_kernel<Window, false>), "low-latency dispatch", kThreads, 0},
    {reinterpret_cast<const void*>(&dispatch_kernel<Window, true>), "low-latency dispatch", kThreads, 0},
};

}  // namespace

int dispatch_blocks_per_sm() {
  static const int blocks =  // once per process, as combine_blocks_per_sm
      std::min(max_blocks_per_sm(reinterpret_cast<const void*>(&dispatch_kernel<Window, false>), kThreads, 0),
               max_blocks_per_sm(reinterpret_cast<const void*>(&dispatch_kernel<Window, true>), kThreads, 0));
  return blocks;
}

void launch_dispatch(const DispatchArgs& a, int blocks, cudaStream_t stream) {
  const LaunchShape shape{blocks, kThreads, 0};
  if (a.fp8)
    launch("low-latency dispatch", &dispatch_kernel<Window, true>, shape, stream, a);
  else
    launch("low-latency dispatch", &dispatch_kernel<Window, false>, shape, stream, a);
}

}  // namespace moelink::low_latency
