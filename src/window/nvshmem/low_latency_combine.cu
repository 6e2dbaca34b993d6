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

int combine_blocks_per_sm_puts() { return combine_blocks_per_sm_of<Window>(); }

void launch_combine_puts(const CombineArgs& a, int blocks, cudaStream_t stream) {
  launch_combine_of<Window>(a, blocks, stream, "low-latency combine (puts)");
}

}  // namespace moelink::low_latency
