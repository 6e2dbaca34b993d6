// The host's mask calls (shrink): set, read or clear this rank's mask words, in stream order with the
// low-latency kernels (which read the mask once per call, at its start).
#include <cuda_runtime.h>

#include "common/launch.cuh"
#include "modes/low_latency/contract.hpp"

namespace moelink::low_latency {

namespace {

__global__ void mask_kernel(MaskOp op, HeaderSection* self, int rank, int value, int* out, int num_ranks) {
  const int r = threadIdx.x;
  if (r >= num_ranks) return;
  switch (op) {
    case kMaskSet:
      if (r == rank) self->masked[r] = value != 0;
      break;
    case kMaskQuery: out[r] = self->masked[r] != 0 || self->masked_by[r] != 0; break;
    case kMaskClean:
      self->masked[r] = 0;
      self->pending_mask[r] = 0;
      self->masked_by[r] = 0;
      break;
  }
}

const kernels::KernelRegistration registration(reinterpret_cast<const void*>(&mask_kernel), "low-latency mask",
                                               kMaxNvlRanks, 0);

}  // namespace

void launch_mask(MaskOp op, HeaderSection* self, int rank, int value, int* out, int num_ranks, cudaStream_t stream) {
  kernels::launch("low-latency mask", &mask_kernel, kernels::LaunchShape{1, kMaxNvlRanks, 0}, stream, op, self, rank,
                  value, out, num_ranks);
}

}  // namespace moelink::low_latency
