#include "moelink/event.hpp"

#include "runtime/errors.hpp"

namespace moelink {

EventHandle::EventHandle(cudaStream_t stream) {
  cudaEvent_t event = nullptr;
  MOELINK_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  event_.reset(event, [](cudaEvent_t e) { cudaEventDestroy(e); });
  MOELINK_CUDA_CHECK(cudaEventRecord(event, stream));
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
