#pragma once
// The put path of the intranode rings (the internode lane's, over a window with kPuts): a sender
// stages a batch in its mirror of the destination's ring (ring_layout.hpp), then ONE thread copies
// the batch into the same slots of that ring, field by field (at most two ranges each, when the
// batch wraps), and adds the batch's rows to the ring's tail. The receiver's side is the rings'
// own: it waits for the tail and returns credit through the sender's head word.
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
                                          int first, int n, int slots) {
  if (slot_bytes == 0 || n == 0) return;
  const int at = first % slots, before_wrap = min(n, slots - at);
  const int64_t from = offset + static_cast<int64_t>(at) * slot_bytes;
  W::put(ring + from, mirror + from, before_wrap * slot_bytes);
  if (n > before_wrap) W::put(ring + offset, mirror + offset, (n - before_wrap) * slot_bytes);
}

// One thread: positions [first, first + n) (n <= slots) of `mirror` into the peer's `ring`, then
// the tail there counts them.
template <class W>
__device__ __forceinline__ void put_batch(const RingLayout& L, unsigned fields, char* ring, const char* mirror,
                                          int first, int n, int* tail) {
  const auto offset = [&](const void* field) { return static_cast<const char*>(field) - ring; };
  const int S = L.slots;
  if (fields & kRingX) put_field<W>(ring, mirror, 0, static_cast<int64_t>(L.hidden_int4) * 16, first, n, S);
  if (fields & kRingSrcIdx) put_field<W>(ring, mirror, offset(L.slot_src_idx(ring, 0)), 4, first, n, S);
  if (fields & kRingTopkIdx)
    put_field<W>(ring, mirror, offset(L.slot_topk_idx(ring, 0)), 4LL * L.num_topk, first, n, S);
  if (fields & kRingWeights)
    put_field<W>(ring, mirror, offset(L.slot_weights(ring, 0)), 4LL * L.num_topk, first, n, S);
  if (fields & kRingScales)
    put_field<W>(ring, mirror, offset(L.slot_scales(ring, 0)), 4LL * L.num_scales, first, n, S);
  W::signal_add(tail, n);
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
