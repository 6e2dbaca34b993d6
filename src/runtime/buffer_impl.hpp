#pragma once
// Buffer's private state, shared by the runtime's translation units (buffer.cpp, intranode.cpp).
#include <string>
#include <vector>

#include "kernels/launch.hpp"
#include "moelink/buffer.hpp"
#include "runtime/arena.hpp"

namespace moelink {

struct Buffer::Impl {
  std::shared_ptr<void> nvl_memory;  // header + data + arena, one cudaMalloc; the arena co-owns it
  char* nvl_base = nullptr;
  std::shared_ptr<detail::RecvArena> arena;  // null when num_arena_bytes == 0
  std::vector<void*> peer_base;  // per NVL rank; ours is nvl_base, others are IPC mappings
  kernels::PeerTable peers{};
  kernels::HostMailbox* mailbox = nullptr;      // host view
  kernels::HostMailbox* mailbox_dev = nullptr;  // device alias
  cudaEvent_t order_event = nullptr;            // reused to order the comm stream after the compute stream
  void* rdma = nullptr;
  bool nvshmem_joined = false;
  std::vector<uint8_t> unique_id;
  int op_seq = 0;
  int dispatch_seq = 0;  // every rank runs the same dispatches, so this numbers them identically
  int combine_seq = 0;
  std::string broken;  // non-empty once a peer timed out: the ring counters can't be trusted

  kernels::NvlHeader* header() const { return reinterpret_cast<kernels::NvlHeader*>(nvl_base); }
  void* data() const { return nvl_base + kernels::kNvlHeaderBytes; }
  // The arena follows the data region, page-aligned.
  static int64_t arena_offset(int64_t num_nvl_bytes) { return kernels::align_up(num_nvl_bytes, 4096); }
  // Where `bytes` at `ref` sit relative to our data region, as peers address them; -1 unless they
  // lie wholly in our receive arena (only there may peers read or write a caller's tensor).
  int64_t offset_in_arena(const TensorRef& ref, int64_t bytes) const {
    if (ref.data == nullptr || !arena || !arena->contains(ref.data, bytes)) return -1;
    return static_cast<const char*>(ref.data) - static_cast<const char*>(data());
  }
};

}  // namespace moelink
