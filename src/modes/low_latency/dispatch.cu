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

int dispatch_blocks_per_sm() { return dispatch_blocks_per_sm_of<Window>(); }

void launch_dispatch(const DispatchArgs& a, int blocks, cudaStream_t stream) {
  launch_dispatch_of<Window>(a, blocks, stream, "low-latency dispatch");
}

}  // namespace moelink::low_latency
