// The world's bounded barrier: every PE signals its epoch into a word of every other PE, then waits
// for all of them, each wait bounded by a timeout. NVSHMEM's own collectives (barrier_all, free,
// finalize) wait without bound, so a world with a PE gone (a rank killed) would hang every survivor
// in its destroy; a Buffer runs this first and skips them (leaking its symmetric memory and the
// membership) unless every PE arrived.
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>
#include <cstdio>

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
  // As the self-test (self_test.cu) does it: a managed flag and a synchronize. The kernel bounds
  // its own waits, so the synchronize returns within timeout_s once it has started. A failure says
  // which call failed on stderr (this runs in destroy, which reports and goes on).
  const auto failed = [](cudaError_t status, const char* what) {
    std::fprintf(stderr, "moelink: the NVSHMEM world barrier: %s failed with %s\n", what, cudaGetErrorString(status));
    return -2;
  };
  cudaGetLastError();  // an earlier call's error is not this barrier's
  int* missing = nullptr;
  cudaError_t status = cudaMallocManaged(&missing, sizeof(int));
  if (status != cudaSuccess) return failed(status, "cudaMallocManaged");
  *missing = 0x7fffffff;
  cudaStream_t stream = nullptr;
  status = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  if (status != cudaSuccess) {
    cudaFree(missing);
    return failed(status, "cudaStreamCreateWithFlags");
  }
  arrive_and_wait<<<1, kThreads, 0, stream>>>(words, epoch, static_cast<unsigned long long>(timeout_s * 1e9), missing);
  status = cudaGetLastError();
  if (status != cudaSuccess) {
    cudaStreamDestroy(stream);
    cudaFree(missing);
    return failed(status, "the launch");
  }
  status = cudaStreamSynchronize(stream);
  cudaStreamDestroy(stream);
  if (status != cudaSuccess) return failed(status, "the kernel");
  const int lowest = *missing;
  cudaFree(missing);
  return lowest == 0x7fffffff ? -1 : lowest;
}

}  // namespace moelink::window::nvshmem_plugin
