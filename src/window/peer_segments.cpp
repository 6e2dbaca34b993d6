#include "window/peer_segments.hpp"

#include <cuda.h>

#include <algorithm>
#include <cstring>
#include <limits>

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
  mapper.pin = [](size_t bytes, void*) -> void* {
    void* host = nullptr;
    if (cudaHostAlloc(&host, bytes, cudaHostAllocPortable) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return host;
  };
  mapper.unpin = [](void* host, void*) { cudaFreeHost(host); };
  mapper.copy = [](void* device, const void* host, size_t bytes, void* c) {
    if (cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, static_cast<Ipc*>(c)->stream) == cudaSuccess)
      return true;
    cudaGetLastError();
    return false;
  };
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
    entry.bytes = s.size;
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
  e.bytes = it->second.bytes;
  e.handle = it->second.handle;
  return e;
}

PeerSegments::PeerSegments(SegmentMapper mapper, Limits limits, SegmentTable* device)
    : mapper_(mapper), limits_(limits), device_(device) {
  if (limits_.second_sighting < 1) limits_.second_sighting = 1;
  if (limits_.stale_after < limits_.second_sighting) limits_.stale_after = limits_.second_sighting;
}

void PeerSegments::note(int peer, const unsigned long long (&keys)[kSegmentFields],
                        const int (&unmapped)[kSegmentFields], const cudaIpcMemHandle_t (&handles)[kSegmentFields],
                        const long long (&bytes)[kSegmentFields]) {
  if (peer < 0 || peer >= kSegmentPeers) return;
  Peer& pe = peers_[peer];
  const long long now = ++pe.notes;
  std::vector<int> victims;
  for (int f = 0; f < kSegmentFields; ++f) {
    const unsigned long long key = keys[f];
    if (key == 0) continue;
    const auto held = pe.slot_of.find(key);
    if (held != pe.slot_of.end()) {
      pe.slots[held->second].named_at = now;
      continue;
    }
    // A key whose old mapping is not closed yet waits for the close: opening a handle this
    // process still has open is not something to rely on.
    if (!unmapped[f] || pe.refused.count(key) || closing(peer, key)) continue;
    auto c = pe.candidates.find(key);
    if (c == pe.candidates.end() || c->second.seen_at == now || !same_handle(c->second.handle, handles[f])) {
      // A repeat within this note (two fields in one segment) is one sighting; a new handle
      // starts over.
      if (c == pe.candidates.end() || c->second.seen_at != now) {
        pe.candidates[key] = {handles[f], now};
        pe.sightings.emplace_back(now, key);
      }
      continue;
    }
    if (bytes[f] > limits_.mapped_bytes) {
      // Larger than the bound on its own: it could only ever be mapped alone, past the bound.
      pe.candidates.erase(c);
      pe.refused[key] = true;
      continue;
    }
    // Keys still in use are never dropped for it: with no room otherwise the key stays unmapped
    // (its receiver takes the rings) rather than two keys evicting each other, an open and a
    // close every step.
    const int slot = make_room(pe, now, bytes[f], victims);
    if (slot < 0) continue;
    pe.candidates.erase(c);
    void* base = mapper_.open(handles[f], mapper_.context);
    ++opens_;
    if (base == nullptr) {
      pe.refused[key] = true;
      continue;
    }
    for (const int v : victims) drop(peer, v);
    pe.slots[slot] = {key, static_cast<char*>(base), bytes[f], now};
    pe.slot_of[key] = slot;
    pe.bytes += bytes[f];
    pe.named_since = std::min(pe.named_since, now);
    ++version_;
  }
  // Sightings not repeated in time are forgotten (a candidate sighted again since, with a new
  // handle, has a later entry of its own).
  while (!pe.sightings.empty() && now - pe.sightings.front().first >= limits_.second_sighting) {
    const auto c = pe.candidates.find(pe.sightings.front().second);
    if (c != pe.candidates.end() && c->second.seen_at == pe.sightings.front().first) pe.candidates.erase(c);
    pe.sightings.pop_front();
  }
  // Only when some mapping may be stale: in steady state every one is named within the window,
  // and a walk over all 128 every note would be most of its cost.
  if (now - pe.named_since < limits_.stale_after) return;
  pe.named_since = std::numeric_limits<long long>::max();
  for (int i = 0; i < kSegmentSlots; ++i) {
    if (pe.slots[i].key == 0) continue;
    if (now - pe.slots[i].named_at >= limits_.stale_after)
      drop(peer, i);
    else
      pe.named_since = std::min(pe.named_since, pe.slots[i].named_at);
  }
}

