// An uncached dispatch's spares: the handle's four tensors and the four small row outputs (scales,
// top-k ids and weights, source indices) of the next uncached dispatch, allocated right after this
// one's launch, while the GPU runs it.
//
// Why: on the default path the host wait for the counts is followed by the outputs' allocations
// and the launch, and the GPU idles through all of it. Five torch.empty there cost ~6 us each on
// the GPU machine's CPU; with spares the wait is followed by one allocation (recv_x) and four
// in-place shrinks (`resize_` to the count, which keeps the storage), and the notify by no
// allocation at all (bench/NOTES.md, eighth session).
//
// The row spares hold the last count plus 1/16 and 128 rows: a count past that, another stream
// (the caching allocator ties a block to the stream it was allocated on), or another shape or
// layout allocates afresh, as without spares, and the stale spares go back to the allocator
// unused. What a dispatch's outputs hold beyond their rows is that slack of its small outputs,
// under 0.3% of its output bytes for fp8 at H 7168. The list lives on the Python Buffer, so its
// tensors go with the Buffer (destroy() clears it).
#pragma once

#include <nanobind/nanobind.h>

#include <cstdint>
#include <cstring>

#include "convert.hpp"
#include "moelink/tensor.hpp"

namespace moelink::bindings {

namespace nb = nanobind;

enum SpareSlot { kSpareRankPrefix, kSpareChannelPrefix, kSpareRecvChannelPrefix, kSpareInfo,
                 kSpareScales, kSpareTopkIdx, kSpareTopkWeights, kSpareSrcIdx, kNumSpares };

// What a set of spares was made for; compared bytewise (it is zeroed before it is filled).
struct SpareKey {
  uintptr_t stream;
  int32_t device, num_ranks, num_channels;
  int32_t num_scales, scales_dtype, scales_col_major;  // num_scales 0: no scales
  int32_t num_topk, weights;                            // num_topk 0: no top-k
};

struct SpareState {
  SpareKey key;
  int64_t rows;                // the row outputs' capacity
  void* data[kNumSpares];      // the tensors' data pointers (nullptr where absent)
};

class Spares {
 public:
  // Takes the spares out of `list` (which is left empty) when they were made for `key`.
  Spares(nb::handle list, const SpareKey& key) {
    if (!list.is_valid() || !PyList_Check(list.ptr())) return;
    const Py_ssize_t size = PyList_GET_SIZE(list.ptr());
    if (size == kNumSpares + 1) {
      PyObject* state = PyList_GET_ITEM(list.ptr(), 0);
      if (PyBytes_Check(state) && PyBytes_GET_SIZE(state) == static_cast<Py_ssize_t>(sizeof(SpareState))) {
        std::memcpy(&state_, PyBytes_AS_STRING(state), sizeof(SpareState));
        if (std::memcmp(&state_.key, &key, sizeof(SpareKey)) == 0) {
          for (int i = 0; i < kNumSpares; ++i) objects_[i] = nb::borrow(PyList_GET_ITEM(list.ptr(), i + 1));
          valid_ = true;
        }
      }
    }
    if (size > 0 && PyList_SetSlice(list.ptr(), 0, size, nullptr) != 0) throw nb::python_error();
  }

  bool valid() const { return valid_; }
  bool fits(int64_t rows) const { return valid_ && rows <= state_.rows; }

  // A handle tensor of the known shape.
  nb::object take(SpareSlot slot, std::vector<int64_t> shape, DType dtype, int device, TensorRef* ref) {
    ref->data = state_.data[slot];
    ref->dtype = dtype;
    ref->shape = std::move(shape);
    ref->strides.clear();
    ref->device = device;
    return std::move(objects_[slot]);
  }

  // A row output shrunk in place to `shape` (rows first; for column-major scales the storage's
  // [num_scales, rows], which the caller transposes).
  nb::object take_resized(SpareSlot slot, std::vector<int64_t> shape, DType dtype, int device, TensorRef* ref) {
    static PyObject* const kResize = PyUnicode_InternFromString("resize_");
    nb::object tensor = take(slot, shape, dtype, device, ref);
    nb::tuple size = nb::steal<nb::tuple>(PyTuple_New(static_cast<Py_ssize_t>(shape.size())));
    for (size_t i = 0; i < shape.size(); ++i)
      PyTuple_SET_ITEM(size.ptr(), static_cast<Py_ssize_t>(i), PyLong_FromLongLong(shape[i]));
    nb::object resized = nb::steal(PyObject_CallMethodOneArg(tensor.ptr(), kResize, size.ptr()));
    if (!resized.is_valid()) throw nb::python_error();
    return tensor;
  }

 private:
  bool valid_ = false;
  SpareState state_{};
  nb::object objects_[kNumSpares];
};

// Fills `list` with spares for the next dispatch of `key` with row outputs of `rows` rows. They are
// an optimisation made after a launch: a failure (out of memory) leaves the list empty, never raises.
inline void make_spares(nb::handle list, const SpareKey& key, int64_t rows, PyObject* scales_dtype) {
  if (!list.is_valid() || !PyList_Check(list.ptr())) return;
  try {
    const Torch& torch = torch_objects();
    SpareState state{};
    state.key = key;
    state.rows = rows;
    nb::object objects[kNumSpares];
    TensorRef ref;
    const int device = key.device;
    const auto make = [&](SpareSlot slot, std::vector<int64_t> shape, PyObject* dtype, DType core) {
      objects[slot] = torch_empty(std::move(shape), dtype, core, device, &ref);
      state.data[slot] = ref.data;
    };
    const int64_t R = key.num_ranks, C = key.num_channels;
    make(kSpareRankPrefix, {R, R}, torch.int32, DType::kInt32);
    make(kSpareChannelPrefix, {R, C}, torch.int32, DType::kInt32);
    make(kSpareRecvChannelPrefix, {R, C}, torch.int32, DType::kInt32);
    make(kSpareInfo, {2}, torch.int64, DType::kInt64);
    if (key.num_scales > 0) {
      const auto core = static_cast<DType>(key.scales_dtype);
      if (key.scales_col_major)
        make(kSpareScales, {key.num_scales, rows}, scales_dtype, core);
      else
        make(kSpareScales, {rows, key.num_scales}, scales_dtype, core);
    }
    if (key.num_topk > 0) {
      make(kSpareTopkIdx, {rows, key.num_topk}, torch.int64, DType::kInt64);
      if (key.weights) make(kSpareTopkWeights, {rows, key.num_topk}, torch.float32, DType::kFloat32);
    }
    make(kSpareSrcIdx, {rows}, torch.int32, DType::kInt32);
    nb::object bytes = nb::steal(PyBytes_FromStringAndSize(reinterpret_cast<const char*>(&state), sizeof(state)));
    if (!bytes.is_valid()) throw nb::python_error();
    if (PyList_Append(list.ptr(), bytes.ptr()) != 0) throw nb::python_error();
    for (int i = 0; i < kNumSpares; ++i) {
      PyObject* item = objects[i].is_valid() ? objects[i].ptr() : Py_None;
      if (PyList_Append(list.ptr(), item) != 0) throw nb::python_error();
    }
  } catch (nb::python_error&) {
    // The error is dropped with the exception; the spares made so far go back with `objects`.
    PyList_SetSlice(list.ptr(), 0, PyList_GET_SIZE(list.ptr()), nullptr);
  }
}

}  // namespace moelink::bindings
