#pragma once
// First-fit allocation of byte ranges inside one fixed-size region, by offset only. It knows
// nothing of CUDA, so the receive arena's bookkeeping is tested on the CPU.
#include <cstdint>
#include <map>
#include <optional>

namespace moelink::detail {

class RangeAllocator {
 public:
  // `alignment` must be a power of two; every range starts at a multiple of it.
  RangeAllocator(int64_t capacity, int64_t alignment);

  // The lowest-addressed free range that fits, or nullopt when none does (never a partial range).
  std::optional<int64_t> allocate(int64_t bytes);
  // Frees the range that `allocate` returned at `offset` and merges it with free neighbours.
  // Raises on an offset that is not a live range (a double free would corrupt later outputs).
  void release(int64_t offset);

  int64_t capacity() const { return capacity_; }
  int64_t bytes_in_use() const { return in_use_; }
  int64_t largest_free() const;
  size_t live_ranges() const { return live_.size(); }

 private:
  int64_t capacity_, alignment_, in_use_ = 0;
  std::map<int64_t, int64_t> free_;  // offset -> size, never adjacent (always merged)
  std::map<int64_t, int64_t> live_;  // offset -> size
};

}  // namespace moelink::detail
