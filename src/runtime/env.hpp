#pragma once
// Every tunable read from the environment, in one place.

namespace moelink::env {

// MOELINK_TIMEOUT_S: how long any wait for a peer may last, device and host side (default 100 s).
double timeout_seconds();

// MOELINK_L2_HINTS (0/1, default 1): evict-first L2 policy on data the kernels touch once.
// (Evict-last on ring writes measured slower: the rings are larger than L2.)
bool l2_hints();

// MOELINK_L2_DISCARD (0/1, default 1): drop ring lines from L2 once consumed instead of letting
// them be written back to HBM; the ring's next lap rewrites them anyway.
bool l2_discard();

}  // namespace moelink::env
