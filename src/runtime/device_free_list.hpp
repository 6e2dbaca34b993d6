#pragma once
// Driver objects kept for reuse, per device: making and destroying a stream or an event is a
// driver call, and each belongs to the device that was current when it was made, so a kept one is
// handed out only for that device.
#include <cstddef>
#include <limits>
#include <map>
#include <mutex>
#include <vector>

namespace moelink::runtime {

template <typename Handle>
class DeviceFreeList {
 public:
  explicit DeviceFreeList(size_t max_kept_per_device = std::numeric_limits<size_t>::max())
      : max_kept_(max_kept_per_device) {}

  // A kept handle of `device` (the one kept last), or Handle{} when there is none.
  Handle take(int device) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(device);
    if (it == free_.end() || it->second.empty()) return Handle{};
    const Handle handle = it->second.back();
    it->second.pop_back();
    return handle;
  }

  // Keeps `handle` for `device`; false when that device's list is full, and the caller destroys it.
  bool keep(int device, Handle handle) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<Handle>& kept = free_[device];
    if (kept.size() >= max_kept_) return false;
    kept.push_back(handle);
    return true;
  }

 private:
  const size_t max_kept_;
  std::mutex mutex_;
  std::map<int, std::vector<Handle>> free_;
};

}  // namespace moelink::runtime
