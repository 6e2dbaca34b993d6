// The order of a Buffer's work across streams (src/runtime/launch_order.hpp), over fake streams and
// a fake device that tracks what each stream's next work is ordered after: every operation must run
// after every earlier eager one (captured ones after every earlier one of their capture), with
// events only between two eager streams or within one capture, and none at all in a run of calls on
// one stream.
#include <cstdint>
#include <map>
#include <set>
#include <string>

#include "harness.hpp"
#include "runtime/launch_order.hpp"

using moelink::runtime::Capture;
using moelink::runtime::LaunchOrder;

namespace {

cudaStream_t stream(uintptr_t id) { return reinterpret_cast<cudaStream_t>(id); }
const cudaStream_t comm = stream(1), a = stream(2), b = stream(3);

// Streams, their captures, and for each stream the operations its next work is ordered after
// (eager, and within its capture). Queue() does what Context::queue_on does, then checks the order.
struct FakeDevice {
  LaunchOrder order{comm};
  std::map<cudaStream_t, Capture> captures;
  std::map<cudaStream_t, std::set<int>> after, captured_after;
  std::set<int> eager_ops;
  std::map<unsigned long long, std::set<int>> captured_ops;
  int next_op = 0, joins = 0, queries = 0;
  bool refused = false;

  Capture capture_of(cudaStream_t s) {
    ++queries;
    return captures[s];
  }
  void begin_capture(cudaStream_t s, unsigned long long id) {
    captures[s] = {true, id};
    captured_after[s].clear();
  }
  void end_capture(unsigned long long id) {
    for (auto& [s, c] : captures)
      if (c.active && c.id == id) c = {};
  }

  // One operation (or a claim's memset, a barrier) queued on `s`; `covered`: a stream `s` already
  // waited for (begin_op's join after the caller's stream), applied here as the device would.
  void queue(cudaStream_t s, std::optional<cudaStream_t> covered = std::nullopt) {
    refused = false;
    const Capture cap = captures[s];
    if (covered) {
      const Capture from = captures[*covered];
      if (!cap.active && !from.active) after[s].insert(after[*covered].begin(), after[*covered].end());
      if (cap.active && from.active && cap.id == from.id)
        captured_after[s].insert(captured_after[*covered].begin(), captured_after[*covered].end());
    }
    if (!order.settled(s)) {
      const LaunchOrder::Join j = order.plan(s, capture_of(s), [this](cudaStream_t x) { return capture_of(x); }, covered);
      if (j.hidden) {
        refused = true;
        return;
      }
      if (j.needed) {
        ++joins;
        const Capture from = captures[j.record_on];
        if (!cap.active && !from.active) {
          after[s].insert(after[j.record_on].begin(), after[j.record_on].end());
        } else if (cap.active && from.active && cap.id == from.id) {
          captured_after[s].insert(captured_after[j.record_on].begin(), captured_after[j.record_on].end());
        } else {
          moelink::testing::record_failure(__FILE__, __LINE__, "a join between an eager stream and a captured one, "
                                           "or across two captures (CUDA refuses it)");
        }
      }
      order.take(j);
    }
    const int op = next_op++;
    if (!cap.active) {
      for (int earlier : eager_ops)
        if (!after[s].count(earlier))
          moelink::testing::record_failure(__FILE__, __LINE__, "eager op " + std::to_string(op) +
                                           " is not ordered after eager op " + std::to_string(earlier));
      eager_ops.insert(op);
      after[s].insert(op);
    } else {
      for (int earlier : captured_ops[cap.id])
        if (!captured_after[s].count(earlier))
          moelink::testing::record_failure(__FILE__, __LINE__, "captured op " + std::to_string(op) +
                                           " is not ordered after captured op " + std::to_string(earlier));
      captured_ops[cap.id].insert(op);
      captured_after[s].insert(op);
    }
  }
};

}  // namespace

