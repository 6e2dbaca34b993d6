#pragma once
// Python values -> core structs. The Python layer sends torch tensors (read through their
// attributes, see tensor_object_ref) or TRef tuples (data_ptr, dtype, shape, strides, device),
// and stream ordering as an order tuple
// (compute_stream, previous_event, async_finish, allocate_on_comm_stream); see
// docs/internal/BINDING_API.md. These are the only translations the extension does.
#include <dlfcn.h>
#include <nanobind/nanobind.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>
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
  PyObject* uint8;
  PyObject* float16;
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
    o.uint8 = nb::object(torch.attr("uint8")).release().ptr();
    o.float16 = nb::object(torch.attr("float16")).release().ptr();
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
    nb::object ordinal = device < 0 ? nb::object(nb::str("cpu")) : nb::object(nb::int_(device));
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

// torch's dtype object for a core DType.
inline PyObject* torch_dtype(DType dtype) {
  const Torch& t = torch_objects();
  switch (dtype) {
    case DType::kBool: return t.bool_;
    case DType::kUInt8: return t.uint8;
    case DType::kInt32: return t.int32;
    case DType::kInt64: return t.int64;
    case DType::kFloat32: return t.float32;
    case DType::kBFloat16: return t.bfloat16;
    case DType::kFloat8E4M3: return t.float8_e4m3fn;
    case DType::kFloat16: return t.float16;
  }
  throw Error(ErrorKind::kType, "moelink: an output of unknown dtype");
}

// torch's C shim (torch/csrc/inductor/aoti_torch/c/shim.h: AOTInductor's stable C ABI, exported by
// the libtorch every torch >= 2.3 loads): an output allocated through it is one C++ call into torch's
// allocator (~2 µs) instead of a Python call (~10-15 µs under MPS, bench/probe_calls.py), and the
// outputs of a call become Python tensors in one Python call, made after the launch. Found in the
// torch the process has loaded (dlopen of torch._C with RTLD_NOLOAD: never a second copy), so the
// extension is still built without torch's headers and loads with any torch.
struct TorchShim {
  using Status = int32_t;  // AOTITorchError: 0 is success
  using Handle = void*;    // AtenTensorHandle: an owned at::Tensor
  Status (*empty_strided)(int64_t ndim, const int64_t* sizes, const int64_t* strides, int32_t dtype,
                          int32_t device_type, int32_t device_index, Handle* out);
  Status (*get_data_ptr)(Handle tensor, void** data);
  Status (*delete_tensor)(Handle tensor);
  int32_t dtype[8];  // by DType
  int32_t cuda, cpu;
  PyObject* wrap;  // torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs: handles in, tensors out
  // Reading arguments (to_tensor_refs): a new handle per tensor, then its fields through C calls.
  // Null where this torch lacks them or they failed the check.
  PyObject* handles_of;  // torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors: tensors in, handles out
  Status (*get_dtype)(Handle tensor, int32_t* dtype);
  Status (*get_dim)(Handle tensor, int64_t* dim);
  Status (*get_sizes)(Handle tensor, int64_t** sizes);
  Status (*get_strides)(Handle tensor, int64_t** strides);
  Status (*get_device_type)(Handle tensor, int32_t* type);
  Status (*get_device_index)(Handle tensor, int32_t* index);
  // Views (Outputs::add_packed): several small outputs carved from one allocation. Null where this
  // torch lacks them or they failed the check; each output is then an allocation of its own.
  Status (*view_dtype)(Handle tensor, int32_t dtype, Handle* out);
  Status (*reinterpret)(Handle tensor, int64_t ndim, const int64_t* sizes, const int64_t* strides,
                        int64_t storage_offset, Handle* out);
};

