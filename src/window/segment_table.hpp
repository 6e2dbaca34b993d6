#pragma once
// The table of peers' mapped segments as kernels read it (window/peer_segments.hpp keeps it): per
// peer, a hash of segment keys to the bases this rank mapped them at. Plain data, for host and
// device alike. It lives in device memory, not in the kernel arguments: 128 mappings per peer make
// it 32 KB, past the 4 KB of parameters a launch takes without CUDA 12.1 (and all of it would be
// copied at every launch), while the host rewrites it only when a mapping comes or goes.
//
// Why a hash: the lookups sit on the kernels' setup path (one thread per destination resolves five
// keys before its first row; a receiver checks every sender's published keys before it answers),
// and scanning 128 keys per field there, and per sender for the receiver, would add tens of
// microseconds to every operation. Buffer ids are consecutive integers, so multiplicative hashing
// spreads them; at most half the buckets are full (kSegmentSlots of kSegmentBuckets), so a probe
// ends after one or two loads.
#include <cstdint>

#include "common/header.hpp"

namespace moelink::window {

inline constexpr int kSegmentPeers = kMaxNvlRanks;
inline constexpr int kSegmentSlots = 128;  // mappings of one peer kept at once
inline constexpr int kSegmentBucketBits = 8;
inline constexpr int kSegmentBuckets = 1 << kSegmentBucketBits;
static_assert(kSegmentBuckets >= 2 * kSegmentSlots, "probes stay short only while the buckets are at most half full");

// [peer][bucket]: key 0 = empty. Keys and bases apart, so the keys of one peer can be published
// (intranode SegmentsOpened) as one array that the receiver probes with the same hash.
struct SegmentTable {
  unsigned long long key[kSegmentPeers][kSegmentBuckets];
  char* base[kSegmentPeers][kSegmentBuckets];
};

MOELINK_HOST_DEVICE int segment_bucket(unsigned long long key) {
  return static_cast<int>((key * 0x9E3779B97F4A7C15ull) >> (64 - kSegmentBucketBits));
}

// The bucket holding `key` among one peer's `keys` (linear probing from segment_bucket), or -1.
template <class Keys>
MOELINK_HOST_DEVICE int find_segment_bucket(Keys keys, unsigned long long key) {
  if (key == 0) return -1;
  int b = segment_bucket(key);
  for (int i = 0; i < kSegmentBuckets; ++i, b = (b + 1) & (kSegmentBuckets - 1)) {
    const unsigned long long k = keys[b];
    if (k == key) return b;
    if (k == 0) return -1;
  }
  return -1;
}

// Whether one peer's `keys` hold `key`: find_segment_bucket's probe as one loop without an early
// return, for a receiver over its senders' published keys (a volatile view). It runs once per
// operation on one thread, but ptxas gives it registers against the combine kernel's hot loops,
// and the early-return form made combine_kernel<8> spill 100 bytes; this one none.
template <class Keys>
MOELINK_HOST_DEVICE bool segment_listed(Keys keys, unsigned long long key) {
  if (key == 0) return false;
  int b = segment_bucket(key);
  unsigned long long k = keys[b];
  for (int i = 1; k != key && k != 0 && i < kSegmentBuckets; ++i) k = keys[b = (b + 1) & (kSegmentBuckets - 1)];
  return k == key;
}

}  // namespace moelink::window
