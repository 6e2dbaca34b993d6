// The low-latency region's layout: both parities, every slot and signal inside its area and 16-byte
// aligned, signals placed by the expert count alone, and the hint equal to deep_ep V1's formula
// (which tests/cpu/test_low_latency_reference.py checks) and never below what the layout needs.
#include <cstddef>
#include <cstdint>

#include "harness.hpp"
#include "modes/low_latency/contract.hpp"
#include "modes/low_latency/layout.hpp"

using moelink::low_latency::Layout;

namespace {

void check_areas(const Layout& l) {
  const int M = l.max_tokens, R = l.num_ranks, E = l.num_experts, EL = l.num_local_experts;
  EXPECT_EQ(l.signals(1), l.signal_bytes);
  EXPECT_EQ(l.send(0), 2 * l.signal_bytes);
  for (int p = 0; p < 2; ++p) {
    EXPECT_EQ(l.recv(p), l.send(p) + l.send_bytes);
    const int64_t recv_end = l.recv(p) + l.recv_bytes;
    EXPECT_LE(l.dispatch_slot(p, EL - 1, R - 1, M - 1) + l.dispatch_stride, recv_end);
    EXPECT_LE(l.combine_slot(p, E - 1, M - 1) + l.combine_stride, recv_end);
    EXPECT_LE(l.count_signal(p, EL - 1, R - 1) + 4, l.signals(p) + l.signal_bytes);
    EXPECT_LE(l.combine_signal(p, E - 1) + 4, l.signals(p) + l.signal_bytes);
    // Kernels move rows as 16-byte words: every slot of every shape starts aligned.
    EXPECT_EQ(l.dispatch_slot(p, EL - 1, R - 1, M - 1) % 16, 0);
    EXPECT_EQ(l.combine_slot(p, E - 1, M - 1) % 16, 0);
    EXPECT_EQ(l.send(p) % 16, 0);
  }
  EXPECT_LE(l.recv(1) + l.recv_bytes, l.total_bytes());
  EXPECT_EQ(l.total_bytes() % 128, 0);
  EXPECT_LE(l.total_bytes(), l.hint_bytes());
}

}  // namespace

MOELINK_TEST(low_latency_layout_areas_do_not_overlap) {
  const Layout l = Layout::make(128, 7168, 8, 256);
  EXPECT_EQ(l.num_local_experts, 32);
  EXPECT_EQ(l.dispatch_message, 16 + 2 * 7168);
  EXPECT_EQ(l.combine_message, 2 * 7168 + 4 * (7168 / 128));
  EXPECT_EQ(l.combine_stride, 2 * 7168);
  check_areas(l);
}

MOELINK_TEST(low_latency_layout_any_hidden_multiple_of_128) {
  // Hidden sizes whose deep_ep combine message (2H + 4H/128) is not a multiple of 16, and tiny shapes.
  for (int hidden : {128, 384, 896, 1152, 2304, 2048, 7168})
    for (int m : {1, 3, 128})
      for (int ranks : {1, 2, 8}) check_areas(Layout::make(m, hidden, ranks, 2 * ranks));
}

MOELINK_TEST(low_latency_signals_move_only_with_the_expert_count) {
  const Layout a = Layout::make(128, 7168, 4, 64), b = Layout::make(1, 2048, 4, 64);
  for (int p = 0; p < 2; ++p) EXPECT_EQ(a.combine_signal(p, 63), b.combine_signal(p, 63));
}

MOELINK_TEST(low_latency_signal_words_name_their_call) {
  using namespace moelink::low_latency;
  for (unsigned long long seq : {1ull, 2ull, 65535ull, 65536ull, 65537ull, (1ull << 40) + 3}) {
    for (int value : {0, 1, 127, kMaxTokensPerRank}) {
      const uint32_t word = signal_word(seq, value);
      EXPECT_TRUE(signal_is_for(word, seq));
      EXPECT_FALSE(signal_is_for(word, seq + 1));
      EXPECT_FALSE(signal_is_for(word, seq + 2));
      EXPECT_EQ(signal_value(word), value);
    }
  }
  EXPECT_FALSE(signal_is_for(0u, 65536ull));  // a zeroed word matches no call, not even tag 0
}

// The symmetric allocation's head (the put path): NVSHMEM's 64-bit signal words must be 8-byte
// aligned, and the region after the head page-aligned as the IPC carve is.
MOELINK_TEST(low_latency_symmetric_head_aligns_the_put_counters) {
  using moelink::low_latency::PutSection;
  using moelink::low_latency::SymmetricHeader;
  using moelink::low_latency::kSymmetricHeaderBytes;
  const int64_t put = static_cast<int64_t>(offsetof(SymmetricHeader, put));
  EXPECT_EQ(put % 128, 0);
  EXPECT_GE(put, static_cast<int64_t>(sizeof(moelink::low_latency::HeaderSection)));
  for (int64_t field : {static_cast<int64_t>(offsetof(PutSection, dispatch_rows)),
                        static_cast<int64_t>(offsetof(PutSection, combine_rows)),
                        static_cast<int64_t>(offsetof(PutSection, dispatch_target)),
                        static_cast<int64_t>(offsetof(PutSection, combine_target)),
                        static_cast<int64_t>(offsetof(PutSection, dispatch_sent)),
                        static_cast<int64_t>(offsetof(PutSection, combine_sent))})
    EXPECT_EQ((put + field) % 8, 0);
  EXPECT_EQ(static_cast<int64_t>(sizeof(PutSection::dispatch_rows[0][0])), 8);
  // Every (local expert, source) pair of the largest layout has its counter.
  EXPECT_GE(static_cast<int64_t>(sizeof(PutSection::dispatch_rows[0]) / 8), int64_t{moelink::low_latency::kMaxExperts});
  EXPECT_EQ(kSymmetricHeaderBytes % 4096, 0);
  EXPECT_GE(kSymmetricHeaderBytes, static_cast<int64_t>(sizeof(SymmetricHeader)));
}

// The put path's target words: the sender's running row total, tagged with the call's number, so a
// word left by another call never reads as this call's total, and a zeroed word matches no call.
MOELINK_TEST(low_latency_put_target_words) {
  using namespace moelink::low_latency;
  const unsigned long long w = put_target(70000ull, 123456789ull);
  EXPECT_TRUE(put_target_is_for(w, 70000ull));
  EXPECT_FALSE(put_target_is_for(w, 70001ull));
  EXPECT_FALSE(put_target_is_for(w, 70002ull));  // the same parity two calls later
  EXPECT_EQ(put_target_total(w), 123456789ull);
  EXPECT_EQ(put_target_total(put_target(5ull, (1ull << 48) + 7)), 7ull);
  for (unsigned long long seq : {0ull, 1ull, 32768ull, 65536ull}) EXPECT_FALSE(put_target_is_for(0ull, seq));
}
