#pragma once
// The receive arena: the part of a rank's IPC-shared allocation that dispatch outputs can live in,
// so peers write rows straight into them. Blocks may outlive the Buffer (a user keeps recv_x after
// destroy()), so the arena co-owns the allocation and the last block frees it.
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>

#include "runtime/range_allocator.hpp"

namespace moelink::detail {

class RecvArena : public std::enable_shared_from_this<RecvArena> {
 public:
  // Ranges start at multiples of `alignment` (runtime::kArenaAlignment).
  RecvArena(std::shared_ptr<void> memory, char* base, int64_t capacity, int64_t alignment);

  // A block of `bytes`, released when the last copy of the returned owner dies; nullopt when no
  // free range is large enough.
  struct Block {
    void* data;
    std::shared_ptr<void> owner;
  };
  std::optional<Block> allocate(int64_t bytes);

  bool contains(const void* p, int64_t bytes) const {
    const char* c = static_cast<const char*>(p);
    return c >= base_ && bytes >= 0 && c + bytes <= base_ + capacity_;
  }
  int64_t capacity() const { return capacity_; }
  int64_t bytes_in_use() const;
  int64_t largest_free() const;

 private:
  void release(void* data);

  std::shared_ptr<void> memory_;
  char* base_;
  int64_t capacity_;
  mutable std::mutex mutex_;
  RangeAllocator ranges_;
};

}  // namespace moelink::detail
