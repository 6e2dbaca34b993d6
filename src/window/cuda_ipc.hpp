#pragma once
// CUDA IPC: share a cudaMalloc'd region with the other processes of the node (the cuda_ipc()
// transport of window.hpp).
#include <cstddef>
#include <cstdint>
#include <vector>

namespace moelink::window {

inline constexpr size_t kIpcHandleBytes = 64;

std::vector<uint8_t> ipc_export(void* base);
// Maps a peer's region into this process. `peer` names the peer in errors.
void* ipc_open(const std::vector<uint8_t>& handle, int peer);
void ipc_close(void* mapped);

}  // namespace moelink::window
