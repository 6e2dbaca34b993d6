#pragma once
// A window: one region that every peer of a group can address, and the transport that made it so.
// A transport is a table of entries (export, open, close), not a branch: the runtime never asks which
// one it holds. CUDA IPC is the transport between processes of one node today; the NVSHMEM
// symmetric heap (window/nvshmem.hpp) is the one low-latency and internode modes add.
// window/device.cuh is the device-side vocabulary over a window.
#include <cstdint>
#include <vector>

namespace moelink::window {

// The device policy (window/device.cuh) a launch takes, as the host names it: the host picks the
// kernel's instantiation, the kernel never asks. kFakePuts: the put path's protocol over IPC (the
// internode lane with MOELINK_DEBUG_LANE_FORCE_PUT=fake). kPuts: the same over NVSHMEM, the
// plugin's build of the lane's kernels (window/nvshmem/lane_*.cu), which a lane picks once it has
// moved into its symmetric region (Context::open_symmetric_lane; docs/internal/INTERNODE_LANE.md, step 3).
enum class Policy { kStores, kFakePuts, kPuts };

struct Transport {
  const char* name;
  // Bytes that let a peer open `base` (any bootstrap carries them unchanged).
  std::vector<uint8_t> (*export_region)(void* base);
  // Maps the region a peer exported into this process. `peer` names it in errors.
  void* (*open_region)(const std::vector<uint8_t>& exported, int peer);
  void (*close_region)(void* mapped);
};

// Peers are processes of this node; regions come from cudaMalloc.
const Transport& cuda_ipc();

class Window {
 public:
  Window() = default;
  // `local` is this rank's region; it is window member `self` of `size`.
  Window(const Transport& transport, void* local, int self, int size);

  std::vector<uint8_t> export_local() const;
  // exported[p]: what member p exported; global_rank[p] names it in errors. Opens every peer.
  void open(const std::vector<std::vector<uint8_t>>& exported, const std::vector<int>& global_rank);
  // Unmaps every peer; idempotent. The local region stays (its owner frees it).
  void close();

  // Member p's region in this process (ours for p == self), or nullptr before open().
  void* member(int p) const { return p >= 0 && p < static_cast<int>(members_.size()) ? members_[p] : nullptr; }
  int self() const { return self_; }
  int size() const { return size_; }
  bool is_open() const { return open_; }

 private:
  const Transport* transport_ = nullptr;
  void* local_ = nullptr;
  int self_ = 0, size_ = 0;
  bool open_ = false;
  std::vector<void*> members_;
};

}  // namespace moelink::window
