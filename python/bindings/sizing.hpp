// An uncached dispatch's small row outputs (scales, top-k ids and weights, source indices),
// allocated before its host wait at a size guessed from the last such dispatch's count, and shrunk
// to the real count after the wait.
//
// Why: on the default path the host wait for the counts is followed by the outputs' allocations
// and the launch, and the GPU idles through all of it. A torch.empty costs ~3.3 us there on the GPU
// machine's CPU, a `resize_` that shrinks (in place, the storage kept) ~1.0 us: the wait is then
// followed by one allocation (recv_x) and four resizes instead of five allocations. The four are
// made while the notify runs and the host would only wait (bench/NOTES.md, eighth session).
//
// Made in the call, not after the previous call's launch: spares made there are allocated while
// that call's outputs are still alive, so consecutive dispatches' outputs alternate between two
// sets of blocks and their segments are named half as often, which kept peers from mapping them
// (tests/gpu/test_intranode.py::test_peer_segments at 8 ranks). Allocated here they reuse the blocks the previous outputs freed,
// as exact allocations after the wait did.
//
// The guess is the last count for the same shapes and layout plus 1/16 and 128 rows, rounded up
// to 256 rows (so the sizes asked for repeat from call to call); a count past it allocates afresh
// after the wait, as without a guess. What a dispatch's small outputs hold beyond their rows is
// that slack, under 0.3% of its output bytes for fp8 at H 7168. The memo (a one-entry list on the
// Python Buffer) holds no tensor.
#pragma once

#include <nanobind/nanobind.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "convert.hpp"
#include "moelink/tensor.hpp"

namespace moelink::bindings {

namespace nb = nanobind;

// What a count was seen for; compared bytewise (zeroed before it is filled).
struct SizingKey {
  int32_t device, num_ranks;
  int32_t num_scales, scales_dtype, scales_col_major;  // num_scales 0: no scales
  int32_t num_topk, weights;                            // num_topk 0: no top-k
};

struct SizingMemo {
  SizingKey key;
  int64_t rows;  // the last count
};

// The rows to allocate before the wait, or -1 when `memo` (a list) holds no count for `key`.
inline int64_t guessed_rows(nb::handle memo, const SizingKey& key) {
  if (!memo.is_valid() || !PyList_Check(memo.ptr()) || PyList_GET_SIZE(memo.ptr()) != 1) return -1;
  PyObject* item = PyList_GET_ITEM(memo.ptr(), 0);
  if (!PyBytes_Check(item) || PyBytes_GET_SIZE(item) != static_cast<Py_ssize_t>(sizeof(SizingMemo))) return -1;
  SizingMemo m;
  std::memcpy(&m, PyBytes_AS_STRING(item), sizeof m);
  if (std::memcmp(&m.key, &key, sizeof key) != 0) return -1;
  const int64_t rows = m.rows + m.rows / 16 + 128;
  return (rows + 255) / 256 * 256;
}

inline void remember_rows(nb::handle memo, const SizingKey& key, int64_t rows) {
  if (!memo.is_valid() || !PyList_Check(memo.ptr())) return;
  SizingMemo m;
  std::memset(&m, 0, sizeof m);
  m.key = key;
  m.rows = rows;
  nb::object bytes = nb::steal(PyBytes_FromStringAndSize(reinterpret_cast<const char*>(&m), sizeof m));
  if (!bytes.is_valid()) throw nb::python_error();
  const Py_ssize_t size = PyList_GET_SIZE(memo.ptr());
  if (PyList_SetSlice(memo.ptr(), 0, size, nullptr) != 0 || PyList_Append(memo.ptr(), bytes.ptr()) != 0)
    throw nb::python_error();
}

// A row output allocated with `capacity` rows before the wait; `take` gives it back shaped for the
// count, shrunk in place when it fits, else allocated afresh (the guess is dropped).
class GuessedRows {
 public:
  GuessedRows() = default;

  // shape: the output's shape with `rows_dim` the row count (0, or 1 for the [num_scales, rows]
  // storage of column-major scales).
  GuessedRows(int64_t capacity, std::vector<int64_t> shape, int rows_dim, PyObject* dtype, DType core, int device)
      : capacity_(capacity), shape_(std::move(shape)), rows_dim_(rows_dim), dtype_(dtype), core_(core), device_(device) {
    if (capacity_ < 0) return;
    std::vector<int64_t> full = shape_;
    full[rows_dim_] = capacity_;
    try {
      tensor_ = torch_empty(std::move(full), dtype_, core_, device_, &ref_);
    } catch (nb::python_error&) {
      // Out of memory for the guess: the exact size is tried after the wait, whose failure is the
      // one to report. Raising here, with the notify in flight, would leave the peers waiting.
      tensor_.reset();
    }
  }

  nb::object take(int64_t rows, TensorRef* ref) {
    std::vector<int64_t> shape = shape_;
    shape[rows_dim_] = rows;
    if (!tensor_.is_valid() || rows > capacity_) {
      tensor_.reset();
      return torch_empty(std::move(shape), dtype_, core_, device_, ref);
    }
    static PyObject* const kResize = PyUnicode_InternFromString("resize_");
    nb::tuple size = nb::steal<nb::tuple>(PyTuple_New(static_cast<Py_ssize_t>(shape.size())));
    for (size_t i = 0; i < shape.size(); ++i)
      PyTuple_SET_ITEM(size.ptr(), static_cast<Py_ssize_t>(i), PyLong_FromLongLong(shape[i]));
    nb::object resized = nb::steal(PyObject_CallMethodOneArg(tensor_.ptr(), kResize, size.ptr()));
    if (!resized.is_valid()) throw nb::python_error();
    *ref = ref_;
    ref->shape = std::move(shape);
    ref->strides.clear();  // contiguous again after the resize
    return std::move(tensor_);
  }

 private:
  int64_t capacity_ = -1;
  std::vector<int64_t> shape_;
  int rows_dim_ = 0;
  PyObject* dtype_ = nullptr;
  DType core_ = DType::kUInt8;
  int device_ = -1;
  TensorRef ref_;
  nb::object tensor_;
};

}  // namespace moelink::bindings
