// Low-latency combine over the NVLink window: each expert's output row goes straight back into its
// token's rank, which sums a token's rows weighted by its top-k weights.
//
// Protocol (any grid; every block does both halves in a plain call):
//   Send half (the experts' side). Every block lays out the dispatch's blocks from its handle
//     (layout_range: per local expert and source, where the source's rows start and how many).
//     Warps take rows: row j of local expert le came from source s's token src_info[le][j]; it is
//     written to slot [expert][token] of s's receive area, then counted done per (le, s). The warp
//     that signals (le, s) waits until its rows are done (this rank's own writes), then writes s's
//     signal for the expert, tagged with the call's number, with release semantics.
//   Receive half (the tokens' side). Warps take this rank's tokens (a slice of a token's row each
//     when there are warps to spare); lane k waits (bounded) for the signal of slot k's expert,
//     then the warp sums the K rows in float32, weighted, and writes one bf16 row (slice). A slot
//     with no expert (-1) adds nothing.
//   Numbering, parities and poisoning as in dispatch.cuh.
//   The put path (W::kPuts; dispatch.cuh): a row for a rank without a mapped region is put from
//     this rank's send area with an ADD on that rank's row counter for the expert: from x itself
//     when x lies in the send area (zero-copy), else from a copy (or the LogFMT encoding) staged at
//     the row's own place in this combine's own zero-copy area (put.staging_area). The signalling
//     lane puts this rank's running total of rows sent to (expert, that rank) (PutSection), a
//     fence, then the usual signal word; the receiver waits for the signal, then for the counter
//     to reach the total. Puts are quieted at the end of the send half, as in dispatch.
//
// The kernels' source, compiled twice: combine.cu (libmoelink) and window/nvshmem/low_latency.cu.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "common/launch.cuh"
#include "common/waits.cuh"
#include "modes/low_latency/call.cuh"
#include "modes/low_latency/contract.hpp"
#include "modes/low_latency/logfmt.cuh"
#include "window/device.cuh"

