#include "runtime/arena.hpp"

#include <algorithm>

namespace moelink::detail {

namespace {
thread_local bool in_cuda_callback = false;
}  // namespace

void RecvArena::set_in_cuda_callback(bool inside) { in_cuda_callback = inside; }

RecvArena::RecvArena(std::shared_ptr<void> memory, char* base, int64_t capacity, int64_t alignment)
    : memory_(std::move(memory)), base_(base), capacity_(capacity), ranges_(capacity, alignment) {}

RecvArena::~RecvArena() {
  for (Pending& p : pending_)
    for (cudaEvent_t e : p.events) cudaEventDestroy(e);
}

void RecvArena::collect_locked() {
  auto done = [](Pending& p) {
    for (cudaEvent_t e : p.events) {
      const cudaError_t status = cudaEventQuery(e);
      if (status == cudaErrorNotReady) return false;
      cudaGetLastError();
    }
    return true;
  };
  auto it = pending_.begin();
  while (it != pending_.end()) {
    if (done(*it)) {
      for (cudaEvent_t e : it->events) cudaEventDestroy(e);
      ranges_.release(it->offset);
      it = pending_.erase(it);
    } else {
      ++it;
    }
  }
}

std::optional<RecvArena::Block> RecvArena::allocate(int64_t bytes, cudaStream_t stream, cudaStream_t comm_stream,
                                                    bool capturing) {
  std::optional<int64_t> offset;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!capturing) collect_locked();
    offset = ranges_.allocate(bytes);
    if (!offset && !pending_.empty() && !capturing) {
      // Take the ranges still in use on some stream, ordering the new block's streams after that use.
      for (Pending& p : pending_) {
        for (cudaEvent_t e : p.events) {
          cudaStreamWaitEvent(comm_stream, e, 0);
          if (stream != comm_stream) cudaStreamWaitEvent(stream, e, 0);
          cudaEventDestroy(e);
        }
        ranges_.release(p.offset);
      }
      pending_.clear();
      offset = ranges_.allocate(bytes);
    }
    if (!offset) return std::nullopt;
    std::vector<cudaStream_t>& used = streams_[*offset];
    used.assign({comm_stream});
    if (stream != comm_stream) used.push_back(stream);
  }
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

void RecvArena::record_stream(const void* p, cudaStream_t stream) {
  const int64_t at = static_cast<const char*>(p) - base_;
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = streams_.upper_bound(at);
  if (it == streams_.begin()) return;
  --it;
  std::vector<cudaStream_t>& used = it->second;
  if (std::find(used.begin(), used.end(), stream) == used.end()) used.push_back(stream);
}

void RecvArena::release(void* data) {
  const int64_t offset = static_cast<char*>(data) - base_;
  std::lock_guard<std::mutex> lock(mutex_);
  Pending pending{offset, {}};
  auto it = streams_.find(offset);
  if (it != streams_.end()) {
    if (!in_cuda_callback) {
      for (cudaStream_t s : it->second) {
        cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
        cudaEvent_t event = nullptr;
        // A stream being captured records into its graph, not now; its use is the graph's, and a
        // captured block is held by that graph until the graph is destroyed.
        if (cudaStreamIsCapturing(s, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) continue;
        if (cudaEventCreateWithFlags(&event, cudaEventDisableTiming) != cudaSuccess) continue;
        if (cudaEventRecord(event, s) != cudaSuccess) {
          cudaEventDestroy(event);
          continue;
        }
        pending.events.push_back(event);
      }
      cudaGetLastError();  // a stream freed meanwhile, or an unloading runtime: nothing left to wait for
    }
    streams_.erase(it);
  }
  if (pending.events.empty())
    ranges_.release(offset);
  else
    pending_.push_back(std::move(pending));
}

int64_t RecvArena::largest_free() const {
  std::lock_guard<std::mutex> lock(mutex_);
  const_cast<RecvArena*>(this)->collect_locked();
  return ranges_.largest_free();
}

int64_t RecvArena::bytes_in_use() const {
  std::lock_guard<std::mutex> lock(mutex_);
  const_cast<RecvArena*>(this)->collect_locked();
  return ranges_.bytes_in_use();
}

}  // namespace moelink::detail
