// The transport's device half, checked end to end: a ring in which every PE sends a block of words
// to the next PE and signals it, once through nvshmem_ptr (a plain store into a peer NVSHMEM can
// map) and once with put-with-signal (the path to a peer on another node), then checks what the
// previous PE sent. Collective; run by tests/gpu/nvshmem_smoke.cpp after join.
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>
#include <string>

#include "window/nvshmem/ops.hpp"

namespace moelink::window::nvshmem_plugin {

namespace {

constexpr int kWords = 4096;
constexpr int kThreads = 256;
constexpr unsigned long long kWaitNs = 10ull * 1000 * 1000 * 1000;

__device__ unsigned pattern(int pe, int round, int i) { return 0x9e3779b9u * (pe + 1) ^ (round << 24) ^ i; }

__device__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// Symmetric layout: inbox[2][kWords], outbox[kWords], signal[2]. result: 0 ok, 1 + first bad
// index, or -1 for a timeout; mapped[0]: whether nvshmem_ptr mapped the next PE.
__global__ void __launch_bounds__(kThreads) ring(unsigned* inbox, unsigned* outbox, uint64_t* signal, int* result,
                                                 int* mapped) {
  const int pe = nvshmem_my_pe(), npes = nvshmem_n_pes();
  const int next = (pe + 1) % npes, prev = (pe + npes - 1) % npes;
  for (int round = 0; round < 2; ++round) {
    unsigned* dest = inbox + round * kWords;
    for (int i = threadIdx.x; i < kWords; i += blockDim.x) outbox[i] = pattern(pe, round, i);
    __syncthreads();
    if (round == 0) {
      auto* peer = static_cast<unsigned*>(nvshmem_ptr(dest, next));
      if (threadIdx.x == 0) *mapped = peer != nullptr && next != pe;  // one PE maps only itself
      if (peer != nullptr) {
        for (int i = threadIdx.x; i < kWords; i += blockDim.x) peer[i] = outbox[i];
        __syncthreads();
        if (threadIdx.x == 0) {
          __threadfence_system();
          nvshmemx_signal_op(signal + round, 1, NVSHMEM_SIGNAL_SET, next);
        }
      } else {
        nvshmemx_putmem_signal_block(dest, outbox, kWords * sizeof(unsigned), signal + round, 1, NVSHMEM_SIGNAL_SET,
                                     next);
      }
    } else {
      nvshmemx_putmem_signal_block(dest, outbox, kWords * sizeof(unsigned), signal + round, 1, NVSHMEM_SIGNAL_SET,
                                   next);
    }
    // Thread 0 keeps the outcome in a register until the barrier: the compiler hoists a shared load
    // in `threadIdx.x == 0 && arrived` into every thread, which races thread 0's store (racecheck).
    __shared__ bool arrived;
    if (threadIdx.x == 0) {
      const unsigned long long start = now_ns();
      bool got = true;
      while (nvshmem_signal_fetch(signal + round) != 1)
        if (now_ns() - start > kWaitNs) {
          got = false;
          break;
        }
      // The spin bounded the wait; the API's wait adds what a proxy transport needs for the data to
      // be visible once the signal is (it returns at once here).
      if (got) nvshmem_signal_wait_until(signal + round, NVSHMEM_CMP_EQ, 1);
      arrived = got;
    }
    __syncthreads();
    if (!arrived) {
      if (threadIdx.x == 0) *result = -1;
      return;
    }
    for (int i = threadIdx.x; i < kWords; i += blockDim.x)
      if (reinterpret_cast<volatile unsigned*>(dest)[i] != pattern(prev, round, i)) atomicCAS(result, 0, 1 + i);
    __syncthreads();
    if (*reinterpret_cast<volatile int*>(result) != 0) return;
    __syncthreads();  // outbox is rewritten next round only after every thread is done with it
  }
}

std::string cuda_error(cudaError_t status, const char* what) {
  return std::string("nvshmem self-test: ") + what + " failed with " + cudaGetErrorString(status);
}

}  // namespace

std::string self_test(bool* mapped) {
  *mapped = false;
  // Every PE makes the same collective calls (calloc, two barriers, free) whatever fails locally,
  // so that one PE's failure cannot pair its collectives with the wrong ones of its peers.
  int* flags = nullptr;  // [result, mapped]
  std::string error;
  cudaError_t status = cudaMallocManaged(&flags, 2 * sizeof(int));
  if (status != cudaSuccess) {
    error = cuda_error(status, "cudaMallocManaged");
    flags = nullptr;
  } else {
    flags[0] = flags[1] = 0;
  }
  const size_t bytes = sizeof(unsigned) * 3 * kWords + 2 * sizeof(uint64_t);
  auto* base = static_cast<char*>(nvshmem_calloc(1, bytes));  // one element: see plugin.cpp's alloc
  if (base == nullptr && error.empty()) error = "nvshmem self-test: nvshmem_calloc failed";
  nvshmem_barrier_all();  // every PE's inbox is zeroed before anyone sends
  if (error.empty()) {
    auto* inbox = reinterpret_cast<unsigned*>(base);
    auto* outbox = inbox + 2 * kWords;
    auto* signal = reinterpret_cast<uint64_t*>(outbox + kWords);
    ring<<<1, kThreads>>>(inbox, outbox, signal, flags, flags + 1);
    status = cudaGetLastError();
    if (status == cudaSuccess) status = cudaDeviceSynchronize();
    if (status != cudaSuccess) error = cuda_error(status, "the ring kernel");
  }
  if (error.empty() && flags[0] != 0) {
    error = flags[0] < 0 ? "nvshmem self-test: the previous PE's signal never came (10 s)"
                         : "nvshmem self-test: word " + std::to_string(flags[0] - 1) + " from the previous PE is wrong";
  }
  if (error.empty()) *mapped = flags[1] != 0;
  nvshmem_barrier_all();
  if (base != nullptr) nvshmem_free(base);
  if (flags != nullptr) cudaFree(flags);
  return error;
}

}  // namespace moelink::window::nvshmem_plugin
