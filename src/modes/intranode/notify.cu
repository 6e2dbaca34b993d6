// Intranode notify, libmoelink's builds: the kernel (modes/intranode/notify.cuh) over stores and
// over the put path's protocol on IPC (FakePuts); the NVSHMEM plugin builds it over puts
// (window/nvshmem/lane_notify.cu).
#include "modes/intranode/notify.cuh"
#include "window/nvshmem.hpp"

namespace moelink::intranode {

namespace {

const KernelRegistration registrations[] = {
    {reinterpret_cast<const void*>(&notify_kernel<window::Stores>), "intranode notify", kNotifyThreads, 0},
    {reinterpret_cast<const void*>(&notify_kernel<window::FakePuts>), "intranode notify (lane, fake puts)",
     kNotifyThreads, 0},
};

}  // namespace

void launch_notify(const NotifyArgs& a, window::Policy window, cudaStream_t stream) {
  const LaunchShape shape{1, kNotifyThreads, 0};
  if (window == window::Policy::kPuts)
    window::nvshmem_lane_notify(a, stream);
  else if (window == window::Policy::kFakePuts)
    launch("intranode notify", &notify_kernel<window::FakePuts>, shape, stream, a);
  else
    launch("intranode notify", &notify_kernel<window::Stores>, shape, stream, a);
}

}  // namespace moelink::intranode