int PeerSegments::make_room(const Peer& pe, long long now, long long bytes, std::vector<int>& victims) const {
  victims.clear();
  int empty = -1;
  std::vector<int> idle;  // mappings not in use, named longest ago first
  for (int i = 0; i < kSegmentSlots; ++i) {
    const Slot& slot = pe.slots[i];
    if (slot.key == 0) {
      if (empty < 0) empty = i;
    } else if (now - slot.named_at >= limits_.second_sighting) {
      idle.push_back(i);
    }
  }
  if (empty < 0 && idle.empty()) return -1;
  std::sort(idle.begin(), idle.end(), [&](int a, int b) { return pe.slots[a].named_at < pe.slots[b].named_at; });
  long long kept = pe.bytes;
  size_t next = 0;
  if (empty < 0) {
    victims.push_back(idle[next]);
    kept -= pe.slots[idle[next++]].bytes;
  }
  while (kept + bytes > limits_.mapped_bytes) {
    if (next == idle.size()) {
      victims.clear();
      return -1;
    }
    victims.push_back(idle[next]);
    kept -= pe.slots[idle[next++]].bytes;
  }
  return empty >= 0 ? empty : victims.front();
}

void PeerSegments::drop(int peer, int slot) {
  Peer& pe = peers_[peer];
  Slot& s = pe.slots[slot];
  if (s.key == 0) return;
  dropped_.push_back({peer, s.key, s.base});
  pe.slot_of.erase(s.key);
  pe.bytes -= s.bytes;
  s = {};
  ++version_;
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

void PeerSegments::fill(SegmentTable& table) const {
  std::memset(static_cast<void*>(&table), 0, sizeof(table));
  for (int p = 0; p < kSegmentPeers; ++p)
    for (const Slot& slot : peers_[p].slots) {
      if (slot.key == 0) continue;
      // Linear probing, as find_segment_bucket reads it; at most half full, so a bucket is free.
      int b = segment_bucket(slot.key);
      while (table.key[p][b] != 0) b = (b + 1) & (kSegmentBuckets - 1);
      table.key[p][b] = slot.key;
      table.base[p][b] = slot.base;
    }
}

const SegmentTable* PeerSegments::upload() {
  if (device_ == nullptr) return nullptr;
  if (uploaded_ == version_) return device_;
  Staging* block = nullptr;
  for (Staging& s : staging_) {
    if (s.mark != nullptr && mapper_.passed(s.mark, mapper_.context) == 1) {
      mapper_.forget(s.mark, mapper_.context);
      s.mark = nullptr;
    }
    if (s.mark == nullptr && !s.lost) {
      block = &s;
      break;
    }
  }
  if (block == nullptr && staging_.size() < static_cast<size_t>(kStagingBlocks)) {
    void* host = mapper_.pin(sizeof(SegmentTable), mapper_.context);
    if (host == nullptr) return nullptr;
    staging_.push_back({host, nullptr, false});
    block = &staging_.back();
  }
  if (block == nullptr) return nullptr;
  fill(*static_cast<SegmentTable*>(block->host));
  if (!mapper_.copy(device_, block->host, sizeof(SegmentTable), mapper_.context)) return nullptr;
  ++uploads_;
  uploaded_ = version_;
  block->mark = mapper_.mark(mapper_.context);
  // Without a mark nobody can tell when the copy has read the block: it is never written again,
  // rather than rewritten under the copy (one of kStagingBlocks lost).
  block->lost = block->mark == nullptr;
  return device_;
}

void PeerSegments::close_all() {
  for (int p = 0; p < kSegmentPeers; ++p) {
    Peer& pe = peers_[p];
    for (int i = 0; i < kSegmentSlots; ++i) drop(p, i);
    pe.candidates.clear();
    pe.sightings.clear();
    pe.refused.clear();
  }
  if (dropped_.empty() && retiring_.empty() && staging_.empty()) return;
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
  // Unless every copy has run, the blocks stay pinned (a leak, never freed under a copy).
  for (Staging& s : staging_) {
    if (s.mark != nullptr) mapper_.forget(s.mark, mapper_.context);
    if (quiet) mapper_.unpin(s.host, mapper_.context);
  }
  staging_.clear();
}

int PeerSegments::mapped(int peer) const {
  if (peer < 0 || peer >= kSegmentPeers) return 0;
  return static_cast<int>(peers_[peer].slot_of.size());
}

long long PeerSegments::mapped_bytes(int peer) const {
  if (peer < 0 || peer >= kSegmentPeers) return 0;
  return peers_[peer].bytes;
}

}  // namespace moelink::window
