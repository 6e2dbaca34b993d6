// The intranode protocol's host-visible arithmetic: how channels split tokens and how a ring is laid
// out. The kernels and the size hint share these definitions, so a mistake here corrupts rows.
#include <cstdint>
#include <vector>

#include "harness.hpp"
#include "common/header.hpp"
#include "modes/intranode/ring_layout.hpp"
#include "moelink/config.hpp"

using moelink::intranode::channel_of;
using moelink::intranode::channel_range;
using moelink::intranode::ChannelRange;
using moelink::intranode::kCounterChannels;
using moelink::intranode::RingLayout;

MOELINK_TEST(channel_ranges_partition_the_tokens_in_order) {
  for (int tokens : {0, 1, 7, 127, 128, 4096, 4097}) {
    for (int channels : {1, 2, 3, 4, 12, 64, 128}) {
      std::vector<int> owner(tokens, -1);
      int previous_end = 0;
      for (int c = 0; c < channels; ++c) {
        const ChannelRange r = channel_range(tokens, channels, c);
        EXPECT_LE(r.begin, r.end);
        EXPECT_EQ(r.begin, previous_end);  // contiguous and in channel order
        previous_end = r.end;
        for (int t = r.begin; t < r.end; ++t) {
          EXPECT_EQ(owner[t], -1);
          owner[t] = c;
          EXPECT_EQ(channel_of(tokens, channels, t), c);  // notify counts a token where dispatch sends it
        }
      }
      EXPECT_EQ(previous_end, tokens);  // every token belongs to exactly one channel
    }
  }
}

MOELINK_TEST(ring_fields_are_disjoint_aligned_and_inside_the_ring) {
  for (int slots : {2, 16, 128}) {
    for (int64_t row_bytes : {16, 2 * 2056, 2 * 7168, 7168}) {
      for (int topk : {0, 1, 8}) {
        for (int scales : {0, 56}) {
          const RingLayout l = RingLayout::make(8, 12, slots, row_bytes, scales, topk);
          std::vector<char> base(static_cast<size_t>(l.total_bytes()));
          char* ring = l.ring(base.data(), 11, 7);  // the last ring of the buffer
          const char* end = base.data() + base.size();
          const char* x_end = reinterpret_cast<const char*>(l.slot_x(ring, slots - 1) + l.hidden_int4);
          EXPECT_LE(x_end, reinterpret_cast<const char*>(l.slot_src_idx(ring, 0)));
          EXPECT_LE(reinterpret_cast<const char*>(l.slot_src_idx(ring, slots)), reinterpret_cast<const char*>(l.slot_topk_idx(ring, 0)));
          EXPECT_LE(reinterpret_cast<const char*>(l.slot_topk_idx(ring, slots)), reinterpret_cast<const char*>(l.slot_weights(ring, 0)));
          EXPECT_LE(reinterpret_cast<const char*>(l.slot_weights(ring, slots)), reinterpret_cast<const char*>(l.slot_scales(ring, 0)));
          EXPECT_LE(reinterpret_cast<const char*>(l.slot_scales(ring, slots)), end);
          EXPECT_EQ(reinterpret_cast<uintptr_t>(l.slot_x(ring, 1)) % 16, reinterpret_cast<uintptr_t>(base.data()) % 16);
          // Counters come first and never reach the first ring.
          EXPECT_LE(reinterpret_cast<const char*>(l.head(base.data(), 11, 7) + 1), l.ring(base.data(), 0, 0));
        }
      }
    }
  }
}

MOELINK_TEST(mirrors_follow_the_rings_laid_out_as_them) {
  // The put path copies slot ranges from a mirror to the ring it mirrors at the same offsets, so a
  // mirror must be as aligned as its ring, clear of every ring, and inside total_bytes(true), as
  // its tails must be.
  const RingLayout l = RingLayout::make(8, 12, 6, 2 * 2056, 56, 8, true);
  const RingLayout stores = RingLayout::make(8, 12, 6, 2 * 2056, 56, 8);
  std::vector<char> base(static_cast<size_t>(l.total_bytes(true)));
  EXPECT_EQ(l.total_bytes(true) - stores.total_bytes(),
            stores.total_bytes() - stores.counters_bytes + l.put_tails_bytes());
  const char* last_ring_end = l.ring(base.data(), 11, 7) + l.ring_bytes;
  EXPECT_LE(last_ring_end, l.mirror(base.data(), 0, 0));
  EXPECT_LE(l.mirror(base.data(), 11, 7) + l.ring_bytes, base.data() + base.size());
  // The put path's 64-bit tails follow the 32-bit counters, aligned for NVSHMEM's signal words,
  // and end before the first ring.
  EXPECT_EQ(reinterpret_cast<const char*>(l.put_tail(base.data(), 0, 0)) - base.data(), stores.counters_bytes);
  EXPECT_EQ(stores.counters_bytes % 128, 0);
  EXPECT_LE(reinterpret_cast<const char*>(l.head(base.data(), 11, 7) + 1),
            reinterpret_cast<const char*>(l.put_tail(base.data(), 0, 0)));
  EXPECT_LE(reinterpret_cast<const char*>(l.put_tail(base.data(), 11, 7) + 1), l.ring(base.data(), 0, 0));
  EXPECT_EQ(l.put_tail(base.data(), 11, 7) - l.put_tail(base.data(), 0, 0), 11 * 8 + 7);
  for (int c : {0, 5, 11})
    for (int p : {0, 3, 7}) {
      EXPECT_EQ((l.mirror(base.data(), c, p) - l.ring(base.data(), c, p)) % 128, 0);
      EXPECT_EQ(l.mirror(base.data(), c, p) - l.mirror(base.data(), 0, 0), l.ring(base.data(), c, p) - l.ring(base.data(), 0, 0));
    }
  EXPECT_EQ(l.counters_bytes, stores.counters_bytes + l.put_tails_bytes());
}

