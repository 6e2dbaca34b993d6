#include <cstdint>
#include <string>
#include <vector>

#include "harness.hpp"
#include "moelink/tensor.hpp"

using moelink::DType;
using moelink::ErrorKind;
using moelink::TensorRef;
namespace check = moelink::check;

namespace {

// A device pointer is never dereferenced by the checks; any non-null address will do.
void* fake_pointer() {
  static int64_t storage;
  return &storage;
}

TensorRef make(DType dtype, std::vector<int64_t> shape, std::vector<int64_t> strides = {}, int device = 0) {
  TensorRef t;
  t.data = fake_pointer();
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.strides = std::move(strides);
  t.device = device;
  return t;
}

}  // namespace

MOELINK_TEST(dtype_names_round_trip) {
  const struct {
    DType dtype;
    const char* name;
    int64_t size;
  } cases[] = {
      {DType::kBool, "bool", 1},
      {DType::kUInt8, "uint8", 1},
      {DType::kInt32, "int32", 4},
      {DType::kInt64, "int64", 8},
      {DType::kFloat32, "float32", 4},
      {DType::kBFloat16, "bfloat16", 2},
      {DType::kFloat8E4M3, "float8_e4m3fn", 1},
      {DType::kFloat16, "float16", 2},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(std::string(moelink::dtype_name(c.dtype)), std::string(c.name));
    EXPECT_TRUE(moelink::dtype_from_name(c.name) == c.dtype);
    EXPECT_TRUE(moelink::dtype_from_name(moelink::dtype_name(c.dtype)) == c.dtype);
    EXPECT_EQ(moelink::dtype_size(c.dtype), c.size);
  }
}

MOELINK_TEST(dtype_from_name_rejects_unknown_names) {
  EXPECT_THROW_KIND(moelink::dtype_from_name("float64"), ErrorKind::kType, "float64");
  EXPECT_THROW_KIND(moelink::dtype_from_name(""), ErrorKind::kType, "dtype");
  EXPECT_THROW_KIND(moelink::dtype_from_name("BFloat16"), ErrorKind::kType, "bfloat16");
  EXPECT_THROW_KIND(moelink::dtype_from_name("float8_e5m2"), ErrorKind::kType, "float8_e5m2");
}

MOELINK_TEST(stride_and_numel) {
  const TensorRef contiguous = make(DType::kBFloat16, {4, 3, 5});
  EXPECT_EQ(contiguous.numel(), 60);
  EXPECT_EQ(contiguous.stride(0), 15);
  EXPECT_EQ(contiguous.stride(1), 5);
  EXPECT_EQ(contiguous.stride(2), 1);
  const TensorRef transposed = make(DType::kFloat32, {5, 4}, {1, 5});
  EXPECT_EQ(transposed.stride(0), 1);
  EXPECT_EQ(transposed.stride(1), 5);
  EXPECT_EQ(transposed.numel(), 20);
  EXPECT_EQ(make(DType::kInt32, {0, 7}).numel(), 0);
  EXPECT_EQ(make(DType::kInt32, {}).numel(), 1);
  EXPECT_THROW_KIND(contiguous.stride(3), ErrorKind::kValue, "stride");
  EXPECT_THROW_KIND(contiguous.stride(-1), ErrorKind::kValue, "got -1");
}

MOELINK_TEST(contiguity_rules) {
  EXPECT_TRUE(make(DType::kBFloat16, {4, 8}).is_contiguous());
  EXPECT_TRUE(make(DType::kBFloat16, {4, 8}, {8, 1}).is_contiguous());
  EXPECT_FALSE(make(DType::kBFloat16, {4, 8}, {1, 4}).is_contiguous());
  // A row slice of a wider tensor.
  EXPECT_FALSE(make(DType::kBFloat16, {4, 8}, {16, 1}).is_contiguous());
  // Size-1 dims may carry any stride (torch produces such strides from unsqueeze / narrow).
  EXPECT_TRUE(make(DType::kFloat32, {1, 8}, {123, 1}).is_contiguous());
  EXPECT_TRUE(make(DType::kFloat32, {4, 1}, {1, 1}).is_contiguous());
  EXPECT_TRUE(make(DType::kFloat32, {4, 1, 3}, {3, 99, 1}).is_contiguous());
  EXPECT_TRUE(make(DType::kFloat32, {1, 1}, {0, 0}).is_contiguous());
  EXPECT_FALSE(make(DType::kFloat32, {4, 1, 3}, {4, 99, 1}).is_contiguous());
  // Expanded (stride 0) dims of size > 1 are not contiguous.
  EXPECT_FALSE(make(DType::kFloat32, {4, 8}, {0, 1}).is_contiguous());
  // Empty tensors are contiguous whatever their strides.
  EXPECT_TRUE(make(DType::kFloat32, {0, 8}, {1, 77}).is_contiguous());
  // Strides that do not match the rank are never contiguous.
  EXPECT_FALSE(make(DType::kFloat32, {4, 8}, {1}).is_contiguous());
}

