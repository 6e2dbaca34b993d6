// The low-latency dispatch built for the put path (window::Puts): the same source as libmoelink's
// (modes/low_latency/dispatch.cuh), here because it calls NVSHMEM's device API, which lives in this
// plugin only. The core reaches it through the plugin's table (ops.hpp) when the low-latency
// region is symmetric (runtime/context.hpp).
#include "window/nvshmem/device.cuh"

#include "modes/low_latency/dispatch.cuh"

namespace moelink::low_latency {

namespace {

using Window = window::Puts;

const KernelRegistration registrations[] = {
    {reinterpret_cast<const void*>(&dispatch_kernel<Window, false>), "low-latency dispatch (puts)", kThreads, 0},
    {reinterpret_cast<const void*>(&dispatch_kernel<Window, true>), "low-latency dispatch (puts)", kThreads, 0},
};

}  // namespace

int dispatch_blocks_per_sm_puts() { return dispatch_blocks_per_sm_of<Window>(); }

void launch_dispatch_puts(const DispatchArgs& a, int blocks, cudaStream_t stream) {
  launch_dispatch_of<Window>(a, blocks, stream, "low-latency dispatch (puts)");
}

}  // namespace moelink::low_latency
