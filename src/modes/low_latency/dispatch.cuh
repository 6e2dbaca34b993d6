// Low-latency dispatch over the NVLink window: every (token, top-k slot) goes straight into a slot
// of its expert's rank's receive area, and each (expert, source) block is signalled with its count.
//
// Protocol (any grid; every block does both halves in a plain call):
//   Send half. Every block counts this rank's (token, slot) pairs per expert (a shared-memory
//     histogram of topk_idx, so each block knows every expert's total). Warps take tokens; for each
//     slot the warp claims the next row of that expert's block (an atomic on this rank's counter),
//     writes the 16-byte header (the token's index) and the row (bf16, or cast to fp8 on the way:
//     per 128 values scale = max(amax, 1e-4) / 448, rounded up to a power of two with
//     round_scale) into the peer's slot through the window, then counts the row done. The warp
//     that signals an expert waits until all its rows are done (this rank's own writes only), then
//     writes the peer's count signal for (expert, this rank), tagged with the call's sequence
//     number, with release semantics, and resets the counters for the next call.
//   Receive half. Blocks take local experts, several at a time; one thread per (expert, source)
//     waits (bounded) for that source's signal of this call (with shrink, a masked source is
//     skipped and one that never answers is masked), the block lays each expert's sources' blocks
//     out back to back (layout_range, recv_count), and its warps copy the rows, their source tokens
//     (src_info) and scales (column-major; packed UE8M0 bytes with use_ue8m0) out of the receive
//     area.
//   The call's number is the device counter + 1 (contract.hpp), read by every block; the last block
//   stores it back and into the state tensor. Outputs are poisoned when a fault is known or a
//   block gives up.
//   The put path (W::kPuts, built in the NVSHMEM plugin; peers without a mapped region): the warp
//     writes the token's message once into this rank's staging area (send(put.staging_area) + t *
//     stride: the send area that is not the next combine's zero-copy buffer) and puts it to each
//     such destination with put-with-signal, the signal an ADD of 1 on the destination's row
//     counter for (expert, this rank) (contract.hpp, PutSection). The signalling lane puts this
//     rank's running total of rows sent to that block (tagged with the call's number), a fence,
//     then the count word; the receiver, once it has the count, waits until the row counter
//     reaches the total. Every thread quiets its puts at the end of the send half, before the last
//     block publishes the number.
//
// The kernels' source, compiled twice: dispatch.cu (libmoelink, window::Stores) and
// window/nvshmem/low_latency.cu (the plugin, window::Puts).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "common/launch.cuh"
#include "common/waits.cuh"
#include "modes/low_latency/call.cuh"
#include "modes/low_latency/contract.hpp"
#include "window/device.cuh"

namespace moelink::low_latency {

using namespace kernels;

namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kSendUnroll = 8;  // loads in flight per lane in a bf16 send
constexpr int kFp8SendUnroll = 4;  // in an fp8 send (each load is quantized in registers)
constexpr int kRecvUnroll = 8;  // in a receive
constexpr int kRecvBatch = 16;  // local experts a block lays out at once, before it copies their rows

__device__ __forceinline__ float block_scale(float amax, bool round_scale) {
  // Times the reciprocal, as the reference and deep_ep compute it (a division differs in the last bit).
  float scale = fmaxf(amax, 1e-4f) * (1.0f / 448.0f);
  if (round_scale) {
    // The next power of two at or above the scale, from its bits (exact, as the reference does).
    unsigned bits = __float_as_uint(scale);
    unsigned exponent = (bits >> 23) & 0xffu;
    if (bits & 0x7fffffu) ++exponent;
    scale = __uint_as_float(exponent << 23);
  }
  return scale;
}

// Lanes 16h..16h+15 of the warp hold one 128-value block (8 bf16 each); returns the block's scale
// and writes the lane's 8 quantized bytes.
__device__ __forceinline__ float quantize_8(const int4& v, bool round_scale, uint2* out) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
  float f[8];
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
    amax = fmaxf(amax, fmaxf(fabsf(p.x), fabsf(p.y)));
  }
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float scale = block_scale(amax, round_scale);
  uint16_t q[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    q[i] = __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(f[2 * i], scale), __fdiv_rn(f[2 * i + 1], scale)),
                                    __NV_SATFINITE, __NV_E4M3);
  out->x = static_cast<uint32_t>(q[0]) | (static_cast<uint32_t>(q[1]) << 16);
  out->y = static_cast<uint32_t>(q[2]) | (static_cast<uint32_t>(q[3]) << 16);
  return scale;
}

