#include "window/peer_segments.hpp"

#include <cuda.h>

#include <cstring>

#include "window/cuda_ipc.hpp"

namespace moelink::window {

namespace {

using PointerGetAttributes = CUresult (*)(unsigned int, CUpointer_attribute*, void**, CUdeviceptr);

// Through the runtime's entry point, so libmoelink needs no link to libcuda.
PointerGetAttributes pointer_get_attributes() {
  static const PointerGetAttributes fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult status{};
#if CUDART_VERSION >= 12050
    const cudaError_t found = cudaGetDriverEntryPointByVersion("cuPointerGetAttributes", &f, 12000, cudaEnableDefault, &status);
#else
    const cudaError_t found = cudaGetDriverEntryPoint("cuPointerGetAttributes", &f, cudaEnableDefault, &status);
#endif
    if (found != cudaSuccess || status != cudaDriverEntryPointSuccess) f = nullptr;
    cudaGetLastError();
    return reinterpret_cast<PointerGetAttributes>(f);
  }();
  return fn;
}

bool same_handle(const cudaIpcMemHandle_t& a, const cudaIpcMemHandle_t& b) {
  return std::memcmp(&a, &b, sizeof(a)) == 0;
}

}  // namespace

Segment segment_of(const void* p, int64_t bytes, int device) {
  Segment s;
  const PointerGetAttributes get = pointer_get_attributes();
  if (p == nullptr || bytes <= 0 || get == nullptr) return s;
  unsigned int memory_type = 0;
  unsigned long long buffer_id = 0;
  int ordinal = -1;
  int ipc_capable = 0;
  CUdeviceptr start = 0;
  size_t size = 0;
  CUpointer_attribute attributes[] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_BUFFER_ID,
                                      CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                                      CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, CU_POINTER_ATTRIBUTE_RANGE_SIZE};
  void* data[] = {&memory_type, &buffer_id, &ordinal, &ipc_capable, &start, &size};
  if (get(6, attributes, data, reinterpret_cast<CUdeviceptr>(p)) != CUDA_SUCCESS) return s;
  if (memory_type != CU_MEMORYTYPE_DEVICE || ordinal != device || !ipc_capable || buffer_id == 0) return s;
  const char* c = static_cast<const char*>(p);
  char* base = reinterpret_cast<char*>(start);
  if (c < base || c + bytes > base + size) return s;
  s.key = buffer_id;
  s.base = base;
  s.size = static_cast<int64_t>(size);
  return s;
}