// A tensor's reading through the shim (data pointer, dtype, shape, strides, device as get_device()
// gives it: -1 off CUDA); false where a call fails or the dtype is none of the core's.
inline bool read_handle(const TorchShim& s, TorchShim::Handle h, TensorRef* ref) {
  void* data = nullptr;
  int32_t dtype = 0, device_type = 0, device_index = 0;
  int64_t dim = 0;
  int64_t *sizes = nullptr, *strides = nullptr;
  if (s.get_data_ptr(h, &data) != 0 || s.get_dtype(h, &dtype) != 0 || s.get_dim(h, &dim) != 0 ||
      s.get_sizes(h, &sizes) != 0 || s.get_strides(h, &strides) != 0 || s.get_device_type(h, &device_type) != 0 ||
      s.get_device_index(h, &device_index) != 0)
    return false;
  int found = -1;
  for (int i = 0; i < 8; ++i)
    if (s.dtype[i] == dtype) found = i;
  if (found < 0) return false;
  ref->data = data;
  ref->dtype = static_cast<DType>(found);
  ref->shape.assign(sizes, sizes + dim);
  ref->strides.assign(strides, strides + dim);
  ref->device = device_type == s.cuda ? device_index : -1;
  return true;
}

namespace detail {
// Whether the shim is used (MOELINK_TORCH_SHIM, python/moelink/_knobs.py; Buffer._torch_shim).
inline bool& torch_shim_wanted() {
  static bool wanted = true;
  return wanted;
}

struct MissingEntry {};

// The shim's reading entries, checked on a strided CPU tensor read back field by field; left null
// (arguments then read through their Python attributes) where any is missing or reads wrong.
inline void load_reading(void* lib, TorchShim& s) {
  nb::object handles_of = nb::getattr(nb::module_::import_("torch._C._aoti"), "unsafe_alloc_void_ptrs_from_tensors",
                                      nb::none());
  if (handles_of.is_none()) return;
  TorchShim r = s;
  const auto entry = [&](auto& f, const char* name) {
    f = reinterpret_cast<std::remove_reference_t<decltype(f)>>(dlsym(lib, name));
    return f != nullptr;
  };
  if (!entry(r.get_dtype, "aoti_torch_get_dtype") || !entry(r.get_dim, "aoti_torch_get_dim") ||
      !entry(r.get_sizes, "aoti_torch_get_sizes") || !entry(r.get_strides, "aoti_torch_get_strides") ||
      !entry(r.get_device_type, "aoti_torch_get_device_type") ||
      !entry(r.get_device_index, "aoti_torch_get_device_index"))
    return;
  nb::object t = nb::module_::import_("torch").attr("empty")(nb::make_tuple(5, 3)).attr("t")();
  nb::list tensors;
  tensors.append(t);
  nb::object handles = nb::steal(PyObject_CallOneArg(handles_of.ptr(), tensors.ptr()));
  if (!handles.is_valid() || !PyList_Check(handles.ptr()) || PyList_GET_SIZE(handles.ptr()) != 1) {
    PyErr_Clear();
    return;
  }
  PyObject* capsule = PyList_GET_ITEM(handles.ptr(), 0);
  auto* h = static_cast<TorchShim::Handle>(PyCapsule_GetPointer(capsule, PyCapsule_GetName(capsule)));
  if (h == nullptr) {
    PyErr_Clear();
    return;
  }
  TensorRef ref;
  const bool read = read_handle(r, h, &ref);
  r.delete_tensor(h);
  if (!read || ref.dtype != DType::kFloat32 || ref.shape != std::vector<int64_t>{3, 5} ||
      ref.strides != std::vector<int64_t>{1, 3} || ref.device != -1 ||
      reinterpret_cast<uintptr_t>(ref.data) != nb::cast<uintptr_t>(t.attr("data_ptr")()))
    return;
  r.handles_of = handles_of.release().ptr();
  s = r;
}

// The shim's view entries, checked on a CPU block carved into an int64 view at an offset, wrapped
// and read back through Python; left null (no packing) where either is missing or reads wrong.
inline void load_views(void* lib, TorchShim& s, nb::handle wrap) {
  TorchShim r = s;
  r.view_dtype = reinterpret_cast<decltype(r.view_dtype)>(dlsym(lib, "aoti_torch_view_dtype"));
  r.reinterpret = reinterpret_cast<decltype(r.reinterpret)>(dlsym(lib, "aoti_torch__reinterpret_tensor"));
  if (r.view_dtype == nullptr || r.reinterpret == nullptr) return;
  const int64_t block_size = 64, block_stride = 1, sizes[2] = {2, 3}, strides[2] = {1, 2};
  TorchShim::Handle block = nullptr, wide = nullptr, view = nullptr;
  void *base = nullptr, *data = nullptr;
  if (r.empty_strided(1, &block_size, &block_stride, r.dtype[static_cast<int>(DType::kUInt8)], r.cpu, 0, &block) != 0)
    return;
  const bool made = r.get_data_ptr(block, &base) == 0 &&
                    r.view_dtype(block, r.dtype[static_cast<int>(DType::kInt64)], &wide) == 0 &&
                    r.reinterpret(wide, 2, sizes, strides, 1, &view) == 0 && r.get_data_ptr(view, &data) == 0;
  if (wide != nullptr) r.delete_tensor(wide);
  r.delete_tensor(block);
  if (!made) {
    if (view != nullptr) r.delete_tensor(view);
    return;
  }
  nb::list handles;
  handles.append(nb::steal(PyCapsule_New(view, nullptr, nullptr)));
  nb::object t = nb::steal(PyObject_CallOneArg(wrap.ptr(), handles.ptr()));  // owns view from here
  if (!t.is_valid()) {
    PyErr_Clear();
    return;
  }
  t = t[0];
  if (t.attr("dtype").ptr() != torch_dtype(DType::kInt64) ||
      !nb::cast<bool>(t.attr("shape").equal(nb::make_tuple(2, 3))) ||
      !nb::cast<bool>(t.attr("stride")().equal(nb::make_tuple(1, 2))) ||
      nb::cast<uintptr_t>(t.attr("data_ptr")()) != reinterpret_cast<uintptr_t>(base) + 8 ||
      reinterpret_cast<uintptr_t>(data) != reinterpret_cast<uintptr_t>(base) + 8)
    return;
  s.view_dtype = r.view_dtype;
  s.reinterpret = r.reinterpret;
}

// The shim's entries, and a check that they make what this extension expects: one CPU tensor of
// every dtype, strided, wrapped and read back through Python. A torch whose shim differs (an entry
// missing, a dtype code or the stealing call changed) is then used through Python only.
inline const TorchShim* load_torch_shim() {
  try {
    nb::module_ torch_c = nb::module_::import_("torch._C");
    nb::object wrap = nb::module_::import_("torch._C._aoti").attr("alloc_tensors_by_stealing_from_void_ptrs");
    const std::string path = nb::cast<std::string>(torch_c.attr("__file__"));
    void* lib = dlopen(path.c_str(), RTLD_LAZY | RTLD_NOLOAD);
    if (lib == nullptr) return nullptr;
    TorchShim s{};
    const auto entry = [&](const char* name) {
      void* f = dlsym(lib, name);
      if (f == nullptr) throw MissingEntry{};
      return f;
    };
    const auto code = [&](const char* name) { return reinterpret_cast<int32_t (*)()>(entry(name))(); };
    s.empty_strided = reinterpret_cast<decltype(s.empty_strided)>(entry("aoti_torch_empty_strided"));
    s.get_data_ptr = reinterpret_cast<decltype(s.get_data_ptr)>(entry("aoti_torch_get_data_ptr"));
    s.delete_tensor = reinterpret_cast<decltype(s.delete_tensor)>(entry("aoti_torch_delete_tensor_object"));
    s.cuda = code("aoti_torch_device_type_cuda");
    s.cpu = code("aoti_torch_device_type_cpu");
    const char* names[8] = {"aoti_torch_dtype_bool",    "aoti_torch_dtype_uint8",     "aoti_torch_dtype_int32",
                            "aoti_torch_dtype_int64",   "aoti_torch_dtype_float32",   "aoti_torch_dtype_bfloat16",
                            "aoti_torch_dtype_float8_e4m3fn", "aoti_torch_dtype_float16"};
    for (int i = 0; i < 8; ++i) s.dtype[i] = code(names[i]);
    const int64_t sizes[2] = {2, 3}, strides[2] = {1, 2};
    for (int i = 0; i < 8; ++i) {
      TorchShim::Handle h = nullptr;
      void* data = nullptr;
      if (s.empty_strided(2, sizes, strides, s.dtype[i], s.cpu, 0, &h) != 0 || h == nullptr) return nullptr;
      if (s.get_data_ptr(h, &data) != 0) {
        s.delete_tensor(h);
        return nullptr;
      }
      nb::list handles;
      handles.append(nb::steal(PyCapsule_New(h, nullptr, nullptr)));
      nb::object tensors = wrap(handles);  // owns h from here
      nb::object t = tensors[0];
      if (t.attr("dtype").ptr() != torch_dtype(static_cast<DType>(i)) ||
          !nb::cast<bool>(t.attr("shape").equal(nb::make_tuple(2, 3))) ||
          !nb::cast<bool>(t.attr("stride")().equal(nb::make_tuple(1, 2))) ||
          nb::cast<uintptr_t>(t.attr("data_ptr")()) != reinterpret_cast<uintptr_t>(data))
        return nullptr;
    }
    load_views(lib, s, wrap);
    s.wrap = wrap.release().ptr();
    load_reading(lib, s);
    return new TorchShim(s);  // for the process, as torch_objects()
  } catch (const nb::python_error&) {
    return nullptr;  // no torch._C._aoti, or the check's Python failed
  } catch (const MissingEntry&) {
    return nullptr;
  }
}
}  // namespace detail

