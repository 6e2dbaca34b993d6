#include "window/cuda_ipc.hpp"

#include <cuda_runtime_api.h>

#include <cstring>

#include "runtime/errors.hpp"
#include "window/window.hpp"

namespace moelink::window {

static_assert(sizeof(cudaIpcMemHandle_t) == kIpcHandleBytes);

std::vector<uint8_t> ipc_export(void* base) {
  cudaIpcMemHandle_t handle;
  MOELINK_CUDA_CHECK(cudaIpcGetMemHandle(&handle, base));
  std::vector<uint8_t> bytes(kIpcHandleBytes);
  std::memcpy(bytes.data(), &handle, kIpcHandleBytes);
  return bytes;
}

void* ipc_open(const std::vector<uint8_t>& bytes, int peer) {
  if (bytes.size() != kIpcHandleBytes)
    detail::raise(ErrorKind::kValue, "ipc_handles[", peer, "]: expected ", kIpcHandleBytes, " bytes, got ", bytes.size());
  cudaIpcMemHandle_t handle;
  std::memcpy(&handle, bytes.data(), kIpcHandleBytes);
  void* mapped = nullptr;
  const cudaError_t status = cudaIpcOpenMemHandle(&mapped, handle, cudaIpcMemLazyEnablePeerAccess);
  if (status != cudaSuccess) {
    cudaGetLastError();
    detail::raise(ErrorKind::kCuda, "opening the NVLink buffer of rank ", peer, " failed: ", cudaGetErrorName(status),
                  " (", cudaGetErrorString(status), "); is that rank alive, on this node, and was its handle sent unchanged?");
  }
  return mapped;
}

void ipc_close(void* mapped) {
  // A failed close leaves nothing to undo, and a last error left behind would surface at the
  // caller's next launch check as its own.
  if (mapped && cudaIpcCloseMemHandle(mapped) != cudaSuccess) cudaGetLastError();
}

const Transport& cuda_ipc() {
  static const Transport transport{"cuda_ipc", &ipc_export, &ipc_open, &ipc_close};
  return transport;
}

}  // namespace moelink::window
