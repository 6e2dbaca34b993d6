#pragma once
// One error type for the whole library. Every failure a caller can see is a moelink::Error whose
// message carries the context (rank, operation, argument, expected vs got); the Python binding maps
// the kind to ValueError / TypeError / TimeoutError / RuntimeError.
#include <stdexcept>
#include <string>

namespace moelink {

enum class ErrorKind {
  kValue,    // an argument has a bad value or shape            -> ValueError
  kType,     // an argument has the wrong dtype / kind          -> TypeError
  kTimeout,  // a peer never arrived at a wait                  -> TimeoutError
  kCuda,     // a CUDA / NVSHMEM call failed                    -> RuntimeError
  kState,    // the Buffer is in the wrong state (destroyed...) -> RuntimeError
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, std::string message) : std::runtime_error(std::move(message)), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

}  // namespace moelink
