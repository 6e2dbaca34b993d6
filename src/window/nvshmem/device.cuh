#pragma once
// The put window policy (window/device.cuh's Stores, plus NVSHMEM for peers that cannot be mapped):
// what the plugin's builds of the mode kernels call on the put path. Every address passed here is
// a symmetric address of this PE (the same offset in the peer's copy of the allocation).
//
// NOTES: NVSHMEM's device fence and quiet order and complete the calling thread's own operations;
// nothing here lets one warp's fence order another warp's puts. Hence a row's arrival is its own
// put's signal, and a fence only orders words one thread puts in a row.
//
// Two vocabularies: the low-latency kernels name a destination by its PE; the intranode kernels
// (the internode lane's, written over window/device.cuh's FakePuts interface) by their peer index
// in the lane, which lane_pe turns into the PE.
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "common/header.hpp"

namespace moelink::window {

// [lane peer] its PE, for every launch of the lane's kernels (window/nvshmem/lane.cu, set by the
// plugin's lane_peers). One table per process is enough: NVSHMEM is one membership per process,
// and a rank's lane (its in-node index across the nodes) is the same in every Buffer of it.
extern __device__ int lane_pe[kMaxNvlRanks];

struct Puts {
  static constexpr bool kPuts = true;

  // Warp-collective: `bytes` from `source` to `dest` on `pe`, then an ADD of 1 on the 64-bit
  // counter `signal` there, which lands after the bytes. Non-blocking: source stays untouched until quiet().
  static __device__ __forceinline__ void put_rows_warp(void* dest, const void* source, int64_t bytes,
                                                       unsigned long long* signal, int pe) {
    static_assert(sizeof(unsigned long long) == sizeof(uint64_t), "64-bit signal words");
    nvshmemx_putmem_signal_nbi_warp(dest, source, static_cast<size_t>(bytes), reinterpret_cast<uint64_t*>(signal), 1,
                                    NVSHMEM_SIGNAL_ADD, pe);
  }
  static __device__ __forceinline__ void put_int(int* dest, int value, int pe) { nvshmem_int_p(dest, value, pe); }
  static __device__ __forceinline__ void put_epoch(kernels::Epoch* dest, kernels::Epoch value, int pe) {
    nvshmem_ulonglong_p(dest, value, pe);
  }
  static __device__ __forceinline__ void put_u64(unsigned long long* dest, unsigned long long value, int pe) {
    nvshmem_ulonglong_p(dest, value, pe);
  }
  static __device__ __forceinline__ void fence() { nvshmem_fence(); }
  static __device__ __forceinline__ void quiet() { nvshmem_quiet(); }

  // The intranode kernels' put path (FakePuts' interface): `dest` is a symmetric address of this
  // PE, reached in lane peer `peer`'s copy. One thread; non-blocking: source stays untouched until
  // quiet(), which the kernels call before a mirror or a stage is rewritten.
  static __device__ __forceinline__ void put(void* dest, const void* source, int64_t bytes, int peer) {
    nvshmem_putmem_nbi(dest, source, static_cast<size_t>(bytes), lane_pe[peer]);
  }
  // The fence puts this thread's earlier puts to that PE (the batch's fields, the digest, the
  // inbox rows) before the signal: a receiver that sees the count or the epoch sees them.
  static __device__ __forceinline__ void signal_add(unsigned long long* counter, int rows, int peer) {
    nvshmem_fence();
    nvshmemx_signal_op(reinterpret_cast<uint64_t*>(counter), static_cast<uint64_t>(rows), NVSHMEM_SIGNAL_ADD,
                       lane_pe[peer]);
  }
  static __device__ __forceinline__ void signal_set(kernels::Epoch* word, kernels::Epoch value, int peer) {
    nvshmem_fence();
    nvshmemx_signal_op(reinterpret_cast<uint64_t*>(word), static_cast<uint64_t>(value), NVSHMEM_SIGNAL_SET,
                       lane_pe[peer]);
  }
  // A receiver's credit: it only read the ring, so no data has to land before the word; the fence
  // keeps its credits in order (puts of one thread to one PE are not ordered without one), so the
  // last, 0, the head's reset, is never overtaken by an earlier count.
  static __device__ __forceinline__ void credit(int* head, int consumed, int peer) {
    nvshmem_fence();
    nvshmem_int_p(head, consumed, lane_pe[peer]);
  }
};

}  // namespace moelink::window
