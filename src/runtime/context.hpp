#pragma once
// The runtime context of one rank: everything the operations share and that lives as long as the
// Buffer does (topology, the memory map, the comm stream, the error record, the order event), and
// the steps every operation takes (entry checks, stream ordering, the device barrier, error
// decoding). Modes are free functions over a Context (modes/<mode>/host.hpp); the Buffer owns one
// and forwards to them. Per-call values are small structs (moelink/ops.hpp).
#include <cuda_runtime_api.h>

#include <memory>
#include <string>
#include <vector>

#include "common/header.hpp"
#include "moelink/buffer.hpp"
#include "runtime/arena.hpp"
#include "runtime/memory_map.hpp"
#include "window/window.hpp"

namespace moelink::runtime {

class Context {
 public:
  explicit Context(const BufferOptions& options);
  ~Context();  // release()
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  // ---- the rank and its resources (read by modes; written by the lifecycle in buffer.cpp) ----
  Topology topo;
  int device = 0;
  int64_t num_nvl_bytes = 0;
  int64_t num_rdma_bytes = 0;
  bool low_latency_mode = false;
  bool explicitly_destroy = false;
  double timeout_s = 100.0;
  bool available = false;
  bool destroyed = false;
  cudaStream_t comm_stream = nullptr;

  std::shared_ptr<void> nvl_memory;  // header + data + arena, one cudaMalloc; the arena co-owns it
  char* nvl_base = nullptr;
  std::shared_ptr<detail::RecvArena> arena;  // null when num_arena_bytes == 0
  window::Window nvl_window;                 // the node's NVLink buffers, ours included
  kernels::PeerTable peers{};
  HostMailbox* mailbox = nullptr;      // host view
  HostMailbox* mailbox_dev = nullptr;  // device alias
  cudaEvent_t order_event = nullptr;   // reused to order the comm stream after the compute stream
  void* rdma = nullptr;
  bool nvshmem_joined = false;
  std::vector<uint8_t> unique_id;
  int op_seq = 0;
  int dispatch_seq = 0;  // every rank runs the same dispatches, so this numbers them identically
  int combine_seq = 0;
  std::string broken;  // non-empty once a peer timed out: the ring counters can't be trusted

  NvlHeader* header() const { return reinterpret_cast<NvlHeader*>(nvl_base); }
  void* data() const { return nvl_base + kNvlHeaderBytes; }
  NvlHeader* peer_header(int nvl_rank) const { return reinterpret_cast<NvlHeader*>(peers.header[nvl_rank]); }
  // Where `bytes` at `ref` sit relative to our data region, as peers address them; -1 unless they
  // lie wholly in our receive arena (only there may peers read or write a caller's tensor).
  int64_t offset_in_arena(const TensorRef& ref, int64_t bytes) const;

  // Unmaps the peers and frees everything; marks the context destroyed. Idempotent.
  void release();

  // ---- steps every operation takes ----
  kernels::ErrorSink error_sink() const;
  // Raises kState when the Buffer is destroyed, not synced, or broken by an earlier timeout.
  void require_usable(const char* op) const;
  // Raises the first error a kernel recorded; a timeout also marks the Buffer broken.
  void check_device_errors();
  // Orders the comm stream after previous_event or the compute stream.
  void begin_op(const StreamOrder& order);
  // The event at the end of the op; without async_finish the compute stream waits for it.
  EventHandle end_op(const StreamOrder& order);
  // Launches the device barrier over the NVLink peers on the comm stream.
  void launch_barrier(int tag);
  // The barrier, then a host wait for it; raises what it found.
  void barrier(int tag);
};

}  // namespace moelink::runtime
