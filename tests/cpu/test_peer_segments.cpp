// The sender's table of peers' mapped segments (src/window/peer_segments.hpp), over a fake mapper
// that logs opens, marks, waits and closes: a segment is mapped only when a peer names it again,
// with the same handle, within kSecondSighting of its dispatches; a mapping the peer stops naming
// is dropped after kStaleAfter of its dispatches and closed only once a mark after the kernels that
// may use it has passed, never by waiting on the note's path; a full table evicts the mapping named
// longest ago; a refused open is never retried; a failed wait at teardown drops mappings without
// closing them; the table a kernel gets names exactly the mappings held.
#include <cstring>
#include <string>
#include <vector>

#include "harness.hpp"
#include "window/peer_segments.hpp"

using moelink::window::kSegmentFields;
using moelink::window::kSegmentPeers;
using moelink::window::kSegmentSlots;
using moelink::window::PeerSegments;
using moelink::window::SegmentMapper;

namespace {

struct FakeDriver {
  std::vector<std::string> log;
  bool refuse = false, quiesce_ok = true;
  int pass = 1;  // what every mark's query answers
  long long next = 0x1000, marks = 0;
};

cudaIpcMemHandle_t handle_of(unsigned char tag) {
  cudaIpcMemHandle_t h;
  std::memset(&h, tag, sizeof(h));
  return h;
}

SegmentMapper fake_mapper(FakeDriver& driver) {
  SegmentMapper m{};
  m.open = [](const cudaIpcMemHandle_t& h, void* c) -> void* {
    auto* d = static_cast<FakeDriver*>(c);
    d->log.push_back("open " + std::to_string(static_cast<unsigned char>(h.reserved[0])));
    if (d->refuse) return nullptr;
    d->next += 0x1000;
    return reinterpret_cast<void*>(d->next);
  };
  m.mark = [](void* c) -> void* {
    auto* d = static_cast<FakeDriver*>(c);
    d->log.push_back("mark");
    return reinterpret_cast<void*>(++d->marks);
  };
  m.passed = [](void*, void* c) { return static_cast<FakeDriver*>(c)->pass; };
  m.forget = [](void*, void* c) { static_cast<FakeDriver*>(c)->log.push_back("forget"); };
  m.quiesce = [](void* c) {
    auto* d = static_cast<FakeDriver*>(c);
    d->log.push_back("wait");
    return d->quiesce_ok;
  };
  m.close = [](void* p, void* c) {
    static_cast<FakeDriver*>(c)->log.push_back("close " + std::to_string(reinterpret_cast<long long>(p)));
  };
  m.context = &driver;
  return m;
}

// One dispatch of `peer` naming `key` for recv_x (unmapped unless `mapped`) and nothing else.
void name_one(PeerSegments& table, int peer, unsigned long long key, unsigned char tag, bool mapped = false) {
  unsigned long long keys[kSegmentFields] = {key};
  int unmapped[kSegmentFields] = {mapped ? 0 : 1};
  cudaIpcMemHandle_t handles[kSegmentFields] = {handle_of(tag)};
  table.note(peer, keys, unmapped, handles);
}

// Keys 1..kSegmentSlots of `peer`, each named twice (so mapped): every slot taken, key 1 oldest.
void fill_slots(PeerSegments& table, int peer) {
  for (unsigned long long key = 1; key <= kSegmentSlots; ++key) {
    name_one(table, peer, key, static_cast<unsigned char>(key));
    name_one(table, peer, key, static_cast<unsigned char>(key));
  }
}

bool holds(const PeerSegments& table, int peer, unsigned long long key) {
  unsigned long long keys[kSegmentPeers][kSegmentSlots];
  char* bases[kSegmentPeers][kSegmentSlots];
  table.fill(keys, bases);
  for (int i = 0; i < kSegmentSlots; ++i)
    if (keys[peer][i] == key) return bases[peer][i] != nullptr;
  return false;
}

}  // namespace

MOELINK_TEST(peer_segments_map_on_the_second_sighting) {
  FakeDriver driver;
  PeerSegments table(fake_mapper(driver));
  name_one(table, 1, 77, 7);
  EXPECT_TRUE(driver.log.empty());
  EXPECT_FALSE(holds(table, 1, 77));
  name_one(table, 1, 77, 7);
  ASSERT_EQ(driver.log.size(), 1u);
  EXPECT_EQ(driver.log[0], std::string("open 7"));
  EXPECT_TRUE(holds(table, 1, 77));
  EXPECT_FALSE(holds(table, 2, 77));  // per peer
  EXPECT_EQ(table.mapped(1), 1);
  // Named again (mapped now, so the kernel says so): nothing new is opened.
  name_one(table, 1, 77, 7, true);
  EXPECT_EQ(driver.log.size(), 1u);
}

