// The internode lane's dispatch built for the put path (window::Puts): the same source as
// libmoelink's (modes/intranode/dispatch.cuh), here because it calls NVSHMEM's device API, which
// lives in this plugin only. The core reaches it through the plugin's table (ops.hpp) when a lane's
// window is NVSHMEM (runtime/context.hpp). The halting build is the test hook's
// (Buffer::debug_halt_next_sends), as in libmoelink.
#include "window/nvshmem/device.cuh"

#include "modes/intranode/dispatch.cuh"

namespace moelink::intranode {

namespace {

using Window = window::Puts;

const KernelRegistration registrations[] = {
    {reinterpret_cast<const void*>(&dispatch_kernel<Window, false>), "intranode dispatch (lane, puts)", kThreads, 0},
    {reinterpret_cast<const void*>(&dispatch_kernel<Window, true>),
     "intranode dispatch (lane, puts, halting test hook)", kThreads, 0},
};

}  // namespace

int dispatch_blocks_per_sm_puts() {
  return max_blocks_per_sm(reinterpret_cast<const void*>(&dispatch_kernel<Window, false>), kThreads, 0);
}

void launch_dispatch_puts(const DispatchArgs& a, cudaStream_t stream) {
  launch_dispatch_over<Window>(a, LaunchShape{a.layout.num_channels * 2, kThreads, 0}, stream);
}

}  // namespace moelink::intranode
