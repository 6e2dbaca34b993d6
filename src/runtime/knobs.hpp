#pragma once
// Every MOELINK_* environment variable the C++ core reads, in one place (docs/KNOBS.md lists them
// all, the Python side's too). Each is read once; a malformed value raises kValue naming it.
// With MOELINK_DEBUG=1 the values in use are printed once per process, on the first Buffer.

namespace moelink::knobs {

// MOELINK_TIMEOUT_S: how long any wait for a peer may last, device and host side (default 100 s).
double timeout_seconds();

// MOELINK_L2_HINTS (0/1, default 1): evict-first L2 policy on data the kernels touch once.
// (Evict-last on ring writes measured slower: the rings are larger than L2.)
bool l2_hints();

// MOELINK_L2_DISCARD (0/1, default 1): drop ring lines from L2 once consumed instead of letting
// them be written back to HBM; the ring's next lap rewrites them anyway.
bool l2_discard();

// MOELINK_PREFETCH (0/1, default 0): a dispatch kernel asks L2 for the routing, top-k and scales
// its blocks read a batch at a time, before its opening. Off: measured 40 us slower per cached fp8
// dispatch at 4x24 with L2 cold, no gain at 2x24 (bench/NOTES.md, eighth session); kept for the
// next measurement of where a cold call's time goes.
bool prefetch();

// MOELINK_SCALES_GATHER (0/1/2, default 2): how a direct dispatch writes column-major scales.
// 2: senders stage them row-major in the receiver's unused rings and the receiver transposes them
// into its output once its senders are done; 1: after each batch, one coalesced run per scale index
// to each destination; 0: each warp its own token's scales, strided, as row-major ones are written.
// For measuring what column-major outputs cost (bench/NOTES.md, twelfth and thirteenth sessions).
// Read at every dispatch, so that one process can time the modes against each other.
int scales_mode();

// MOELINK_DEBUG (0/1, default 0): log the knobs' values once.
bool debug();

// MOELINK_DEBUG_EPOCH_START (unsigned 64-bit, default 0): where barrier epochs and operation
// sequence numbers start, the same on every rank; tests start them next to the wrap point.
unsigned long long debug_epoch_start();

// MOELINK_NVL_RANKS (1..8): GPUs per node, read where no Buffer says so (the static size hints);
// 0 when unset (the Python side then uses min(ranks, 8), and the hints deep_ep's 8).
int nvl_ranks_per_node();

// MOELINK_SPIN_BACKOFF_NS (0..10000, default 0): a device wait that has spun 64 times sleeps this
// many ns (__nanosleep) between its further polls. 0 keeps the tight spin. For measuring whether
// spinning warps slow the working ones on their SMs (bench/NOTES.md); read on every Buffer.
unsigned spin_backoff_ns();

// MOELINK_LL_TRANSPORT (ipc | nvshmem; default ipc when every rank is in one NVLink domain, else
// nvshmem): where the low-latency region lives. ipc carves it from the NVLink buffer (peers reached
// by stores, no NVSHMEM); nvshmem makes it one symmetric NVSHMEM allocation (peers NVSHMEM maps get
// stores, the others put-with-signal). Read on every Buffer.
enum class LowLatencyTransport { kAuto, kIpc, kNvshmem };
LowLatencyTransport low_latency_transport();

// MOELINK_DEBUG_LL_FORCE_PUT (0/1, default 0): with the nvshmem transport, treat every other rank as
// one NVSHMEM cannot map, so the put path runs (and is tested) on one GPU. Read on every Buffer.
bool debug_low_latency_force_put();

// MOELINK_DEBUG_LANE_FORCE_PUT (fake | nvshmem; unset: neither): how an internode Buffer's lane
// (the node-to-node leg, python/moelink/_internode.py) fills its peers' rings. Unset, by stores;
// fake, by the put path's protocol over the same IPC mappings (mirrors, one ranged copy per batch,
// counted tail signals: docs/internal/INTERNODE_LANE.md), so that it is tested without NVSHMEM;
// nvshmem, by NVSHMEM puts (the plugin's builds, over a symmetric region: Context::open_symmetric_lane;
// one host only). Must agree on every rank. Read for each lane Buffer, and by the RDMA size hint
// (the put path's mirrors).
enum class LanePut { kStores, kFake, kNvshmem };
LanePut debug_lane_force_put();

// MOELINK_PEER_SEGMENTS (0/1, default 1): peers write dispatch rows straight into outputs that are
// ordinary cudaMalloc'd (caching-allocator) tensors, by mapping their segments with legacy CUDA IPC
// (window/peer_segments.hpp), and token owners read ordinary combine inputs in place the same way;
// 0 sends every row through the rings unless it is in the receive arena.
// Ranks may differ: a rank that does not take part makes its peers use the rings. Read on every Buffer.
bool peer_segments();

// MOELINK_SEGMENT_WINDOW (2..1048576 notes, default 512): a peer's segment is mapped when the peer
// names it again within this many of its notes (dispatches and combines that name segments), and a
// mapping it has not named in twice as many is closed. 512 maps a segment named once every training
// step (a layer's output held until its backward) by the second step, for steps of up to 512 notes
// (60 layers' forward and backward dispatches and combines make ~240). Read on every Buffer.
int segment_window();

// MOELINK_SEGMENT_MAPPED_MB (0..16777216, default 16384): MB of one peer's segments this rank keeps
// mapped at most, i.e. of the peer's memory its mappings may keep alive once the peer frees it;
// past it the mappings named longest ago are closed. Read on every Buffer.
long long segment_mapped_mb();

// Prints every knob's value to stderr once per process when debug() is on.
void log_once();

}  // namespace moelink::knobs
