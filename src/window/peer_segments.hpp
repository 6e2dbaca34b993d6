#pragma once
// Peer segments: a peer writes a dispatch's rows straight into this rank's outputs although they
// are ordinary caching-allocator tensors. Each output lies in a cudaMalloc'd segment, which legacy
// CUDA IPC exports whole; the receiver names the segment by its driver buffer id (unique in its
// process for the process's lifetime, so a segment freed and made again at the same address gets a
// new one) and publishes its handle, and each sender maps it once and keeps the mapping while the
// receiver goes on naming it. In steady state (the same shapes every step) the caching allocator
// hands out the same segments, so nothing new is exported or opened.
//
// Costs and limits, from .scratch/probe_torch_ipc (one H200, under MPS): export ~11 us, open
// 200-350 us, once per segment and peer. A mapping keeps the segment's memory alive after its owner
// frees it (empty_cache), so a sender closes mappings a peer has stopped naming (kStaleAfter). Memory
// that legacy IPC cannot export (expandable segments, VMM pools) gets key 0: those outputs take the
// rings, as before.
#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <list>
#include <memory>
#include <unordered_map>
#include <vector>

namespace moelink::window {

inline constexpr int kSegmentPeers = 8;   // = kernels::kMaxNvlRanks
inline constexpr int kSegmentSlots = 8;   // mappings of one peer kept at once
inline constexpr int kSegmentFields = 5;  // outputs one dispatch names

// The cudaMalloc'd allocation holding [p, p + bytes) on `device`: its buffer id and base, or
// key 0 when there is none legacy IPC can export (another kind of memory, or the range spans two).
struct Segment {
  unsigned long long key = 0;
  char* base = nullptr;
  int64_t size = 0;
};
Segment segment_of(const void* p, int64_t bytes, int device);

// Receiver side: the handles of this rank's segments, exported once each.
class SegmentExports {
 public:
  struct Export {
    unsigned long long key = 0;  // 0: not exportable, the output takes the rings
    int64_t offset = -1;         // of p from the segment's base
    cudaIpcMemHandle_t handle{};
  };
  Export find(const void* p, int64_t bytes, int device);

 private:
  struct Entry {
    cudaIpcMemHandle_t handle;
    bool ok;
    std::list<unsigned long long>::iterator age;
  };
  static constexpr size_t kKept = 64;  // segments whose handles are remembered; the oldest is dropped
  std::unordered_map<unsigned long long, Entry> entries_;
  std::list<unsigned long long> ages_;  // most recently used first
};

// Sender side: the peers' segments this rank has mapped, fed by what its kernels saw the peers name
// (MailboxSection::segment_news in intranode/contract.hpp). Opening and closing go through
// `Mapper`, so the bookkeeping is tested without a GPU.
//
// A mapping dropped from the table (stale, or evicted for a new one) may still be used by kernels
// already queued, so it is closed only once they have finished. That is never waited for on an
// operation's path: a wait there would hold the caller's thread behind every queued kernel, the
// host sync the whole runtime avoids (a dispatch after a long compute kernel would return only when
// it ends). The drop is marked on the comm stream instead and the close done by a later
// retire() that finds the mark passed.
//
// Closing is a host sync too: cudaIpcCloseMemHandle returns only when the whole device is idle
// (.scratch/probe_ipc_sync on the H200, with and without MPS: 500 ms behind a 500 ms kernel on any
// stream of the process; opening, exporting and pointer queries do not wait). So a passed mark is
// closed only when the caller finds its streams idle, or when so many closes wait that the pinned
// memory they hold matters more than one stall (kCloseBacklog).
struct SegmentMapper {
  // Maps a peer's segment; nullptr when it cannot (the key is then not tried again).
  void* (*open)(const cudaIpcMemHandle_t& handle, void* context);
  // A mark after every kernel queued so far (those that may use the mappings dropped until now);
  // nullptr when none could be made (the drop is marked again later).
  void* (*mark)(void* context);
  // 1 when the kernels before `mark` have finished, 0 when not yet, -1 when that cannot be known
  // (the mappings are then never closed: a leak, never an unmapping under a running kernel).
  int (*passed)(void* mark, void* context);
  void (*forget)(void* mark, void* context);
  // close_all only (the Buffer's teardown): waits for every queued kernel; false when they did not
  // finish in time (the mappings are then dropped without a close).
  bool (*quiesce)(void* context);
  void (*close)(void* mapped, void* context);
  void* context;
  std::shared_ptr<void> owned;  // what `context` points to, when the mapper made it
};

// The mapper over legacy CUDA IPC: marks are events recorded on `stream`; `quiesce(context)` waits
// for every kernel on it.
SegmentMapper ipc_segment_mapper(cudaStream_t stream, bool (*quiesce)(void*), void* context);

class PeerSegments {
 public:
  // A mapping the peer has not named in this many of its notes (dispatches and combines that name
  // segments) is dropped.
  static constexpr int kStaleAfter = 64;
  static constexpr int kSecondSighting = 4;
  // Mappings waiting for an idle device beyond which retire() closes them even on a busy one.
  static constexpr int kCloseBacklog = 32;

