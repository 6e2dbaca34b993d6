#pragma once
// The receive arena: the part of a rank's IPC-shared allocation that dispatch outputs can live in,
// so peers write rows straight into them. Blocks may outlive the Buffer (a user keeps recv_x after
// destroy()), so the arena co-owns the allocation and the last block frees it.
//
// A block's range is reused with stream semantics, as the caching allocator reuses memory: when its
// last owner dies, an event is recorded on every stream the block was used on (the stream it was
// allocated on, the comm stream, and each stream record_stream named), and a new block that takes
// the range makes its streams wait for those events first. Torch's own record_stream cannot see
// these tensors (they are not the caching allocator's), so the Python layer reports the streams.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "runtime/range_allocator.hpp"

namespace moelink::detail {

class RecvArena : public std::enable_shared_from_this<RecvArena> {
 public:
  // Ranges start at multiples of `alignment` (runtime::kArenaAlignment).
  RecvArena(std::shared_ptr<void> memory, char* base, int64_t capacity, int64_t alignment);
  ~RecvArena();

  // A block of `bytes`, released when the last copy of the returned owner dies; nullopt when no
  // free range is large enough. `stream` (where the caller uses it first) and `comm_stream` are
  // ordered after the earlier users of the range.
  struct Block {
    void* data;
    std::shared_ptr<void> owner;
  };
  // While `stream` is being captured no event may be queried (it would invalidate the capture),
  // so `capturing` takes free ranges only.
  std::optional<Block> allocate(int64_t bytes, cudaStream_t stream, cudaStream_t comm_stream, bool capturing);
  // The live block holding `p` is also used on `stream`. No-op for a pointer in no live block.
  void record_stream(const void* p, cudaStream_t stream);

  bool contains(const void* p, int64_t bytes) const {
    const char* c = static_cast<const char*>(p);
    return c >= base_ && bytes >= 0 && c + bytes <= base_ + capacity_;
  }
  int64_t capacity() const { return capacity_; }
  int64_t bytes_in_use() const;  // live ranges, and freed ones still in use on a stream
  int64_t largest_free() const;

  // Set while a CUDA callback (a graph's user-object destructor) drops an owner: no CUDA call may
  // be made there, and the graph's work is complete, so the range is freed without events.
  static void set_in_cuda_callback(bool inside);

 private:
  struct Pending {
    int64_t offset;
    std::vector<cudaEvent_t> events;
  };
  void release(void* data);
  void collect_locked();  // pending ranges whose events completed become free

  std::shared_ptr<void> memory_;
  char* base_;
  int64_t capacity_;
  mutable std::mutex mutex_;
  RangeAllocator ranges_;
  std::map<int64_t, std::vector<cudaStream_t>> streams_;  // live block offset -> streams it is used on
  std::vector<Pending> pending_;
};

}  // namespace moelink::detail
