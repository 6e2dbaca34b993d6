// Intranode dispatch, libmoelink's builds: the kernel (modes/intranode/dispatch.cuh) over stores and
// over the put path's protocol on IPC (FakePuts); the NVSHMEM plugin builds it over puts
// (window/nvshmem/lane_dispatch.cu).
#include "modes/intranode/dispatch.cuh"

#include <algorithm>

#include "window/nvshmem.hpp"

namespace moelink::intranode {

namespace {

using window::FakePuts;
using window::Stores;

const KernelRegistration registrations[] = {
    {reinterpret_cast<const void*>(&dispatch_kernel<Stores, false>), "intranode dispatch", kThreads, 0},
    {reinterpret_cast<const void*>(&dispatch_kernel<Stores, true>), "intranode dispatch (halting test hook)", kThreads,
     0},
    {reinterpret_cast<const void*>(&dispatch_kernel<FakePuts, false>), "intranode dispatch (lane, fake puts)",
     kThreads, 0},
    {reinterpret_cast<const void*>(&dispatch_kernel<FakePuts, true>),
     "intranode dispatch (lane, fake puts, halting test hook)", kThreads, 0},
};

}  // namespace

int dispatch_blocks_per_sm() {
  return std::min(max_blocks_per_sm(reinterpret_cast<const void*>(&dispatch_kernel<Stores, false>), kThreads, 0),
                  max_blocks_per_sm(reinterpret_cast<const void*>(&dispatch_kernel<FakePuts, false>), kThreads, 0));
}

void launch_dispatch(const DispatchArgs& a, window::Policy window, cudaStream_t stream) {
  const LaunchShape shape{a.layout.num_channels * 2, kThreads, 0};
  if (window == window::Policy::kPuts)
    window::nvshmem_lane_dispatch(a, stream);
  else if (window == window::Policy::kFakePuts)
    launch_dispatch_over<FakePuts>(a, shape, stream);
  else
    launch_dispatch_over<Stores>(a, shape, stream);
}

}  // namespace moelink::intranode
