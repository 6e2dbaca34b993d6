#pragma once
// What a kernel does with its outputs when it may not run (its operation was skipped, or the node
// has a fault) and when one of its blocks gave up mid-way: every output byte becomes 0xFF (NaN
// for bf16, fp8 and float32; -1 for ids), so nothing it leaves can pass as data.
#include "common/header.hpp"
#include "common/primitives.cuh"

namespace moelink::kernels {

// Whether this kernel may run: its operation's opening said go and no fault is known. Every
// block asks at its start.
__device__ __forceinline__ bool operation_may_run(const ErrorSink& err) {
  return ld_volatile(&err.self->gate) == kGateGo && ld_volatile(&err.self->fault) == 0;
}

// Fills every region, this thread taking elements thread, thread + num_threads, ...
__device__ __forceinline__ void poison(const PoisonList& list, int64_t thread, int64_t num_threads) {
  const int4 ones = make_int4(-1, -1, -1, -1);
  for (int r = 0; r < kMaxPoisonRegions; ++r) {
    char* base = static_cast<char*>(list.data[r]);
    if (base == nullptr || list.bytes[r] <= 0) continue;
    // Torch and arena allocations are at least 256-byte aligned; the tail is done byte by byte.
    const int64_t words = list.bytes[r] / 16;
    for (int64_t i = thread; i < words; i += num_threads) reinterpret_cast<int4*>(base)[i] = ones;
    for (int64_t i = words * 16 + thread; i < list.bytes[r]; i += num_threads) base[i] = static_cast<char>(0xff);
  }
}

// The whole grid's share of the poisoning: called by every thread of every block.
__device__ __forceinline__ void poison_grid_share(const PoisonList& list) {
  poison(list, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// Called by every thread of every block as the last thing the kernel does. The last block to
// finish poisons every output when any block gave up (it knows no block still writes them), and
// resets the counters for the next kernel on the comm stream. Returns true in that last block:
// every block of the grid has started (and finished) by then.
__device__ __forceinline__ bool finish_block(const ErrorSink& err, const PoisonList& list) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(&err.self->exit_count, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return false;
  __threadfence();
  if (ld_volatile(&err.self->op_failed) != 0) poison(list, threadIdx.x, blockDim.x);
  __syncthreads();
  if (threadIdx.x == 0) {
    err.self->exit_count = 0;
    *reinterpret_cast<volatile int*>(&err.self->op_failed) = 0;
    err.self->open_claim = 0;
    *reinterpret_cast<volatile int*>(&err.self->opened) = 0;
  }
  return true;
}

}  // namespace moelink::kernels
