// Intranode combine, libmoelink's builds: the kernel (modes/intranode/combine.cuh) over stores and
// over the put path's protocol on IPC (FakePuts); the NVSHMEM plugin builds it over puts
// (window/nvshmem/lane_combine.cu).
#include "modes/intranode/combine.cuh"

#include <algorithm>

#include "window/nvshmem.hpp"

namespace moelink::intranode {

namespace {

using window::FakePuts;
using window::Stores;

const KernelRegistration registrations[] = {
    {reinterpret_cast<const void*>(&combine_kernel<2>), "intranode combine", kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<4>), "intranode combine", kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<kMaxNvlRanks>), "intranode combine", kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<2, Stores, true>), "intranode combine (halting test hook)",
     kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<4, Stores, true>), "intranode combine (halting test hook)",
     kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<kMaxNvlRanks, Stores, true>),
     "intranode combine (halting test hook)", kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<2, FakePuts>), "intranode combine (lane, fake puts)", kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<4, FakePuts>), "intranode combine (lane, fake puts)", kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<kMaxNvlRanks, FakePuts>), "intranode combine (lane, fake puts)",
     kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<2, FakePuts, true>),
     "intranode combine (lane, fake puts, halting test hook)", kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<4, FakePuts, true>),
     "intranode combine (lane, fake puts, halting test hook)", kThreads, 0},
    {reinterpret_cast<const void*>(&combine_kernel<kMaxNvlRanks, FakePuts, true>),
     "intranode combine (lane, fake puts, halting test hook)", kThreads, 0},
};

}  // namespace

int combine_blocks_per_sm() {
  return std::min({max_blocks_per_sm(reinterpret_cast<const void*>(&combine_kernel<2>), kThreads, 0),
                   max_blocks_per_sm(reinterpret_cast<const void*>(&combine_kernel<4>), kThreads, 0),
                   max_blocks_per_sm(reinterpret_cast<const void*>(&combine_kernel<kMaxNvlRanks>), kThreads, 0),
                   max_blocks_per_sm(reinterpret_cast<const void*>(&combine_kernel<2, FakePuts>), kThreads, 0),
                   max_blocks_per_sm(reinterpret_cast<const void*>(&combine_kernel<4, FakePuts>), kThreads, 0),
                   max_blocks_per_sm(reinterpret_cast<const void*>(&combine_kernel<kMaxNvlRanks, FakePuts>), kThreads,
                                     0)});
}

void launch_combine(const CombineArgs& a, window::Policy window, cudaStream_t stream) {
  const LaunchShape shape{a.layout.num_channels * 2, kThreads, 0};
  if (window == window::Policy::kPuts) {
    window::nvshmem_lane_combine(a, stream);
  } else if (window == window::Policy::kFakePuts) {
    if (a.halt_sends)
      launch_combine_for_ranks<FakePuts, true>(a, shape, stream);
    else
      launch_combine_for_ranks<FakePuts, false>(a, shape, stream);
  } else if (a.halt_sends) {
    launch_combine_for_ranks<Stores, true>(a, shape, stream);
  } else {
    launch_combine_for_ranks<Stores, false>(a, shape, stream);
  }
}

}  // namespace moelink::intranode