MOELINK_TEST(counters_stay_put_whatever_the_channel_count) {
  // The next operation on a Buffer may use another num_sms. Every counter it uses (tails, heads,
  // the put path's tails) must be at the same word as in any earlier operation, and before every
  // ring and mirror of every channel count: with the block sized by the channel count, 8 ranks
  // going from 16 SMs to 24 found their heads in ring(0, 0) of the earlier layout.
  for (int ranks : {2, 8})
    for (bool puts : {false, true}) {
      const RingLayout first = RingLayout::make(ranks, 8, 128, 2 * 7168, 56, 8, puts);
      std::vector<char> base(static_cast<size_t>(first.counters_bytes));
      const auto offset = [&](const void* p) { return static_cast<const char*>(p) - base.data(); };
      for (int channels = 1; channels <= kCounterChannels; ++channels) {
        const RingLayout l = RingLayout::make(ranks, channels, 6, 2 * 2056, 0, 4, puts);
        EXPECT_EQ(l.counters_bytes, first.counters_bytes);
        for (int c = 0; c < channels; ++c)
          for (int p = 0; p < ranks; ++p) {
            EXPECT_EQ(offset(l.tail(base.data(), c, p)), offset(first.tail(base.data(), c, p)));
            EXPECT_EQ(offset(l.head(base.data(), c, p)), offset(first.head(base.data(), c, p)));
            EXPECT_LE(offset(l.head(base.data(), c, p) + 1), offset(first.ring(base.data(), 0, 0)));
            if (puts) EXPECT_EQ(offset(l.put_tail(base.data(), c, p)), offset(first.put_tail(base.data(), c, p)));
          }
      }
    }
  // Past kCounterChannels the block grows with the operation (no GPU has that many SMs).
  EXPECT_GT(RingLayout::make(8, kCounterChannels + 1, 6, 2 * 2056, 0, 4).counters_bytes,
            RingLayout::make(8, kCounterChannels, 6, 2 * 2056, 0, 4).counters_bytes);
}

MOELINK_TEST(put_tails_stay_put_whatever_the_rows) {
  // A receiver zeroes only its own operation's tails, so the next operation on the Buffer, whatever
  // its rows (hidden bytes, fp8 scales, top-k, slots), must find its tails at the same words and
  // no ring or mirror of any operation may reach them. The fake-puts lane's 2x2 run faulted when
  // the tails followed the mirrors: an fp8 H 2048 cached dispatch (no top-k) read as its tails the
  // rows a bf16 H 2056 top-4 dispatch had staged, and took them for counts.
  for (int ranks : {2, 8}) {
    for (int channels : {4, 12}) {
      const RingLayout first = RingLayout::make(ranks, channels, 128, 2 * 2056, 0, 4, true);
      std::vector<char> base(static_cast<size_t>(first.counters_bytes));
      const auto offset = [&](const void* p) { return static_cast<const char*>(p) - base.data(); };
      for (int slots : {2, 16, 128})
        for (int64_t row_bytes : {16, 2048, 2 * 2056, 2 * 7168})
          for (int scales : {0, 16, 56})
            for (int topk : {0, 4, 8}) {
              const RingLayout l = RingLayout::make(ranks, channels, slots, row_bytes, scales, topk, true);
              EXPECT_EQ(l.counters_bytes, first.counters_bytes);
              for (int c = 0; c < channels; ++c)
                for (int p = 0; p < ranks; ++p) {
                  EXPECT_EQ(offset(l.put_tail(base.data(), c, p)), offset(first.put_tail(base.data(), c, p)));
                  // Every ring (and so every mirror, after the rings) of this layout starts past them.
                  EXPECT_LE(offset(l.put_tail(base.data(), c, p) + 1), offset(l.ring(base.data(), 0, 0)));
                }
            }
    }
  }
}

MOELINK_TEST(size_hint_is_the_layout_the_kernels_use_at_the_largest_row) {
  for (int ranks : {1, 2, 4, 8}) {
    for (int sms : {8, 16, 24}) {
      const moelink::Config config = moelink::default_dispatch_config(ranks, sms);
      const int64_t hidden_bytes = 2 * 7168;
      const int64_t hint = config.get_nvl_buffer_size_hint(hidden_bytes, ranks);
      const RingLayout widest = RingLayout::make(ranks, config.num_channels(), config.num_max_nvl_chunked_recv_tokens,
                                                 hidden_bytes, static_cast<int>(hidden_bytes / 128),
                                                 moelink::kernels::kMaxTopK);
      EXPECT_EQ(hint, widest.total_bytes());
      // What a real bf16 dispatch (top-8) and an fp8 one (7168 + 56 scales) need fits in the hint.
      const int channels = config.num_channels(), slots = config.num_max_nvl_chunked_recv_tokens;
      EXPECT_LE(RingLayout::make(ranks, channels, slots, hidden_bytes, 0, 8).total_bytes(), hint);
      EXPECT_LE(RingLayout::make(ranks, channels, slots, 7168, 56, 8).total_bytes(), hint);
    }
  }
}
