#include "runtime/stream_pool.hpp"

#include <map>
#include <mutex>
#include <vector>

#include "runtime/errors.hpp"

namespace moelink::runtime {

namespace {

struct Pool {
  std::mutex mutex;
  std::map<int, std::vector<cudaStream_t>> free;  // by device
};

// Never destroyed: its streams must stay valid until the process exits.
Pool& pool() {
  static Pool* p = new Pool;
  return *p;
}

}  // namespace

cudaStream_t acquire_comm_stream(int device) {
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    auto& streams = p.free[device];
    if (!streams.empty()) {
      cudaStream_t stream = streams.back();
      streams.pop_back();
      return stream;
    }
  }
  cudaStream_t stream = nullptr;
  MOELINK_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  return stream;
}

void give_back_comm_stream(cudaStream_t stream, int device) {
  if (stream == nullptr) return;
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.free[device].push_back(stream);
}

}  // namespace moelink::runtime
