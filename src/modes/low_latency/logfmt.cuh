#pragma once
// moelink's LogFMT: the lossy combine format of low_latency_combine(use_logfmt=True). The format,
// its bound and its edge cases are documented once, in tests/reference/logfmt_reference.py (the
// reference the GPU suite checks this code against); in short, per group of 128 values in its own
// 256-byte region: either 10-bit log codes (a sign and 9 bits) under an 8-byte header of lmin and
// step, 168 bytes sent instead of 256, or the bf16 values (groups with a NaN or an infinity). The
// header's lowest bit, which is also the lowest mantissa bit of a bf16 group's value 0, says which.
#include <cuda_bf16.h>

#include <cstdint>

#include "common/bf16x8.cuh"
#include "common/primitives.cuh"

namespace moelink::low_latency::logfmt {

inline constexpr int kGroupBytes = 256;  // a group keeps the bf16 group's region: the slot is unchanged
inline constexpr int kFlushOctaves = 12;
inline constexpr int kLevels = 511;       // non-zero magnitude codes

// Reductions over the 16 lanes of a half-warp (xor offsets below 16 stay in the half).
__device__ __forceinline__ float half_max(float v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float half_min(float v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ int half_or(int v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

using kernels::unpack_bf16x8;

// One group, by the 16 lanes of a half-warp: lane `sub` holds values 8 sub .. 8 sub + 7 as one int4
// of bf16. Every lane of the warp must call it (the reductions are shuffles); only lanes with
// `store` write, into the group's region at `dst`.
__device__ __forceinline__ void encode(const int4& v, int sub, bool store, char* dst) {
  float f[8];
  unpack_bf16x8(v, f);
  int bad = 0;
  float amax = 0.f, amin = __int_as_float(0x7f800000);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float a = fabsf(f[i]);
    bad |= !isfinite(f[i]);
    amax = fmaxf(amax, a);
    if (a > 0.f) amin = fminf(amin, a);
  }
  bad = half_or(bad);
  amax = half_max(amax);
  amin = half_min(amin);
  if (!store) return;
  if (bad) {
    int4 w = v;
    if (sub == 0) {
      unsigned first = static_cast<unsigned>(w.x) & 0xffffu;
      if (isnan(f[0])) first = (first & 0x8000u) | 0x7fc0u;  // clearing the marker bit must leave a NaN
      w.x = static_cast<int>((static_cast<unsigned>(w.x) & 0xffff0000u) | (first & 0xfffeu));
    }
    reinterpret_cast<int4*>(dst)[sub] = w;
    return;
  }
  unsigned codes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  float lmin = 0.f, step = 0.f;
  if (amax > 0.f) {
    const float lmax = log2f(amax);
    const float floor_l = lmax - static_cast<float>(kFlushOctaves);
    lmin = __uint_as_float(__float_as_uint(fmaxf(log2f(amin), floor_l)) | 1u);
    step = __fdiv_rn(lmax - lmin, static_cast<float>(kLevels - 1));
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float a = fabsf(f[i]);
      if (a > 0.f) {
        const float l = log2f(a);
        if (l >= floor_l) {
          const float q = step > 0.f ? fminf(fmaxf(rintf(__fdiv_rn(l - lmin, step)), 0.f), kLevels - 1.f) : 0.f;
          codes[i] = (static_cast<unsigned>(q) + 1u) | (f[i] < 0.f ? 1u << 9 : 0u);
        }
      }
    }
  }
  if (sub == 0) reinterpret_cast<uint2*>(dst)[0] = make_uint2(__float_as_uint(lmin) | 1u, __float_as_uint(step));
  uint2 low;
  low.x = (codes[0] & 0xffu) | (codes[1] & 0xffu) << 8 | (codes[2] & 0xffu) << 16 | (codes[3] & 0xffu) << 24;
  low.y = (codes[4] & 0xffu) | (codes[5] & 0xffu) << 8 | (codes[6] & 0xffu) << 16 | (codes[7] & 0xffu) << 24;
  reinterpret_cast<uint2*>(dst + 8)[sub] = low;
  unsigned high = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) high |= ((codes[i] >> 8) & 3u) << (2 * i);
  reinterpret_cast<uint16_t*>(dst + 136)[sub] = static_cast<uint16_t>(high);
}

// What a receiver loads for one lane's word (8 values) of a group, all at once before any decode.
struct Word {
  uint2 header, low;
  unsigned high;
};

__device__ __forceinline__ Word load(const char* group, int sub) {
  Word w;
  asm volatile("ld.global.cg.v2.u32 {%0, %1}, [%2];" : "=r"(w.header.x), "=r"(w.header.y) : "l"(group));
  asm volatile("ld.global.cg.v2.u32 {%0, %1}, [%2];" : "=r"(w.low.x), "=r"(w.low.y) : "l"(group + 8 + 8 * sub));
  unsigned short h;
  asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(h) : "l"(group + 136 + 2 * sub));
  w.high = h;
  return w;
}

// The 8 values of lane `sub`'s word of the group at `group`, from what load() fetched (a bf16 group
// loads its word here, once, as such groups are rare).
__device__ __forceinline__ void decode(const Word& w, const char* group, int sub, float (&f)[8]) {
  if (!(w.header.x & 1u)) {
    unpack_bf16x8(kernels::ld_cg(reinterpret_cast<const int4*>(group) + sub), f);
    return;
  }
  const float lmin = __uint_as_float(w.header.x), step = __uint_as_float(w.header.y);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const unsigned low = ((i < 4 ? w.low.x : w.low.y) >> (8 * (i % 4))) & 0xffu;
    const unsigned code = low | ((w.high >> (2 * i)) & 3u) << 8;
    const unsigned magnitude = code & 0x1ffu;
    const float value = magnitude ? exp2f(__fadd_rn(lmin, __fmul_rn(static_cast<float>(magnitude - 1), step))) : 0.f;
    f[i] = (code & (1u << 9)) ? -value : value;
  }
}

}  // namespace moelink::low_latency::logfmt
