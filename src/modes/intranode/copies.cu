// A staged dispatch's copies (contract.hpp, CopyList): up to eight flat ranges, a row of blocks
// each. They are small (an fp8 dispatch's scales, ids, weights and source indices are ~320 bytes a
// row: a few MB at 4096 tokens per rank), so the launch, not the bandwidth, is their cost; one
// launch takes them all.
#include <cuda_runtime.h>

#include "common/launch.cuh"
#include "modes/intranode/contract.hpp"

namespace moelink::intranode {

namespace {

using kernels::KernelRegistration;

constexpr int kCopyThreads = 256;
constexpr int kCopyBlocksPerEntry = 16;

__global__ void __launch_bounds__(kCopyThreads) copies_kernel(CopyList copies) {
  const CopyList::Entry e = copies.entry[blockIdx.y];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool vector = ((reinterpret_cast<uintptr_t>(e.from) | reinterpret_cast<uintptr_t>(e.to)) & 15) == 0;
  int64_t done = 0;
  if (vector) {
    const int64_t n = e.bytes / 16;
    const int4* from = static_cast<const int4*>(e.from);
    int4* to = static_cast<int4*>(e.to);
    for (int64_t i = first; i < n; i += stride) to[i] = from[i];
    done = n * 16;
  }
  const int* from = static_cast<const int*>(e.from);
  int* to = static_cast<int*>(e.to);
  for (int64_t i = done / 4 + first; i < e.bytes / 4; i += stride) to[i] = from[i];
}

const KernelRegistration registration(reinterpret_cast<const void*>(&copies_kernel), "staged copies", kCopyThreads,
                                      0);

}  // namespace

void launch_copies(const CopyList& copies, cudaStream_t stream) {
  if (copies.count == 0) return;
  // A row of blocks per entry (blockIdx.y): kernels::launch takes one-dimensional grids only.
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(kCopyBlocksPerEntry, static_cast<unsigned>(copies.count));
  config.blockDim = dim3(kCopyThreads);
  config.stream = stream;
  kernels::check_launch(cudaLaunchKernelEx(&config, copies_kernel, copies), "staged copies");
}

}  // namespace moelink::intranode
