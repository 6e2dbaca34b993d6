// The low-latency region's layout: both parities, every slot and signal inside its area, and the
// total equal to deep_ep V1's hint formula (which tests/cpu/test_low_latency_reference.py checks).
#include <cstdint>

#include "harness.hpp"
#include "modes/low_latency/layout.hpp"

using moelink::low_latency::Layout;

MOELINK_TEST(low_latency_layout_areas_do_not_overlap) {
  const int M = 128, H = 7168, R = 8, E = 256;
  const Layout l = Layout::make(M, H, R, E);
  EXPECT_EQ(l.num_local_experts, 32);
  EXPECT_EQ(l.dispatch_message, 16 + 2 * H);
  EXPECT_EQ(l.combine_message, 2 * H + 4 * (H / 128));
  for (int p = 0; p < 2; ++p) {
    EXPECT_EQ(l.recv(p), l.send(p) + l.send_bytes);
    EXPECT_EQ(l.signals(p), l.recv(p) + l.recv_bytes);
    // The last dispatch slot and the last combine slot end inside the receive area.
    EXPECT_LE(l.dispatch_slot(p, l.num_local_experts - 1, R - 1, M - 1) + l.dispatch_message, l.signals(p));
    EXPECT_LE(l.combine_slot(p, E - 1, M - 1) + l.combine_message, l.signals(p));
    EXPECT_LE(l.count_signal(p, l.num_local_experts - 1, R - 1) + 4, l.signals(p) + l.signal_bytes);
    EXPECT_LE(l.combine_signal(p, E - 1) + 4, l.signals(p) + l.signal_bytes);
    EXPECT_EQ(l.dispatch_slot(p, 0, 0, 0) % 16, 0);
  }
  EXPECT_EQ(l.send(1), l.parity_bytes);
  EXPECT_LE(2 * l.parity_bytes, l.total_bytes());
  EXPECT_EQ(l.total_bytes() % 128, 0);
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
