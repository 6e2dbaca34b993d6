#include "runtime/range_allocator.hpp"

#include <algorithm>

#include "runtime/errors.hpp"

namespace moelink::detail {

RangeAllocator::RangeAllocator(int64_t capacity, int64_t alignment) : capacity_(capacity), alignment_(alignment) {
  if (alignment <= 0 || (alignment & (alignment - 1)) != 0)
    raise(ErrorKind::kValue, "RangeAllocator: alignment must be a power of two, got ", alignment);
  if (capacity < 0) raise(ErrorKind::kValue, "RangeAllocator: capacity must be >= 0, got ", capacity);
  capacity_ = capacity / alignment * alignment;
  if (capacity_ > 0) free_.emplace(0, capacity_);
}

std::optional<int64_t> RangeAllocator::allocate(int64_t bytes) {
  if (bytes <= 0) return std::nullopt;
  const int64_t size = (bytes + alignment_ - 1) / alignment_ * alignment_;
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < size) continue;
    const int64_t offset = it->first, rest = it->second - size;
    free_.erase(it);
    if (rest > 0) free_.emplace(offset + size, rest);
    live_.emplace(offset, size);
    in_use_ += size;
    return offset;
  }
  return std::nullopt;
}

void RangeAllocator::release(int64_t offset) {
  const auto live = live_.find(offset);
  if (live == live_.end()) raise(ErrorKind::kState, "receive arena: release of offset ", offset, ", which is not allocated");
  int64_t begin = offset, size = live->second;
  in_use_ -= size;
  live_.erase(live);
  auto next = free_.lower_bound(begin);
  if (next != free_.end() && next->first == begin + size) {
    size += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == begin) {
      begin = prev->first;
      size += prev->second;
      free_.erase(prev);
    }
  }
  free_.emplace(begin, size);
}

int64_t RangeAllocator::largest_free() const {
  int64_t best = 0;
  for (const auto& [offset, size] : free_) best = std::max(best, size);
  return best;
}

}  // namespace moelink::detail