// One warp sends token t to each of its top-k experts. On the put path dsts[k] of a put destination
// is the slot's symmetric address here (the put's target), and bit k of `puts` says so.
template <class W, bool kFp8>
__device__ void send_token(const DispatchArgs& a, int t, int parity, unsigned masked, char* (&dsts)[kMaxTopK],
                           int* experts) {
  const Layout& L = a.layout;
  const int lane = lane_id(), K = a.num_topk, H = L.hidden;
  const long long e = lane < K ? a.topk_idx[static_cast<int64_t>(t) * K + lane] : -1;
  const bool duplicate = names_earlier_slot(e, L.num_experts, lane);
  bool put = false;
  if (lane < K) {
    char* dst = nullptr;
    int expert = -1;
    const long long where = static_cast<long long>(t) * kernels::kMaxTopK + lane;
    if (e < -1 || e >= L.num_experts) report_local(a.err, kErrLowLatencyBadExpertId, 0, where);
    if (duplicate) report_local(a.err, kErrLowLatencyDuplicateExpert, 0, where);
    // An expert on a masked rank (shrink) gets nothing: it is gone.
    if (e >= 0 && e < L.num_experts && !duplicate && !is_masked(masked, static_cast<int>(e) / L.num_local_experts)) {
      expert = static_cast<int>(e);
      const int r = expert / L.num_local_experts, le = expert % L.num_local_experts;
      const int slot = atomicAdd(&a.self->dispatch_slots[expert], 1);
      // More than M rows for one expert only when a token names it twice: the extra rows are
      // dropped (still counted done, so the expert's signal goes out) and reported.
      if (slot < L.max_tokens) {
        dst = window::peer_address_in(a.regions, r, L.dispatch_slot(parity, le, a.rank, slot));
        if constexpr (W::kPuts) {
          if (dst == nullptr) {
            dst = a.regions[a.rank] + L.dispatch_slot(parity, le, a.rank, slot);
            put = true;
          }
        }
        if (!put) *reinterpret_cast<int4*>(dst) = make_int4(t, 0, 0, 0);
      } else {
        report_local(a.err, kErrLowLatencyTooManyRows, 0, expert);
      }
    }
    dsts[lane] = dst;
    experts[lane] = expert;
  }
  __syncwarp();
  unsigned puts = 0;
  char* staging = nullptr;  // the message, once, for every put destination
  if constexpr (W::kPuts) {
    puts = __ballot_sync(0xffffffffu, put);
    if (puts != 0) {
      staging = a.regions[a.rank] + L.send(a.put.staging_area) + static_cast<int64_t>(t) * L.dispatch_stride;
      if (lane == 0) *reinterpret_cast<int4*>(staging) = make_int4(t, 0, 0, 0);
    }
  }
  const auto stores_to = [&](int k) { return dsts[k] != nullptr && !(W::kPuts && ((puts >> k) & 1u)); };
  const int4* row = static_cast<const int4*>(a.x) + static_cast<int64_t>(t) * (H / 8);
  // A row is short for one warp: the latency of each load, not bandwidth, bounds it, so every lane
  // keeps several loads in flight before it stores to the K destinations.
  if constexpr (!kFp8) {
    warp_copy<kSendUnroll>(
        H / 8, [&](int i) { return ld_nc_stream(row + i); },
        [&](int i, const int4& v) {
          if constexpr (W::kPuts) {
            if (staging != nullptr) reinterpret_cast<int4*>(staging + 16)[i] = v;
          }
          for (int k = 0; k < K; ++k)
            if (stores_to(k)) reinterpret_cast<int4*>(dsts[k] + 16)[i] = v;
        });
  } else {
    // Two 128-value blocks per warp step: lanes 0-15 take block b, lanes 16-31 block b + 1, and
    // kFp8SendUnroll steps' loads go out first. Every lane runs every step (the amax shuffles need the
    // whole warp); a missing block is zeros and stored nowhere.
    const int half = lane / 16, sub = lane % 16;
    for (int b0 = 0; b0 < L.num_scales; b0 += 2 * kFp8SendUnroll) {
      int4 v[kFp8SendUnroll];
#pragma unroll
      for (int u = 0; u < kFp8SendUnroll; ++u) {
        const int b = b0 + 2 * u + half;
        v[u] = b < L.num_scales ? ld_nc_stream(row + b * 16 + sub) : make_int4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kFp8SendUnroll; ++u) {
        const int b = b0 + 2 * u + half;
        uint2 q;
        const float scale = quantize_8(v[u], a.round_scale, &q);
        if (b >= L.num_scales) continue;
        if constexpr (W::kPuts) {
          if (staging != nullptr) {
            reinterpret_cast<uint2*>(staging + 16 + b * kScaleBlock)[sub] = q;
            if (sub == 0) reinterpret_cast<float*>(staging + 16 + H)[b] = scale;
          }
        }
        for (int k = 0; k < K; ++k) {
          if (!stores_to(k)) continue;
          reinterpret_cast<uint2*>(dsts[k] + 16 + b * kScaleBlock)[sub] = q;
          if (sub == 0) reinterpret_cast<float*>(dsts[k] + 16 + H)[b] = scale;
        }
      }
    }
  }
  // Every lane's writes land before the expert's count moves (the signalling warp releases it):
  // the warp barrier orders them before lane 0's fence, whose cumulativity covers them.
  __syncwarp();
  if constexpr (W::kPuts) {
    // The staged message is whole (the barrier above orders the lanes' writes before the warp's
    // put); each put signals its own row counter, so no fence of another warp is needed for it.
    const int64_t bytes = 16 + (kFp8 ? H + 4LL * L.num_scales : 2LL * H);
    for (unsigned left = puts; left != 0; left &= left - 1) {
      const int k = __ffs(left) - 1, expert = experts[k];
      const int r = expert / L.num_local_experts, le = expert % L.num_local_experts;
      W::put_rows_warp(dsts[k], staging, bytes, &a.put.state->dispatch_rows[parity][le * L.num_ranks + a.rank],
                       a.put.pe[r]);
    }
  }
  if (lane == 0) {
    __threadfence_system();
    for (int k = 0; k < K; ++k)
      if (experts[k] >= 0) atomicAdd(&a.self->dispatch_done[experts[k]], 1);
  }
  __syncwarp();
}

