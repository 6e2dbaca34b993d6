#pragma once
// Python values -> core structs. The Python layer sends torch tensors (read through their
// attributes, see tensor_object_ref) or TRef tuples (data_ptr, dtype, shape, strides, device),
// and stream ordering as an order tuple
// (compute_stream, previous_event, async_finish, allocate_on_comm_stream); see
// docs/internal/BINDING_API.md. These are the only translations the extension does.
#include <nanobind/nanobind.h>

#include <cstdint>
#include <string>
#include <vector>

#include "moelink/buffer.hpp"
#include "moelink/error.hpp"
#include "moelink/event.hpp"
#include "moelink/tensor.hpp"

namespace moelink::bindings {

namespace nb = nanobind;

[[noreturn]] inline void raise_type(const char* arg, const std::string& expected) {
  throw Error(ErrorKind::kType, std::string("moelink: ") + arg + ": expected " + expected);
}

inline void* to_pointer(nb::handle value, const char* arg) {
  if (!nb::isinstance<nb::int_>(value)) raise_type(arg, "an int pointer");
  return reinterpret_cast<void*>(nb::cast<uintptr_t>(value));
}

inline std::vector<int64_t> to_int_vector(nb::handle value, const char* arg, const char* what) {
  if (!nb::isinstance<nb::tuple>(value) && !nb::isinstance<nb::list>(value)) {
    raise_type(arg, std::string("a tuple of ints as ") + what);
  }
  std::vector<int64_t> out;
  for (nb::handle item : value) {
    if (!nb::isinstance<nb::int_>(item)) raise_type(arg, std::string("a tuple of ints as ") + what);
    out.push_back(nb::cast<int64_t>(item));
  }
  return out;
}

// The core's dtype parser does not know which argument it was parsing for.
inline DType dtype_for_arg(const std::string& name, const char* arg) {
  try {
    return dtype_from_name(name);
  } catch (const Error& e) {
    std::string message = e.what();
    const std::string prefix = "moelink: ";
    if (message.rfind(prefix, 0) == 0) message.erase(0, prefix.size());
    throw Error(e.kind(), prefix + arg + ": " + message);
  }
}

// A tuple of Python ints (torch.Size is one) appended to `out`; false if it is not one.
inline bool append_int_tuple(PyObject* tuple, std::vector<int64_t>& out) {
  if (tuple == nullptr || !PyTuple_Check(tuple)) return false;
  const Py_ssize_t n = PyTuple_GET_SIZE(tuple);
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyTuple_GET_ITEM(tuple, i);
    if (!PyLong_Check(item)) return false;
    out.push_back(PyLong_AsLongLong(item));
  }
  return true;
}

// A dtype object's DType, remembered by identity: torch's dtypes are singletons, and parsing
// str(dtype) on every tensor of every call would be most of the conversion's time. The cache
// holds a reference to each object, so an identity it remembers cannot be reused by another.
inline DType dtype_of_object(PyObject* dtype, const char* arg) {
  struct Entry {
    PyObject* object;
    DType dtype;
  };
  static Entry cache[16];
  static int cached = 0;
  for (int i = 0; i < cached; ++i) {
    if (cache[i].object == dtype) return cache[i].dtype;
  }
  nb::str name = nb::steal<nb::str>(PyObject_Str(dtype));
  if (!name.is_valid()) throw nb::python_error();
  const DType parsed = dtype_for_arg(name.c_str(), arg);
  if (cached < 16) {
    Py_INCREF(dtype);
    cache[cached++] = {dtype, parsed};
  }
  return parsed;
}

// A tensor read through the attributes every torch.Tensor has (data_ptr(), dtype, shape, stride(),
// get_device()), with the C API rather than torch's headers: the extension stays free of one
// PyTorch ABI, and passing tensors costs the Python caller nothing (a TRef tuple built in Python
// was ~2 µs per tensor of the host path an operation's kernel waits for).
inline TensorRef tensor_object_ref(nb::handle obj, const char* arg) {
  static PyObject* const kDataPtr = PyUnicode_InternFromString("data_ptr");
  static PyObject* const kDtype = PyUnicode_InternFromString("dtype");
  static PyObject* const kShape = PyUnicode_InternFromString("shape");
  static PyObject* const kStride = PyUnicode_InternFromString("stride");
  static PyObject* const kGetDevice = PyUnicode_InternFromString("get_device");
  PyObject* self = obj.ptr();
  nb::object data = nb::steal(PyObject_CallMethodNoArgs(self, kDataPtr));
  if (!data.is_valid()) {
    PyErr_Clear();
    raise_type(arg, std::string("a torch.Tensor or None, got ") + Py_TYPE(self)->tp_name);
  }
  TensorRef ref;
  ref.data = to_pointer(data, arg);
  nb::object dtype = nb::steal(PyObject_GetAttr(self, kDtype));
  nb::object shape = nb::steal(PyObject_GetAttr(self, kShape));
  nb::object strides = nb::steal(PyObject_CallMethodNoArgs(self, kStride));
  nb::object device = nb::steal(PyObject_CallMethodNoArgs(self, kGetDevice));
  if (!dtype.is_valid() || !shape.is_valid() || !strides.is_valid() || !device.is_valid()) {
    PyErr_Clear();
    raise_type(arg, std::string("a torch.Tensor (dtype, shape, stride(), get_device()), got ") +
                        Py_TYPE(self)->tp_name);
  }
  ref.dtype = dtype_of_object(dtype.ptr(), arg);
  if (!append_int_tuple(shape.ptr(), ref.shape)) raise_type(arg, "a tensor whose shape is a tuple of ints");
  if (!append_int_tuple(strides.ptr(), ref.strides)) raise_type(arg, "a tensor whose stride() is a tuple of ints");
  if (!PyLong_Check(device.ptr())) raise_type(arg, "a tensor whose get_device() is an int");
  ref.device = static_cast<int>(PyLong_AsLong(device.ptr()));
  return ref;
}