// Whether Outputs::add_packed packs (Buffer._pack_outputs: for side-by-side timing).
inline bool& packing_wanted() {
  static bool wanted = true;
  return wanted;
}

// Whether Outputs::add_packed can pack through `shim` (it has views) and is wanted to.
inline bool packs_with(const TorchShim* shim) {
  return shim != nullptr && shim->view_dtype != nullptr && shim->reinterpret != nullptr && packing_wanted();
}

// The shim where it loaded and is wanted, else null (outputs are then made through Python).
inline const TorchShim* torch_shim() {
  static const TorchShim* const shim = detail::load_torch_shim();
  return detail::torch_shim_wanted() ? shim : nullptr;
}

// One argument of an extension call: its object (a tensor, None, or a TRef tuple), its name for
// errors, and where its reading goes.
struct TensorArg {
  nb::handle object;
  const char* arg;
  TensorRef* ref;
};

// to_tensor_ref of each argument, with the plain torch.Tensor ones (not subclasses: their storage
// may not be what their Python attributes say) read through the shim: one Python call for all of
// them instead of five per tensor (data_ptr(), dtype, shape, stride(), get_device()), on the host
// path in front of every launch. The rest, and all of them without the shim, as to_tensor_ref.
inline void to_tensor_refs(std::initializer_list<TensorArg> args) {
  const TorchShim* shim = torch_shim();
  bool read[16] = {};
  if (shim != nullptr && shim->handles_of != nullptr && args.size() <= 16) {
    PyTypeObject* const tensor_type = torch_objects().tensor;  // torch is imported: the shim came from it
    nb::list tensors;
    for (const TensorArg& a : args)
      if (Py_TYPE(a.object.ptr()) == tensor_type) tensors.append(a.object);
    nb::object handles =
        nb::len(tensors) == 0 ? nb::list() : nb::steal(PyObject_CallOneArg(shim->handles_of, tensors.ptr()));
    if (!handles.is_valid()) throw nb::python_error();
    // Every handle is a new reference to its tensor, deleted here whatever happens.
    size_t next = 0, i = 0;
    const Py_ssize_t count = PyList_Check(handles.ptr()) ? PyList_GET_SIZE(handles.ptr()) : 0;
    for (const TensorArg& a : args) {
      if (Py_TYPE(a.object.ptr()) == tensor_type && static_cast<Py_ssize_t>(next) < count) {
        PyObject* capsule = PyList_GET_ITEM(handles.ptr(), next++);
        auto* h = static_cast<TorchShim::Handle>(PyCapsule_GetPointer(capsule, PyCapsule_GetName(capsule)));
        if (h == nullptr) throw nb::python_error();
        read[i] = read_handle(*shim, h, a.ref);
        shim->delete_tensor(h);
      }
      ++i;
    }
  }
  size_t i = 0;
  for (const TensorArg& a : args) {
    if (!read[i]) *a.ref = to_tensor_ref(a.object, a.arg);
    ++i;
  }
}

