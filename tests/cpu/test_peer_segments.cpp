// The sender's table of peers' mapped segments (src/window/peer_segments.hpp), over a fake mapper
// that logs opens, marks, waits, closes and the table's copies: a segment is mapped only when a
// peer names it again, with the same handle, within second_sighting of its notes; a mapping the
// peer stops naming is dropped after stale_after of its notes and closed only once a mark after the
// kernels that may use it has passed, never by waiting on the note's path; a full table evicts the
// mapping named longest ago, and so does the byte bound; a refused open is never retried; a failed
// wait at teardown drops mappings without closing them; the table a kernel gets names exactly the
// mappings held, and its copy never reuses staging a queued copy still reads; a training step's
// held outputs (each segment named once a step) are mapped by the second step and stay mapped.
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "harness.hpp"
#include "window/peer_segments.hpp"

using moelink::window::find_segment_bucket;
using moelink::window::kSegmentBuckets;
using moelink::window::kSegmentFields;
using moelink::window::kSegmentPeers;
using moelink::window::kSegmentSlots;
using moelink::window::PeerSegments;
using moelink::window::SegmentMapper;
using moelink::window::SegmentTable;

namespace {

struct FakeDriver {
  std::vector<std::string> log;
  bool refuse = false, quiesce_ok = true, copy_ok = true;
  int pass = 1;  // what every mark's query answers
  long long next = 0x1000, marks = 0;
  int pinned = 0;  // staging blocks handed out and not given back
  std::vector<const void*> copied_from;  // each queued copy's staging block
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
  // The copies are immediate here (the device table is host memory); what is checked is which
  // staging block each one reads, against the marks that say when it has been read.
  m.pin = [](size_t bytes, void* c) -> void* {
    ++static_cast<FakeDriver*>(c)->pinned;
    return ::operator new(bytes);
  };
  m.unpin = [](void* host, void* c) {
    --static_cast<FakeDriver*>(c)->pinned;
    ::operator delete(host);
  };
  m.copy = [](void* device, const void* host, size_t bytes, void* c) {
    auto* d = static_cast<FakeDriver*>(c);
    if (!d->copy_ok) return false;
    std::memcpy(device, host, bytes);
    d->copied_from.push_back(host);
    return true;
  };
  m.context = &driver;
  return m;
}

// One dispatch of `peer` naming `key` for recv_x (unmapped unless `mapped`), its segment `bytes`
// long, and nothing else.
void name_one(PeerSegments& table, int peer, unsigned long long key, unsigned char tag, bool mapped = false,
              long long bytes = 0) {
  unsigned long long keys[kSegmentFields] = {key};
  int unmapped[kSegmentFields] = {mapped ? 0 : 1};
  cudaIpcMemHandle_t handles[kSegmentFields] = {handle_of(tag)};
  long long sizes[kSegmentFields] = {bytes};
  table.note(peer, keys, unmapped, handles, sizes);
}

const long long kNoSizes[kSegmentFields] = {};

// Keys 1..kSegmentSlots of `peer`, each named twice (so mapped): every slot taken, key 1 oldest.
void fill_slots(PeerSegments& table, int peer) {
  for (unsigned long long key = 1; key <= kSegmentSlots; ++key) {
    name_one(table, peer, key, static_cast<unsigned char>(key));
    name_one(table, peer, key, static_cast<unsigned char>(key));
  }
}

// Whether `image` (a table as a kernel reads it) maps peer's `key`, looked up as the kernels do.
bool maps(const SegmentTable& image, int peer, unsigned long long key) {
  const int b = find_segment_bucket(image.key[peer], key);
  return b >= 0 && image.base[peer][b] != nullptr;
}

bool holds(const PeerSegments& table, int peer, unsigned long long key) {
  static SegmentTable image;
  table.fill(image);
  return maps(image, peer, key);
}

// For the tests written when the window was 4 notes, which fill every slot and then evict: with
// 512 the mappings they filled would still be in use (named within the window), and kept.
PeerSegments::Limits short_window() {
  PeerSegments::Limits limits;
  limits.second_sighting = 4;
  return limits;
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
  table.note(3, none, zero, handles, kNoSizes);
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
  for (int i = 0; i < PeerSegments::kSecondSighting; ++i) name_one(table, 1, 2000 + i, 50);
  name_one(table, 1, 1000, 100);
  name_one(table, 1, 1000, 100);
  table.retire(true);
  EXPECT_TRUE(holds(table, 1, 1000));
  EXPECT_FALSE(holds(table, 1, 1));
  EXPECT_EQ(table.closing(), 1);
  for (int i = 0; i < 10; ++i) {
    name_one(table, 1, 1000, 100, true);
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
    name_one(table, 1, 3000, 30, i >= 2);
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
  PeerSegments table(fake_mapper(driver), short_window());
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
  PeerSegments table(fake_mapper(driver), short_window());
  fill_slots(table, 2);
  EXPECT_EQ(table.mapped(2), kSegmentSlots);
  name_one(table, 2, 1, 1, true);  // key 1 is fresh again; key 2 is now the oldest
  name_one(table, 2, 1000, 100);
  name_one(table, 2, 1000, 100);
  EXPECT_EQ(table.mapped(2), kSegmentSlots);
  EXPECT_TRUE(holds(table, 2, 1000));
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
  table.note(6, keys, unmapped, handles, kNoSizes);
  EXPECT_TRUE(driver.log.empty());  // one dispatch is one sighting, however many fields name it
  table.note(6, keys, unmapped, handles, kNoSizes);
  EXPECT_EQ(driver.log.size(), 1u);
  EXPECT_EQ(table.mapped(6), 1);
}

MOELINK_TEST(peer_segments_keys_in_use_are_not_evicted_for_one_more) {
  FakeDriver driver;
  PeerSegments table(fake_mapper(driver));
  // Thirty micro-batches in turn, each naming five segments of its own: 150 keys in use, 128
  // slots. 128 get mapped; the others stay unmapped instead of evicting each other every round
  // (each eviction an open and a close, which waits for the device).
  static_assert(30 * kSegmentFields > kSegmentSlots, "more keys in use than slots");
  cudaIpcMemHandle_t handles[kSegmentFields];
  for (int f = 0; f < kSegmentFields; ++f) handles[f] = handle_of(static_cast<unsigned char>(f));
  int unmapped[kSegmentFields] = {1, 1, 1, 1, 1};
  for (int round = 0; round < 90; ++round) {
    const unsigned long long base = 10 * (round % 30);
    unsigned long long keys[kSegmentFields] = {base + 1, base + 2, base + 3, base + 4, base + 5};
    table.note(5, keys, unmapped, handles, kNoSizes);
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
    table.note(2, keys, unmapped, h, kNoSizes);
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

namespace {

constexpr long long kMiB = 1ll << 20;

// One note of `peer` as a kernel reports it: a field is unmapped when the table the kernel got
// (the image) does not map it.
void note_as_kernel(PeerSegments& table, int peer, const unsigned long long (&keys)[kSegmentFields],
                    const long long (&sizes)[kSegmentFields]) {
  int unmapped[kSegmentFields] = {};
  cudaIpcMemHandle_t handles[kSegmentFields];
  for (int f = 0; f < kSegmentFields; ++f) {
    unmapped[f] = keys[f] != 0 && !holds(table, peer, keys[f]);
    handles[f] = handle_of(static_cast<unsigned char>(keys[f]));
  }
  table.note(peer, keys, unmapped, handles, sizes);
}

// One forward step of a training loop as peer `peer`'s notes: per layer an uncached dispatch whose
// recv_x is held until the step ends (its own segment, layer_key(i)) and whose small outputs share
// one small-pool segment (key 7), then the layer's combine, whose input is a fresh expert output
// in one recurring segment (key 8) and whose weights are the small dispatch output.
template <class LayerKey>
void forward_step(PeerSegments& table, int peer, int layers, LayerKey layer_key) {
  for (int i = 0; i < layers; ++i) {
    note_as_kernel(table, peer, {layer_key(i), 0, 7, 7, 7}, {58 * kMiB, 0, 2 * kMiB, 2 * kMiB, 2 * kMiB});
    note_as_kernel(table, peer, {8, 7}, {58 * kMiB, 2 * kMiB});
  }
  table.retire(true);
}

int closes_in(const FakeDriver& driver) {
  int n = 0;
  for (const std::string& entry : driver.log) n += entry.rfind("close ", 0) == 0;
  return n;
}

}  // namespace

// The held-layers pattern at the default limits: 60 layers, so each layer's recv_x segment comes
// back once every 120 notes of its peer. All of them are mapped during the second step (at their
// second sighting), the third step finds every one mapped, and they stay so, with nothing opened,
// closed or copied again, for as many steps as the run goes on (well past stale_after).
MOELINK_TEST(peer_segments_a_step_of_held_layers_is_mapped_by_the_second_step_and_kept) {
  FakeDriver driver;
  auto device = std::make_unique<SegmentTable>();
  std::memset(static_cast<void*>(device.get()), 0, sizeof(SegmentTable));
  PeerSegments table(fake_mapper(driver), {}, device.get());
  constexpr int kLayers = 60;
  const auto layer_key = [](int i) { return 100ull + static_cast<unsigned long long>(i); };
  const auto all_layers_mapped = [&](int peer) {
    for (int i = 0; i < kLayers; ++i)
      if (!holds(table, peer, layer_key(i))) return false;
    return true;
  };
  // Peers 1..7 (keys are per process: every peer's layers use the same numbers).
  for (int peer = 1; peer < kSegmentPeers; ++peer) forward_step(table, peer, kLayers, layer_key);
  for (int peer = 1; peer < kSegmentPeers; ++peer) {
    EXPECT_EQ(table.mapped(peer), 2);  // the small segment and the combine input's, named every layer
    EXPECT_FALSE(holds(table, peer, layer_key(0)));
  }
  for (int peer = 1; peer < kSegmentPeers; ++peer) forward_step(table, peer, kLayers, layer_key);
  const long long opens = table.opens();
  EXPECT_EQ(opens, static_cast<long long>((kSegmentPeers - 1) * (kLayers + 2)));
  ASSERT_TRUE(table.upload() == device.get());
  const long long uploads = table.uploads();
  for (int peer = 1; peer < kSegmentPeers; ++peer) {
    EXPECT_TRUE(all_layers_mapped(peer));
    EXPECT_EQ(table.mapped(peer), kLayers + 2);
    EXPECT_EQ(table.mapped_bytes(peer), (kLayers + 1) * 58 * kMiB + 2 * kMiB);
    for (int i = 0; i < kLayers; ++i) EXPECT_TRUE(maps(*device, peer, layer_key(i)));  // the kernels' copy
  }
  const int steps = 2 * PeerSegments::kStaleAfter / (2 * kLayers) + 2;
  for (int step = 0; step < steps; ++step) {
    for (int peer = 1; peer < kSegmentPeers; ++peer) forward_step(table, peer, kLayers, layer_key);
    EXPECT_TRUE(table.upload() == device.get());
  }
  EXPECT_EQ(table.opens(), opens);
  EXPECT_EQ(table.uploads(), uploads);  // the table did not change: nothing was copied
  EXPECT_EQ(closes_in(driver), 0);
  EXPECT_EQ(table.closing(), 0);
  for (int peer = 1; peer < kSegmentPeers; ++peer) {
    EXPECT_TRUE(all_layers_mapped(peer));
    EXPECT_EQ(table.mapped(peer), kLayers + 2);
  }
}

// The same pattern once the peer's model shrinks to 30 layers: the other 30 segments are no longer
// named, so after stale_after of its notes they are dropped and closed; the 30 in use stay.
MOELINK_TEST(peer_segments_stale_after_still_drops_the_keys_no_longer_named) {
  FakeDriver driver;
  PeerSegments table(fake_mapper(driver));
  const auto layer_key = [](int i) { return 100ull + static_cast<unsigned long long>(i); };
  for (int step = 0; step < 3; ++step) forward_step(table, 3, 60, layer_key);
  EXPECT_EQ(table.mapped(3), 62);
  // Just short of stale: the first of them to go, layer 30, was named 59 notes before the third
  // step ended.
  const int short_steps = (PeerSegments::kStaleAfter - 2 * 30) / 60;
  for (int step = 0; step < short_steps; ++step) forward_step(table, 3, 30, layer_key);
  EXPECT_EQ(table.mapped(3), 62);
  EXPECT_EQ(closes_in(driver), 0);
  for (int step = 0; step < 3; ++step) forward_step(table, 3, 30, layer_key);
  EXPECT_EQ(table.mapped(3), 32);
  for (int i = 0; i < 60; ++i) EXPECT_EQ(holds(table, 3, layer_key(i)), i < 30);
  table.retire(true);
  EXPECT_EQ(closes_in(driver), 30);
  EXPECT_EQ(table.closing(), 0);
  EXPECT_EQ(table.mapped_bytes(3), 31 * 58 * kMiB + 2 * kMiB);
}

// MOELINK_SEGMENT_MAPPED_MB: past the bound the mappings named longest ago go (as many as the new
// one needs), never one still in use; a segment larger than the bound is never opened.
MOELINK_TEST(peer_segments_the_byte_bound_drops_the_mappings_named_longest_ago) {
  FakeDriver driver;
  PeerSegments::Limits limits = short_window();
  constexpr long long kSize = 100 * kMiB;
  limits.mapped_bytes = 4 * kSize;
  PeerSegments table(fake_mapper(driver), limits);
  const auto map = [&](unsigned long long key, long long bytes) {
    name_one(table, 0, key, static_cast<unsigned char>(key), false, bytes);
    name_one(table, 0, key, static_cast<unsigned char>(key), false, bytes);
  };
  for (unsigned long long key = 1; key <= 4; ++key) map(key, kSize);
  EXPECT_EQ(table.mapped(0), 4);
  EXPECT_EQ(table.mapped_bytes(0), 4 * kSize);
  name_one(table, 0, 1, 1, true);  // key 1 named again: key 2 is now the one named longest ago
  map(5, kSize);
  EXPECT_TRUE(holds(table, 0, 5));
  EXPECT_FALSE(holds(table, 0, 2));
  for (unsigned long long key : {1ull, 3ull, 4ull}) EXPECT_TRUE(holds(table, 0, key));
  EXPECT_EQ(table.mapped_bytes(0), 4 * kSize);
  // Twice the size: the two named longest ago (3, then 4) go, key 1 (named after them) stays.
  map(6, 2 * kSize);
  EXPECT_TRUE(holds(table, 0, 6));
  EXPECT_FALSE(holds(table, 0, 3));
  EXPECT_FALSE(holds(table, 0, 4));
  EXPECT_TRUE(holds(table, 0, 1));
  EXPECT_TRUE(holds(table, 0, 5));
  EXPECT_EQ(table.mapped_bytes(0), 4 * kSize);
  EXPECT_EQ(table.closing(), 3);
  // Larger than the bound itself: refused without an open, and not tried again.
  const long long opens = table.opens();
  map(7, 5 * kSize);
  map(7, 5 * kSize);
  EXPECT_FALSE(holds(table, 0, 7));
  EXPECT_EQ(table.opens(), opens);
  // Every mapping in use (named in this very note): a new key stays unmapped rather than evict one.
  cudaIpcMemHandle_t handles[kSegmentFields];
  for (int f = 0; f < kSegmentFields; ++f) handles[f] = handle_of(static_cast<unsigned char>(f + 20));
  const long long sizes[kSegmentFields] = {kSize, 2 * kSize, kSize, kSize, 0};
  const unsigned long long in_use[kSegmentFields] = {1, 6, 5, 8, 0};
  const int unmapped[kSegmentFields] = {0, 0, 0, 1, 0};
  table.note(0, in_use, unmapped, handles, sizes);
  table.note(0, in_use, unmapped, handles, sizes);
  EXPECT_FALSE(holds(table, 0, 8));
  EXPECT_EQ(table.opens(), opens);
  // Once key 1 is out of use (not named for the window), key 8 takes its bytes.
  const unsigned long long without_1[kSegmentFields] = {0, 6, 5, 8, 0};
  for (int i = 0; i < 3 * limits.second_sighting && !holds(table, 0, 8); ++i)
    table.note(0, without_1, unmapped, handles, sizes);
  EXPECT_TRUE(holds(table, 0, 8));
  EXPECT_FALSE(holds(table, 0, 1));
  EXPECT_EQ(table.mapped_bytes(0), 4 * kSize);
  table.retire(true);
  table.retire(true);
  EXPECT_EQ(closes_in(driver), 4);  // keys 2, 3, 4 and 1, once their marks passed
  EXPECT_EQ(table.closing(), 0);
}

// Every mapped key is found where the kernels look (linear probing from its hash bucket), however
// many share a bucket, the last bucket's run wrapping to the first; keys not mapped are not found.
MOELINK_TEST(peer_segments_table_image_finds_every_key_among_colliding_ones) {
  FakeDriver driver;
  PeerSegments table(fake_mapper(driver));
  std::vector<unsigned long long> keys;
  for (unsigned long long k = 1; keys.size() < 40; ++k)
    if (moelink::window::segment_bucket(k) == kSegmentBuckets - 1) keys.push_back(k);
  for (unsigned long long k = 1; keys.size() < static_cast<size_t>(kSegmentSlots); ++k)
    if (moelink::window::segment_bucket(k) != kSegmentBuckets - 1) keys.push_back(k);
  for (unsigned long long k : keys) {
    name_one(table, 4, k, 1);
    name_one(table, 4, k, 1);
  }
  EXPECT_EQ(table.mapped(4), kSegmentSlots);
  static SegmentTable image;
  table.fill(image);
  int held = 0;
  for (int b = 0; b < kSegmentBuckets; ++b) held += image.key[4][b] != 0;
  EXPECT_EQ(held, kSegmentSlots);
  for (unsigned long long k : keys) EXPECT_TRUE(maps(image, 4, k));
  // A receiver's probe of the same buckets as published (segments_opened) agrees.
  for (unsigned long long k : keys) EXPECT_TRUE(moelink::window::segment_listed(image.key[4], k));
  int absent_found = 0;
  for (unsigned long long k = 1; k < 100000; ++k)
    if (std::find(keys.begin(), keys.end(), k) == keys.end())
      absent_found += maps(image, 4, k) + moelink::window::segment_listed(image.key[4], k);
  EXPECT_EQ(absent_found, 0);
  EXPECT_FALSE(maps(image, 3, keys[0]));  // per peer
}

// upload(): a copy only when the mappings changed; each from a staging block whose earlier copy has
// been read (its mark passed); with every block still waiting, no table (the kernel then names no
// mapping) rather than a block rewritten under a queued copy; a refused copy is retried.
MOELINK_TEST(peer_segments_upload_copies_changes_and_never_rewrites_staging_a_copy_may_read) {
  FakeDriver driver;
  auto device = std::make_unique<SegmentTable>();
  std::memset(static_cast<void*>(device.get()), 0, sizeof(SegmentTable));
  PeerSegments table(fake_mapper(driver), {}, device.get());
  EXPECT_TRUE(table.upload() == device.get());
  EXPECT_EQ(table.uploads(), 1);
  EXPECT_TRUE(table.upload() == device.get());
  EXPECT_EQ(table.uploads(), 1);  // nothing changed
  unsigned long long key = 1;
  const auto map_new = [&] {
    name_one(table, 2, key, 1);
    name_one(table, 2, key, 1);
    ++key;
  };
  map_new();
  EXPECT_FALSE(maps(*device, 2, 1));  // not before the upload that precedes the next kernel
  EXPECT_TRUE(table.upload() == device.get());
  EXPECT_TRUE(maps(*device, 2, 1));
  // The copies are queued but not run yet (a long kernel ahead of them on the stream).
  driver.pass = 0;
  std::vector<const void*> blocks;
  for (int i = 1; i < PeerSegments::kStagingBlocks; ++i) {
    map_new();
    EXPECT_TRUE(table.upload() == device.get());
    blocks.push_back(driver.copied_from.back());
  }
  blocks.push_back(driver.copied_from[driver.copied_from.size() - PeerSegments::kStagingBlocks]);
  std::sort(blocks.begin(), blocks.end());
  EXPECT_TRUE(std::unique(blocks.begin(), blocks.end()) == blocks.end());  // each copy its own block
  EXPECT_EQ(driver.pinned, PeerSegments::kStagingBlocks);
  const size_t copies = driver.copied_from.size();
  map_new();
  EXPECT_TRUE(table.upload() == nullptr);
  EXPECT_EQ(driver.copied_from.size(), copies);
  EXPECT_FALSE(maps(*device, 2, key - 1));
  driver.pass = 1;
  EXPECT_TRUE(table.upload() == device.get());
  EXPECT_EQ(driver.copied_from.size(), copies + 1);
  EXPECT_TRUE(std::binary_search(blocks.begin(), blocks.end(), driver.copied_from.back()));  // reused
  for (unsigned long long k = 1; k < key; ++k) EXPECT_TRUE(maps(*device, 2, k));
  EXPECT_EQ(driver.pinned, PeerSegments::kStagingBlocks);
  driver.copy_ok = false;
  map_new();
  EXPECT_TRUE(table.upload() == nullptr);
  driver.copy_ok = true;
  EXPECT_TRUE(table.upload() == device.get());
  EXPECT_TRUE(maps(*device, 2, key - 1));
  table.close_all();
  EXPECT_EQ(driver.pinned, 0);
}