template <class W, bool kFp8>
__device__ void send_half(const DispatchArgs& a, Epoch seq, int parity, unsigned masked, int* expected) {
  const Layout& L = a.layout;
  const int warp = threadIdx.x / 32, lane = lane_id();
  const int E = L.num_experts, K = a.num_topk;
  for (int e = threadIdx.x; e < E; e += blockDim.x) expected[e] = 0;
  __syncthreads();
  // Rows each expert gets from this rank: valid ids, a token's repeats of one expert not counted
  // (send_token skips them, and the count must be the rows written).
  for (int i = threadIdx.x; i < a.num_tokens * K; i += blockDim.x) {
    const long long e = a.topk_idx[i];
    if (e < 0 || e >= E || is_masked(masked, static_cast<int>(e) / L.num_local_experts)) continue;
    bool repeat = false;
    for (int k = i - i % K; k < i; ++k) repeat |= a.topk_idx[k] == e;
    if (!repeat) atomicAdd(&expected[e], 1);
  }
  __syncthreads();
  __shared__ char* dsts[kWarps][kMaxTopK];
  __shared__ int experts[kWarps][kMaxTopK];
  const int global_warp = blockIdx.x * kWarps + warp, num_warps = gridDim.x * kWarps;
  for (int t = global_warp; t < a.num_tokens; t += num_warps)
    send_token<W, kFp8>(a, t, parity, masked, dsts[warp], experts[warp]);
  // Signal each expert once all of this rank's rows to it are written.
  for (int e = global_warp; e < E; e += num_warps) {
    if (lane != 0 || is_masked(masked, e / L.num_local_experts)) continue;
    const int want = expected[e];  // rows counted done, dropped ones included
    int* done = &a.self->dispatch_done[e];
    if (!wait_until([&] { return ld_acquire_sys(done) >= want; }, a.err, a.err.rank, kStepLocal, e, want)) continue;
    const int r = e / L.num_local_experts, le = e % L.num_local_experts;
    a.self->dispatch_slots[e] = 0;
    *done = 0;
    if constexpr (W::kPuts) {
      if (a.regions[r] == nullptr) {
        // The rows' own signals say when they have landed; the total (every row this rank has put
        // to the block, this call's included: the rows not dropped for slot overflow) says how many
        // to wait for, and lands before the count (the fence orders this lane's two puts to r).
        const int rows = min(want, L.max_tokens);
        unsigned long long* sent = &a.put.state->dispatch_sent[parity][e];
        const unsigned long long total = *sent + static_cast<unsigned long long>(rows);
        *sent = total;
        W::put_u64(&a.put.state->dispatch_target[parity][le * L.num_ranks + a.rank], put_target(seq, total), a.put.pe[r]);
        W::fence();
        W::put_int(reinterpret_cast<int*>(a.regions[a.rank] + L.count_signal(parity, le, a.rank)),
                   static_cast<int>(signal_word(seq, rows)), a.put.pe[r]);
        continue;
      }
    }
    window::signal(reinterpret_cast<int*>(window::peer_address_in(a.regions, r, L.count_signal(parity, le, a.rank))),
                   static_cast<int>(signal_word(seq, min(want, L.max_tokens))));
  }
  // The staging area is staged into again by a later call: every put of this half is complete (its
  // source consumed) before the last block publishes the number.
  if constexpr (W::kPuts) {
    if (a.put.any) W::quiet();
  }
}

