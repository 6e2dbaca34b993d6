#pragma once
// The device vocabulary over a window (window.hpp): a peer's address, rows put into it, a counter
// signalled after the rows, and a bounded wait on a local counter. Over CUDA IPC these are plain
// stores through mapped pointers and release/acquire at system scope (a peer may be another
// process on this GPU under MPS, or another GPU across NVLink). A kernel written once over a window
// takes its policy as a template argument: Stores here (libmoelink), FakePuts (the put path's
// protocol over stores, for tests without NVSHMEM), or window/nvshmem/device.cuh's Puts (the
// NVSHMEM plugin), which adds put-with-signal for peers that cannot be mapped.
#include <cstdint>

#include "common/header.hpp"
#include "common/primitives.cuh"
#include "common/waits.cuh"

namespace moelink::window {

// Every peer is reached by stores: the put path's branches are compiled out.
struct Stores {
  static constexpr bool kPuts = false;
};

// The put path's protocol over stores (the internode lane's MOELINK_DEBUG_LANE_FORCE_PUT=fake): a
// sender stages what it sends in its own memory (a mirror) and one thread copies it into the peer's
// mapped memory and signals it, exactly where window/nvshmem/device.cuh's Puts issues a put and a
// signal. Over IPC the copy is complete when put() returns, so quiet() has nothing left to wait
// for; the kernels still call it where Puts must (before a mirror is rewritten).
//
// Every call names the destination by its peer index in the kernel's group (`peer`): Puts turns it
// into the peer's PE, and reaches `dest` there by its symmetric address; here `dest` is already
// the peer's mapped address and the index is not needed.
struct FakePuts {
  static constexpr bool kPuts = true;

  // One thread: `bytes` (a multiple of 4; dest and source equally aligned mod 16, as a mirror and
  // the ring it mirrors are) from this rank's `source` to a peer's mapped `dest`.
  static __device__ __forceinline__ void put(void* dest, const void* source, int64_t bytes, int /*peer*/) {
    char* d = static_cast<char*>(dest);
    const char* s = static_cast<const char*>(source);
    int64_t done = 0;
    for (; done < bytes && (reinterpret_cast<uintptr_t>(d + done) & 15) != 0; done += 4)
      *reinterpret_cast<int*>(d + done) = kernels::ld_cg(reinterpret_cast<const int*>(s + done));
    // Loads kUnroll words ahead of their stores: one thread's copy is bound by load latency.
    constexpr int kUnroll = 8;
    const int64_t words = (bytes - done) / 16;
    const int4* from = reinterpret_cast<const int4*>(s + done);
    int4* to = reinterpret_cast<int4*>(d + done);
    for (int64_t i0 = 0; i0 < words; i0 += kUnroll) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (i0 + u < words) v[u] = kernels::ld_cg(from + i0 + u);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (i0 + u < words) to[i0 + u] = v[u];
    }
    for (done += words * 16; done < bytes; done += 4)
      *reinterpret_cast<int*>(d + done) = kernels::ld_cg(reinterpret_cast<const int*>(s + done));
  }
  // A counted signal on a 64-bit counter (the width of NVSHMEM's signal words): `rows` more have
  // landed. A release add at system scope (a system fence and the add in one), so the copies this
  // thread made before are visible to whoever sees the new count (Puts: a fence, then the signal's
  // ADD).
  static __device__ __forceinline__ void signal_add(unsigned long long* counter, int rows, int /*peer*/) {
    kernels::red_add_release_sys(counter, static_cast<unsigned long long>(rows));
  }
  // One thread: an epoch into a peer's word (a barrier's arrival), after the puts this thread made
  // to that peer before. A release store at system scope (Puts: a fence, then the signal's SET).
  static __device__ __forceinline__ void signal_set(kernels::Epoch* word, kernels::Epoch value, int /*peer*/) {
    kernels::st_release_sys(word, value);
  }
  // A receiver's credit: its consumed count into the sender's head word. Nothing the receiver
  // wrote has to land before it (it only read the ring); one thread's stores to one word land in
  // order, and the release keeps the stores path's semantics (Puts: a fence, which keeps the
  // credits in order, and a put of the word).
  static __device__ __forceinline__ void credit(int* head, int consumed, int /*peer*/) {
    kernels::st_release_sys(head, consumed);
  }
  static __device__ __forceinline__ void quiet() {}
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
