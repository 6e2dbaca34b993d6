#pragma once
// The launch helper's device side: kernels::launch(name, kernel, shape, stream, args...).
#include <cuda_runtime.h>

#include <utility>

#include "common/launch.hpp"

namespace moelink::kernels {

template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), const LaunchShape& shape, cudaStream_t stream,
            Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(shape.grid));
  config.blockDim = dim3(static_cast<unsigned>(shape.block));
  config.dynamicSmemBytes = shape.smem;
  config.stream = stream;
  check_launch(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), name);
}

}  // namespace moelink::kernels
