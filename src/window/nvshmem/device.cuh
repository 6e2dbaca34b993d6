#pragma once
// The put window policy (window/device.cuh's Stores, plus NVSHMEM for peers that cannot be mapped):
// what the plugin's builds of the mode kernels call on the put path. Every address passed here is
// a symmetric address of this PE (the same offset in the peer's copy of the allocation).
//
// NOTES: NVSHMEM's device fence and quiet order and complete the calling thread's own operations;
// nothing here lets one warp's fence order another warp's puts. Hence a row's arrival is its own
// put's signal, and a fence only orders words one thread puts in a row.
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "common/header.hpp"

namespace moelink::window {

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
};

}  // namespace moelink::window
