// The host-side pieces of the runtime that need no GPU: epoch arithmetic across the wrap, the
// fault word and digest encodings every rank must decode alike, the wait-step table, the knobs'
// parsing, the window's bookkeeping over a transport table, and the per-device free lists that keep
// streams and events for reuse.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/header.hpp"
#include "harness.hpp"
#include "moelink/event.hpp"
#include "moelink/config.hpp"
#include "runtime/context.hpp"
#include "runtime/device_free_list.hpp"
#include "runtime/knobs.hpp"
#include "runtime/wait_steps.hpp"
#include "window/nvshmem_world.hpp"
#include "window/window.hpp"

using moelink::ErrorKind;
using namespace moelink::kernels;

MOELINK_TEST(epochs_order_across_the_wrap) {
  const Epoch near_wrap = ~0ull - 2;  // 2^64 - 3
  EXPECT_TRUE(epoch_reached(near_wrap, near_wrap));
  EXPECT_FALSE(epoch_reached(near_wrap, near_wrap + 1));
  // After the wrap a later epoch is numerically smaller and must still count as later.
  const Epoch after = near_wrap + 5;  // 2
  EXPECT_EQ(after, 2ull);
  EXPECT_TRUE(epoch_reached(after, near_wrap));
  EXPECT_FALSE(epoch_reached(near_wrap, after));
  // A signal one barrier ahead of the waiter satisfies it; one behind does not.
  for (Epoch base : {Epoch{0}, Epoch{1} << 31, near_wrap}) {
    EXPECT_TRUE(epoch_reached(base + 1, base));
    EXPECT_FALSE(epoch_reached(base - 1, base));
  }
}

MOELINK_TEST(fault_word_names_lost_rank_reporter_step_and_barrier) {
  for (int lost = 0; lost < moelink::kMaxNvlRanks; ++lost)
    for (int reporter = 0; reporter < moelink::kMaxNvlRanks; ++reporter)
      for (int tag : {-1, 0, 3}) {
        const int word = encode_fault(lost, reporter, 37, tag);
        EXPECT_GT(word, 0);  // 0 means "no fault"
        EXPECT_EQ(fault_lost(word), lost);
        EXPECT_EQ(fault_reporter(word), reporter);
        EXPECT_EQ(fault_step(word), 37);
        EXPECT_EQ(fault_barrier_tag(word), tag);
      }
}

MOELINK_TEST(digest_words_differ_for_every_field_ranks_may_disagree_on) {
  using moelink::DType;
  using moelink::runtime::make_digest;
  const Digest base = make_digest(kOpCombine, 12, 128, 16, 7168, DType::kBFloat16, 8, 0, 256);
  const std::vector<std::pair<int, Digest>> variants = {
      {kDigestOperation, make_digest(kOpCachedDispatch, 12, 128, 16, 7168, DType::kBFloat16, 8, 0, 256)},
      {kDigestConfig, make_digest(kOpCombine, 8, 128, 16, 7168, DType::kBFloat16, 8, 0, 256)},
      {kDigestConfig, make_digest(kOpCombine, 12, 256, 16, 7168, DType::kBFloat16, 8, 0, 256)},
      {kDigestConfig, make_digest(kOpCombine, 12, 128, 6, 7168, DType::kBFloat16, 8, 0, 256)},
      {kDigestRow, make_digest(kOpCombine, 12, 128, 16, 4096, DType::kBFloat16, 8, 0, 256)},
      {kDigestRow, make_digest(kOpCombine, 12, 128, 16, 7168, DType::kFloat8E4M3, 8, 0, 256)},
      {kDigestTopK, make_digest(kOpCombine, 12, 128, 16, 7168, DType::kBFloat16, 4, 0, 256)},
      {kDigestExperts, make_digest(kOpCombine, 12, 128, 16, 7168, DType::kBFloat16, 8, 0, 64)},
  };
  for (const auto& [word, d] : variants) {
    for (int w = 0; w < kDigestCompared; ++w) {
      if (w == word)
        EXPECT_NE(d.w[w], base.w[w]);
      else
        EXPECT_EQ(d.w[w], base.w[w]);
    }
  }
  // The handle word is the device's to fill; the verdict word is never compared.
  EXPECT_EQ(base.w[kDigestHandle], 0ull);
  EXPECT_EQ(base.w[kDigestVerdict], 0ull);
  EXPECT_LT(static_cast<int>(kDigestHandle), static_cast<int>(kDigestCompared));
  EXPECT_EQ(static_cast<int>(kDigestVerdict), static_cast<int>(kDigestCompared));
}

