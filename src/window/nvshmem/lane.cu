// The internode lane's put build (window::Puts) of the opening and barrier kernels (common/), and
// the table of the lane peers' PEs that every lane kernel's puts read (window/nvshmem/device.cuh).
// The core reaches them through the plugin's table (ops.hpp) when a lane's window is NVSHMEM.
#include "window/nvshmem/device.cuh"

#include <string>

#include "common/barrier_kernel.cuh"
#include "common/opening_kernel.cuh"
#include "moelink/error.hpp"
#include "window/nvshmem/ops.hpp"

namespace moelink::window {

__device__ int lane_pe[kMaxNvlRanks];

}  // namespace moelink::window

namespace moelink::kernels {

namespace {

using Window = window::Puts;

const KernelRegistration registrations[] = {
    {reinterpret_cast<const void*>(&barrier_kernel<Window>), "barrier (lane, puts)", 32, 0},
    {reinterpret_cast<const void*>(&opening_kernel<Window>), "opening (lane, puts)", 32, 0},
};

}  // namespace

void launch_barrier_puts(const PeerTable& peers, int rank, int num_ranks, int tag, const ErrorSink& err,
                         cudaStream_t stream) {
  launch("barrier", &barrier_kernel<Window>, LaunchShape{1, 32, 0}, stream, peers, rank, num_ranks, tag, err);
}

void launch_opening_puts(const PeerTable& peers, int rank, int num_ranks, const Opening& opening, const ErrorSink& err,
                         cudaStream_t stream) {
  launch("opening", &opening_kernel<Window>, LaunchShape{1, 32, 0}, stream, peers, rank, num_ranks, opening, err);
}

}  // namespace moelink::kernels

namespace moelink::window::nvshmem_plugin {

void set_lane_peers(const int* pes, int num_peers) {
  if (num_peers < 1 || num_peers > kMaxNvlRanks)
    throw Error(ErrorKind::kValue, "moelink: the NVSHMEM lane takes 1.." + std::to_string(kMaxNvlRanks) +
                                       " peers, got " + std::to_string(num_peers));
  int table[kMaxNvlRanks] = {};
  for (int p = 0; p < num_peers; ++p) table[p] = pes[p];
  // Synchronous: every later launch of a lane kernel, on any stream, reads the table.
  const cudaError_t status = cudaMemcpyToSymbol(lane_pe, table, sizeof(table));
  if (status != cudaSuccess)
    throw Error(ErrorKind::kCuda, std::string("moelink: setting the NVSHMEM lane's peers failed with ") +
                                      cudaGetErrorString(status));
}

}  // namespace moelink::window::nvshmem_plugin
