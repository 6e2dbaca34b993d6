#include "window/window.hpp"

#include "runtime/errors.hpp"

namespace moelink::window {

Window::Window(const Transport& transport, void* local, int self, int size)
    : transport_(&transport), local_(local), self_(self), size_(size) {}

std::vector<uint8_t> Window::export_local() const {
  if (transport_ == nullptr) detail::raise(ErrorKind::kState, "window: no transport");
  return transport_->export_region(local_);
}

void Window::open(const std::vector<std::vector<uint8_t>>& exported, const std::vector<int>& global_rank) {
  if (open_) detail::raise(ErrorKind::kState, "window: already open");
  if (static_cast<int>(exported.size()) != size_ || static_cast<int>(global_rank.size()) != size_)
    detail::raise(ErrorKind::kValue, "window: expected ", size_, " members, got ", exported.size());
  members_.assign(size_, nullptr);
  members_[self_] = local_;
  open_ = true;  // so close() unmaps what was opened before a failure
  try {
    for (int p = 0; p < size_; ++p)
      if (p != self_) members_[p] = transport_->open_region(exported[p], global_rank[p]);
  } catch (...) {
    close();
    throw;
  }
}

void Window::close() {
  if (!open_) return;
  for (int p = 0; p < size_; ++p)
    if (p != self_ && members_[p] != nullptr) transport_->close_region(members_[p]);
  members_.clear();
  open_ = false;
}

}  // namespace moelink::window
