#pragma once
// The launch helper's host side. Every kernel is launched through kernels::launch (launch.cuh),
// which checks the launch in one place, and registers itself (KernelRegistration at namespace
// scope next to its definition) so that a Buffer loads every kernel when it is built (with lazy
// module loading a first launch would otherwise block the host) and can ask how many of its
// blocks fit on one SM.
#include <cuda_runtime_api.h>

#include <cstddef>

namespace moelink::kernels {

struct LaunchShape {
  int grid = 1;
  int block = 32;
  size_t smem = 0;
};

// Throws moelink::Error (kCuda) naming `kernel` when `status` is an error.
void check_launch(cudaError_t status, const char* kernel);

struct KernelRegistration {
  KernelRegistration(const void* fn, const char* name, int block, size_t smem);
};

// Loads every registered kernel into the current device's context.
void preload_kernels();

// Blocks of `fn` with `block` threads and `smem` dynamic shared memory that one SM holds at once.
int max_blocks_per_sm(const void* fn, int block, size_t smem);

}  // namespace moelink::kernels
