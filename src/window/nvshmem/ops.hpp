#pragma once
// The table libmoelink_nvshmem.so hands the core: the NVSHMEM transport behind window/nvshmem.hpp.
// NVSHMEM lives in that plugin, not in libmoelink, so that moelink loads (and runs intranode)
// where NVSHMEM is not installed; the core opens the plugin the first time the RDMA buffer is used.
// Both sides are built together, so the table may use C++ types; kAbi catches a stale plugin.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/header.hpp"
#include "modes/intranode/contract.hpp"
#include "modes/low_latency/contract.hpp"

namespace moelink::window::nvshmem_plugin {

// 5: DispatchArgs and DirectTarget changed (staged column-major scales).
inline constexpr int kAbi = 6;
inline constexpr const char* kLibrary = "libmoelink_nvshmem.so";
inline constexpr const char* kEntry = "moelink_nvshmem_ops";

struct Ops {
  int abi;
  std::vector<uint8_t> (*unique_id)();
  void (*join)(int pe, int num_pes, const std::vector<uint8_t>& root_unique_id);
  void* (*alloc)(int64_t bytes);
  void (*release)(void* ptr);
  void (*barrier_all)();
  void (*leave)();
  // Collective, after join: a ring of plain stores (to peers nvshmem_ptr maps) and of
  // put-with-signal through the device API. Returns "" on success; *mapped says whether the next PE
  // was mapped (so the store path ran too).
  std::string (*self_test)(bool* mapped);
  // Host nvshmem_ptr: `symmetric` (this PE's address) in PE pe's copy, mapped into this process, or
  // null where NVSHMEM cannot map that PE.
  void* (*peer_pointer)(void* symmetric, int pe);
  // The low-latency kernels built with puts (window/nvshmem/low_latency_*.cu), launched as
  // libmoelink launches its own, and the blocks of the fewest-fitting of them one SM holds.
  void (*low_latency_dispatch)(const low_latency::DispatchArgs& args, int blocks, cudaStream_t stream);
  void (*low_latency_combine)(const low_latency::CombineArgs& args, int blocks, cudaStream_t stream);
  int (*low_latency_blocks_per_sm)();
  // The internode lane's kernels built with puts (window/nvshmem/lane*.cu), launched as libmoelink
  // launches its own builds of them; lane_peers first, once per membership: pes[p] is lane rank
  // p's PE, which every later lane kernel's puts go to.
  void (*lane_peers)(const std::vector<int>& pes);
  void (*lane_notify)(const intranode::NotifyArgs& args, cudaStream_t stream);
  void (*lane_dispatch)(const intranode::DispatchArgs& args, cudaStream_t stream);
  void (*lane_combine)(const intranode::CombineArgs& args, cudaStream_t stream);
  void (*lane_opening)(const kernels::PeerTable& peers, int rank, int num_ranks, const kernels::Opening& opening,
                       const kernels::ErrorSink& err, cudaStream_t stream);
  void (*lane_barrier)(const kernels::PeerTable& peers, int rank, int num_ranks, int tag,
                       const kernels::ErrorSink& err, cudaStream_t stream);
  int (*lane_blocks_per_sm)();
  // After join, on every PE together: the world's bounded barrier (world_barrier.cu). -1 when every
  // PE arrived within timeout_s, else the lowest PE that did not (-2: this PE's CUDA calls failed).
  int (*world_barrier)(double timeout_s);
  // The world lost a PE: this process leaves it without NVSHMEM's collectives (which would wait for
  // that PE forever), leaking its symmetric heap; NVSHMEM cannot be joined again in this process.
  void (*abandon)();
};

std::string self_test(bool* mapped);                 // self_test.cu
void set_lane_peers(const int* pes, int num_peers);  // lane.cu
int world_barrier(uint64_t* words, uint64_t epoch, double timeout_s);  // world_barrier.cu

}  // namespace moelink::window::nvshmem_plugin

// The plugin's one exported symbol (kEntry).
extern "C" const moelink::window::nvshmem_plugin::Ops* moelink_nvshmem_ops();