// None -> an undefined TensorRef ("not given"); a torch.Tensor, or a TRef tuple.
inline TensorRef to_tensor_ref(nb::handle obj, const char* arg) {
  if (obj.is_none()) return {};
  if (!PyTuple_Check(obj.ptr())) return tensor_object_ref(obj, arg);
  if (nb::len(obj) != 5) {
    raise_type(arg, "a torch.Tensor, a TRef tuple (data_ptr, dtype, shape, strides, device) or None");
  }
  nb::tuple t = nb::borrow<nb::tuple>(obj);
  TensorRef ref;
  ref.data = to_pointer(t[0], arg);
  if (!nb::isinstance<nb::str>(t[1])) raise_type(arg, "a dtype name as the second TRef entry");
  ref.dtype = dtype_for_arg(nb::cast<std::string>(t[1]), arg);
  ref.shape = to_int_vector(t[2], arg, "shape");
  ref.strides = to_int_vector(t[3], arg, "strides");
  if (!nb::isinstance<nb::int_>(t[4])) raise_type(arg, "an int device ordinal as the last TRef entry");
  ref.device = nb::cast<int>(t[4]);
  return ref;
}

// Outputs the extension allocates itself, through torch.empty called from here: the caller's
// Python then builds no shapes and makes no calls between a host wait and the launch behind it.
// The module and its objects are looked up once and kept for the process (never released: the
// interpreter may be finalizing when statics are destroyed).
struct Torch {
  PyObject* empty;
  PyObject* empty_strided;
  PyObject* int32;
  PyObject* int64;
  PyObject* float32;
  PyObject* bfloat16;
  PyObject* float8_e4m3fn;
  PyObject* bool_;
  PyObject* kwnames;  // ("dtype", "device")
  PyTypeObject* tensor;  // torch.Tensor
};

inline const Torch& torch_objects() {
  static const Torch objects = [] {
    nb::module_ torch = nb::module_::import_("torch");
    Torch o{};
    o.empty = nb::object(torch.attr("empty")).release().ptr();
    o.empty_strided = nb::object(torch.attr("empty_strided")).release().ptr();
    o.int32 = nb::object(torch.attr("int32")).release().ptr();
    o.int64 = nb::object(torch.attr("int64")).release().ptr();
    o.float32 = nb::object(torch.attr("float32")).release().ptr();
    o.bfloat16 = nb::object(torch.attr("bfloat16")).release().ptr();
    o.float8_e4m3fn = nb::object(torch.attr("float8_e4m3fn")).release().ptr();
    o.bool_ = nb::object(torch.attr("bool")).release().ptr();
    o.kwnames = nb::make_tuple("dtype", "device").release().ptr();
    o.tensor = reinterpret_cast<PyTypeObject*>(nb::object(torch.attr("Tensor")).release().ptr());
    return o;
  }();
  return objects;
}

// Whether obj is a torch.Tensor (a subclass too), without calling into Python.
inline bool is_tensor(nb::handle obj) { return PyObject_TypeCheck(obj.ptr(), torch_objects().tensor) != 0; }

inline nb::tuple int_tuple(const std::vector<int64_t>& values) {
  nb::tuple tuple = nb::steal<nb::tuple>(PyTuple_New(static_cast<Py_ssize_t>(values.size())));
  for (size_t i = 0; i < values.size(); ++i)
    PyTuple_SET_ITEM(tuple.ptr(), static_cast<Py_ssize_t>(i), PyLong_FromLongLong(values[i]));
  return tuple;
}

