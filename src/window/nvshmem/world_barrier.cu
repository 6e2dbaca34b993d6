// The world's bounded barrier: every PE signals its epoch into a word of every other PE, then waits
// for all of them, each wait bounded by a timeout. NVSHMEM's own collectives (barrier_all, free,
// finalize) wait without bound, so a world with a PE gone (a rank killed) would hang every survivor
// in its destroy; a Buffer runs this first and skips them (leaking its symmetric memory and the
// membership) unless every PE arrived.
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <chrono>
#include <cstdint>
#include <thread>

#include "window/nvshmem/ops.hpp"

namespace moelink::window::nvshmem_plugin {

namespace {

constexpr int kThreads = 256;

__device__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// words: the symmetric [num_pes] epochs (words[p] here: the last epoch PE p signalled to this PE).
// missing: the lowest PE whose signal did not come within timeout_ns, or -1 (host-mapped).
__global__ void __launch_bounds__(kThreads) arrive_and_wait(uint64_t* words, uint64_t epoch, unsigned long long timeout_ns,
                                                            int* missing) {
  const int me = nvshmem_my_pe(), n = nvshmem_n_pes();
  for (int pe = threadIdx.x; pe < n; pe += blockDim.x) nvshmemx_signal_op(words + me, epoch, NVSHMEM_SIGNAL_SET, pe);
  nvshmem_quiet();
  const unsigned long long start = now_ns();
  for (int pe = threadIdx.x; pe < n; pe += blockDim.x) {
    // >= : a peer one barrier ahead (it passed this one and entered the next) has arrived here too.
    while (nvshmem_signal_fetch(words + pe) < epoch) {
      if (now_ns() - start > timeout_ns) {
        atomicMin(missing, pe);
        break;
      }
    }
  }
}

}  // namespace

int world_barrier(uint64_t* words, uint64_t epoch, double timeout_s) {
  int* missing = nullptr;
  if (cudaHostAlloc(reinterpret_cast<void**>(&missing), sizeof(int), cudaHostAllocMapped) != cudaSuccess) return -2;
  *missing = 0x7fffffff;
  cudaStream_t stream = nullptr;
  int result = -2;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess) {
    int* missing_dev = nullptr;
    cudaHostGetDevicePointer(reinterpret_cast<void**>(&missing_dev), missing, 0);
    arrive_and_wait<<<1, kThreads, 0, stream>>>(words, epoch, static_cast<unsigned long long>(timeout_s * 1e9),
                                                missing_dev);
    // The kernel bounds its own waits; the host's margin covers one that never started.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s + 5.0);
    cudaError_t status = cudaGetLastError();
    while (status == cudaSuccess && (status = cudaStreamQuery(stream)) == cudaErrorNotReady) {
      if (std::chrono::steady_clock::now() > deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (status == cudaSuccess) {
      const int lowest = *reinterpret_cast<volatile int*>(missing);
      result = lowest == 0x7fffffff ? -1 : lowest;
    } else {
      cudaGetLastError();
    }
    // A kernel still running keeps the stream and the flag (leaked) rather than free them under it.
    if (status == cudaSuccess) cudaStreamDestroy(stream);
    if (status == cudaSuccess) cudaFreeHost(missing);
    return result;
  }
  cudaFreeHost(missing);
  return result;
}

}  // namespace moelink::window::nvshmem_plugin
