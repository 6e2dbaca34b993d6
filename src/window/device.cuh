#pragma once
// The device vocabulary over a window (window.hpp): a peer's address, rows put into it, a counter
// signalled after the rows, and a bounded wait on a local counter. Over CUDA IPC these are plain
// stores through mapped pointers and release/acquire at system scope (a peer may be another
// process on this GPU under MPS, or another GPU across NVLink). A kernel written once over a window
// takes its policy as a template argument: Stores here (libmoelink), or window/nvshmem/device.cuh's
// Puts (the NVSHMEM plugin), which adds put-with-signal for peers that cannot be mapped.
#include <cstdint>

#include "common/header.hpp"
#include "common/primitives.cuh"
#include "common/waits.cuh"

namespace moelink::window {

// Every peer is reached by stores: the put path's branches are compiled out.
struct Stores {
  static constexpr bool kPuts = false;
};

// Peer p's region at `offset`, or nullptr when p is not reachable by stores.
__device__ __forceinline__ char* peer_address(const kernels::PeerTable& peers, int p, int64_t offset) {
  return peers.data[p] == nullptr ? nullptr : static_cast<char*>(peers.data[p]) + offset;
}
// The same over a table of regions (one per rank, nullptr where unreachable).
__device__ __forceinline__ char* peer_address_in(char* const* regions, int p, int64_t offset) {
  return regions[p] == nullptr ? nullptr : regions[p] + offset;
}

// Raises a counter (usually in a peer's memory) to `value`; every store this thread made before is
// visible to whoever sees the new value.
__device__ __forceinline__ void signal(int* counter, int value) { kernels::st_release_sys(counter, value); }
__device__ __forceinline__ void signal(kernels::Epoch* counter, kernels::Epoch value) {
  kernels::st_release_sys(counter, value);
}

// Waits until a counter in this rank's memory reaches `target`; false (after reporting rank, peer,
// step and channel) when the timeout expires first.
__device__ __forceinline__ bool wait(const int* counter, int target, const kernels::ErrorSink& err, int peer,
                                     int step, int channel) {
  return kernels::wait_at_least(counter, target, err, peer, step, channel);
}
// The same for an epoch-valued counter (wrap-safe).
__device__ __forceinline__ bool wait(const kernels::Epoch* counter, kernels::Epoch target, const kernels::ErrorSink& err,
                                     int peer, int step, int channel) {
  return kernels::wait_epoch(counter, target, err, peer, step, channel);
}

// The same for a word its publisher writes only after waiting on every rank (waits.cuh's
// wait_until_deferring): a lost rank is named by the publisher's wait, not blamed on the publisher.
__device__ __forceinline__ bool wait_published(const kernels::Epoch* counter, kernels::Epoch target,
                                               const kernels::ErrorSink& err, int peer, int step, int channel) {
  return kernels::wait_until_deferring(
      [&] { return kernels::epoch_reached(kernels::ld_acquire_sys(counter), target); }, err, peer, step, channel,
      static_cast<long long>(target));
}

}  // namespace moelink::window
