#pragma once
// The core never sees a framework tensor: callers describe memory with TensorRef (pointer, dtype,
// shape, strides in elements, device). The Python layer fills these from torch tensors, so the
// extension does not depend on one PyTorch ABI.
#include <cstdint>
#include <string>
#include <vector>

namespace moelink {

enum class DType : int32_t {
  kBool = 0,
  kUInt8 = 1,
  kInt32 = 2,
  kInt64 = 3,
  kFloat32 = 4,
  kBFloat16 = 5,
  kFloat8E4M3 = 6,
  kFloat16 = 7,
};

int64_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
// Parses the names the Python layer sends ("bfloat16", "float8_e4m3fn", "int64", ...).
DType dtype_from_name(const std::string& name);

struct TensorRef {
  void* data = nullptr;
  DType dtype = DType::kUInt8;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements; empty means contiguous
  int device = -1;               // CUDA ordinal, -1 for host memory

  bool defined() const { return data != nullptr || !shape.empty(); }
  int64_t dim() const { return static_cast<int64_t>(shape.size()); }
  int64_t size(int64_t d) const { return shape.at(static_cast<size_t>(d)); }
  int64_t stride(int64_t d) const;
  int64_t numel() const;
  bool is_contiguous() const;
};

// Argument checks shared by every operation. Each throws moelink::Error naming `arg` and the
// expected value.
namespace check {
void defined(const TensorRef& t, const char* arg);
void dtype(const TensorRef& t, DType expected, const char* arg);
void dim(const TensorRef& t, int64_t expected, const char* arg);
void shape(const TensorRef& t, const std::vector<int64_t>& expected, const char* arg);
void contiguous(const TensorRef& t, const char* arg);
void on_device(const TensorRef& t, int device, const char* arg);
}  // namespace check

}  // namespace moelink
