#pragma once
// Python values -> core structs. The Python layer sends tensors as TRef tuples
// (data_ptr, dtype, shape, strides, device) and stream ordering as an order tuple
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

// None -> an undefined TensorRef ("not given").
inline TensorRef to_tensor_ref(nb::handle obj, const char* arg) {
  if (obj.is_none()) return {};
  if (!nb::isinstance<nb::tuple>(obj) || nb::len(obj) != 5) {
    raise_type(arg, "a TRef tuple (data_ptr, dtype, shape, strides, device) or None");
  }
  nb::tuple t = nb::borrow<nb::tuple>(obj);
  TensorRef ref;
  ref.data = to_pointer(t[0], arg);
  if (!nb::isinstance<nb::str>(t[1])) raise_type(arg, "a dtype name as the second TRef entry");
  try {
    ref.dtype = dtype_from_name(nb::cast<std::string>(t[1]));
  } catch (const Error& e) {
    // The core's parser does not know which argument it was parsing for.
    std::string message = e.what();
    const std::string prefix = "moelink: ";
    if (message.rfind(prefix, 0) == 0) message.erase(0, prefix.size());
    throw Error(e.kind(), prefix + arg + ": " + message);
  }
  ref.shape = to_int_vector(t[2], arg, "shape");
  ref.strides = to_int_vector(t[3], arg, "strides");
  if (!nb::isinstance<nb::int_>(t[4])) raise_type(arg, "an int device ordinal as the last TRef entry");
  ref.device = nb::cast<int>(t[4]);
  return ref;
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
