// The low-latency combine built for the put path (window::Puts): the same source as libmoelink's
// (modes/low_latency/combine.cuh), here because it calls NVSHMEM's device API, which lives in this
// plugin only. The core reaches it through the plugin's table (ops.hpp) when the low-latency
// region is symmetric (runtime/context.hpp).
#include "window/nvshmem/device.cuh"

#include "modes/low_latency/combine.cuh"

namespace moelink::low_latency {

namespace {

using Window = window::Puts;

const KernelRegistration registrations[] = {
    {reinterpret_cast<const void*>(&combine_kernel<Window, false>), "low-latency combine (puts)", kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<Window, true>), "low-latency combine (puts)", kThreads, 0},
};

}  // namespace

int combine_blocks_per_sm_puts() {
  static const int blocks =
      std::min(max_blocks_per_sm(reinterpret_cast<const void*>(&combine_kernel<Window, false>), kThreads, 0),
               max_blocks_per_sm(reinterpret_cast<const void*>(&combine_kernel<Window, true>), kThreads, 0));
  return blocks;
}

void launch_combine_puts(const CombineArgs& a, int blocks, cudaStream_t stream) {
  const LaunchShape shape{blocks, kThreads, 0};
  if (a.logfmt)
    launch("low-latency combine (puts)", &combine_kernel<Window, true>, shape, stream, a);
  else
    launch("low-latency combine (puts)", &combine_kernel<Window, false>, shape, stream, a);
}

}  // namespace moelink::low_latency