namespace moelink::low_latency {

using namespace kernels;

namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kSendUnroll = 8;  // loads in flight per lane when a row goes back
constexpr int kMaxWarpsPerToken = 4;  // warps that share one token's sum, each a slice of its row
constexpr int kLoadGroup = 8;  // top-k rows' words loaded together in a sum
constexpr int kLogFmtUnroll = 4;  // LogFMT send: group steps whose loads go out together
// What an expert's combine signal carries: the format its rows are in.
constexpr int kFormatBf16 = 0, kFormatLogFmt = 1;

__device__ __forceinline__ int block_begin(long long range) { return static_cast<int>(range >> 32); }
__device__ __forceinline__ int block_count(long long range) { return static_cast<int>(range & 0xffffffffLL); }

template <class W, bool kLogFmt>
__device__ void send_half(const CombineArgs& a, Epoch seq, int parity, unsigned masked) {
  const Layout& L = a.layout;
  const int R = L.num_ranks, RM = R * L.max_tokens, H = L.hidden, E_local = L.num_local_experts;
  const int warp = threadIdx.x / 32, lane = lane_id();
  const int global_warp = blockIdx.x * kWarps + warp, num_warps = gridDim.x * kWarps;
  // Rows of local expert le are [0, total[le]); prefix[le] numbers them across experts. The
  // handle's ranges are read once, in parallel (one thread per expert), into shared memory: a
  // serial walk over E_local x R ranges from global memory cost more than the rows' copies.
  __shared__ int prefix[kMaxExperts + 1];
  __shared__ int begin_of[kMaxExperts];  // [le * R + s]: where source s's rows of le start
  for (int le = threadIdx.x; le < E_local; le += blockDim.x) {
    int total = 0;
    for (int s = 0; s < R; ++s) {
      const long long range = a.layout_range[le * R + s];
      begin_of[le * R + s] = block_begin(range);
      total += block_count(range);
    }
    prefix[le + 1] = total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    prefix[0] = 0;
    for (int le = 0; le < E_local; ++le) prefix[le + 1] += prefix[le];
  }
  __syncthreads();
  for (int idx = global_warp; idx < prefix[E_local]; idx += num_warps) {
    int lo = 0, hi = E_local - 1;  // the expert whose rows hold idx: prefix[lo] <= idx < prefix[lo + 1]
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (prefix[mid] <= idx) lo = mid; else hi = mid - 1;
    }
    const int le = lo;
    const int row = idx - prefix[le];
    int s = 0;
    while (s + 1 < R && row >= begin_of[le * R + s + 1]) ++s;
    if (is_masked(masked, s)) continue;  // shrink: the token's rank is gone
    const int token = a.src_info[static_cast<int64_t>(le) * RM + row];
    const int expert = a.rank * E_local + le;
    char* dst = window::peer_address_in(a.regions, s, L.combine_slot(parity, expert, token));
    const int4* src = static_cast<const int4*>(a.x) + (static_cast<int64_t>(le) * RM + row) * (H / 8);
    char* put_to = nullptr;  // the put path: the slot's symmetric address here, dst the staged row
    if constexpr (W::kPuts) {
      if (dst == nullptr) {
        put_to = a.regions[a.rank] + L.combine_slot(parity, expert, token);
        dst = a.put.x_in_send_area && !kLogFmt
                  ? nullptr
                  : a.regions[a.rank] + L.send(a.put.staging_area) + (static_cast<int64_t>(le) * RM + row) * L.combine_stride;
      }
    }
    if constexpr (!kLogFmt) {
      // A row is short for one warp: several loads per lane in flight, not one at a time.
      if (!W::kPuts || dst != nullptr)
        warp_copy<kSendUnroll>(
            H / 8, [&](int i) { return ld_nc_stream(src + i); },
            [&](int i, const int4& v) { reinterpret_cast<int4*>(dst)[i] = v; });
    } else {
      // Two groups per warp step (lanes 0-15 group g, lanes 16-31 group g + 1), kLogFmtUnroll steps'
      // loads first; every lane runs every step (the encoder's reductions are shuffles).
      const int half = lane / 16, sub = lane % 16, S = L.num_scales;
      for (int g0 = 0; g0 < S; g0 += 2 * kLogFmtUnroll) {
        int4 v[kLogFmtUnroll];
#pragma unroll
        for (int u = 0; u < kLogFmtUnroll; ++u) {
          const int g = g0 + 2 * u + half;
          v[u] = g < S ? ld_nc_stream(src + g * 16 + sub) : make_int4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kLogFmtUnroll; ++u) {
          const int g = g0 + 2 * u + half;
          logfmt::encode(v[u], sub, g < S, dst + static_cast<int64_t>(g) * logfmt::kGroupBytes);
        }
      }
    }
    // The warp barrier orders every lane's writes before lane 0's fence (see dispatch.cuh), and, on
    // the put path, the staged row before the warp's put.
    __syncwarp();
    if constexpr (W::kPuts) {
      if (put_to != nullptr)
        W::put_rows_warp(put_to, dst != nullptr ? static_cast<const void*>(dst) : static_cast<const void*>(src),
                         2LL * H, &a.put.state->combine_rows[parity][expert], a.put.pe[s]);
    }
    if (lane == 0) {
      __threadfence_system();
      atomicAdd(&a.self->combine_done[le * R + s], 1);
    }
  }
  for (int pair = global_warp; pair < E_local * R; pair += num_warps) {
    if (lane != 0 || is_masked(masked, pair % R)) continue;
    const int le = pair / R, s = pair % R;
    const int want = block_count(a.layout_range[pair]);
    int* done = &a.self->combine_done[pair];
    if (!wait_until([&] { return ld_acquire_sys(done) >= want; }, a.err, a.err.rank, kStepLocal, pair, want)) continue;
    *done = 0;
    if constexpr (W::kPuts) {
      if (a.regions[s] == nullptr) {
        const int expert = a.rank * E_local + le;
        // Every row of this block went by a put (none is dropped on this side): the running total
        // lands before the signal that sends the receiver to read it.
        unsigned long long* sent = &a.put.state->combine_sent[parity][pair];
        const unsigned long long total = *sent + static_cast<unsigned long long>(want);
        *sent = total;
        W::put_u64(&a.put.state->combine_target[parity][expert], put_target(seq, total), a.put.pe[s]);
        W::fence();
        W::put_int(reinterpret_cast<int*>(a.regions[a.rank] + L.combine_signal(parity, expert)),
                   static_cast<int>(signal_word(seq, kLogFmt ? kFormatLogFmt : kFormatBf16)), a.put.pe[s]);
        continue;
      }
    }
    window::signal(reinterpret_cast<int*>(window::peer_address_in(a.regions, s,
                                                                  L.combine_signal(parity, a.rank * E_local + le))),
                   static_cast<int>(signal_word(seq, kLogFmt ? kFormatLogFmt : kFormatBf16)));
  }
  // As in dispatch.cuh: the staged rows (and a zero-copy x) are free again once the number is out.
  if constexpr (W::kPuts) {
    if (a.put.any) W::quiet();
  }
}

