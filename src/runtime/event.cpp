#include "moelink/event.hpp"

#include <mutex>

#include "runtime/device_free_list.hpp"
#include "runtime/errors.hpp"

namespace moelink {

namespace {

// Every operation returns an event recorded at its end. Making one (and destroying the last one,
// when the caller drops it, often during the next call) is a driver call each on the host path the
// GPU waits for, so released events are kept for reuse: a wait already issued on an event is not
// affected by recording it again. At most 64 per device, more than a caller keeps alive at once.
// Never destroyed: handles released during static destruction still find it.
runtime::DeviceFreeList<cudaEvent_t>& event_pool() {
  static auto* events = new runtime::DeviceFreeList<cudaEvent_t>(64);
  return *events;
}

}  // namespace

struct EventHandle::State {
  int device = 0;
  cudaEvent_t event = nullptr;
  // A deferred handle: the stream its record goes on, made once (a failed record is tried again).
  bool deferred = false;
  cudaStream_t stream = nullptr;
  std::once_flag recorded;

  ~State() {
    if (event != nullptr && !event_pool().keep(device, event)) cudaEventDestroy(event);
  }

  void record() {
    if (event == nullptr) {
      event = event_pool().take(device);
      if (event == nullptr) MOELINK_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    }
    MOELINK_CUDA_CHECK(cudaEventRecord(event, stream));
  }
};

EventHandle::EventHandle(cudaStream_t stream) {
  auto state = std::make_shared<State>();
  MOELINK_CUDA_CHECK(cudaGetDevice(&state->device));
  state->stream = stream;
  // An event that failed to record goes back to the pool unrecorded, which is harmless.
  state->record();
  state_ = std::move(state);
}

EventHandle EventHandle::deferred(cudaStream_t stream, int device) {
  EventHandle handle;
  auto state = std::make_shared<State>();
  state->deferred = true;
  state->device = device;
  state->stream = stream;
  handle.state_ = std::move(state);
  return handle;
}

cudaEvent_t EventHandle::get() const {
  if (!state_) detail::raise(ErrorKind::kState, "EventHandle: the handle holds no event");
  State& s = *state_;
  if (s.deferred)
    std::call_once(s.recorded, [&s] {
      // On the stream's device, whichever is current now: the event is made there, and the legacy
      // stream (null) is the current device's.
      int current = 0;
      MOELINK_CUDA_CHECK(cudaGetDevice(&current));
      if (current == s.device) return s.record();
      MOELINK_CUDA_CHECK(cudaSetDevice(s.device));
      struct Restore {
        int device;
        ~Restore() { cudaSetDevice(device); }
      } restore{current};
      s.record();
    });
  return s.event;
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