MOELINK_TEST(peer_segments_never_open_a_key_seen_once_or_with_two_handles) {
  FakeDriver driver;
  PeerSegments table(fake_mapper(driver));
  // Shapes that change every step: a new segment each dispatch, none opened.
  for (unsigned long long key = 1; key <= 20; ++key) name_one(table, 3, key, 1);
  EXPECT_TRUE(driver.log.empty());
  // A handle that differs between two sightings (read while rewritten) is not trusted.
  name_one(table, 3, 99, 4);
  name_one(table, 3, 99, 5);
  EXPECT_TRUE(driver.log.empty());
  name_one(table, 3, 99, 5);
  ASSERT_EQ(driver.log.size(), 1u);
  EXPECT_EQ(driver.log[0], std::string("open 5"));
  // Sightings further apart than kSecondSighting do not count; closer ones do (an uncached
  // dispatch, then a cached one that names fewer fields, then the next uncached one).
  name_one(table, 3, 500, 9);
  for (int i = 0; i < PeerSegments::kSecondSighting; ++i) name_one(table, 3, 600 + i, 9);
  name_one(table, 3, 500, 9);
  EXPECT_EQ(driver.log.size(), 1u);
  unsigned long long none[kSegmentFields] = {};
  int zero[kSegmentFields] = {};
  cudaIpcMemHandle_t handles[kSegmentFields] = {};
  table.note(3, none, zero, handles);
  name_one(table, 3, 500, 9);
  EXPECT_EQ(driver.log.size(), 2u);
}

MOELINK_TEST(peer_segments_close_stale_mappings_once_their_mark_has_passed) {
  FakeDriver driver;
  PeerSegments table(fake_mapper(driver));
  name_one(table, 0, 5, 5);
  name_one(table, 0, 5, 5);
  ASSERT_TRUE(holds(table, 0, 5));
  // The peer moves to another segment; the old mapping stays until it is stale.
  for (int i = 0; i < PeerSegments::kStaleAfter - 1; ++i) name_one(table, 0, 6, 6, i >= 2);
  EXPECT_TRUE(holds(table, 0, 5));
  EXPECT_TRUE(holds(table, 0, 6));
  name_one(table, 0, 6, 6, true);
  table.retire(true);  // as the host does after an operation's notes
  EXPECT_FALSE(holds(table, 0, 5));  // out of the table the next kernel gets at once
  EXPECT_TRUE(holds(table, 0, 6));
  ASSERT_EQ(driver.log.size(), 3u);
  EXPECT_EQ(driver.log[2], std::string("mark"));  // not closed under the kernels queued before
  EXPECT_EQ(table.closing(), 1);
  table.retire(true);
  ASSERT_EQ(driver.log.size(), 5u);
  EXPECT_EQ(driver.log[3].rfind("close ", 0), 0u);
  EXPECT_EQ(driver.log[4], std::string("forget"));
  EXPECT_EQ(table.closing(), 0);
}

MOELINK_TEST(peer_segments_a_drop_never_waits_and_closes_only_when_its_mark_passed) {
  FakeDriver driver;
  PeerSegments table(fake_mapper(driver));
  fill_slots(table, 1);
  // The kernels before the eviction's mark are still running (a long compute kernel ahead of them).
  driver.pass = 0;
  for (int i = 0; i < PeerSegments::kSecondSighting; ++i) name_one(table, 1, 200 + i, 50);
  name_one(table, 1, 100, 100);
  name_one(table, 1, 100, 100);
  table.retire(true);
  EXPECT_TRUE(holds(table, 1, 100));
  EXPECT_FALSE(holds(table, 1, 1));
  EXPECT_EQ(table.closing(), 1);
  for (int i = 0; i < 10; ++i) {
    name_one(table, 1, 100, 100, true);
    table.retire(true);
  }
  for (const std::string& entry : driver.log) {
    EXPECT_TRUE(entry != "wait");  // an operation's host path never waits for the stream
    EXPECT_TRUE(entry.rfind("close ", 0) != 0);
  }
  // The evicted key named again while its old mapping is open: not opened a second time meanwhile.
  const size_t opens_before = driver.log.size();
  name_one(table, 1, 1, 1);
  name_one(table, 1, 1, 1);
  EXPECT_FALSE(holds(table, 1, 1));
  EXPECT_EQ(driver.log.size(), opens_before);
  // Another peer's key 1 is another segment (keys are per process): it is mapped meanwhile.
  name_one(table, 2, 1, 1);
  name_one(table, 2, 1, 1);
  EXPECT_TRUE(holds(table, 2, 1));
  driver.pass = 1;
  table.retire(true);
  EXPECT_EQ(table.closing(), 0);
  ASSERT_TRUE(driver.log.size() >= 2u);
  EXPECT_EQ(driver.log[driver.log.size() - 2].rfind("close ", 0), 0u);
  // A mark whose query fails: forgotten, the mapping never closed (a leak, not an unmapping).
  driver.pass = -1;
  for (int i = 0; i < PeerSegments::kStaleAfter + 1; ++i) {
    name_one(table, 1, 300, 30, i >= 2);
    table.retire(true);
  }
  table.retire(true);
  EXPECT_EQ(table.closing(), 0);
  int closes = 0;
  for (const std::string& entry : driver.log) closes += entry.rfind("close ", 0) == 0;
  EXPECT_EQ(closes, 1);
  EXPECT_EQ(table.closes(), 1);
}