MOELINK_TEST(wait_steps_registered_by_modes_are_named) {
  // Intranode registers its steps from its host code, which the test binary links in.
  const std::string notify = moelink::runtime::wait_step_description(32);
  EXPECT_EQ(notify, std::string("dispatch notify"));
  EXPECT_EQ(std::string(moelink::runtime::wait_step_description(12345)), std::string("an operation"));
  static const moelink::runtime::WaitStepRegistration extra{{12346, "a test step"}};
  EXPECT_EQ(std::string(moelink::runtime::wait_step_description(12346)), std::string("a test step"));
}

MOELINK_TEST(knobs_read_timeout_and_reject_malformed_values) {
  setenv("MOELINK_TIMEOUT_S", "2.5", 1);
  EXPECT_EQ(moelink::knobs::timeout_seconds(), 2.5);
  setenv("MOELINK_TIMEOUT_S", "soon", 1);
  EXPECT_THROW_KIND(moelink::knobs::timeout_seconds(), ErrorKind::kValue, "MOELINK_TIMEOUT_S");
  setenv("MOELINK_TIMEOUT_S", "-1", 1);
  EXPECT_THROW_KIND(moelink::knobs::timeout_seconds(), ErrorKind::kValue, "MOELINK_TIMEOUT_S");
  unsetenv("MOELINK_TIMEOUT_S");
  EXPECT_EQ(moelink::knobs::timeout_seconds(), 100.0);
}

MOELINK_TEST(knobs_read_the_low_latency_transport_and_the_forced_put_path) {
  using moelink::knobs::LowLatencyTransport;
  unsetenv("MOELINK_LL_TRANSPORT");
  EXPECT_TRUE(moelink::knobs::low_latency_transport() == LowLatencyTransport::kAuto);
  setenv("MOELINK_LL_TRANSPORT", "ipc", 1);
  EXPECT_TRUE(moelink::knobs::low_latency_transport() == LowLatencyTransport::kIpc);
  setenv("MOELINK_LL_TRANSPORT", "nvshmem", 1);
  EXPECT_TRUE(moelink::knobs::low_latency_transport() == LowLatencyTransport::kNvshmem);
  setenv("MOELINK_LL_TRANSPORT", "rdma", 1);
  EXPECT_THROW_KIND(moelink::knobs::low_latency_transport(), ErrorKind::kValue, "MOELINK_LL_TRANSPORT");
  unsetenv("MOELINK_LL_TRANSPORT");
  unsetenv("MOELINK_DEBUG_LL_FORCE_PUT");
  EXPECT_FALSE(moelink::knobs::debug_low_latency_force_put());
  setenv("MOELINK_DEBUG_LL_FORCE_PUT", "1", 1);
  EXPECT_TRUE(moelink::knobs::debug_low_latency_force_put());
  setenv("MOELINK_DEBUG_LL_FORCE_PUT", "yes", 1);
  EXPECT_THROW_KIND(moelink::knobs::debug_low_latency_force_put(), ErrorKind::kValue, "MOELINK_DEBUG_LL_FORCE_PUT");
  unsetenv("MOELINK_DEBUG_LL_FORCE_PUT");
}

MOELINK_TEST(knobs_read_the_lane_put_switch) {
  using moelink::knobs::LanePut;
  unsetenv("MOELINK_DEBUG_LANE_FORCE_PUT");
  EXPECT_TRUE(moelink::knobs::debug_lane_force_put() == LanePut::kStores);
  setenv("MOELINK_DEBUG_LANE_FORCE_PUT", "fake", 1);
  EXPECT_TRUE(moelink::knobs::debug_lane_force_put() == LanePut::kFake);
  // The put path's mirrors double the lane's rings, and only when it is forced.
  const moelink::Config config(20, 6, 256, 6, 256);
  const int64_t with_mirrors = config.get_rdma_buffer_size_hint(14336, 16);
  setenv("MOELINK_DEBUG_LANE_FORCE_PUT", "nvshmem", 1);
  EXPECT_TRUE(moelink::knobs::debug_lane_force_put() == LanePut::kNvshmem);
  for (const char* bad : {"1", "puts", "FAKE"}) {
    setenv("MOELINK_DEBUG_LANE_FORCE_PUT", bad, 1);
    EXPECT_THROW_KIND(moelink::knobs::debug_lane_force_put(), ErrorKind::kValue, "MOELINK_DEBUG_LANE_FORCE_PUT");
  }
  unsetenv("MOELINK_DEBUG_LANE_FORCE_PUT");
  const int64_t rings = config.get_rdma_buffer_size_hint(14336, 16);
  EXPECT_GT(with_mirrors, rings);
  EXPECT_EQ(rings, moelink::Config(20, 6, 256).get_nvl_buffer_size_hint(14336, 2));
}