// torch.empty(shape, dtype=dtype, device=device) on the current stream, and its TensorRef (the
// shape, dtype and device are known: only the pointer is read back). With `strides`,
// torch.empty_strided: a column-major output in one torch call, not an empty and a .t() (a view
// op whose cold path, run once per call, cost more than the allocation: bench/NOTES.md).
// With `like` (from template_for(): a plain torch.Tensor of `dtype` on `device`; `dtype` may then be
// null), the same tensor as like.new_empty(shape) / new_empty_strided: positional arguments only,
// which torch's argument parser takes faster than torch.empty's keyword dtype and device, on every
// output of every call's host path.
inline nb::object torch_empty(std::vector<int64_t> shape, PyObject* dtype, DType core_dtype, int device,
                              TensorRef* ref, std::vector<int64_t> strides = {}, nb::handle like = nb::handle()) {
  const Torch& torch = torch_objects();
  nb::tuple size = int_tuple(shape);
  nb::object tensor;
  if (like.is_valid()) {
    static PyObject* const kNewEmpty = PyUnicode_InternFromString("new_empty");
    static PyObject* const kNewEmptyStrided = PyUnicode_InternFromString("new_empty_strided");
    if (strides.empty()) {
      PyObject* args[] = {like.ptr(), size.ptr()};
      tensor = nb::steal(PyObject_VectorcallMethod(kNewEmpty, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr));
    } else {
      nb::tuple stride = int_tuple(strides);
      PyObject* args[] = {like.ptr(), size.ptr(), stride.ptr()};
      tensor = nb::steal(
          PyObject_VectorcallMethod(kNewEmptyStrided, args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr));
    }
  } else {
    nb::int_ ordinal(device);
    if (strides.empty()) {
      PyObject* args[] = {size.ptr(), dtype, ordinal.ptr()};
      tensor = nb::steal(PyObject_Vectorcall(torch.empty, args, 1, torch.kwnames));
    } else {
      nb::tuple stride = int_tuple(strides);
      PyObject* args[] = {size.ptr(), stride.ptr(), dtype, ordinal.ptr()};
      tensor = nb::steal(PyObject_Vectorcall(torch.empty_strided, args, 2, torch.kwnames));
    }
  }
  if (!tensor.is_valid()) throw nb::python_error();
  static PyObject* const kDataPtr = PyUnicode_InternFromString("data_ptr");
  nb::object data = nb::steal(PyObject_CallMethodNoArgs(tensor.ptr(), kDataPtr));
  if (!data.is_valid()) throw nb::python_error();
  ref->data = reinterpret_cast<void*>(nb::cast<uintptr_t>(data));
  ref->dtype = core_dtype;
  ref->shape = std::move(shape);
  ref->strides = std::move(strides);  // empty: contiguous
  ref->device = device;
  return tensor;
}

// `tensor` as torch_empty's `like` for an output of `dtype` on `device`, when its reading `ref` says it
// is one (dtype and device; a subclass is not: its new_empty would make the subclass); else none.
inline nb::handle template_for(nb::handle tensor, const TensorRef& ref, DType dtype, int device) {
  if (!ref.defined() || ref.dtype != dtype || ref.device != device || Py_TYPE(tensor.ptr()) != torch_objects().tensor)
    return nb::handle();
  return tensor;
}

inline cudaStream_t to_stream(nb::handle value, const char* arg) {
  return static_cast<cudaStream_t>(to_pointer(value, arg));
}

inline StreamOrder to_stream_order(nb::handle obj) {
  if (!nb::isinstance<nb::tuple>(obj) || nb::len(obj) != 4) {
    raise_type("order", "a tuple (compute_stream, previous_event, async_finish, allocate_on_comm_stream)");
  }
  nb::tuple t = nb::borrow<nb::tuple>(obj);
  StreamOrder order;
  order.compute_stream = to_stream(t[0], "order.compute_stream");
  if (!t[1].is_none()) {
    if (!nb::isinstance<EventHandle>(t[1])) raise_type("order.previous_event", "an EventHandle or None");
    order.previous_event = nb::cast<EventHandle>(t[1]);
  }
  if (!nb::isinstance<nb::bool_>(t[2])) raise_type("order.async_finish", "a bool");
  if (!nb::isinstance<nb::bool_>(t[3])) raise_type("order.allocate_on_comm_stream", "a bool");
  order.async_finish = nb::cast<bool>(t[2]);
  order.allocate_on_comm_stream = nb::cast<bool>(t[3]);
  return order;
}

inline std::vector<uint8_t> to_byte_vector(nb::handle value, const char* arg) {
  if (!nb::isinstance<nb::bytes>(value)) raise_type(arg, "bytes");
  nb::bytes b = nb::borrow<nb::bytes>(value);
  const auto* data = static_cast<const uint8_t*>(b.data());
  return std::vector<uint8_t>(data, data + b.size());
}

inline nb::bytes to_bytes(const std::vector<uint8_t>& value) {
  return nb::bytes(reinterpret_cast<const char*>(value.data()), value.size());
}

}  // namespace moelink::bindings
