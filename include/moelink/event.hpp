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

  bool valid() const { return event_ != nullptr; }
  cudaEvent_t get() const;
  // Makes `stream` wait for the event (GPU-side; the host never blocks).
  void stream_wait(cudaStream_t stream) const;
  // Makes the calling thread's current stream (the legacy default stream) wait.
  void current_stream_wait() const { stream_wait(nullptr); }
  // Blocks the host until the event completed.
  void synchronize() const;
  bool query() const;

 private:
  std::shared_ptr<CUevent_st> event_;
};

}  // namespace moelink