MOELINK_TEST(launch_order_a_run_of_calls_on_one_stream_makes_no_cuda_call) {
  FakeDevice d;
  for (int i = 0; i < 4; ++i) d.queue(comm);  // setup, barriers, normal-mode operations
  EXPECT_EQ(d.joins, 0);
  EXPECT_EQ(d.queries, 0);
  d.queue(a);  // the first low-latency call on the caller's stream joins the comm stream's work
  EXPECT_EQ(d.joins, 1);
  const int queries = d.queries;
  for (int i = 0; i < 8; ++i) d.queue(a);  // dispatch, combine, dispatch, ...: nothing at all
  EXPECT_EQ(d.joins, 1);
  EXPECT_EQ(d.queries, queries);
}

MOELINK_TEST(launch_order_joins_every_change_of_stream_with_one_event) {
  FakeDevice d;
  d.queue(a);     // a low-latency dispatch with return_recv_hook, its send on the caller's stream
  d.queue(b);     // the hook, called from another stream
  EXPECT_EQ(d.joins, 2);
  d.queue(comm);  // a normal-mode operation with previous_event: the comm stream did not wait for b
  EXPECT_EQ(d.joins, 3);
  d.queue(b);
  d.queue(b);
  EXPECT_EQ(d.joins, 4);
}

MOELINK_TEST(launch_order_takes_no_event_from_a_stream_already_waited_for) {
  FakeDevice d;
  d.queue(a);
  const int joins = d.joins;
  d.queue(comm, a);  // begin_op without previous_event: the comm stream waits for the caller's a
  EXPECT_EQ(d.joins, joins);
  d.queue(comm, b);  // covered by b, but the latest work is on comm itself: nothing either
  EXPECT_EQ(d.joins, joins);
  d.queue(a);
  EXPECT_EQ(d.joins, joins + 1);
}

MOELINK_TEST(launch_order_keeps_eager_order_across_a_capture) {
  FakeDevice d;
  d.queue(comm);
  d.queue(a);  // eager, on the caller's stream
  d.begin_capture(b, 7);
  d.queue(b);  // captured: no event from the eager a (CUDA refuses that join), and none is needed
  d.queue(b);
  d.queue(comm, b);  // a captured normal-mode operation: the comm stream joined b's capture
  d.queue(b);
  d.end_capture(7);
  // Eager again: ordered after the eager call on a, not after the captured ones (which ran nowhere).
  d.queue(comm);
  d.queue(a);
  d.queue(a);
}

MOELINK_TEST(launch_order_joins_streams_within_a_capture_only) {
  FakeDevice d;
  d.queue(a);
  d.begin_capture(b, 5);
  d.queue(b);  // captured: nothing from the eager a
  EXPECT_EQ(d.joins, 1);
  d.begin_capture(a, 5);  // a forked into b's capture
  d.queue(a);             // joins b within the capture
  EXPECT_EQ(d.joins, 2);
  d.end_capture(5);
  d.begin_capture(a, 6);
  d.begin_capture(b, 6);
  d.queue(a);  // settled, and a new capture: the one a's latest work belongs to is no longer known
  d.queue(b);  // so it asks, finds a in its own capture, and joins
  EXPECT_EQ(d.joins, 3);
  d.end_capture(6);
  d.begin_capture(b, 8);
  d.queue(b);  // a's work of capture 6 orders nothing in capture 8
  EXPECT_EQ(d.joins, 3);
  d.end_capture(8);
  d.queue(b);  // eager: after the eager call on a
  EXPECT_EQ(d.joins, 4);
}

MOELINK_TEST(launch_order_refuses_eager_work_whose_predecessor_sits_behind_a_capture) {
  FakeDevice d;
  d.queue(a);
  d.begin_capture(a, 9);  // a capture on the stream that holds the latest eager call
  d.queue(a);             // captured there: fine
  d.queue(b);             // eager meanwhile: no event can follow a's eager call now
  EXPECT_TRUE(d.refused);
  EXPECT_EQ(d.next_op, 2);
  d.end_capture(9);
  d.queue(b);
  EXPECT_FALSE(d.refused);
}

MOELINK_TEST(launch_order_treats_the_legacy_stream_as_a_stream) {
  // The legacy stream (null) is a stream like any other to the order (Context's query answers for
  // it without asking CUDA): a call on it after one on a joins a.
  FakeDevice d;
  d.queue(a);
  d.queue(nullptr);
  d.queue(nullptr);
  EXPECT_EQ(d.joins, 2);
}
