#pragma once
// The order of one Buffer's work on the device, whatever stream each piece is queued on. Its
// operations must run in host call order: a low-latency call's parity and signal numbers assume the
// previous call's kernel ran first, a claim's memset must follow the kernel that took the claim, a
// barrier must follow every kernel before it. Most work goes on the comm stream, but a low-latency
// call with the default order launches on the caller's stream (host.cpp: no events then), and the
// caller may change streams between calls (a hook called from another stream than its send).
//
// The rule: remember the stream that holds the Buffer's latest work; work queued on the same stream
// needs nothing (stream order keeps it behind), work queued on another stream first makes that
// stream wait for an event recorded on the remembered one. Every place that queues work on any
// stream enters it through Context::queue_on, which applies this.
//
// CUDA graph capture splits that memory in two: captured work runs at each replay, not now, so it
// orders nothing eager, and eager work cannot be joined to it (waiting from a captured stream on an
// event recorded outside the capture is invalid, and so is the reverse). So the order keeps the
// stream of the latest eager work and the stream of the latest captured work, with the capture it
// belongs to; a join is made only between two eager streams or within one capture. The eager work
// queued on a stream before a capture began on it cannot be reached until that capture ends: eager
// work on another stream meanwhile is refused (`hidden`), as no event can order it.
//
// Pure (the capture state comes from a query the caller passes), so tests/cpu drives it with fake
// streams.
#include <cuda_runtime_api.h>

#include <optional>

namespace moelink::runtime {

// A stream's capture state: `active` while work queued on it goes into a CUDA graph; `id` names the
// capture (cudaStreamGetCaptureInfo's, never 0 while active).
struct Capture {
  bool active = false;
  unsigned long long id = 0;
};

class LaunchOrder {
 public:
  // What queuing on a stream takes, and the order after it (take() applies it once the join is made).
  struct Join {
    bool needed = false;             // record an event on record_on; the entered stream waits for it
    cudaStream_t record_on = nullptr;
    bool hidden = false;             // eager work whose predecessor sits behind a capture: refuse it
    cudaStream_t eager = nullptr;
    cudaStream_t captured = nullptr;
    unsigned long long captured_id = 0;
  };

  // `first`: the stream the Buffer's setup was queued on (the comm stream).
  explicit LaunchOrder(cudaStream_t first) : eager_(first), captured_(first) {}

  // Queuing on `stream` needs no join whether or not it is being captured: it holds both the latest
  // eager and the latest captured work (or a capture that has ended). Then no query is made at
  // all, which keeps a run of calls on one stream free of CUDA calls. Its capture is no longer
  // known (this work may belong to a new one), so the next join from elsewhere asks.
  bool settled(cudaStream_t stream) {
    if (stream != eager_ || stream != captured_) return false;
    captured_id_ = 0;
    return true;
  }

  // The join that queuing work on `stream` (in state `capture`) takes. `covered`: a stream whose
  // work so far `stream` already waits for (begin_op's own join of the comm stream after the
  // caller's), so no event is needed from it. `capture_of` answers for the other streams it must ask
  // about.
  template <class Query>
  Join plan(cudaStream_t stream, Capture capture, Query&& capture_of,
            std::optional<cudaStream_t> covered = std::nullopt) const {
    Join j;
    j.eager = eager_;
    j.captured = captured_;
    j.captured_id = captured_id_;
    const auto joined = [&](cudaStream_t s) { return s == stream || (covered && *covered == s); };
    if (!capture.active) {
      if (!joined(eager_)) {
        if (capture_of(eager_).active) {
          j.hidden = true;
          return j;
        }
        j.needed = true;
        j.record_on = eager_;
      }
      j.eager = stream;
      // The latest captured work belongs to a capture that has ended: nothing is left to join, and
      // this stream takes its place so that the next call here is settled.
      if (captured_ != stream && !capture_of(captured_).active) {
        j.captured = stream;
        j.captured_id = 0;
      }
    } else {
      if (!joined(captured_)) {
        unsigned long long last = captured_id_;
        if (last == 0) {
          const Capture c = capture_of(captured_);
          if (c.active) last = c.id;
        }
        // Another capture's work (or none) orders nothing in this one.
        if (last == capture.id) {
          j.needed = true;
          j.record_on = captured_;
        }
      }
      j.captured = stream;
      j.captured_id = capture.id;
    }
    return j;
  }

  void take(const Join& j) {
    eager_ = j.eager;
    captured_ = j.captured;
    captured_id_ = j.captured_id;
  }

  cudaStream_t eager_stream() const { return eager_; }
  cudaStream_t captured_stream() const { return captured_; }

 private:
  cudaStream_t eager_;
  cudaStream_t captured_;
  unsigned long long captured_id_ = 0;  // the capture of captured_'s latest work; 0: not known
};

}  // namespace moelink::runtime