// A close waits for the whole device (cudaIpcCloseMemHandle), so on a busy device passed marks
// stay open, until more than kCloseBacklog mappings wait; an idle retire closes them all.
MOELINK_TEST(peer_segments_close_only_on_idle_streams_or_past_the_backlog) {
  FakeDriver driver;
  PeerSegments table(fake_mapper(driver));
  const auto closes = [&] {
    int n = 0;
    for (const std::string& entry : driver.log) n += entry.rfind("close ", 0) == 0;
    return n;
  };
  // Each round maps a new key of peer 0 (named twice), evicting the oldest once the slots are full.
  unsigned long long key = 1;
  const auto map_new = [&] {
    name_one(table, 0, key, static_cast<unsigned char>(key));
    name_one(table, 0, key, static_cast<unsigned char>(key));
    ++key;
    table.retire(false);
  };
  for (int i = 0; i < kSegmentSlots; ++i) map_new();
  EXPECT_EQ(table.closing(), 0);
  for (int i = 0; i < PeerSegments::kCloseBacklog; ++i) map_new();
  EXPECT_EQ(table.closing(), PeerSegments::kCloseBacklog);
  EXPECT_EQ(closes(), 0);  // every mark has passed, but the streams were busy
  map_new();               // one past the backlog: closed although busy
  EXPECT_EQ(closes(), PeerSegments::kCloseBacklog);
  EXPECT_EQ(table.closing(), 1);  // the drop of this round, marked now
  EXPECT_EQ(table.mapped(0), kSegmentSlots);
  map_new();
  EXPECT_EQ(closes(), PeerSegments::kCloseBacklog);
  table.retire(true);
  EXPECT_EQ(closes(), PeerSegments::kCloseBacklog + 2);
  EXPECT_EQ(table.closing(), 0);
  EXPECT_EQ(table.closes(), PeerSegments::kCloseBacklog + 2);
}

MOELINK_TEST(peer_segments_full_table_evicts_the_mapping_named_longest_ago) {
  FakeDriver driver;
  PeerSegments table(fake_mapper(driver));
  fill_slots(table, 2);
  EXPECT_EQ(table.mapped(2), kSegmentSlots);
  name_one(table, 2, 1, 1, true);  // key 1 is fresh again; key 2 is now the oldest
  name_one(table, 2, 100, 100);
  name_one(table, 2, 100, 100);
  EXPECT_EQ(table.mapped(2), kSegmentSlots);
  EXPECT_TRUE(holds(table, 2, 100));
  EXPECT_TRUE(holds(table, 2, 1));
  EXPECT_FALSE(holds(table, 2, 2));
}

MOELINK_TEST(peer_segments_refused_open_is_not_retried_and_failed_wait_closes_nothing) {
  FakeDriver driver;
  PeerSegments table(fake_mapper(driver));
  driver.refuse = true;
  name_one(table, 4, 8, 8);
  name_one(table, 4, 8, 8);
  EXPECT_EQ(driver.log.size(), 1u);
  for (int i = 0; i < 4; ++i) name_one(table, 4, 8, 8);
  EXPECT_EQ(driver.log.size(), 1u);
  EXPECT_FALSE(holds(table, 4, 8));
  driver.refuse = false;
  name_one(table, 4, 9, 9);
  name_one(table, 4, 9, 9);
  ASSERT_TRUE(holds(table, 4, 9));
  driver.log.clear();
  driver.quiesce_ok = false;
  table.close_all();
  ASSERT_EQ(driver.log.size(), 1u);
  EXPECT_EQ(driver.log[0], std::string("wait"));  // and no close under a kernel that may still run
  EXPECT_EQ(table.mapped(4), 0);
}

