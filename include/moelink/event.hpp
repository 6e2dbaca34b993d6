#pragma once
// A CUDA event recorded on a stream. Copies share the event.
#include <cuda_runtime_api.h>

#include <memory>

namespace moelink {

class EventHandle {
 public:
  EventHandle() = default;
  // Records a new event on `stream`.
  explicit EventHandle(cudaStream_t stream);
  // An event on `stream` (of `device`) recorded at its first use (get, a wait, synchronize, query),
  // not now: the end of a call whose work the caller's own stream already holds, which the caller
  // rarely looks at, so that the call itself makes no CUDA call for it. Recorded later it covers at
  // least the work queued before the call returned (and whatever the stream got since).
  static EventHandle deferred(cudaStream_t stream, int device);

  bool valid() const { return state_ != nullptr; }
  cudaEvent_t get() const;
  // Makes `stream` wait for the event (GPU-side; the host never blocks).
  void stream_wait(cudaStream_t stream) const;
  // Makes the calling thread's current stream (the legacy default stream) wait.
  void current_stream_wait() const { stream_wait(nullptr); }
  // Blocks the host until the event completed.
  void synchronize() const;
  bool query() const;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

}  // namespace moelink
