#include "moelink/event.hpp"

#include <mutex>
#include <utility>
#include <vector>

#include "runtime/errors.hpp"

namespace moelink {

namespace {

// Every operation returns an event recorded at its end. Creating one (and destroying the last
// one, when the caller drops it, often in the next call) is a driver call each on the host path
// the GPU waits for, so released events are kept for reuse: a wait already issued on an event is
// not affected by recording it again. Per device, since an event belongs to the device that was
// current when it was made, as does the stream it is recorded on.
class EventPool {
 public:
  cudaEvent_t take(int device) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = free_.size(); i-- > 0;) {
        if (free_[i].first != device) continue;
        const cudaEvent_t event = free_[i].second;
        free_[i] = free_.back();
        free_.pop_back();
        return event;
      }
    }
    cudaEvent_t event = nullptr;
    MOELINK_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    return event;
  }

  void give_back(int device, cudaEvent_t event) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (free_.size() < kMaxKept) {
        free_.emplace_back(device, event);
        return;
      }
    }
    cudaEventDestroy(event);
  }

 private:
  static constexpr size_t kMaxKept = 64;  // more than the events a caller keeps alive at once
  std::mutex mutex_;
  std::vector<std::pair<int, cudaEvent_t>> free_;
};

// Never destroyed: handles released during static destruction still find it.
EventPool& event_pool() {
  static EventPool* pool = new EventPool;
  return *pool;
}

}  // namespace

EventHandle::EventHandle(cudaStream_t stream) {
  int device = 0;
  MOELINK_CUDA_CHECK(cudaGetDevice(&device));
  cudaEvent_t event = event_pool().take(device);
  event_.reset(event, [device](cudaEvent_t e) { event_pool().give_back(device, e); });
  const cudaError_t status = cudaEventRecord(event, stream);
  if (status != cudaSuccess) {
    event_.reset();  // an event that failed to record goes back unrecorded, which is harmless
    MOELINK_CUDA_CHECK(status);
  }
}

cudaEvent_t EventHandle::get() const {
  if (!event_) detail::raise(ErrorKind::kState, "EventHandle: the handle holds no event");
  return event_.get();
}

void EventHandle::stream_wait(cudaStream_t stream) const { MOELINK_CUDA_CHECK(cudaStreamWaitEvent(stream, get(), 0)); }

void EventHandle::synchronize() const { MOELINK_CUDA_CHECK(cudaEventSynchronize(get())); }

bool EventHandle::query() const {
  const cudaError_t status = cudaEventQuery(get());
  if (status == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  MOELINK_CUDA_CHECK(status);
  return true;
}

}  // namespace moelink