template <class W, bool kFp8>
__device__ void recv_half(const DispatchArgs& a, Epoch seq, int parity, unsigned masked) {
  const Layout& L = a.layout;
  const int R = L.num_ranks, RM = R * L.max_tokens, H = L.hidden, S = L.num_scales;
  const int warp = threadIdx.x / 32, lane = lane_id();
  // A block takes its local experts (le = block, block + grid, ...) kRecvBatch at a time: first
  // every (expert, source) signal of the batch, one thread each, then all its warps copy the
  // batch's rows. One expert at a time would leave most warps idle (an expert gets few rows) and
  // put each expert's signal wait and layout in series with the copies.
  __shared__ int counts[kRecvBatch][kMaxNvlRanks], begins[kRecvBatch][kMaxNvlRanks + 1];
  __shared__ int first_row[kRecvBatch + 1];
  __shared__ bool failed;
  char* own = a.regions[a.rank];
  const int mine = blockIdx.x < L.num_local_experts ? (L.num_local_experts - 1 - blockIdx.x) / gridDim.x + 1 : 0;
  for (int batch = 0; batch < mine; batch += kRecvBatch) {
    const int n = min(kRecvBatch, mine - batch);
    const auto expert_of = [&](int i) { return blockIdx.x + (batch + i) * gridDim.x; };
    if (threadIdx.x == 0) failed = false;
    __syncthreads();
    for (int p = threadIdx.x; p < n * R; p += blockDim.x) {
      const int i = p / R, s = p % R, le = expert_of(i);
      const int* word = reinterpret_cast<const int*>(own + L.count_signal(parity, le, s));
      const uint64_t start = global_timer_ns();
      // A masked source (shrink) sends nothing and is not waited for; one that never answers is
      // masked now and counts as empty.
      const PeerWait got = is_masked(masked, s) ? kPeerMasked
                                                : wait_peer(a, s, kStepDispatchRecv, le, static_cast<long long>(seq), [&] {
                                                    return signal_is_for(static_cast<uint32_t>(ld_acquire_sys(word)), seq);
                                                  });
      if (got == kPeerFailed) failed = true;
      int count = got == kPeerArrived ? signal_value(static_cast<uint32_t>(ld_volatile(word))) : 0;
      if (got == kPeerArrived && (count < 0 || count > L.max_tokens)) {
        // Not a count any sender writes: a word left by another layout (contract.hpp).
        report_fault(a.err, kErrBadSignal, s, kStepDispatchRecv, le, count);
        failed = true;
        count = 0;
      }
      if constexpr (W::kPuts) {
        // A put source: the count says how many rows; its rows' signals say they have landed, once
        // the row counter reaches the source's running total for this call (no state kept here).
        if (got == kPeerArrived && !failed && a.regions[s] == nullptr) {
          const unsigned long long* target = &a.put.state->dispatch_target[parity][le * R + s];
          const unsigned long long* rows = &a.put.state->dispatch_rows[parity][le * R + s];
          const PeerWait landed = wait_peer(a, s, kStepDispatchRecv, le, static_cast<long long>(seq), [&] {
            const unsigned long long word = ld_acquire_sys(target);
            return put_target_is_for(word, seq) && ld_acquire_sys(rows) >= put_target_total(word);
          });
          if (landed == kPeerFailed) failed = true;
          if (landed != kPeerArrived) count = 0;
        }
      }
      counts[i][s] = count;
      if (a.wait_recv_cost_stats != nullptr)
        atomicAdd(reinterpret_cast<unsigned long long*>(&a.wait_recv_cost_stats[s]), global_timer_ns() - start);
    }
    __syncthreads();
    if (failed) return;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const int le = expert_of(i);
      int acc = 0;
      for (int s = 0; s < R; ++s) {
        begins[i][s] = acc;
        a.layout_range[le * R + s] = (static_cast<long long>(acc) << 32) | counts[i][s];
        acc += counts[i][s];
      }
      begins[i][R] = acc;
      a.recv_count[le] = acc;
      if (a.cumulative_recv_stats != nullptr) atomicAdd(&a.cumulative_recv_stats[le], acc);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      first_row[0] = 0;
      for (int i = 0; i < n; ++i) first_row[i + 1] = first_row[i] + begins[i][R];
    }
    __syncthreads();
    for (int flat = warp; flat < first_row[n]; flat += kWarps) {
      int i = 0;
      while (flat >= first_row[i + 1]) ++i;
      const int le = expert_of(i), row = flat - first_row[i];
      int s = 0;
      while (row >= begins[i][s + 1]) ++s;
      const char* msg = own + L.dispatch_slot(parity, le, s, row - begins[i][s]);
      const int64_t out_row = static_cast<int64_t>(le) * RM + row;
      if (lane == 0) a.src_info[out_row] = ld_cg(reinterpret_cast<const int4*>(msg)).x;
      const int4* payload = reinterpret_cast<const int4*>(msg + 16);
      int4* out = reinterpret_cast<int4*>(static_cast<char*>(a.recv_x) + out_row * (kFp8 ? H : 2 * H));
      warp_copy<kRecvUnroll>(
          kFp8 ? H / 16 : H / 8, [&](int j) { return ld_cg(payload + j); }, [&](int j, const int4& v) { out[j] = v; });
      if constexpr (kFp8) {
        const float* scales = reinterpret_cast<const float*>(msg + 16 + H);
        // Column-major in the last two dims: scale g of row r at [le][g][r].
        if (!a.ue8m0) {
          float* dst = static_cast<float*>(a.recv_scales) + static_cast<int64_t>(le) * S * RM;
          for (int g = lane; g < S; g += 32) dst[static_cast<int64_t>(g) * RM + row] = __ldcg(scales + g);
        } else {
          int* dst = static_cast<int*>(a.recv_scales) + static_cast<int64_t>(le) * (S / kUe8m0PerInt) * RM;
          for (int g = lane; g < S / kUe8m0PerInt; g += 32) {
            unsigned packed = 0;
#pragma unroll
            for (int j = 0; j < kUe8m0PerInt; ++j)
              packed |= ((__float_as_uint(__ldcg(scales + g * kUe8m0PerInt + j)) >> 23) & 0xffu) << (8 * j);
            dst[static_cast<int64_t>(g) * RM + row] = static_cast<int>(packed);
          }
        }
      }
    }
    __syncthreads();
  }
}

