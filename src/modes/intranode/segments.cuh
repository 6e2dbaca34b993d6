#pragma once
// Device side of peer segments (window/peer_segments.hpp), shared by dispatch (a receiver's outputs)
// and combine (a rank's input, pulled by the token owners): the per-peer table lookup, the
// SegmentsOpened handshake that makes the choice on the device, and the news for the host.
#include "common/waits.cuh"
#include "modes/intranode/contract.hpp"
#include "window/device.cuh"

namespace moelink::intranode {

// Where this rank has peer d's segment `key` mapped; null when it has not (or has no table: a
// captured operation, or one whose table could not be copied).
__device__ __forceinline__ char* mapped_segment(const SegmentTable* table, int d, unsigned long long key) {
  if (table == nullptr) return nullptr;
  const int b = window::find_segment_bucket(table->key[d], key);
  return b < 0 ? nullptr : table->base[d][b];
}

// Every peer hears, at the start of each dispatch and combine, which of its segments this rank has
// mapped (this kernel's table, its buckets as they are, which the peer probes with the same hash).
// The whole block calls it; warp d writes peer d's 2 KB as eight coalesced stores, where one thread
// would issue 256 one after another ahead of the seq every receiver waits for.
__device__ __forceinline__ void publish_opened(const SegmentTable* table, HeaderSection* const* sections, int rank,
                                               int num_ranks, Epoch seq) {
  const int d = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (d >= num_ranks || d == rank) return;
  SegmentsOpened* opened = &sections[d]->segments_opened[rank];
  for (int i = lane; i < kSegmentBuckets; i += 32) opened->key[i] = table != nullptr ? table->key[d][i] : 0;
  // The lanes' stores are ordered before lane 0's release by the warp barrier (as the rows before a
  // block's tail signal are by __syncthreads).
  __syncwarp();
  if (lane == 0) window::signal(&opened->seq, seq);
}

// Publishes in the header the offers (handle and size) of the segments `keys` names (a nonzero
// key), where peers open them from; whether any was named.
template <int kFields>
__device__ __forceinline__ bool publish_offers(const unsigned long long (&keys)[kFields], const SegmentOffer* offers,
                                               SegmentOffer* published) {
  bool named = false;
  for (int f = 0; f < kFields; ++f) {
    named |= keys[f] != 0;
    if (keys[f] != 0) {
      published[f].key = keys[f];
      published[f].bytes = offers[f].bytes;
      published[f].handle = offers[f].handle;
    }
  }
  return named;
}

// Whether every other rank said, in this operation, that it has all of `keys` (0 = no segment)
// mapped. Waits for each one's SegmentsOpened; false on a timeout (the fault is recorded).
template <int kFields>
__device__ bool all_opened(const HeaderSection* self, const unsigned long long (&keys)[kFields], int rank,
                           int num_ranks, Epoch seq, const kernels::ErrorSink& err, int step) {
  bool all = true;
  for (int s = 0; s < num_ranks; ++s) {
    if (s == rank) continue;
    const SegmentsOpened* opened = &self->segments_opened[s];
    if (!window::wait(&opened->seq, seq, err, s, step, -1)) return false;
    const volatile unsigned long long* mapped = opened->key;
    for (int f = 0; f < kFields; ++f)
      if (keys[f] != 0) all &= window::segment_listed(mapped, keys[f]);
  }
  return all;
}

// What peer d named (its keys, and in `offers` their handles), for this rank's host: the keys, and
// the handles of those this rank has not mapped (MailboxSection::segment_news and
// combine_segment_news, a seqlock). One thread per d.
template <int kFields>
__device__ void report_segments(SegmentNewsOf<kFields>* news, const SegmentTable* table, int d,
                                const volatile unsigned long long* keys, const SegmentOffer* offers, Epoch seq) {
  news->busy = 1;
  __threadfence_system();
  for (int f = 0; f < kFields; ++f) {
    const unsigned long long key = keys[f];
    const bool unmapped = key != 0 && mapped_segment(table, d, key) == nullptr;
    news->key[f] = key;
    news->unmapped[f] = unmapped;
    if (unmapped) {
      news->bytes[f] = reinterpret_cast<const volatile long long*>(&offers[f].bytes)[0];
      const volatile int4* from = reinterpret_cast<const volatile int4*>(&offers[f].handle);
      int4* to = reinterpret_cast<int4*>(&news->handle[f]);
      for (int i = 0; i < static_cast<int>(sizeof(cudaIpcMemHandle_t) / 16); ++i) {
        const int4 v = make_int4(from[i].x, from[i].y, from[i].z, from[i].w);
        to[i] = v;
      }
    }
  }
  __threadfence_system();
  news->seq = seq;
  __threadfence_system();
  news->busy = 0;
}

}  // namespace moelink::intranode
