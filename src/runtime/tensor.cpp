#include "moelink/tensor.hpp"

#include <string>

#include "moelink/error.hpp"
#include "runtime/errors.hpp"

namespace moelink {

namespace {

struct DTypeInfo {
  DType dtype;
  const char* name;  // as torch prints it without "torch."; the Python layer sends these
  int64_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::kBool, "bool", 1},
    {DType::kUInt8, "uint8", 1},
    {DType::kInt32, "int32", 4},
    {DType::kInt64, "int64", 8},
    {DType::kFloat32, "float32", 4},
    {DType::kBFloat16, "bfloat16", 2},
    {DType::kFloat8E4M3, "float8_e4m3fn", 1},
    {DType::kFloat16, "float16", 2},
};

const DTypeInfo& info(DType dtype) {
  for (const auto& entry : kDTypes) {
    if (entry.dtype == dtype) return entry;
  }
  throw Error(ErrorKind::kType, "moelink: dtype: expected one of the supported dtypes, got enum value " +
                                    std::to_string(static_cast<int32_t>(dtype)));
}

std::string join(const std::vector<int64_t>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) detail::append(out, i ? ", " : ""), detail::append(out, values[i]);
  return out + "]";
}

std::string shape_pattern(const std::vector<int64_t>& expected) {
  std::string out = "[";
  for (size_t i = 0; i < expected.size(); ++i) {
    detail::append(out, i ? ", " : "");
    if (expected[i] < 0)
      out += '*';
    else
      detail::append(out, expected[i]);
  }
  return out + "]";
}

std::string device_name(int device) { return device < 0 ? "cpu" : "cuda:" + std::to_string(device); }

[[noreturn]] void fail(ErrorKind kind, const char* arg, const std::string& expected, const std::string& got) {
  throw Error(kind, std::string("moelink: ") + arg + ": expected " + expected + ", got " + got);
}

}  // namespace

int64_t dtype_size(DType dtype) { return info(dtype).size; }

const char* dtype_name(DType dtype) { return info(dtype).name; }

DType dtype_from_name(const std::string& name) {
  // Accept "torch.bfloat16" too: str(torch.bfloat16) carries the prefix and callers forget to strip it.
  const std::string bare = name.rfind("torch.", 0) == 0 ? name.substr(6) : name;
  for (const auto& entry : kDTypes) {
    if (bare == entry.name) return entry.dtype;
  }
  std::string supported;
  for (const auto& entry : kDTypes) {
    if (!supported.empty()) supported += ", ";
    supported += entry.name;
  }
  throw Error(ErrorKind::kType, "moelink: dtype: expected one of " + supported + ", got '" + name + "'");
}

int64_t TensorRef::stride(int64_t d) const {
  if (d < 0 || d >= dim()) {
    throw Error(ErrorKind::kValue, "moelink: stride: expected a dimension in [0, " + std::to_string(dim()) + "), got " +
                                       std::to_string(d));
  }
  if (!strides.empty()) return strides.at(static_cast<size_t>(d));
  int64_t result = 1;
  for (int64_t i = d + 1; i < dim(); ++i) result *= shape[static_cast<size_t>(i)];
  return result;
}

int64_t TensorRef::numel() const {
  int64_t result = 1;
  for (int64_t extent : shape) result *= extent;
  return result;
}

bool TensorRef::is_contiguous() const {
  if (strides.empty()) return true;
  if (strides.size() != shape.size()) return false;
  // Torch calls empty tensors contiguous whatever their strides, and a size-1 dim is never stepped
  // over, so its stride is free; the Python layer hands us torch's strides unchanged.
  if (numel() == 0) return true;
  int64_t expected = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    if (shape[i] == 1) continue;
    if (strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

namespace check {

void defined(const TensorRef& t, const char* arg) {
  if (!t.defined()) fail(ErrorKind::kValue, arg, "a tensor", "None");
}

void dtype(const TensorRef& t, DType expected, const char* arg) {
  if (t.dtype != expected)
    fail(ErrorKind::kType, arg, std::string("dtype ") + dtype_name(expected), dtype_name(t.dtype));
}

void dim(const TensorRef& t, int64_t expected, const char* arg) {
  if (t.dim() != expected) {
    fail(ErrorKind::kValue, arg, std::to_string(expected) + " dims",
         std::to_string(t.dim()) + " (shape " + join(t.shape) + ")");
  }
}

// A negative entry in `expected` matches any extent, for dims the caller does not constrain.
void shape(const TensorRef& t, const std::vector<int64_t>& expected, const char* arg) {
  bool ok = t.shape.size() == expected.size();
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = expected[i] < 0 || expected[i] == t.shape[i];
  if (!ok) fail(ErrorKind::kValue, arg, "shape " + shape_pattern(expected), join(t.shape));
}

void contiguous(const TensorRef& t, const char* arg) {
  if (!t.is_contiguous()) {
    fail(ErrorKind::kValue, arg, "a contiguous tensor", "strides " + join(t.strides) + " for shape " + join(t.shape));
  }
}

void on_device(const TensorRef& t, int device, const char* arg) {
  if (t.device != device) fail(ErrorKind::kValue, arg, "device " + device_name(device), device_name(t.device));
  if (t.data == nullptr && t.numel() != 0) {
    fail(ErrorKind::kValue, arg, "a non-null data pointer", "null with " + std::to_string(t.numel()) + " elements");
  }
}

}  // namespace check

}  // namespace moelink
