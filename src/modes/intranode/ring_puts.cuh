#pragma once
// The put path of the intranode rings (the internode lane's, over a window with kPuts): a sender
// stages a batch in its mirror of the destination's ring (ring_layout.hpp), then ONE thread copies
// the batch into the same slots of that ring, field by field (at most two ranges each, when the
// batch wraps), and adds the batch's rows to the ring's 64-bit tail (RingLayout::put_tail). The
// receiver waits for that tail in its own memory and returns credit by putting its consumed count
// into the sender's head word (W::credit); the sender's wait for room reads its own head, as on the
// stores path. A kernel written over W takes its tail and its credit from here, so that the
// stores instantiation keeps the 32-bit tails and plain stores it always had.
//
// NOTES: one thread, because a put path's ordering is per thread: its puts to one peer land in
// order after a fence, and nothing orders another thread's (window/nvshmem/device.cuh). Over IPC
// (FakePuts) the tail's release orders the same thread's copies before it.
#include "modes/intranode/ring_layout.hpp"
#include "window/device.cuh"

namespace moelink::intranode {

// The slot fields a batch fills: dispatch's rings carry them all, combine's x and its weights.
enum RingFields : unsigned {
  kRingX = 1u,
  kRingSrcIdx = 2u,
  kRingTopkIdx = 4u,
  kRingWeights = 8u,
  kRingScales = 16u,
  kRingDispatchFields = kRingX | kRingSrcIdx | kRingTopkIdx | kRingWeights | kRingScales,
  kRingCombineFields = kRingX | kRingWeights,
};

// Ring positions [first, first + n) of one field (slot_bytes per slot, at `offset` in the ring).
template <class W>
__device__ __forceinline__ void put_field(char* ring, const char* mirror, int64_t offset, int64_t slot_bytes,
                                          int first, int n, int slots, int peer) {
  if (slot_bytes == 0 || n == 0) return;
  const int at = first % slots, before_wrap = min(n, slots - at);
  const int64_t from = offset + static_cast<int64_t>(at) * slot_bytes;
  W::put(ring + from, mirror + from, before_wrap * slot_bytes, peer);
  if (n > before_wrap) W::put(ring + offset, mirror + offset, (n - before_wrap) * slot_bytes, peer);
}

// One thread: positions [first, first + n) (n <= slots) of `mirror` into `peer`'s `ring`, then
// the tail there counts them.
template <class W>
__device__ __forceinline__ void put_batch(const RingLayout& L, unsigned fields, char* ring, const char* mirror,
                                          int first, int n, unsigned long long* tail, int peer) {
  const auto offset = [&](const void* field) { return static_cast<const char*>(field) - ring; };
  const int S = L.slots;
  if (fields & kRingX) put_field<W>(ring, mirror, 0, static_cast<int64_t>(L.hidden_int4) * 16, first, n, S, peer);
  if (fields & kRingSrcIdx) put_field<W>(ring, mirror, offset(L.slot_src_idx(ring, 0)), 4, first, n, S, peer);
  if (fields & kRingTopkIdx)
    put_field<W>(ring, mirror, offset(L.slot_topk_idx(ring, 0)), 4LL * L.num_topk, first, n, S, peer);
  if (fields & kRingWeights)
    put_field<W>(ring, mirror, offset(L.slot_weights(ring, 0)), 4LL * L.num_topk, first, n, S, peer);
  if (fields & kRingScales)
    put_field<W>(ring, mirror, offset(L.slot_scales(ring, 0)), 4LL * L.num_scales, first, n, S, peer);
  W::signal_add(tail, n, peer);
}

// The tail of ring(channel, peer) in the buffer at `base`, as W signals it: the stores path's
// 32-bit word, or the put path's 64-bit one.
template <class W>
__device__ __forceinline__ auto ring_tail(const RingLayout& L, void* base, int channel, int peer) {
  if constexpr (W::kPuts)
    return L.put_tail(base, channel, peer);
  else
    return L.tail(base, channel, peer);
}

// A receiver's credit to the sender `peer` of its ring: `consumed` into that sender's head word
// (0 after the last chunk, so the head is reset for the next operation).
template <class W>
__device__ __forceinline__ void return_credit(int* head, int consumed, int peer) {
  if constexpr (W::kPuts)
    W::credit(head, consumed, peer);
  else
    window::signal(head, consumed);
}

// Called by the putting thread before its batch of positions [first, first + n) is staged: a
// mirror slot is rewritten a lap after its last copy, whose source must stay untouched until the
// copy is complete, so the first batch of each lap waits for every earlier one (quiet). Once per
// lap, not per batch; *quiet_lap (0 at the start) is the last lap it ran for.
template <class W>
__device__ __forceinline__ void before_staging(int* quiet_lap, int first, int n, int slots) {
  const int lap = (first + n - 1) / slots;
  if (lap > *quiet_lap) {
    W::quiet();
    *quiet_lap = lap;
  }
}

}  // namespace moelink::intranode