// The outputs of one extension call, made as torch tensors on the current stream. Through the shim
// each add() is a C++ allocation and finish() makes every one a Python tensor in one call, after the
// launch that the adds were in front of; without it each add() is torch_empty (Python, `like` as
// there). An add the shim refuses (out of memory) is made by torch_empty, whose error is torch's.
class Outputs {
 public:
  static constexpr int kNone = -1;

  Outputs() : shim_(torch_shim()) {}
  Outputs(const Outputs&) = delete;
  Outputs& operator=(const Outputs&) = delete;
  ~Outputs() {
    for (TorchShim::Handle h : handles_)
      if (h != nullptr) shim_->delete_tensor(h);
  }

  // A tensor of `shape` (`strides`; empty: contiguous) and `dtype` on CUDA device `device` (the CPU
  // for -1: tests); fills `ref`. Returns its slot for get().
  int add(std::vector<int64_t> shape, DType dtype, int device, TensorRef* ref, std::vector<int64_t> strides = {},
          nb::handle like = nb::handle()) {
    const int slot = static_cast<int>(objects_.size());
    handles_.push_back(nullptr);
    objects_.emplace_back();
    if (shim_ != nullptr) {
      std::vector<int64_t> dense = strides;
      if (dense.empty()) {
        dense.assign(shape.size(), 1);
        for (size_t i = shape.size(); i-- > 1;) dense[i - 1] = dense[i] * std::max<int64_t>(shape[i], 1);
      }
      TorchShim::Handle h = nullptr;
      void* data = nullptr;
      if (shim_->empty_strided(static_cast<int64_t>(shape.size()), shape.data(), dense.data(),
                               shim_->dtype[static_cast<int>(dtype)], device < 0 ? shim_->cpu : shim_->cuda,
                               std::max(device, 0), &h) == 0) {
        if (shim_->get_data_ptr(h, &data) == 0) {
          handles_[slot] = h;
          ref->data = data;
          ref->dtype = dtype;
          ref->shape = std::move(shape);
          ref->strides = std::move(strides);
          ref->device = device;
          return slot;
        }
        shim_->delete_tensor(h);
      }
    }
    objects_[slot] = torch_empty(std::move(shape), like.is_valid() ? nullptr : torch_dtype(dtype), dtype, device, ref,
                                 std::move(strides), like);
    return slot;
  }

