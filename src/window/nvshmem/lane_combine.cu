// The internode lane's combine built for the put path (window::Puts): the same source as
// libmoelink's (modes/intranode/combine.cuh), here because it calls NVSHMEM's device API, which
// lives in this plugin only. The core reaches it through the plugin's table (ops.hpp) when a lane's
// window is NVSHMEM (runtime/context.hpp). The halting builds are the test hook's, as in libmoelink.
#include "window/nvshmem/device.cuh"

#include <algorithm>

#include "modes/intranode/combine.cuh"

namespace moelink::intranode {

namespace {

using Window = window::Puts;

const KernelRegistration registrations[] = {
    {reinterpret_cast<const void*>(&combine_kernel<2, Window>), "intranode combine (lane, puts)", kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<4, Window>), "intranode combine (lane, puts)", kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<kMaxNvlRanks, Window>), "intranode combine (lane, puts)", kThreads,
     0},
    {reinterpret_cast<const void*>(&combine_kernel<2, Window, true>), "intranode combine (lane, puts, halting test hook)",
     kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<4, Window, true>), "intranode combine (lane, puts, halting test hook)",
     kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<kMaxNvlRanks, Window, true>),
     "intranode combine (lane, puts, halting test hook)", kThreads, 0},
};

}  // namespace

int combine_blocks_per_sm_puts() {
  return std::min({max_blocks_per_sm(reinterpret_cast<const void*>(&combine_kernel<2, Window>), kThreads, 0),
                   max_blocks_per_sm(reinterpret_cast<const void*>(&combine_kernel<4, Window>), kThreads, 0),
                   max_blocks_per_sm(reinterpret_cast<const void*>(&combine_kernel<kMaxNvlRanks, Window>), kThreads,
                                     0)});
}

void launch_combine_puts(const CombineArgs& a, cudaStream_t stream) {
  const LaunchShape shape{a.layout.num_channels * 2, kThreads, 0};
  if (a.halt_sends)
    launch_combine_for_ranks<Window, true>(a, shape, stream);
  else
    launch_combine_for_ranks<Window, false>(a, shape, stream);
}

}  // namespace moelink::intranode