SegmentMapper ipc_segment_mapper(cudaStream_t stream, bool (*quiesce)(void*), void* context) {
  // The stream travels in the context word the callbacks get; quiesce keeps the caller's.
  struct Ipc {
    cudaStream_t stream;
    bool (*quiesce)(void*);
    void* context;
  };
  SegmentMapper mapper{};
  // Not ipc_open: a segment that cannot be opened is not an error, only a key that takes the rings.
  mapper.open = [](const cudaIpcMemHandle_t& handle, void*) -> void* {
    void* mapped = nullptr;
    if (cudaIpcOpenMemHandle(&mapped, handle, cudaIpcMemLazyEnablePeerAccess) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return mapped;
  };
  mapper.mark = [](void* c) -> void* {
    cudaEvent_t event = nullptr;
    if (cudaEventCreateWithFlags(&event, cudaEventDisableTiming) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    if (cudaEventRecord(event, static_cast<Ipc*>(c)->stream) != cudaSuccess) {
      cudaGetLastError();
      cudaEventDestroy(event);
      return nullptr;
    }
    return event;
  };
  mapper.passed = [](void* mark, void*) -> int {
    const cudaError_t e = cudaEventQuery(static_cast<cudaEvent_t>(mark));
    if (e == cudaSuccess) return 1;
    cudaGetLastError();
    return e == cudaErrorNotReady ? 0 : -1;
  };
  mapper.forget = [](void* mark, void*) { cudaEventDestroy(static_cast<cudaEvent_t>(mark)); };
  mapper.quiesce = [](void* c) {
    const Ipc* ipc = static_cast<Ipc*>(c);
    return ipc->quiesce(ipc->context);
  };
  mapper.close = [](void* mapped, void*) { ipc_close(mapped); };
  mapper.owned = std::make_shared<Ipc>(Ipc{stream, quiesce, context});
  mapper.context = mapper.owned.get();
  return mapper;
}

SegmentExports::Export SegmentExports::find(const void* p, int64_t bytes, int device) {
  Export e;
  const Segment s = segment_of(p, bytes, device);
  if (s.key == 0) return e;
  auto it = entries_.find(s.key);
  if (it == entries_.end()) {
    Entry entry{};
    entry.ok = cudaIpcGetMemHandle(&entry.handle, s.base) == cudaSuccess;
    if (!entry.ok) cudaGetLastError();
    if (entries_.size() >= kKept) {
      entries_.erase(ages_.back());
      ages_.pop_back();
    }
    ages_.push_front(s.key);
    entry.age = ages_.begin();
    it = entries_.emplace(s.key, entry).first;
  } else {
    ages_.splice(ages_.begin(), ages_, it->second.age);
  }
  if (!it->second.ok) return e;
  e.key = s.key;
  e.offset = static_cast<const char*>(p) - s.base;
  e.handle = it->second.handle;
  return e;
}

void PeerSegments::note(int peer, const unsigned long long (&keys)[kSegmentFields],
                        const int (&unmapped)[kSegmentFields], const cudaIpcMemHandle_t (&handles)[kSegmentFields]) {
  if (peer < 0 || peer >= kSegmentPeers) return;
  Peer& pe = peers_[peer];
  const long long now = ++pe.notes;
  for (int f = 0; f < kSegmentFields; ++f) {
    const unsigned long long key = keys[f];
    if (key == 0) continue;
    bool held = false;
    for (Slot& slot : pe.slots)
      if (slot.key == key) {
        slot.named_at = now;
        held = true;
      }
    // A key whose old mapping is not closed yet waits for the close: opening a handle this
    // process still has open is not something to rely on.
    if (held || !unmapped[f] || pe.refused.count(key) || closing(peer, key)) continue;
    auto c = pe.candidates.find(key);
    if (c == pe.candidates.end() || c->second.seen_at == now || !same_handle(c->second.handle, handles[f])) {
      // A repeat within this note (two fields in one segment) is one sighting; a new handle
      // starts over.
      if (c == pe.candidates.end() || c->second.seen_at != now) pe.candidates[key] = {handles[f], now};
      continue;
    }
    // The slot of the mapping named longest ago (an empty slot is oldest of all). One named within
    // kSecondSighting is still in use: with no other slot the key stays unmapped (its receiver takes
    // the rings) rather than two keys evicting each other, an open and a close every dispatch.
    Slot* victim = nullptr;
    for (Slot& slot : pe.slots)
      if (slot.key == 0 || now - slot.named_at >= kSecondSighting)
        if (victim == nullptr || slot.key == 0 || (victim->key != 0 && slot.named_at < victim->named_at)) victim = &slot;
    if (victim == nullptr) continue;
    pe.candidates.erase(c);
    void* base = mapper_.open(handles[f], mapper_.context);
    ++opens_;
    if (base == nullptr) {
      pe.refused[key] = true;
      continue;
    }
    drop(peer, *victim);
    *victim = {key, static_cast<char*>(base), now};
  }
  // Sightings not repeated in time are forgotten.
  for (auto c = pe.candidates.begin(); c != pe.candidates.end();)
    c = now - c->second.seen_at >= kSecondSighting ? pe.candidates.erase(c) : std::next(c);
  for (Slot& slot : pe.slots)
    if (slot.key != 0 && now - slot.named_at >= kStaleAfter) drop(peer, slot);
}

void PeerSegments::drop(int peer, Slot& slot) {
  if (slot.key == 0) return;
  dropped_.push_back({peer, slot.key, slot.base});
  slot = {};
}

void PeerSegments::retire(bool quiet) {
  const bool may_close = quiet || closing() > kCloseBacklog;
  for (auto r = retiring_.begin(); may_close && r != retiring_.end();) {
    const int passed = mapper_.passed(r->mark, mapper_.context);
    if (passed == 0) {
      ++r;
      continue;
    }
    if (passed > 0)
      for (const Dropped& d : r->mappings) {
        mapper_.close(d.base, mapper_.context);
        ++closes_;
      }
    mapper_.forget(r->mark, mapper_.context);
    r = retiring_.erase(r);
  }
  if (dropped_.empty()) return;
  if (void* mark = mapper_.mark(mapper_.context)) {
    retiring_.push_back({mark, std::move(dropped_)});
    dropped_.clear();
  }
}

int PeerSegments::closing() const {
  size_t n = dropped_.size();
  for (const Retiring& r : retiring_) n += r.mappings.size();
  return static_cast<int>(n);
}

bool PeerSegments::closing(int peer, unsigned long long key) const {
  for (const Dropped& d : dropped_)
    if (d.peer == peer && d.key == key) return true;
  for (const Retiring& r : retiring_)
    for (const Dropped& d : r.mappings)
      if (d.peer == peer && d.key == key) return true;
  return false;
}

void PeerSegments::fill(unsigned long long (&keys)[kSegmentPeers][kSegmentSlots],
                        char* (&bases)[kSegmentPeers][kSegmentSlots]) const {
  for (int p = 0; p < kSegmentPeers; ++p)
    for (int i = 0; i < kSegmentSlots; ++i) {
      keys[p][i] = peers_[p].slots[i].key;
      bases[p][i] = peers_[p].slots[i].base;
    }
}

void PeerSegments::close_all() {
  for (int p = 0; p < kSegmentPeers; ++p) {
    Peer& pe = peers_[p];
    for (Slot& slot : pe.slots) drop(p, slot);
    pe.candidates.clear();
    pe.refused.clear();
  }
  if (dropped_.empty() && retiring_.empty()) return;
  const bool quiet = mapper_.quiesce(mapper_.context);
  for (Retiring& r : retiring_) {
    if (quiet) dropped_.insert(dropped_.end(), r.mappings.begin(), r.mappings.end());
    mapper_.forget(r.mark, mapper_.context);
  }
  retiring_.clear();
  if (quiet)
    for (const Dropped& d : dropped_) {
      mapper_.close(d.base, mapper_.context);
      ++closes_;
    }
  dropped_.clear();
}

int PeerSegments::mapped(int peer) const {
  int n = 0;
  if (peer < 0 || peer >= kSegmentPeers) return 0;
  for (const Slot& slot : peers_[peer].slots) n += slot.key != 0;
  return n;
}

}  // namespace moelink::window
