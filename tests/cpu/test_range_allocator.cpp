// The receive arena's bookkeeping: ranges never overlap, freed ranges merge back, and a full
// arena says so instead of handing out a partial range (the dispatch then falls back to the rings).
#include <cstdint>
#include <map>
#include <random>
#include <vector>

#include "harness.hpp"
#include "runtime/range_allocator.hpp"

using moelink::detail::RangeAllocator;

MOELINK_TEST(range_allocator_aligns_and_fills_first_fit) {
  RangeAllocator a(4096, 512);
  const auto r0 = a.allocate(1);
  const auto r1 = a.allocate(513);
  ASSERT_TRUE(r0.has_value());
  ASSERT_TRUE(r1.has_value());
  EXPECT_EQ(*r0, 0);
  EXPECT_EQ(*r1, 512);  // 1 byte still takes a whole 512-byte unit
  EXPECT_EQ(a.bytes_in_use(), 512 + 1024);
  EXPECT_FALSE(a.allocate(4096).has_value());  // never a partial range
  EXPECT_FALSE(a.allocate(0).has_value());
  a.release(*r0);
  const auto r2 = a.allocate(512);
  ASSERT_TRUE(r2.has_value());
  EXPECT_EQ(*r2, 0);  // the lowest free range that fits
}

MOELINK_TEST(range_allocator_merges_neighbours_back_into_one_range) {
  RangeAllocator a(8 * 512, 512);
  std::vector<int64_t> offsets;
  for (int i = 0; i < 8; ++i) offsets.push_back(*a.allocate(512));
  EXPECT_EQ(a.largest_free(), 0);
  for (int i : {1, 3, 5, 7, 0, 2, 6, 4}) a.release(offsets[i]);  // both-sided and one-sided merges
  EXPECT_EQ(a.largest_free(), 8 * 512);
  EXPECT_EQ(a.bytes_in_use(), 0);
  EXPECT_EQ(a.live_ranges(), 0u);
}

MOELINK_TEST(range_allocator_rejects_unknown_and_double_release) {
  RangeAllocator a(4096, 512);
  const auto r = a.allocate(100);
  ASSERT_TRUE(r.has_value());
  EXPECT_THROW_KIND(a.release(*r + 512), moelink::ErrorKind::kState, "not allocated");
  a.release(*r);
  EXPECT_THROW_KIND(a.release(*r), moelink::ErrorKind::kState, "not allocated");
  EXPECT_THROW_KIND(RangeAllocator(4096, 300), moelink::ErrorKind::kValue, "power of two");
}

MOELINK_TEST(range_allocator_random_traffic_never_overlaps) {
  const int64_t capacity = 1 << 20, align = 512;
  RangeAllocator a(capacity, align);
  std::mt19937 rng(7);
  std::map<int64_t, int64_t> live;  // offset -> rounded size
  for (int step = 0; step < 20000; ++step) {
    if (live.empty() || rng() % 3 != 0) {
      const int64_t bytes = 1 + rng() % (64 * 1024);
      const auto r = a.allocate(bytes);
      if (!r) {
        EXPECT_LT(a.largest_free(), bytes);  // it only refuses when nothing fits
        continue;
      }
      const int64_t size = (bytes + align - 1) / align * align;
      EXPECT_EQ(*r % align, 0);
      EXPECT_LE(*r + size, capacity);
      auto next = live.lower_bound(*r);
      if (next != live.end()) EXPECT_LE(*r + size, next->first);
      if (next != live.begin()) EXPECT_LE(std::prev(next)->first + std::prev(next)->second, *r);
      live.emplace(*r, size);
    } else {
      auto it = live.begin();
      std::advance(it, rng() % live.size());
      a.release(it->first);
      live.erase(it);
    }
    int64_t in_use = 0;
    for (const auto& [offset, size] : live) in_use += size;
    ASSERT_EQ(a.bytes_in_use(), in_use);
  }
  for (const auto& [offset, size] : live) a.release(offset);
  EXPECT_EQ(a.largest_free(), capacity);
}
