#pragma once
// The named layout of a rank's low-latency region: one definition for the size hint, the host's
// checks and the kernels.
//
//   [ signals, parity 0 ][ signals, parity 1 ][ send 0 ][ receive 0 ][ send 1 ][ receive 1 ]
//
// Consecutive low-latency calls alternate between the parities. Signals are one 32-bit word per
// expert and come first, so their place depends on the expert count alone: calls of another M or
// hidden size never find a signal word where rows were written (a new expert count needs
// clean_low_latency_buffer, as in deep_ep). A dispatch receives into slots [local expert][source
// rank][M] of its parity's receive area, and its signals [local expert][source rank] carry the
// counts; a combine receives into slots [expert][token] and its signals [expert] say that expert's
// rows have landed. The send area is the zero-copy combine input (peers never touch it).
//
// Sizes: deep_ep V1 sizes its buffer as 2 x (send + receive + align128(4E)), rounded as (n + 128) / 128 x 128, with dispatch messages of
// 16 + max(2H, H + 4H/128) bytes and combine messages of 2H + 4H/128; hint_bytes() is exactly that,
// so a num_rdma_bytes from either library's hint fits. moelink's combine slots hold the bf16 row
// alone (2H: every offset stays 16-byte aligned for any H multiple of 128), so it needs no more.
#include <cstdint>

#include "common/header.hpp"

namespace moelink::low_latency {

using kernels::align_up;

inline constexpr int kScaleBlock = 128;  // hidden values per fp8 scale
inline constexpr int kUe8m0PerInt = 4;   // UE8M0 exponent bytes per packed int32

struct Layout {
  int num_ranks = 0, num_experts = 0, num_local_experts = 0, max_tokens = 0, hidden = 0, num_scales = 0;
  int64_t dispatch_message = 0, combine_message = 0;  // deep_ep's message sizes (the hint)
  int64_t dispatch_stride = 0, combine_stride = 0;    // moelink's slot sizes
  int64_t send_bytes = 0, recv_bytes = 0, signal_bytes = 0, hint = 0;

  MOELINK_HOST_DEVICE static Layout make(int max_tokens, int hidden, int num_ranks, int num_experts) {
    Layout l;
    l.num_ranks = num_ranks;
    l.num_experts = num_experts;
    l.num_local_experts = num_ranks > 0 ? num_experts / num_ranks : 0;
    l.max_tokens = max_tokens;
    l.hidden = hidden;
    l.num_scales = hidden / kScaleBlock;
    const int64_t m = max_tokens, e = num_experts;
    // A 16-byte header (the source token index), then a bf16 row, or an fp8 row and its scales.
    const int64_t bf16_row = 2LL * hidden, fp8_row = hidden + 4LL * l.num_scales;
    l.dispatch_message = 16 + (bf16_row > fp8_row ? bf16_row : fp8_row);
    l.combine_message = bf16_row + 4LL * l.num_scales;  // deep_ep also carries LogFMT scales
    l.signal_bytes = align_up(4 * e, 128);
    const auto larger = [](int64_t a, int64_t b) { return a > b ? a : b; };
    // deep_ep rounds with (n + 128) / 128 * 128, one 128 bytes more when n is aligned already.
    l.hint = (2 * (larger(m * l.dispatch_message, e * m * l.combine_message) +
                   larger(e * m * l.dispatch_message, e * m * l.combine_message) + l.signal_bytes) +
              128) / 128 * 128;
    l.dispatch_stride = align_up(l.dispatch_message, 16);
    l.combine_stride = bf16_row;
    l.send_bytes = align_up(larger(m * l.dispatch_stride, e * m * l.combine_stride), 16);
    l.recv_bytes = align_up(larger(e * m * l.dispatch_stride, e * m * l.combine_stride), 16);
    return l;
  }

  // get_low_latency_rdma_size_hint: deep_ep's formula, never below what total_bytes() needs.
  MOELINK_HOST_DEVICE int64_t hint_bytes() const { return hint > total_bytes() ? hint : total_bytes(); }
  // What both parities need.
  MOELINK_HOST_DEVICE int64_t total_bytes() const { return align_up(2 * (signal_bytes + send_bytes + recv_bytes), 128); }

  // Offsets in a rank's low-latency region.
  MOELINK_HOST_DEVICE int64_t signals(int parity) const { return parity * signal_bytes; }
  MOELINK_HOST_DEVICE int64_t send(int parity) const { return 2 * signal_bytes + parity * (send_bytes + recv_bytes); }
  MOELINK_HOST_DEVICE int64_t recv(int parity) const { return send(parity) + send_bytes; }
  MOELINK_HOST_DEVICE int64_t dispatch_slot(int parity, int local_expert, int source, int slot) const {
    return recv(parity) + ((static_cast<int64_t>(local_expert) * num_ranks + source) * max_tokens + slot) * dispatch_stride;
  }
  MOELINK_HOST_DEVICE int64_t combine_slot(int parity, int expert, int token) const {
    return recv(parity) + (static_cast<int64_t>(expert) * max_tokens + token) * combine_stride;
  }
  MOELINK_HOST_DEVICE int64_t count_signal(int parity, int local_expert, int source) const {
    return signals(parity) + 4LL * (static_cast<int64_t>(local_expert) * num_ranks + source);
  }
  MOELINK_HOST_DEVICE int64_t combine_signal(int parity, int expert) const { return signals(parity) + 4LL * expert; }
};

// A signal word: the low 16 bits of the call's sequence number, then (for a count) count + 1, so
// a word left by an earlier call never reads as this call's and none needs cleaning.
MOELINK_HOST_DEVICE uint32_t signal_word(unsigned long long seq, int value) {
  return (static_cast<uint32_t>(seq & 0xffffu) << 16) | static_cast<uint32_t>(value + 1);
}
MOELINK_HOST_DEVICE bool signal_is_for(uint32_t word, unsigned long long seq) {
  return (word >> 16) == static_cast<uint32_t>(seq & 0xffffu) && (word & 0xffffu) != 0;
}
MOELINK_HOST_DEVICE int signal_value(uint32_t word) { return static_cast<int>(word & 0xffffu) - 1; }

// The largest num_max_dispatch_tokens_per_rank a count signal can carry.
inline constexpr int kMaxTokensPerRank = 0xfffe;

}  // namespace moelink::low_latency
