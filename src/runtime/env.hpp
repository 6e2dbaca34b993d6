#pragma once
// Every tunable read from the environment, in one place.

namespace moelink::env {

// MOELINK_TIMEOUT_S: how long any wait for a peer may last, device and host side (default 100 s).
double timeout_seconds();

}  // namespace moelink::env