  explicit PeerSegments(SegmentMapper mapper) : mapper_(mapper) {}
  ~PeerSegments() { close_all(); }
  PeerSegments(const PeerSegments&) = delete;
  PeerSegments& operator=(const PeerSegments&) = delete;

  // One dispatch of `peer` as this rank's kernel saw it (or one combine that named a segment: its
  // two fields, the others 0): the key of each field (0 = not a
  // segment) and, for keys it had not mapped, their handles. A key is mapped when it comes again,
  // with the same handle, within kSecondSighting of the peer's dispatches (a cached dispatch names
  // fewer fields than the uncached one before it): a segment named once (shapes that change every
  // step) costs no open, and a handle read while the kernel was rewriting it is never opened.
  void note(int peer, const unsigned long long (&keys)[kSegmentFields], const int (&unmapped)[kSegmentFields],
            const cudaIpcMemHandle_t (&handles)[kSegmentFields]);
  // The table a kernel gets: [peer][slot] key (0 = empty) and mapped base.
  void fill(unsigned long long (&keys)[kSegmentPeers][kSegmentSlots], char* (&bases)[kSegmentPeers][kSegmentSlots]) const;
  // Marks what was dropped since the last mark and closes what earlier marks have passed, when
  // `quiet` (the caller's streams were idle, so a close does not stall it) or past kCloseBacklog.
  // Called once after an operation's notes, before its kernel is launched (one mark covers every
  // peer's drops), and also when there was no news, so pending closes do not wait for news.
  void retire(bool quiet);
  void close_all();

  int mapped(int peer) const;  // mappings held for `peer`
  long long opens() const { return opens_; }
  long long closes() const { return closes_; }
  int closing() const;  // mappings dropped and not closed yet

 private:
  struct Slot {
    unsigned long long key = 0;
    char* base = nullptr;
    long long named_at = 0;  // the peer's note count when it last named this key
  };
  struct Peer {
    std::array<Slot, kSegmentSlots> slots{};
    long long notes = 0;
    // Seen once, not mapped yet: key -> its handle and the note that saw it.
    struct Candidate {
      cudaIpcMemHandle_t handle;
      long long seen_at;
    };
    std::unordered_map<unsigned long long, Candidate> candidates;
    std::unordered_map<unsigned long long, bool> refused;  // keys whose open failed
  };
  struct Dropped {
    int peer;  // keys are buffer ids of the peer's process: two peers may use the same one
    unsigned long long key;
    char* base;
  };
  struct Retiring {
    void* mark;
    std::vector<Dropped> mappings;
  };
  void drop(int peer, Slot& slot);
  bool closing(int peer, unsigned long long key) const;

  SegmentMapper mapper_;
  std::array<Peer, kSegmentPeers> peers_{};
  std::vector<Dropped> dropped_;    // not marked yet
  std::vector<Retiring> retiring_;  // marked, waiting for the mark to pass
  long long opens_ = 0;
  long long closes_ = 0;
};

}  // namespace moelink::window
