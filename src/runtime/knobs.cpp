#include "runtime/knobs.hpp"

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

#include "runtime/errors.hpp"

namespace moelink::knobs {

namespace {

const char* value_of(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr || *value == '\0' ? nullptr : value;
}

bool flag(const char* name, bool fallback) {
  const char* value = value_of(name);
  if (value == nullptr) return fallback;
  const std::string text(value);
  if (text != "0" && text != "1") detail::raise(ErrorKind::kValue, name, ": expected 0 or 1, got '", text, "'");
  return text == "1";
}

// An integer knob in [lo, hi], or `fallback` when unset; `expected` words the range for the error.
long integer(const char* name, long lo, long hi, long fallback, const char* expected) {
  const char* value = value_of(name);
  if (value == nullptr) return fallback;
  char* end = nullptr;
  const long n = std::strtol(value, &end, 10);
  if (end == value || *end != '\0' || n < lo || n > hi)
    detail::raise(ErrorKind::kValue, name, ": expected ", expected, ", got '", value, "'");
  return n;
}

const char* transport_name(LowLatencyTransport transport) {
  switch (transport) {
    case LowLatencyTransport::kIpc: return "ipc";
    case LowLatencyTransport::kNvshmem: return "nvshmem";
    default: return "auto";
  }
}

const char* lane_put_name(LanePut put) {
  switch (put) {
    case LanePut::kFake: return "fake";
    case LanePut::kNvshmem: return "nvshmem";
    default: return "stores";
  }
}

}  // namespace

double timeout_seconds() {
  // Read on every Buffer construction, not cached: tests lower it between Buffers of one process.
  const char* value = value_of("MOELINK_TIMEOUT_S");
  if (value == nullptr) return 100.0;
  char* end = nullptr;
  const double seconds = std::strtod(value, &end);
  if (end == value || *end != '\0' || !(seconds > 0))
    detail::raise(ErrorKind::kValue, "MOELINK_TIMEOUT_S: expected a positive number of seconds, got '", value, "'");
  return seconds;
}

bool l2_hints() {
  static const bool enabled = flag("MOELINK_L2_HINTS", true);
  return enabled;
}

bool l2_discard() {
  static const bool enabled = flag("MOELINK_L2_DISCARD", true);
  return enabled;
}

bool prefetch() {
  static const bool enabled = flag("MOELINK_PREFETCH", false);
  return enabled;
}

int scales_mode() { return static_cast<int>(integer("MOELINK_SCALES_GATHER", 0, 2, 2, "0, 1 or 2")); }

bool debug() {
  static const bool enabled = flag("MOELINK_DEBUG", false);
  return enabled;
}

unsigned long long debug_epoch_start() {
  const char* value = value_of("MOELINK_DEBUG_EPOCH_START");
  if (value == nullptr) return 0;
  char* end = nullptr;
  const unsigned long long start = std::strtoull(value, &end, 0);
  if (end == value || *end != '\0' || *value == '-')
    detail::raise(ErrorKind::kValue, "MOELINK_DEBUG_EPOCH_START: expected an unsigned 64-bit integer, got '", value, "'");
  return start;
}

int nvl_ranks_per_node() {
  return static_cast<int>(integer("MOELINK_NVL_RANKS", 1, 8, 0, "1..8 GPUs per node"));
}

unsigned spin_backoff_ns() {
  return static_cast<unsigned>(integer("MOELINK_SPIN_BACKOFF_NS", 0, 10000, 0, "0..10000 ns"));
}

LowLatencyTransport low_latency_transport() {
  const char* value = value_of("MOELINK_LL_TRANSPORT");
  if (value == nullptr) return LowLatencyTransport::kAuto;
  const std::string text(value);
  if (text == "ipc") return LowLatencyTransport::kIpc;
  if (text == "nvshmem") return LowLatencyTransport::kNvshmem;
  detail::raise(ErrorKind::kValue, "MOELINK_LL_TRANSPORT: expected ipc or nvshmem, got '", text, "'");
}

bool debug_low_latency_force_put() { return flag("MOELINK_DEBUG_LL_FORCE_PUT", false); }

LanePut debug_lane_force_put() {
  const char* value = value_of("MOELINK_DEBUG_LANE_FORCE_PUT");
  if (value == nullptr) return LanePut::kStores;
  const std::string text(value);
  if (text == "fake") return LanePut::kFake;
  if (text == "nvshmem") return LanePut::kNvshmem;
  detail::raise(ErrorKind::kValue, "MOELINK_DEBUG_LANE_FORCE_PUT: expected fake or nvshmem, got '", text, "'");
}

bool peer_segments() { return flag("MOELINK_PEER_SEGMENTS", true); }

int segment_window() {
  return static_cast<int>(integer("MOELINK_SEGMENT_WINDOW", 2, 1 << 20, 512, "2..1048576 notes"));
}

long long segment_mapped_mb() {
  return integer("MOELINK_SEGMENT_MAPPED_MB", 0, 1L << 24, 16384, "0..16777216 MB");
}

void log_once() {
  if (!debug()) return;
  static std::once_flag once;
  std::call_once(once, [] {
    std::fprintf(stderr,
                 "moelink: knobs: MOELINK_TIMEOUT_S=%g MOELINK_L2_HINTS=%d MOELINK_L2_DISCARD=%d MOELINK_PREFETCH=%d "
                 "MOELINK_SCALES_GATHER=%d MOELINK_DEBUG_EPOCH_START=%llu MOELINK_SPIN_BACKOFF_NS=%u MOELINK_LL_TRANSPORT=%s "
                 "MOELINK_DEBUG_LL_FORCE_PUT=%d MOELINK_DEBUG_LANE_FORCE_PUT=%s MOELINK_PEER_SEGMENTS=%d "
                 "MOELINK_SEGMENT_WINDOW=%d MOELINK_SEGMENT_MAPPED_MB=%lld MOELINK_DEBUG=1\n",
                 timeout_seconds(), l2_hints() ? 1 : 0, l2_discard() ? 1 : 0, prefetch() ? 1 : 0,
                 scales_mode(), debug_epoch_start(), spin_backoff_ns(),
                 transport_name(low_latency_transport()), debug_low_latency_force_put() ? 1 : 0,
                 lane_put_name(debug_lane_force_put()), peer_segments() ? 1 : 0, segment_window(), segment_mapped_mb());
  });
}

}  // namespace moelink::knobs
