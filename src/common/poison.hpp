#pragma once
// The host half of poisoning (common/poison.cuh): the list of output regions a kernel fills with
// 0xFF bytes when it may not run or gives up.
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "common/header.hpp"
#include "moelink/tensor.hpp"
#include "runtime/errors.hpp"

namespace moelink::kernels {

// Undefined tensors and empty regions are left out.
inline PoisonList poison_list(std::initializer_list<std::pair<const TensorRef*, int64_t>> regions) {
  PoisonList list{};
  int i = 0;
  for (const auto& [ref, bytes] : regions) {
    if (ref->data == nullptr || bytes <= 0) continue;
    if (i == kMaxPoisonRegions)
      detail::raise(ErrorKind::kState, "moelink internal: more than ", kMaxPoisonRegions, " outputs to poison");
    list.data[i] = ref->data;
    list.bytes[i] = bytes;
    ++i;
  }
  return list;
}

}  // namespace moelink::kernels
