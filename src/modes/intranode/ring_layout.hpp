#pragma once
// The named layout of the intranode part of an NVLink buffer. One definition serves the host (size
// hints, "buffer too small" checks) and the kernels, so they cannot disagree.
//
//   [ counters: tail[N][R] | head[N][R] | put_tail[N][R] (the put path only) ], N = counter_channels
//   [ ring(c=0,peer=0) | ring(0,1) | ... | ring(C-1,R-1) ]
//   [ mirror(0,0) | ... | mirror(C-1,R-1) ]   (the put path only: total_bytes(true))
//
// ring(c, p) in rank d's buffer carries channel c's rows from peer p to d. Each ring is `slots`
// entries deep, stored field by field: x rows, source token index, top-k ids, top-k weights, scales.
// tail[c][p] (in d's buffer) = rows p has published into ring(c, p); written by p.
// head[c][q] (in p's buffer)  = rows q has consumed from p's ring in q's buffer; written by q.
// mirror(c, d) in p's buffer is laid out as ring(c, p) in d's buffer: on the put path p stages the
// rows it sends d there, and copies them to the same slots of d's ring a batch at a time.
// put_tail[c][p] (in d's buffer) is the put path's tail of ring(c, p): 64-bit, the width of
// NVSHMEM's signal words, which the put path adds the rows of each batch to; tail[c][p] is then unused.
// It sits with the other counters because a receiver zeroes only its own operation's tails, and
// the next operation must find them zero: anywhere the rows' size (hidden bytes, scales, top-k,
// slots) moves it, such as after the mirrors, it lands on bytes an earlier operation's rows left,
// which the receiver takes for a count. For the same reason the counter block is laid out for
// kCounterChannels channels, not for this operation's C: the next operation may use another
// num_sms, and with the block sized by C its heads and tails would move onto words the last one's
// rows had left (at 8 ranks, from 16 SMs to 24 the heads land in ring(0, 0)). Every counter an
// operation uses is zero when it ends, and the region is zeroed when the Buffer is made, so every
// operation finds its counters zero whatever channel count came before.
#include <cstdint>

#include <vector_types.h>

#include "common/header.hpp"

namespace moelink::intranode {

using kernels::align_up;

// Channels the counter block is laid out for: num_sms / 2 for any num_sms up to 256 (Hopper has
// 132 SMs). An operation with more channels gets a block of its own size, which moves.
constexpr int kCounterChannels = 128;

struct RingLayout {
  int num_ranks = 0;
  int num_channels = 0;
  int counter_channels = 0;  // the counter block's channel stride: max(num_channels, kCounterChannels)
  int slots = 0;
  int hidden_int4 = 0;  // row bytes / 16
  int num_scales = 0;   // float32 per row
  int num_topk = 0;

  int64_t x_bytes = 0, src_idx_bytes = 0, topk_idx_bytes = 0, weights_bytes = 0, scales_bytes = 0;
  int64_t ring_bytes = 0;
  int64_t counters_bytes = 0;

  // puts: the put path's layout (a window with kPuts), whose counters also hold the 64-bit tails.
  MOELINK_HOST_DEVICE static RingLayout make(int num_ranks, int num_channels, int slots, int64_t row_bytes,
                                             int num_scales, int num_topk, bool puts = false) {
    RingLayout l;
    l.num_ranks = num_ranks;
    l.num_channels = num_channels;
    l.counter_channels = num_channels > kCounterChannels ? num_channels : kCounterChannels;
    l.slots = slots;
    l.hidden_int4 = static_cast<int>(row_bytes / 16);
    l.num_scales = num_scales;
    l.num_topk = num_topk;
    l.x_bytes = align_up(static_cast<int64_t>(slots) * row_bytes, 128);
    l.src_idx_bytes = align_up(static_cast<int64_t>(slots) * 4, 128);
    l.topk_idx_bytes = align_up(static_cast<int64_t>(slots) * num_topk * 4, 128);
    l.weights_bytes = align_up(static_cast<int64_t>(slots) * num_topk * 4, 128);
    l.scales_bytes = align_up(static_cast<int64_t>(slots) * num_scales * 4, 128);
    l.ring_bytes = l.x_bytes + l.src_idx_bytes + l.topk_idx_bytes + l.weights_bytes + l.scales_bytes;
    l.counters_bytes = l.int_counters_bytes() + (puts ? l.put_tails_bytes() : 0);
    return l;
  }

