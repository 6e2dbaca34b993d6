#include "common/launch.hpp"

#include <mutex>
#include <vector>

#include "runtime/errors.hpp"

namespace moelink::kernels {

namespace {

struct KernelInfo {
  const void* fn;
  const char* name;
  int block;
  size_t smem;
};

struct Registry {
  std::mutex mutex;
  std::vector<KernelInfo> kernels;
};

Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

void check_launch(cudaError_t status, const char* kernel) {
  if (status == cudaSuccess) status = cudaPeekAtLastError();
  if (status != cudaSuccess) {
    cudaGetLastError();  // a launch-configuration error is not sticky; do not report it twice
    detail::raise(ErrorKind::kCuda, "launching ", kernel, " failed: ", cudaGetErrorName(status), " (",
                  cudaGetErrorString(status), ")");
  }
}

KernelRegistration::KernelRegistration(const void* fn, const char* name, int block, size_t smem) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.kernels.push_back({fn, name, block, smem});
}

void preload_kernels() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  for (const KernelInfo& k : r.kernels) {
    cudaFuncAttributes attributes;
    const cudaError_t status = cudaFuncGetAttributes(&attributes, k.fn);
    if (status != cudaSuccess) {
      cudaGetLastError();
      detail::raise(ErrorKind::kCuda, "loading kernel ", k.name, " failed: ", cudaGetErrorName(status), " (",
                    cudaGetErrorString(status), "); was libmoelink built for this GPU (sm_90)?");
    }
  }
}

int max_blocks_per_sm(const void* fn, int block, size_t smem) {
  int blocks = 0;
  MOELINK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, fn, block, smem));
  return blocks;
}

}  // namespace moelink::kernels