MOELINK_TEST(peer_segments_two_fields_in_one_segment_count_once_per_dispatch) {
  FakeDriver driver;
  PeerSegments table(fake_mapper(driver));
  unsigned long long keys[kSegmentFields] = {0, 0, 42, 42, 42};
  int unmapped[kSegmentFields] = {0, 0, 1, 1, 1};
  cudaIpcMemHandle_t handles[kSegmentFields] = {handle_of(0), handle_of(0), handle_of(3), handle_of(3), handle_of(3)};
  table.note(6, keys, unmapped, handles);
  EXPECT_TRUE(driver.log.empty());  // one dispatch is one sighting, however many fields name it
  table.note(6, keys, unmapped, handles);
  EXPECT_EQ(driver.log.size(), 1u);
  EXPECT_EQ(table.mapped(6), 1);
}

MOELINK_TEST(peer_segments_keys_in_use_are_not_evicted_for_one_more) {
  FakeDriver driver;
  PeerSegments table(fake_mapper(driver));
  // Two micro-batches alternating, each naming five segments of its own: ten keys in use, eight
  // slots. Eight get mapped; the other two stay unmapped instead of evicting each other every
  // dispatch (each eviction a drain of the comm stream and an open).
  cudaIpcMemHandle_t handles[kSegmentFields];
  for (int f = 0; f < kSegmentFields; ++f) handles[f] = handle_of(static_cast<unsigned char>(f));
  int unmapped[kSegmentFields] = {1, 1, 1, 1, 1};
  for (int round = 0; round < 20; ++round) {
    const unsigned long long base = round % 2 == 0 ? 10 : 20;
    unsigned long long keys[kSegmentFields] = {base + 1, base + 2, base + 3, base + 4, base + 5};
    table.note(5, keys, unmapped, handles);
  }
  EXPECT_EQ(table.mapped(5), kSegmentSlots);
  EXPECT_EQ(table.opens(), static_cast<long long>(kSegmentSlots));
  for (const std::string& entry : driver.log) EXPECT_EQ(entry.rfind("open ", 0), 0u);
}

MOELINK_TEST(peer_segments_combine_notes_share_the_table_with_dispatch) {
  FakeDriver driver;
  PeerSegments table(fake_mapper(driver));
  // One steady step of peer 2 as this rank's host notes it: an uncached dispatch (five outputs), a
  // cached one (recv_x alone), then a combine whose input is a fresh tensor in segment 50 and whose
  // weights are the dispatch's recv_topk_weights (segment 4); a combine's note fills two fields,
  // the others 0 (intranode/host.cpp take_news).
  cudaIpcMemHandle_t handles[kSegmentFields];
  for (int f = 0; f < kSegmentFields; ++f) handles[f] = handle_of(static_cast<unsigned char>(f + 1));
  // What the kernel would say: a key is unmapped when the table it got does not hold it.
  const auto note = [&](const unsigned long long (&keys)[kSegmentFields], const cudaIpcMemHandle_t (&h)[kSegmentFields]) {
    int unmapped[kSegmentFields] = {};
    for (int f = 0; f < kSegmentFields; ++f) unmapped[f] = keys[f] != 0 && !holds(table, 2, keys[f]);
    table.note(2, keys, unmapped, h);
  };
  const cudaIpcMemHandle_t combine_handles[kSegmentFields] = {handle_of(9), handles[3]};
  for (int step = 0; step < 3; ++step) {
    note({1, 2, 3, 4, 5}, handles);
    note({1}, handles);
    note({50, 4}, combine_handles);
  }
  // Segment 50 was named in two steps, three notes apart: mapped once, beside the dispatch's five.
  EXPECT_TRUE(holds(table, 2, 50));
  for (unsigned long long key = 1; key <= 5; ++key) EXPECT_TRUE(holds(table, 2, key));
  EXPECT_EQ(table.mapped(2), 6);
  EXPECT_EQ(table.opens(), 6);
  int closes = 0;
  for (const std::string& entry : driver.log) closes += entry.rfind("close ", 0) == 0;
  EXPECT_EQ(closes, 0);
}
