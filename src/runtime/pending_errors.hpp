#pragma once
// When a call raises the errors its host sees recorded. A kernel records a data error on every
// rank's device asynchronously, so ranks' hosts see it at different calls. A collective call that
// raised it at its entry would open nothing on the rank whose host saw it, while a peer whose host
// had not opened the operation and waited out MOELINK_TIMEOUT_S for it. So a collective call checks
// only faults on entry and raises a data error at its end, after its last launch: every rank then
// opens every operation its peers open, whatever its host has seen (docs/ARCHITECTURE.md, "Pending
// errors"). Templates over the host's view (the runtime Context; a fake in tests/cpu) so that the
// order of the steps is tested without a GPU.
#include <string>
#include <utility>

#include "moelink/error.hpp"

namespace moelink::runtime {

// The check a call makes before it launches anything. Faults always raise (the Buffer is broken).
// A call that opens no collective (get_dispatch_layout) raises a data error here too, unless
// defer_data_errors holds them back (internode mode, halfway through one of its operations).
template <class Host>
void check_on_entry(Host& host, bool opens_collective) {
  host.check_faults();
  if (!opens_collective && !host.defer_data_errors) host.raise_data_error();
}

// The end of a collective call, after its last launch: raises the data error the host sees
// recorded now, left by this call or an earlier one. First a bounded wait for the comm stream
// (drain_s), since the exception frees, as it unwinds, outputs its kernels may still write (their
// poison too). Nothing while defer_data_errors holds errors back, nor while the comm stream is being
// captured (nothing runs then, and querying a capturing stream would end the capture): the error
// stays recorded for the end of a later call. Nothing either where a fault is recorded (the next
// call raises it) or where the stream has not drained in time or its query was refused (raising now
// could free memory under a kernel; the error stays recorded, as it would have for a call that saw
// nothing).
template <class Host>
void raise_at_end(Host& host, double drain_s) {
  if (host.defer_data_errors || !host.data_error_recorded() || host.fault_recorded()) return;
  if (host.comm_stream_capturing()) return;
  if (!host.drain(drain_s, /*strict=*/true)) return;
  host.check_faults();  // a peer lost while the stream drained: that is what the caller must hear
  host.raise_data_error();
}

// The data errors a rank's record had no room for. The record holds one error until the host
// raises it, which may be at a later call's end, so an operation failing meanwhile finds it taken
// and is only counted (common/waits.cuh, report_data). The device's count is a running total that
// nothing resets; the host keeps the total it has raised. A reset could lose counts: where the host
// raises without a drain (layout's entry, check_device_errors), kernels queued before the memset
// that gives the claim back may still lose the claim after the host has read the record, and a
// reset made at that read would wipe them. Against the running total each is counted with the next
// error this rank raises instead (whose note then calls it later, though it failed before).
struct LostDataErrors {
  unsigned raised = 0;  // the device's total as of the last raise

  // How many operations were counted since the last raise, given the device's total now; from
  // then on they are raised. A total below the one raised (two counts that raced, which stream
  // order excludes unless a graph replays beside eager calls) adds nothing.
  unsigned take(unsigned total) {
    const int since = static_cast<int>(total - raised);
    if (since <= 0) return 0;
    raised = total;
    return static_cast<unsigned>(since);
  }
};

// What a raised data error adds for `count` operations whose errors were not recorded ("" for 0),
// so that every poisoned output is still followed by an error that says so.
inline std::string lost_data_errors_note(unsigned count) {
  if (count == 0) return "";
  if (count == 1) return " (and 1 later operation on this rank failed too; its error was not recorded)";
  return " (and " + std::to_string(count) +
         " later operations on this rank failed too; their errors were not recorded)";
}

// Raises the data error the host sees recorded, once, with the count of those that found the
// record taken; clears it first. Nothing when no error is recorded, whatever the count: a count
// without a record (operations that lost the claim after the host had read the record) waits for
// the next error. The count is read after the record, as the device wrote it after the record.
template <class Host>
void raise_recorded_data_error(Host& host) {
  if (!host.data_error_recorded()) return;
  std::string message = host.describe_data_error();
  message += lost_data_errors_note(host.lost_data_errors.take(host.data_lost_total()));
  host.clear_data_error();
  throw Error(ErrorKind::kValue, std::move(message));
}

}  // namespace moelink::runtime
