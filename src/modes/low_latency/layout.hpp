#pragma once
// The named layout of a rank's low-latency region: one definition for the size hint, the host's
// checks and the kernels. Two parities (consecutive low-latency calls alternate between them), each
//
//   [ send area ][ receive area ][ signals: one 32-bit word per expert ]
//
// sized as deep_ep V1 sizes its buffers, so that a num_rdma_bytes from deep_ep's hint fits:
//   send    = max(M * dispatch message, E * M * combine message)   (the zero-copy combine input)
//   receive = max(E * M * dispatch message, E * M * combine message)
// A dispatch receives into slots [local expert][source rank][M] of its parity's receive area and its
// signals [local expert][source rank] carry the counts; a combine receives into slots
// [expert][token] of the area and its signals [expert] say that expert's rows have landed.
#include <cstdint>

#include "common/header.hpp"

namespace moelink::low_latency {

using kernels::align_up;

inline constexpr int kScaleBlock = 128;  // hidden values per fp8 scale
inline constexpr int kUe8m0PerInt = 4;   // UE8M0 exponent bytes per packed int32

struct Layout {
  int num_ranks = 0, num_experts = 0, num_local_experts = 0, max_tokens = 0, hidden = 0, num_scales = 0;
  int64_t dispatch_message = 0, combine_message = 0;
  int64_t send_bytes = 0, recv_bytes = 0, signal_bytes = 0, parity_bytes = 0;

  MOELINK_HOST_DEVICE static Layout make(int max_tokens, int hidden, int num_ranks, int num_experts) {
    Layout l;
    l.num_ranks = num_ranks;
    l.num_experts = num_experts;
    l.num_local_experts = num_ranks > 0 ? num_experts / num_ranks : 0;
    l.max_tokens = max_tokens;
    l.hidden = hidden;
    l.num_scales = hidden / kScaleBlock;
    // A 16-byte header (the source token index), then a bf16 row, or an fp8 row and its scales.
    const int64_t bf16_row = 2LL * hidden, fp8_row = hidden + 4LL * l.num_scales;
    l.dispatch_message = 16 + (bf16_row > fp8_row ? bf16_row : fp8_row);
    // deep_ep's combine message also holds LogFMT scales; moelink reserves the same room.
    l.combine_message = 2LL * hidden + 4LL * l.num_scales;
    const int64_t m = max_tokens, e = num_experts;
    const int64_t dispatch_send = m * l.dispatch_message, combine_send = e * m * l.combine_message;
    const int64_t dispatch_recv = e * m * l.dispatch_message, combine_recv = e * m * l.combine_message;
    l.send_bytes = dispatch_send > combine_send ? dispatch_send : combine_send;
    l.recv_bytes = dispatch_recv > combine_recv ? dispatch_recv : combine_recv;
    l.signal_bytes = align_up(4 * e, 128);
    l.parity_bytes = l.send_bytes + l.recv_bytes + l.signal_bytes;
    return l;
  }

  // What both parities need; also what get_low_latency_rdma_size_hint returns.
  MOELINK_HOST_DEVICE int64_t total_bytes() const { return align_up(2 * parity_bytes, 128); }

  // Offsets in a rank's low-latency region.
  MOELINK_HOST_DEVICE int64_t send(int parity) const { return parity * parity_bytes; }
  MOELINK_HOST_DEVICE int64_t recv(int parity) const { return parity * parity_bytes + send_bytes; }
  MOELINK_HOST_DEVICE int64_t signals(int parity) const { return parity * parity_bytes + send_bytes + recv_bytes; }
  MOELINK_HOST_DEVICE int64_t dispatch_slot(int parity, int local_expert, int source, int slot) const {
    return recv(parity) + ((static_cast<int64_t>(local_expert) * num_ranks + source) * max_tokens + slot) * dispatch_message;
  }
  MOELINK_HOST_DEVICE int64_t combine_slot(int parity, int expert, int token) const {
    return recv(parity) + (static_cast<int64_t>(expert) * max_tokens + token) * combine_message;
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