MOELINK_TEST(knobs_read_the_spin_backoff_and_reject_malformed_values) {
  unsetenv("MOELINK_SPIN_BACKOFF_NS");
  EXPECT_EQ(moelink::knobs::spin_backoff_ns(), 0u);
  setenv("MOELINK_SPIN_BACKOFF_NS", "250", 1);
  EXPECT_EQ(moelink::knobs::spin_backoff_ns(), 250u);
  for (const char* bad : {"-1", "10001", "fast", "25ns"}) {
    setenv("MOELINK_SPIN_BACKOFF_NS", bad, 1);
    EXPECT_THROW_KIND(moelink::knobs::spin_backoff_ns(), ErrorKind::kValue, "MOELINK_SPIN_BACKOFF_NS");
  }
  unsetenv("MOELINK_SPIN_BACKOFF_NS");
}

MOELINK_TEST(knobs_parse_the_epoch_start_as_unsigned_64_bit) {
  setenv("MOELINK_DEBUG_EPOCH_START", "18446744073709551516", 1);
  EXPECT_EQ(moelink::knobs::debug_epoch_start(), 18446744073709551516ull);
  setenv("MOELINK_DEBUG_EPOCH_START", "0x10", 1);
  EXPECT_EQ(moelink::knobs::debug_epoch_start(), 16ull);
  setenv("MOELINK_DEBUG_EPOCH_START", "-5", 1);
  EXPECT_THROW_KIND(moelink::knobs::debug_epoch_start(), ErrorKind::kValue, "MOELINK_DEBUG_EPOCH_START");
  setenv("MOELINK_DEBUG_EPOCH_START", "12x", 1);
  EXPECT_THROW_KIND(moelink::knobs::debug_epoch_start(), ErrorKind::kValue, "MOELINK_DEBUG_EPOCH_START");
  unsetenv("MOELINK_DEBUG_EPOCH_START");
  EXPECT_EQ(moelink::knobs::debug_epoch_start(), 0ull);
}

namespace {

// A transport over plain host memory: "exporting" a region writes its address, "opening" reads it
// back, and every open and close is counted, so the window's bookkeeping is visible.
int opened = 0, closed = 0;
std::vector<uint8_t> fake_export(void* base) {
  const auto at = reinterpret_cast<uintptr_t>(base);
  std::vector<uint8_t> bytes(sizeof(at));
  for (size_t i = 0; i < sizeof(at); ++i) bytes[i] = static_cast<uint8_t>(at >> (8 * i));
  return bytes;
}
void* fake_open(const std::vector<uint8_t>& bytes, int peer) {
  if (bytes.size() != sizeof(uintptr_t)) throw moelink::Error(ErrorKind::kValue, "moelink: peer " + std::to_string(peer));
  uintptr_t at = 0;
  for (size_t i = 0; i < sizeof(at); ++i) at |= static_cast<uintptr_t>(bytes[i]) << (8 * i);
  ++opened;
  return reinterpret_cast<void*>(at);
}
void fake_close(void*) { ++closed; }
const moelink::window::Transport fake{"fake", &fake_export, &fake_open, &fake_close};

}  // namespace

MOELINK_TEST(window_opens_every_peer_and_closes_what_it_opened) {
  opened = closed = 0;
  char regions[3][16];
  std::vector<moelink::window::Window> windows;
  for (int r = 0; r < 3; ++r) windows.emplace_back(fake, regions[r], r, 3);
  std::vector<std::vector<uint8_t>> exported;
  for (auto& w : windows) exported.push_back(w.export_local());
  windows[1].open(exported, {10, 11, 12});
  EXPECT_EQ(windows[1].member(0), static_cast<void*>(regions[0]));
  EXPECT_EQ(windows[1].member(1), static_cast<void*>(regions[1]));  // itself: never opened
  EXPECT_EQ(windows[1].member(2), static_cast<void*>(regions[2]));
  EXPECT_EQ(opened, 2);
  EXPECT_THROW_KIND(windows[1].open(exported, {10, 11, 12}), ErrorKind::kState, "already open");
  windows[1].close();
  windows[1].close();  // idempotent
  EXPECT_EQ(closed, 2);
  EXPECT_EQ(windows[1].member(0), nullptr);

  // A peer that cannot be opened leaves nothing mapped behind.
  opened = closed = 0;
  exported[2] = {1, 2, 3};
  EXPECT_THROW_KIND(windows[0].open(exported, {10, 11, 12}), ErrorKind::kValue, "peer 12");
  EXPECT_EQ(opened, 1);
  EXPECT_EQ(closed, 1);
  EXPECT_FALSE(windows[0].is_open());
}