MOELINK_TEST(check_defined) {
  TensorRef none;
  EXPECT_FALSE(none.defined());
  EXPECT_THROW_KIND(check::defined(none, "topk_weights"), ErrorKind::kValue, "topk_weights: expected a tensor");
  EXPECT_NO_THROW(check::defined(make(DType::kFloat32, {2, 2}), "topk_weights"));
  // An empty tensor on a rank with no tokens is still "given".
  TensorRef empty = make(DType::kFloat32, {0, 8});
  empty.data = nullptr;
  EXPECT_NO_THROW(check::defined(empty, "x"));
}

MOELINK_TEST(check_dtype_names_argument_expected_and_actual) {
  const TensorRef t = make(DType::kFloat32, {4, 2});
  EXPECT_THROW_KIND(check::dtype(t, DType::kInt64, "topk_idx"), ErrorKind::kType,
                    "moelink: topk_idx: expected dtype int64, got float32");
  EXPECT_NO_THROW(check::dtype(t, DType::kFloat32, "topk_weights"));
}

MOELINK_TEST(check_dim_and_shape) {
  const TensorRef t = make(DType::kBFloat16, {4, 7168});
  EXPECT_NO_THROW(check::dim(t, 2, "x"));
  EXPECT_THROW_KIND(check::dim(t, 3, "x"), ErrorKind::kValue, "x: expected 3 dims, got 2");
  EXPECT_NO_THROW((check::shape(t, {4, 7168}, "x")));
  EXPECT_THROW_KIND((check::shape(t, {4, 4096}, "x")), ErrorKind::kValue, "x: expected shape [4, 4096], got [4, 7168]");
  EXPECT_THROW_KIND((check::shape(t, {4}, "bias_0")), ErrorKind::kValue, "bias_0: expected shape [4]");
  // A negative expected extent leaves that dim free.
  EXPECT_NO_THROW((check::shape(t, {-1, 7168}, "x")));
  EXPECT_THROW_KIND((check::shape(t, {-1, 16}, "x")), ErrorKind::kValue, "expected shape [*, 16]");
}

MOELINK_TEST(check_contiguous) {
  EXPECT_NO_THROW(check::contiguous(make(DType::kBFloat16, {4, 8}), "x"));
  EXPECT_THROW_KIND(check::contiguous(make(DType::kBFloat16, {4, 8}, {1, 4}), "recv_x"), ErrorKind::kValue,
                    "recv_x: expected a contiguous tensor, got strides [1, 4] for shape [4, 8]");
}

MOELINK_TEST(check_on_device) {
  EXPECT_NO_THROW(check::on_device(make(DType::kBFloat16, {4, 8}, {}, 3), 3, "x"));
  EXPECT_THROW_KIND(check::on_device(make(DType::kBFloat16, {4, 8}, {}, 1), 0, "x"), ErrorKind::kValue,
                    "x: expected device cuda:0, got cuda:1");
  EXPECT_THROW_KIND(check::on_device(make(DType::kBFloat16, {4, 8}, {}, -1), 0, "topk_idx"), ErrorKind::kValue,
                    "topk_idx: expected device cuda:0, got cpu");
  TensorRef null_data = make(DType::kBFloat16, {4, 8});
  null_data.data = nullptr;
  EXPECT_THROW_KIND(check::on_device(null_data, 0, "x"), ErrorKind::kValue, "x: expected a non-null data pointer");
  // Torch gives empty tensors a null pointer; a rank with no tokens must still pass.
  TensorRef empty = make(DType::kBFloat16, {0, 8});
  empty.data = nullptr;
  EXPECT_NO_THROW(check::on_device(empty, 0, "x"));
  // The device is checked even for empty tensors.
  empty.device = 2;
  EXPECT_THROW_KIND(check::on_device(empty, 0, "x"), ErrorKind::kValue, "got cuda:2");
}
