#pragma once
// The single error path: build a message from parts and throw moelink::Error; check every CUDA call.
#include <cuda_runtime_api.h>

#include <string>
#include <string_view>
#include <type_traits>

#include "moelink/error.hpp"

namespace moelink::detail {

// Messages are built with std::to_string, never iostreams: formatting through std::ostream crashed
// inside a process whose C++ runtime differs from the one libmoelink was built against (seen with
// torch's Python on the GPU machine), and the error path must be the most robust code we have.
inline void append(std::string& out, std::string_view part) { out.append(part); }
inline void append(std::string& out, const char* part) { out.append(part ? part : "(null)"); }
inline void append(std::string& out, char part) { out.push_back(part); }
template <class T, std::enable_if_t<std::is_arithmetic_v<T> && !std::is_same_v<T, char>, int> = 0>
void append(std::string& out, T part) {
  if constexpr (std::is_same_v<T, bool>)
    out.append(part ? "true" : "false");
  else
    out.append(std::to_string(part));
}

template <class... Parts>
std::string str(const Parts&... parts) {
  std::string out;
  (append(out, parts), ...);
  return out;
}

template <class... Parts>
[[noreturn]] void raise(ErrorKind kind, const Parts&... parts) {
  throw Error(kind, str("moelink: ", parts...));
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
