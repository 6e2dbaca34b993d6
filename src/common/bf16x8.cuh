#pragma once
// Eight bf16 values as one int4 (a 16-byte load or store) to and from floats: the unit the combine
// kernels sum in.
#include <cuda_bf16.h>

namespace moelink::kernels {

__device__ __forceinline__ void unpack_bf16x8(const int4& v, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

__device__ __forceinline__ int4 pack_bf16x8(const float (&f)[8]) {
  int4 out;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return out;
}

}  // namespace moelink::kernels
