#include "runtime/arena.hpp"

namespace moelink::detail {

RecvArena::RecvArena(std::shared_ptr<void> memory, char* base, int64_t capacity, int64_t alignment)
    : memory_(std::move(memory)), base_(base), capacity_(capacity), ranges_(capacity, alignment) {}

std::optional<RecvArena::Block> RecvArena::allocate(int64_t bytes) {
  std::optional<int64_t> offset;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    offset = ranges_.allocate(bytes);
  }
  if (!offset) return std::nullopt;
  char* data = base_ + *offset;
  std::shared_ptr<RecvArena> self = shared_from_this();
  return Block{data, std::shared_ptr<void>(data, [self](void* p) noexcept {
                  try {
                    self->release(p);
                  } catch (...) {
                    // Only a bookkeeping bug gets here; a deleter must not throw.
                  }
                })};
}

void RecvArena::release(void* data) {
  std::lock_guard<std::mutex> lock(mutex_);
  ranges_.release(static_cast<char*>(data) - base_);
}

int64_t RecvArena::largest_free() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return ranges_.largest_free();
}

int64_t RecvArena::bytes_in_use() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return ranges_.bytes_in_use();
}

}  // namespace moelink::detail
