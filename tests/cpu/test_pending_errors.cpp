// Where a call raises the errors its host sees recorded (src/runtime/pending_errors.hpp), over a
// fake of the runtime Context that logs each step: a collective's entry raises faults only, its end
// waits for the comm stream before it raises a data error, get_dispatch_layout raises it on entry,
// and nothing drains or raises while the errors are deferred or the stream is being captured; the
// raise of a data error says how many later ones found the record taken, and a count alone raises
// nothing.
#include <string>
#include <vector>

#include "harness.hpp"
#include "runtime/pending_errors.hpp"

using moelink::Error;
using moelink::ErrorKind;

namespace {

// What the Context's host sees, and the log of what it was asked to do.
struct FakeHost {
  bool fault = false, data = false, capturing = false, drains = true, fault_while_draining = false;
  bool defer_data_errors = false;
  std::vector<std::string> log;

  bool fault_recorded() const { return fault; }
  bool data_error_recorded() const { return data; }
  bool comm_stream_capturing() const { return capturing; }
  bool drain(double seconds, bool strict) {
    // A lenient drain would count a refused query as drained and raise under running kernels.
    log.push_back("drain " + std::to_string(static_cast<int>(seconds)) + (strict ? "" : " lenient"));
    fault = fault || fault_while_draining;
    return drains;
  }
  void check_faults() {
    log.push_back("check faults");
    if (fault) throw Error(ErrorKind::kTimeout, "moelink: rank 1 timed out");
  }
  void raise_data_error() {
    log.push_back("raise data");
    if (!data) return;
    data = false;  // raised once
    throw Error(ErrorKind::kValue, "moelink: num_worst_tokens: rank 1 would receive 9 rows");
  }
};

using Log = std::vector<std::string>;

}  // namespace

MOELINK_TEST(pending_collective_entry_raises_faults_but_not_a_pending_data_error) {
  FakeHost host;
  host.data = true;
  EXPECT_NO_THROW(moelink::runtime::check_on_entry(host, true));
  EXPECT_TRUE(host.data);  // still recorded, for the call's end
  EXPECT_TRUE(host.log == Log{"check faults"});
  host.fault = true;
  EXPECT_THROW_KIND(moelink::runtime::check_on_entry(host, true), ErrorKind::kTimeout, "timed out");
}

MOELINK_TEST(pending_layout_entry_still_raises_a_pending_data_error) {
  FakeHost host;
  host.data = true;
  EXPECT_THROW_KIND(moelink::runtime::check_on_entry(host, false), ErrorKind::kValue, "num_worst_tokens");
  EXPECT_FALSE(host.data);
  EXPECT_TRUE(host.log == (Log{"check faults", "raise data"}));
  // Halfway through an internode operation layout holds it back too.
  FakeHost deferred;
  deferred.data = deferred.defer_data_errors = true;
  EXPECT_NO_THROW(moelink::runtime::check_on_entry(deferred, false));
  EXPECT_TRUE(deferred.data);
}

MOELINK_TEST(pending_end_of_call_drains_before_it_raises) {
  FakeHost host;
  host.data = true;
  EXPECT_THROW_KIND(moelink::runtime::raise_at_end(host, 12.0), ErrorKind::kValue, "num_worst_tokens");
  EXPECT_TRUE(host.log == (Log{"drain 12", "check faults", "raise data"}));
  EXPECT_FALSE(host.data);
  // Raised once: the next call's end finds nothing and does not wait.
  host.log.clear();
  EXPECT_NO_THROW(moelink::runtime::raise_at_end(host, 12.0));
  EXPECT_TRUE(host.log.empty());
}

MOELINK_TEST(pending_end_of_call_without_an_error_neither_waits_nor_raises) {
  FakeHost host;
  EXPECT_NO_THROW(moelink::runtime::raise_at_end(host, 12.0));
  EXPECT_TRUE(host.log.empty());
}

