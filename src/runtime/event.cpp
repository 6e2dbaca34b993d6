#include "moelink/event.hpp"

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

EventHandle::EventHandle(cudaStream_t stream) {
  int device = 0;
  MOELINK_CUDA_CHECK(cudaGetDevice(&device));
  cudaEvent_t event = event_pool().take(device);
  if (event == nullptr) MOELINK_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  event_.reset(event, [device](cudaEvent_t e) {
    if (!event_pool().keep(device, e)) cudaEventDestroy(e);
  });
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
