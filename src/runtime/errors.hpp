#pragma once
// The single error path: build a message from parts and throw moelink::Error; check every CUDA call.
#include <cuda_runtime_api.h>

#include <sstream>

#include "moelink/error.hpp"

namespace moelink::detail {

template <class... Parts>
[[noreturn]] void raise(ErrorKind kind, const Parts&... parts) {
  std::ostringstream os;
  os << "moelink: ";
  (os << ... << parts);
  throw Error(kind, os.str());
}

[[noreturn]] void raise_cuda(cudaError_t status, const char* expr, const char* file, int line);

}  // namespace moelink::detail

#define MOELINK_CUDA_CHECK(expr)                                                          \
  do {                                                                                    \
    const cudaError_t moelink_status_ = (expr);                                           \
    if (moelink_status_ != cudaSuccess)                                                   \
      ::moelink::detail::raise_cuda(moelink_status_, #expr, __FILE__, __LINE__);          \
  } while (0)

// After a kernel launch: launch-configuration errors surface here, not at the next sync.
#define MOELINK_CHECK_LAUNCH() MOELINK_CUDA_CHECK(cudaPeekAtLastError())
