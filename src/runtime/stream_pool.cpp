#include "runtime/stream_pool.hpp"

#include "runtime/device_free_list.hpp"
#include "runtime/errors.hpp"

namespace moelink::runtime {

namespace {

// Never destroyed: its streams must stay valid until the process exits.
DeviceFreeList<cudaStream_t>& pool() {
  static auto* streams = new DeviceFreeList<cudaStream_t>;
  return *streams;
}

}  // namespace

cudaStream_t acquire_comm_stream(int device) {
  cudaStream_t stream = pool().take(device);
  if (stream != nullptr) return stream;
  MOELINK_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  return stream;
}

void give_back_comm_stream(cudaStream_t stream, int device) {
  if (stream != nullptr) pool().keep(device, stream);
}

}  // namespace moelink::runtime
