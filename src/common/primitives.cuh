#pragma once
// Device primitives named for their memory semantics. Everything that crosses processes (peer
// buffers over CUDA IPC, host-mapped mailboxes) uses .sys scope: a peer may be another process on
// the same GPU under MPS or another GPU across NVLink.
#include <cstdint>

#include "moelink/topology.hpp"



namespace moelink::kernels {

__device__ __forceinline__ int ld_acquire_sys(const int* ptr) {
  int v;
  asm volatile("ld.acquire.sys.global.b32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(int* ptr, int v) {
  asm volatile("st.release.sys.global.b32 [%0], %1;" ::"l"(ptr), "r"(v) : "memory");
}

// Adds v to a counter (usually in a peer's memory) with release semantics: every store this thread
// made before is visible to whoever sees the sum.
__device__ __forceinline__ void red_add_release_sys(int* ptr, int v) {
  asm volatile("red.release.sys.global.add.s32 [%0], %1;" ::"l"(ptr), "r"(v) : "memory");
}
__device__ __forceinline__ void red_add_release_sys(unsigned long long* ptr, unsigned long long v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(ptr), "l"(v) : "memory");
}

__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* ptr) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(ptr) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(unsigned long long* ptr, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(v) : "memory");
}

__device__ __forceinline__ unsigned long long ld_volatile(const unsigned long long* ptr) {
  unsigned long long v;
  asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(ptr));
  return v;
}

__device__ __forceinline__ int ld_volatile(const int* ptr) {
  int v;
  asm volatile("ld.volatile.global.b32 %0, [%1];" : "=r"(v) : "l"(ptr));
  return v;
}

__device__ __forceinline__ void st_volatile(int* ptr, int v) {
  asm volatile("st.volatile.global.b32 [%0], %1;" ::"l"(ptr), "r"(v) : "memory");
}
__device__ __forceinline__ void st_volatile(unsigned long long* ptr, unsigned long long v) {
  asm volatile("st.volatile.global.u64 [%0], %1;" ::"l"(ptr), "l"(v) : "memory");
}

// Streaming read of data this kernel reads once and nobody writes during the kernel.
__device__ __forceinline__ int4 ld_nc_stream(const int4* ptr) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

// Read of ring data a peer wrote: it must not come from a stale L1 line, so bypass L1.
__device__ __forceinline__ int4 ld_cg(const int4* ptr) {
  int4 v;
  asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}
__device__ __forceinline__ int ld_cg(const int* ptr) {
  int v;
  asm volatile("ld.global.cg.b32 %0, [%1];" : "=r"(v) : "l"(ptr));
  return v;
}
__device__ __forceinline__ float ld_cg(const float* ptr) { return __int_as_float(ld_cg(reinterpret_cast<const int*>(ptr))); }

__device__ __forceinline__ void st_na(int4* ptr, const int4& v) {
  asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

// L2 eviction policy for data touched once (x rows, recv_x / combined_x rows): let it leave L2
// first, so the rings, which are rewritten soon after they are read, stay resident.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ int4 ld_nc_stream(const int4* ptr, uint64_t policy) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.s32 {%0, %1, %2, %3}, [%4], %5;"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr), "l"(policy));
  return v;
}

__device__ __forceinline__ void st_na(int4* ptr, const int4& v, uint64_t policy) {
  asm volatile("st.global.L1::no_allocate.L2::cache_hint.v4.s32 [%0], {%1, %2, %3, %4}, %5;" ::"l"(ptr), "r"(v.x),
               "r"(v.y), "r"(v.z), "r"(v.w), "l"(policy)
               : "memory");
}

