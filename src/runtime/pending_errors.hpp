#pragma once
// When a call raises the errors its host sees recorded. A kernel records a data error on every
// rank's device asynchronously, so ranks' hosts see it at different calls. A collective call that
// raised it at its entry would open nothing on the rank whose host saw it, while a peer whose host
// had not opened the operation and waited out MOELINK_TIMEOUT_S for it. So a collective call checks
// only faults on entry and raises a data error at its end, after its last launch: every rank then
// opens every operation its peers open, whatever its host has seen (docs/ARCHITECTURE.md, "Pending
// errors"). Templates over the host's view (the runtime Context; a fake in tests/cpu) so that the
// order of the steps is tested without a GPU.
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

}  // namespace moelink::runtime