__device__ __forceinline__ void accumulate_bf16x8(float (&acc)[8], const int4& v, float w) {
  float f[8];
  logfmt::unpack_bf16x8(v, f);
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] += w * f[i];
}

template <class W, bool kLogFmt>
__device__ void recv_half(const CombineArgs& a, Epoch seq, int parity, unsigned masked) {
  const Layout& L = a.layout;
  const int K = a.num_topk, H = L.hidden;
  const int warp = threadIdx.x / 32, lane = lane_id();
  const int global_warp = blockIdx.x * kWarps + warp, num_warps = gridDim.x * kWarps;
  __shared__ const int4* rows[kWarps][kMaxTopK];
  __shared__ float weights[kWarps][kMaxTopK];
  char* own = a.regions[a.rank];
  // With warps to spare (decode batches are small), a token's row is split over up to
  // kMaxWarpsPerToken warps, each summing a slice: a warp's K loads per word are in flight
  // together, but its words follow one another, so fewer words per warp is less time. Each warp
  // waits for the token's signals itself; only slice 0 reports and counts wait time. Not with
  // shrink: warps of one token must agree on which experts a late peer's masking dropped.
  const int parts = a.shrink ? 1 : max(1, min(kMaxWarpsPerToken, num_warps / max(1, a.num_tokens)));
  const int words = H / 8, slice = (words + parts - 1) / parts;
  for (int task = global_warp; task < a.num_tokens * parts; task += num_warps) {
    const int t = task / parts, part = task % parts;
    const int word_begin = part * slice, word_end = min(words, word_begin + slice);
    bool ok = true, bad = false;
    const long long e = lane < K ? a.topk_idx[static_cast<int64_t>(t) * K + lane] : -1;
    const bool duplicate = names_earlier_slot(e, L.num_experts, lane);
    if (lane < K) {
      const int4* row = nullptr;
      const long long where = static_cast<long long>(t) * kernels::kMaxTopK + lane;
      if (e < -1 || e >= L.num_experts) {
        if (part == 0) report_local(a.err, kErrLowLatencyBadExpertId, 1, where);
        bad = true;
      }
      if (duplicate) {
        if (part == 0) report_local(a.err, kErrLowLatencyDuplicateExpert, 1, where);
        bad = true;
      }
      if (e >= 0 && e < L.num_experts && !duplicate) {
        const int expert = static_cast<int>(e), source = expert / L.num_local_experts;
        const int* word = reinterpret_cast<const int*>(own + L.combine_signal(parity, expert));
        const uint64_t start = global_timer_ns();
        // Shrink: an expert on a masked rank, or on one that never answers, drops out of the sum.
        PeerWait got = is_masked(masked, source)
                           ? kPeerMasked
                           : wait_peer(a, source, kStepCombineRecv, expert, static_cast<long long>(seq), [&] {
                               return signal_is_for(static_cast<uint32_t>(ld_acquire_sys(word)), seq);
                             });
        if constexpr (W::kPuts) {
          // A put source: its rows' counter at the source's running total for this call (put
          // before the signal; no state kept here, so rows this rank ignores never count later).
          if (got == kPeerArrived && a.regions[source] == nullptr) {
            const unsigned long long* target = &a.put.state->combine_target[parity][expert];
            const unsigned long long* rows = &a.put.state->combine_rows[parity][expert];
            got = wait_peer(a, source, kStepCombineRecv, expert, static_cast<long long>(seq), [&] {
              const unsigned long long word = ld_acquire_sys(target);
              return put_target_is_for(word, seq) && ld_acquire_sys(rows) >= put_target_total(word);
            });
          }
        }
        ok = got != kPeerFailed;
        if (a.wait_recv_cost_stats != nullptr && part == 0)
          atomicAdd(reinterpret_cast<unsigned long long*>(&a.wait_recv_cost_stats[source]), global_timer_ns() - start);
        // The signal says which format the rows came in: ranks (or a hook's send and receive) that
        // disagree on use_logfmt would otherwise decode one format as the other.
        if (got == kPeerArrived &&
            signal_value(static_cast<uint32_t>(ld_volatile(word))) != (kLogFmt ? kFormatLogFmt : kFormatBf16)) {
          if (part == 0) report_local(a.err, kErrLowLatencyFormatMismatch, 1, expert);
          bad = true;
        } else if (got == kPeerArrived) {
          row = reinterpret_cast<const int4*>(own + L.combine_slot(parity, expert, t));
        }
      }
      rows[warp][lane] = row;
      weights[warp][lane] = row != nullptr ? a.topk_weights[static_cast<int64_t>(t) * K + lane] : 0.f;
    }
    __syncwarp();
    if (!__all_sync(0xffffffffu, ok)) return;
    int4* out = static_cast<int4*>(a.combined_x) + static_cast<int64_t>(t) * (H / 8);
    if (__any_sync(0xffffffffu, bad)) {
      for (int i = word_begin + lane; i < word_end; i += 32) out[i] = make_int4(-1, -1, -1, -1);  // 0xFF bytes: NaN
      __syncwarp();
      continue;
    }
    for (int i = word_begin + lane; i < word_end; i += 32) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      // The K rows' words are loaded before any is summed (in slot order, as before: the sum's
      // rounding does not change), kLoadGroup at a time.
#pragma unroll
      for (int k0 = 0; k0 < kMaxTopK; k0 += kLoadGroup) {
        if (k0 >= K) break;
        if constexpr (!kLogFmt) {
          int4 v[kLoadGroup];
#pragma unroll
          for (int u = 0; u < kLoadGroup; ++u) {
            const int4* r = k0 + u < K ? rows[warp][k0 + u] : nullptr;
            if (r != nullptr) v[u] = ld_cg(r + i);
          }
#pragma unroll
          for (int u = 0; u < kLoadGroup; ++u)
            if (k0 + u < K && rows[warp][k0 + u] != nullptr) accumulate_bf16x8(acc, v[u], weights[warp][k0 + u]);
        } else {
          // Word i is lane (i % 16)'s word of group i / 16 (the encoder's lanes).
          const int64_t group_offset = static_cast<int64_t>(i / 16) * logfmt::kGroupBytes;
          logfmt::Word w[kLoadGroup];
#pragma unroll
          for (int u = 0; u < kLoadGroup; ++u) {
            const int4* r = k0 + u < K ? rows[warp][k0 + u] : nullptr;
            if (r != nullptr) w[u] = logfmt::load(reinterpret_cast<const char*>(r) + group_offset, i % 16);
          }
#pragma unroll
          for (int u = 0; u < kLoadGroup; ++u) {
            if (k0 + u >= K || rows[warp][k0 + u] == nullptr) continue;
            float f[8];
            logfmt::decode(w[u], reinterpret_cast<const char*>(rows[warp][k0 + u]) + group_offset, i % 16, f);
            const float weight = weights[warp][k0 + u];
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] += weight * f[j];
          }
        }
      }
      out[i] = kernels::pack_bf16x8(acc);
    }
    __syncwarp();
  }
}

template <class W, bool kLogFmt>
__global__ void __launch_bounds__(kThreads) combine_kernel(CombineArgs a) {
  run_call<W>(a, [&](Epoch seq, int parity, unsigned masked) { send_half<W, kLogFmt>(a, seq, parity, masked); },
              [&](Epoch seq, int parity, unsigned masked) { recv_half<W, kLogFmt>(a, seq, parity, masked); });
}

// The two entry points of each build of these kernels, as dispatch.cuh's.
template <class W>
int combine_blocks_per_sm_of() {
  static const int blocks =
      std::min(max_blocks_per_sm(reinterpret_cast<const void*>(&combine_kernel<W, false>), kThreads, 0),
               max_blocks_per_sm(reinterpret_cast<const void*>(&combine_kernel<W, true>), kThreads, 0));
  return blocks;
}

template <class W>
void launch_combine_of(const CombineArgs& a, int blocks, cudaStream_t stream, const char* name) {
  const LaunchShape shape{blocks, kThreads, 0};
  if (a.logfmt)
    launch(name, &combine_kernel<W, true>, shape, stream, a);
  else
    launch(name, &combine_kernel<W, false>, shape, stream, a);
}

}  // namespace

}  // namespace moelink::low_latency