MOELINK_TEST(nvshmem_world_is_shared_by_its_ranks_and_finalised_by_the_last_to_leave) {
  using moelink::window::NvshmemWorld;
  NvshmemWorld world;
  const std::vector<uint8_t> id(128, 7), other(128, 8);
  EXPECT_TRUE(world.admit(2, 4, id) == NvshmemWorld::Join::kInit);
  world.joined(2, 4, id);
  // A second Buffer over the same ranks (an internode Buffer's lane beside a low-latency Buffer).
  EXPECT_TRUE(world.admit(2, 4, id) == NvshmemWorld::Join::kShare);
  world.joined(2, 4, id);
  EXPECT_EQ(world.members(), 2);
  // Another world, or this one as another PE, would be a second NVSHMEM job in one process.
  EXPECT_THROW_KIND(world.admit(2, 4, other), ErrorKind::kState, "cannot join another one");
  EXPECT_THROW_KIND(world.admit(1, 4, id), ErrorKind::kState, "asked to be pe 1 of 4");
  EXPECT_THROW_KIND(world.admit(2, 8, id), ErrorKind::kState, "asked to be pe 2 of 8");
  EXPECT_FALSE(world.left());  // the other Buffer still puts over it
  EXPECT_EQ(world.pe(), 2);
  EXPECT_TRUE(world.left());
  EXPECT_TRUE(world.id().empty());
  EXPECT_THROW_KIND(world.left(), ErrorKind::kState, "without a join");
  // Once left, any world may be joined again.
  EXPECT_TRUE(world.admit(0, 2, other) == NvshmemWorld::Join::kInit);

  // A world that lost a PE is left without finalize by every member, and never entered again.
  NvshmemWorld broken;
  broken.joined(0, 2, id);
  broken.joined(0, 2, id);
  broken.lose(1);
  EXPECT_EQ(broken.lost_pe(), 1);
  EXPECT_FALSE(broken.left());
  EXPECT_FALSE(broken.left());  // the last member too: NVSHMEM's finalize would wait for pe 1
  EXPECT_THROW_KIND(broken.admit(0, 2, id), ErrorKind::kState, "lost pe 1");
}

MOELINK_TEST(device_free_list_hands_out_only_what_its_device_gave_back) {
  using moelink::runtime::DeviceFreeList;
  int a = 0, b = 0, c = 0;
  DeviceFreeList<int*> list(2);
  EXPECT_TRUE(list.take(0) == nullptr);  // nothing kept yet
  EXPECT_TRUE(list.keep(0, &a));
  EXPECT_TRUE(list.keep(1, &b));
  EXPECT_TRUE(list.take(2) == nullptr);  // another device's handles are never handed out
  EXPECT_TRUE(list.take(1) == &b);
  EXPECT_TRUE(list.take(1) == nullptr);
  EXPECT_TRUE(list.keep(0, &b));
  EXPECT_FALSE(list.keep(0, &c));  // full: the caller destroys it
  EXPECT_TRUE(list.take(0) == &b);  // the one kept last first
  EXPECT_TRUE(list.take(0) == &a);
  EXPECT_TRUE(list.take(0) == nullptr);
  DeviceFreeList<int*> unbounded;
  for (int i = 0; i < 1000; ++i) EXPECT_TRUE(unbounded.keep(0, &a));
}


MOELINK_TEST(deferred_event_handle_is_valid_before_any_cuda_call) {
  // No GPU here: a handle that made a CUDA call would fail. Its record waits for the first use.
  const moelink::EventHandle deferred = moelink::EventHandle::deferred(nullptr, 0);
  EXPECT_TRUE(deferred.valid());
  const moelink::EventHandle copy = deferred;  // copies share the one event, recorded once
  EXPECT_TRUE(copy.valid());
  EXPECT_FALSE(moelink::EventHandle().valid());
}
