// The internode lane's notify built for the put path (window::Puts): the same source as libmoelink's
// (modes/intranode/notify.cuh), here because it calls NVSHMEM's device API, which lives in this
// plugin only. The core reaches it through the plugin's table (ops.hpp) when a lane's window is
// NVSHMEM (runtime/context.hpp).
#include "window/nvshmem/device.cuh"

#include "modes/intranode/notify.cuh"

namespace moelink::intranode {

namespace {

const KernelRegistration registrations[] = {
    {reinterpret_cast<const void*>(&notify_kernel<window::Puts>), "intranode notify (lane, puts)", kNotifyThreads, 0},
};

}  // namespace

void launch_notify_puts(const NotifyArgs& a, cudaStream_t stream) {
  launch("intranode notify", &notify_kernel<window::Puts>, LaunchShape{1, kNotifyThreads, 0}, stream, a);
}

}  // namespace moelink::intranode