  // One output of add_packed, or of add(device, part).
  struct Part {
    std::vector<int64_t> shape;
    DType dtype;
    TensorRef* ref;
    std::vector<int64_t> strides = {};  // empty: contiguous
    nb::handle like = nb::handle();
  };

  int add(int device, Part p) {
    return add(std::move(p.shape), p.dtype, device, p.ref, std::move(p.strides), p.like);
  }

  // Small outputs of one call in one allocation, each a view at its own 256-byte aligned offset:
  // through the shim an allocation is ~5 µs on the host path in front of a launch (bench/NOTES.md,
  // eleventh session) and a view well under one. Only for outputs that live about as long as each
  // other (a view keeps the whole block): never a call's recv_x. Without the shim's views each
  // part is add()'s. Returns the parts' slots, in order.
  std::vector<int> add_packed(int device, std::vector<Part> parts) {
    std::vector<int> slots;
    if (parts.size() > 1 && packs_with(shim_)) {
      std::vector<int64_t> offsets;
      std::vector<std::vector<int64_t>> strides;
      int64_t total = 0;
      for (const Part& p : parts) {
        std::vector<int64_t> st = p.strides;
        if (st.empty()) {
          st.assign(p.shape.size(), 1);
          for (size_t i = p.shape.size(); i-- > 1;) st[i - 1] = st[i] * std::max<int64_t>(p.shape[i], 1);
        }
        int64_t extent = 1;  // elements from the first to one past the last
        for (size_t i = 0; i < p.shape.size(); ++i) {
          if (p.shape[i] == 0) extent = 0;
          if (extent > 0) extent += (p.shape[i] - 1) * st[i];
        }
        strides.push_back(std::move(st));
        offsets.push_back(total);
        total += (extent * dtype_size(p.dtype) + 255) / 256 * 256;
      }
      total = std::max<int64_t>(total, 256);
      if (carve(device, total, parts, strides, offsets, slots)) return slots;
    }
    for (Part& p : parts) slots.push_back(add(device, std::move(p)));
    return slots;
  }