  // with_mirrors: the put path's layout (made with puts), a mirror per ring after the rings.
  MOELINK_HOST_DEVICE int64_t total_bytes(bool with_mirrors = false) const {
    const int64_t rings = static_cast<int64_t>(num_channels) * num_ranks * ring_bytes;
    return counters_bytes + rings + (with_mirrors ? rings : 0);
  }
  // The 32-bit tail and head words; the put path's tails follow them.
  MOELINK_HOST_DEVICE int64_t int_counters_bytes() const {
    return align_up(2LL * counter_channels * num_ranks * 4, 128);
  }
  MOELINK_HOST_DEVICE int64_t put_tails_bytes() const {
    return align_up(static_cast<int64_t>(counter_channels) * num_ranks * 8, 128);
  }

  // All pointers below are relative to the base of some rank's data region.
  MOELINK_HOST_DEVICE int* tail(void* base, int channel, int peer) const {
    return reinterpret_cast<int*>(base) + channel * num_ranks + peer;
  }
  MOELINK_HOST_DEVICE int* head(void* base, int channel, int peer) const {
    return reinterpret_cast<int*>(base) + counter_channels * num_ranks + channel * num_ranks + peer;
  }
  MOELINK_HOST_DEVICE char* ring(void* base, int channel, int peer) const {
    return reinterpret_cast<char*>(base) + counters_bytes +
           (static_cast<int64_t>(channel) * num_ranks + peer) * ring_bytes;
  }
  MOELINK_HOST_DEVICE char* mirror(void* base, int channel, int peer) const {
    return ring(base, channel, peer) + static_cast<int64_t>(num_channels) * num_ranks * ring_bytes;
  }
  MOELINK_HOST_DEVICE unsigned long long* put_tail(void* base, int channel, int peer) const {
    return reinterpret_cast<unsigned long long*>(reinterpret_cast<char*>(base) + int_counters_bytes()) +
           channel * num_ranks + peer;
  }
  MOELINK_HOST_DEVICE int4* slot_x(char* ring, int slot) const {
    return reinterpret_cast<int4*>(ring) + static_cast<int64_t>(slot) * hidden_int4;
  }
  MOELINK_HOST_DEVICE int* slot_src_idx(char* ring, int slot) const {
    return reinterpret_cast<int*>(ring + x_bytes) + slot;
  }
  MOELINK_HOST_DEVICE int* slot_topk_idx(char* ring, int slot) const {
    return reinterpret_cast<int*>(ring + x_bytes + src_idx_bytes) + slot * num_topk;
  }
  MOELINK_HOST_DEVICE float* slot_weights(char* ring, int slot) const {
    return reinterpret_cast<float*>(ring + x_bytes + src_idx_bytes + topk_idx_bytes) + slot * num_topk;
  }
  MOELINK_HOST_DEVICE float* slot_scales(char* ring, int slot) const {
    return reinterpret_cast<float*>(ring + x_bytes + src_idx_bytes + topk_idx_bytes + weights_bytes) +
           slot * num_scales;
  }
};

// Tokens [begin, end) of a rank's T tokens that channel c carries; the same split on every rank.
struct ChannelRange {
  int begin, end;
};
MOELINK_HOST_DEVICE int tokens_per_channel(int num_tokens, int num_channels) {
  return (num_tokens + num_channels - 1) / num_channels;
}
MOELINK_HOST_DEVICE ChannelRange channel_range(int num_tokens, int num_channels, int channel) {
  const int per = tokens_per_channel(num_tokens, num_channels);
  int b = channel * per;
  b = b < num_tokens ? b : num_tokens;
  int e = b + per;
  e = e < num_tokens ? e : num_tokens;
  return {b, e};
}
// The channel that carries token t (0 <= t < num_tokens): the one whose channel_range holds it.
MOELINK_HOST_DEVICE int channel_of(int num_tokens, int num_channels, int t) {
  return t / tokens_per_channel(num_tokens, num_channels);
}

}  // namespace moelink::intranode