template <class W, bool kFp8>
__global__ void __launch_bounds__(kThreads) dispatch_kernel(DispatchArgs a) {
  __shared__ int expected[kMaxExperts];
  run_call<W>(a, [&](Epoch seq, int parity, unsigned masked) { send_half<W, kFp8>(a, seq, parity, masked, expected); },
              [&](Epoch seq, int parity, unsigned masked) { recv_half<W, kFp8>(a, seq, parity, masked); });
}

// The two entry points of each build of these kernels (libmoelink's over stores, the NVSHMEM
// plugin's over puts). Blocks per SM are asked once per process: a dispatch is a decode-step call,
// and two occupancy queries per call are host time it does not need.
template <class W>
int dispatch_blocks_per_sm_of() {
  static const int blocks =
      std::min(max_blocks_per_sm(reinterpret_cast<const void*>(&dispatch_kernel<W, false>), kThreads, 0),
               max_blocks_per_sm(reinterpret_cast<const void*>(&dispatch_kernel<W, true>), kThreads, 0));
  return blocks;
}

template <class W>
void launch_dispatch_of(const DispatchArgs& a, int blocks, cudaStream_t stream, const char* name) {
  const LaunchShape shape{blocks, kThreads, 0};
  if (a.fp8)
    launch(name, &dispatch_kernel<W, true>, shape, stream, a);
  else
    launch(name, &dispatch_kernel<W, false>, shape, stream, a);
}

}  // namespace

}  // namespace moelink::low_latency