  // Every added tensor as a Python object (one call into torch for those the shim made).
  void finish() {
    nb::list handles;
    for (TorchShim::Handle h : handles_)
      if (h != nullptr) handles.append(nb::steal(PyCapsule_New(h, nullptr, nullptr)));
    if (nb::len(handles) == 0) return;
    nb::object tensors = nb::steal(PyObject_CallOneArg(shim_->wrap, handles.ptr()));
    if (!tensors.is_valid()) throw nb::python_error();
    size_t next = 0;
    for (size_t i = 0; i < handles_.size(); ++i) {
      if (handles_[i] == nullptr) continue;
      objects_[i] = tensors[next++];
      handles_[i] = nullptr;  // the tensor owns it now
    }
  }

  // After finish(): the tensor of `slot`, or None for kNone.
  nb::object get(int slot) const { return slot == kNone ? nb::none() : objects_[static_cast<size_t>(slot)]; }

 private:
  // add_packed's block of `total` bytes and its views; false (nothing kept, `slots` untouched)
  // where any shim call fails, and the caller allocates each part instead.
  bool carve(int device, int64_t total, const std::vector<Part>& parts,
             const std::vector<std::vector<int64_t>>& strides, const std::vector<int64_t>& offsets,
             std::vector<int>& slots) {
    const int64_t stride = 1;
    TorchShim::Handle block = nullptr;
    void* base = nullptr;
    if (shim_->empty_strided(1, &total, &stride, shim_->dtype[static_cast<int>(DType::kUInt8)],
                             device < 0 ? shim_->cpu : shim_->cuda, std::max(device, 0), &block) != 0)
      return false;
    std::vector<TorchShim::Handle> views;
    bool ok = shim_->get_data_ptr(block, &base) == 0;
    for (size_t i = 0; ok && i < parts.size(); ++i) {
      const Part& p = parts[i];
      const int64_t size = dtype_size(p.dtype);
      TorchShim::Handle typed = nullptr, view = nullptr;
      ok = shim_->view_dtype(block, shim_->dtype[static_cast<int>(p.dtype)], &typed) == 0 &&
           shim_->reinterpret(typed, static_cast<int64_t>(p.shape.size()), p.shape.data(), strides[i].data(),
                              offsets[i] / size, &view) == 0;
      if (typed != nullptr) shim_->delete_tensor(typed);
      if (view != nullptr) views.push_back(view);
    }
    shim_->delete_tensor(block);  // the views hold its storage
    if (!ok) {
      for (TorchShim::Handle v : views) shim_->delete_tensor(v);
      return false;
    }
    for (size_t i = 0; i < parts.size(); ++i) {
      const Part& p = parts[i];
      slots.push_back(static_cast<int>(objects_.size()));
      handles_.push_back(views[i]);
      objects_.emplace_back();
      p.ref->data = static_cast<char*>(base) + offsets[i];
      p.ref->dtype = p.dtype;
      p.ref->shape = p.shape;
      p.ref->strides = p.strides;
      p.ref->device = device;
    }
    return true;
  }

  const TorchShim* shim_;
  std::vector<TorchShim::Handle> handles_;  // the shim's, until finish()
  std::vector<nb::object> objects_;
};

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