// Asks L2 for the 128-byte lines of [ptr, ptr + bytes), one line per thread per turn, without
// waiting for them. For inputs a block later reads in small dependent pieces (a batch's scales,
// routing flags and top-k at a time): with L2 cold each piece is an HBM round trip on the batch's
// path, an L2 one after this. A prefetch is a hint; the lines start inside the tensor's
// allocation (blocks are 512-byte aligned), so none leaves it.
__device__ __forceinline__ void prefetch_l2(const void* ptr, int64_t bytes, int thread, int num_threads) {
  if (ptr == nullptr || bytes <= 0) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t end = begin + static_cast<uintptr_t>(bytes);
  for (uintptr_t line = (begin & ~uintptr_t{127}) + static_cast<uintptr_t>(thread) * 128; line < end;
       line += static_cast<uintptr_t>(num_threads) * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
}

// Drops the 128-byte L2 line at `line` without writing it back: a weak write of undefined data, so
// it must follow every read of the line and precede the release that hands the line to a writer.
__device__ __forceinline__ void discard_l2_line(const void* line) {
  asm volatile("discard.global.L2 [%0], 128;" ::"l"(line) : "memory");
}

// Discards every 128-byte line of rows [0, n) that lies wholly inside a row, spread over a group's
// threads; row(j) gives row j's base and `row_bytes` its length.
template <typename Row>
__device__ __forceinline__ void group_discard_rows(int n, int64_t row_bytes, int thread, int num_threads, Row row) {
  const int lines = static_cast<int>(row_bytes / 128);
  for (int e = thread; e < n * lines; e += num_threads) {
    const int j = e / lines;
    const uintptr_t base = reinterpret_cast<uintptr_t>(row(j));
    const uintptr_t first = (base + 127) & ~uintptr_t{127};
    const uintptr_t line = first + static_cast<uintptr_t>(e - j * lines) * 128;
    if (line + 128 <= base + row_bytes) discard_l2_line(reinterpret_cast<const void*>(line));
  }
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Named barrier over `num_threads` threads of a warp group; id 0 is __syncthreads.
__device__ __forceinline__ void group_barrier(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x & 31); }

// For e in [0, count), store(e, load(e)) across a group, with kUnroll loads in flight per thread
// before their stores: per-row metadata (ids, weights, scales) would otherwise cost one memory
// round trip per element.
template <int kUnroll, typename Load, typename Store>
__device__ __forceinline__ void group_transfer(int count, int thread, int num_threads, Load load, Store store) {
  for (int base = thread; base < count; base += num_threads * kUnroll) {
    decltype(load(0)) v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * num_threads < count) v[u] = load(base + u * num_threads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * num_threads < count) store(base + u * num_threads, v[u]);
  }
}

// Copies `num_int4` 16-byte words with the whole warp, kUnroll loads in flight per lane before
// their stores, the last round predicated: a short row is a few rounds, so a tail done one word at
// a time would cost as much as the rounds before it. Load and store policies are template
// functors so the same loop serves every path.
template <int kUnroll, typename Load, typename Store>
__device__ __forceinline__ void warp_copy(int num_int4, Load load, Store store) {
  group_transfer<kUnroll>(num_int4, lane_id(), 32, load, store);
}

// Bit d set when token t is routed to rank d. All R loads are issued before any is used, so a
// batch's routing costs one memory round trip instead of R.
__device__ __forceinline__ unsigned valid_token_flags(const bool* is_token_in_rank, int t, bool valid, int num_ranks) {
  unsigned flags = 0;
  if (!valid) return 0;
  const bool* row = is_token_in_rank + static_cast<int64_t>(t) * num_ranks;
#pragma unroll
  for (int d = 0; d < kMaxNvlRanks; ++d)
    if (d < num_ranks && row[d]) flags |= 1u << d;
  return flags;
}

// Warp groups serve only the remote peers: group g talks to peer g, skipping this rank.
__device__ __forceinline__ int peer_of_group(int group, int rank) { return group < rank ? group : group + 1; }

// Copies n rows of `row_int4` 16-byte words with every thread of a group: the (row, word) space is
// flattened, so a chunk of short rows still keeps kUnroll loads per thread in flight. `src(j)` and
// `dst(j)` give row j's base; `load`/`store` choose the cache policy.
template <int kUnroll, typename SrcRow, typename DstRow, typename Load, typename Store>
__device__ __forceinline__ void group_copy_rows(int n, int row_int4, int thread, int num_threads, SrcRow src, DstRow dst,
                                                Load load, Store store) {
  const int total = n * row_int4;
  for (int base = thread; base < total; base += num_threads * kUnroll) {
    int4 v[kUnroll];
    int row[kUnroll], word[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int e = base + u * num_threads;
      row[u] = e / row_int4;
      word[u] = e - row[u] * row_int4;
      if (e < total) v[u] = load(src(row[u]) + word[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * num_threads < total) store(dst(row[u]) + word[u], v[u]);
  }
}

}  // namespace moelink::kernels