MOELINK_TEST(pending_end_of_call_leaves_the_error_recorded_where_it_may_not_raise) {
  FakeHost deferred;  // an internode leg: the operation's own end raises it
  deferred.data = deferred.defer_data_errors = true;
  FakeHost captured;  // nothing runs while captured, and querying the stream would end the capture
  captured.data = captured.capturing = true;
  FakeHost faulted;  // the Buffer is broken: the next call raises that
  faulted.data = faulted.fault = true;
  FakeHost stuck;  // the stream did not drain in time: raising would free memory under a kernel
  stuck.data = true;
  stuck.drains = false;
  for (FakeHost* host : {&deferred, &captured, &faulted, &stuck}) {
    EXPECT_NO_THROW(moelink::runtime::raise_at_end(*host, 12.0));
    EXPECT_TRUE(host->data);
  }
  EXPECT_TRUE(deferred.log.empty());
  EXPECT_TRUE(captured.log.empty());
  EXPECT_TRUE(faulted.log.empty());
  EXPECT_TRUE(stuck.log == Log{"drain 12"});
}

MOELINK_TEST(pending_end_of_call_raises_a_fault_found_while_draining) {
  FakeHost host;
  host.data = host.fault_while_draining = true;
  EXPECT_THROW_KIND(moelink::runtime::raise_at_end(host, 12.0), ErrorKind::kTimeout, "timed out");
  EXPECT_TRUE(host.log == (Log{"drain 12", "check faults"}));
}

namespace {

// The host's view of the data record for raise_recorded_data_error: the record, the device's count
// of the errors that found it taken, and the log of what was read and done.
struct RecordHost {
  bool recorded = false;
  unsigned total = 0;
  moelink::runtime::LostDataErrors lost_data_errors;
  std::vector<std::string> log;

  bool data_error_recorded() const { return recorded; }
  std::string describe_data_error() {
    log.push_back("describe");
    return "moelink: num_worst_tokens: rank 1 would receive 9 rows";
  }
  unsigned data_lost_total() {
    log.push_back("total");
    return total;
  }
  void clear_data_error() {
    log.push_back("clear");
    recorded = false;
  }
};

// The message raise_recorded_data_error throws, or "" when it throws nothing.
std::string raised_message(RecordHost& host) {
  try {
    moelink::runtime::raise_recorded_data_error(host);
  } catch (const Error& e) {
    EXPECT_TRUE(e.kind() == ErrorKind::kValue);
    return e.what();
  }
  return "";
}

const std::string kRecorded = "moelink: num_worst_tokens: rank 1 would receive 9 rows";

}  // namespace

MOELINK_TEST(pending_a_data_error_says_how_many_later_operations_found_its_record_taken) {
  RecordHost host;
  host.recorded = true;
  EXPECT_EQ(raised_message(host), kRecorded);  // nothing lost: the message as recorded
  EXPECT_FALSE(host.recorded);
  // Read after the record (the device counted after it filled the record), before it is cleared.
  EXPECT_TRUE(host.log == (Log{"describe", "total", "clear"}));
  host.recorded = true;
  host.total = 1;
  EXPECT_EQ(raised_message(host),
            kRecorded + " (and 1 later operation on this rank failed too; its error was not recorded)");
  // Only what was counted since the last raise.
  host.recorded = true;
  host.total = 3;
  EXPECT_EQ(raised_message(host),
            kRecorded + " (and 2 later operations on this rank failed too; their errors were not recorded)");
  host.recorded = true;
  EXPECT_EQ(raised_message(host), kRecorded);
}

MOELINK_TEST(pending_a_lost_count_alone_never_raises_and_waits_for_the_next_error) {
  RecordHost host;
  host.total = 2;  // operations that lost the claim after the host had read the last record
  EXPECT_EQ(raised_message(host), "");
  EXPECT_TRUE(host.log.empty());  // the count is not even read, so it is not used up
  EXPECT_EQ(host.lost_data_errors.raised, 0u);
  host.recorded = true;
  EXPECT_EQ(raised_message(host),
            kRecorded + " (and 2 later operations on this rank failed too; their errors were not recorded)");
}

MOELINK_TEST(pending_lost_count_is_a_running_total_across_the_wrap) {
  moelink::runtime::LostDataErrors lost;
  lost.raised = ~0u - 1;  // 2^32 - 2
  EXPECT_EQ(lost.take(1), 3u);  // 2^32 - 1, 0, 1
  EXPECT_EQ(lost.raised, 1u);
  EXPECT_EQ(lost.take(1), 0u);
  // A total below the one raised (two counts that raced) adds nothing and keeps the total raised.
  EXPECT_EQ(lost.take(0), 0u);
  EXPECT_EQ(lost.raised, 1u);
  EXPECT_EQ(lost.take(2), 1u);
  EXPECT_EQ(moelink::runtime::lost_data_errors_note(0), "");
}
