#include "runtime/errors.hpp"

namespace moelink::detail {

void raise_cuda(cudaError_t status, const char* expr, const char* file, int line) {
  // Clear a non-sticky error so the next call does not report it again.
  cudaGetLastError();
  raise(ErrorKind::kCuda, expr, " failed: ", cudaGetErrorName(status), " (", cudaGetErrorString(status), ") at ",
        file, ":", line);
}

}  // namespace moelink::detail
