#pragma once
// Peer segments: a peer writes a dispatch's rows straight into this rank's outputs although they
// are ordinary caching-allocator tensors. Each output lies in a cudaMalloc'd segment, which legacy
// CUDA IPC exports whole; the receiver names the segment by its driver buffer id (unique in its
// process for the process's lifetime, so a segment freed and made again at the same address gets a
// new one) and publishes its handle, and each sender maps it once and keeps the mapping while the
// receiver goes on naming it. In steady state (the same shapes every step) the caching allocator
// hands out the same segments, so nothing new is exported or opened.
//
// A training step holds each layer's outputs until its backward, so each of ~60 layers names its
// own segment, and a given segment comes back once a step (every ~60-240 of the peer's notes,
// combines and the backward's operations counted). The table keeps 128 mappings per peer and a
// key is mapped when it comes back within a window of 512 notes (MOELINK_SEGMENT_WINDOW), so such
// a step is mapped by its second iteration; a window of a few notes, enough for a segment reused
// every call, would never map it.
//
// Costs and limits, from .scratch/probe_torch_ipc (one H200, under MPS): export ~11 us, open
// 200-350 us, once per segment and peer. A mapping keeps the segment's memory alive after its owner
// frees it (empty_cache), so a sender closes mappings a peer has stopped naming (stale_after), and
// keeps at most Limits::mapped_bytes of one peer's segments mapped (MOELINK_SEGMENT_MAPPED_MB).
// Memory that legacy IPC cannot export (expandable segments, VMM pools) gets key 0: those outputs
// take the rings, as before.
#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <deque>
#include <limits>
#include <list>
#include <memory>
#include <unordered_map>
#include <vector>

#include "window/segment_table.hpp"

namespace moelink::window {

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
    int64_t bytes = 0;           // the whole segment's, what a peer's mapping of it keeps alive
    cudaIpcMemHandle_t handle{};
  };
  Export find(const void* p, int64_t bytes, int device);

 private:
  struct Entry {
    cudaIpcMemHandle_t handle;
    int64_t bytes;
    bool ok;
    std::list<unsigned long long>::iterator age;
  };
  // Segments whose handles are remembered; the oldest is dropped. Above what peers may keep mapped
  // of this rank (kSegmentSlots), or a step naming more segments than this would export each
  // again on every dispatch.
  static constexpr size_t kKept = 2 * kSegmentSlots;
  std::unordered_map<unsigned long long, Entry> entries_;
  std::list<unsigned long long> ages_;  // most recently used first
};

// Sender side: the peers' segments this rank has mapped, fed by what its kernels saw the peers name
// (MailboxSection::segment_news in intranode/contract.hpp). Opening and closing go through
// `Mapper`, so the bookkeeping is tested without a GPU.
//
// A mapping dropped from the table (stale, evicted for a new one, or over the byte bound) may still
// be used by kernels already queued, so it is closed only once they have finished. That is never
// waited for on an operation's path: a wait there would hold the caller's thread behind every
// queued kernel, the host sync the whole runtime avoids (a dispatch after a long compute kernel
// would return only when it ends). The drop is marked on the comm stream instead and the close done
// by a later retire() that finds the mark passed.
//
// Closing is a host sync too: cudaIpcCloseMemHandle returns only when the whole device is idle
// (.scratch/probe_ipc_sync on the H200, with and without MPS: 500 ms behind a 500 ms kernel on any
// stream of the process; opening, exporting and pointer queries do not wait). So a passed mark is
// closed only when the caller finds its streams idle, or when so many closes wait that the pinned
// memory they hold matters more than one stall (kCloseBacklog).
//
// The kernels read the table from device memory (SegmentTable), which upload() rewrites on the
// comm stream when a mapping came or went. The image is copied from pinned staging that no queued
// copy still reads: each copy is marked like a drop, and its block is written again only once the
// mark has passed.
struct SegmentMapper {
  // Maps a peer's segment; nullptr when it cannot (the key is then not tried again).
  void* (*open)(const cudaIpcMemHandle_t& handle, void* context);
  // A mark after everything queued so far (the kernels that may use the mappings dropped until
  // now, or a table's copy); nullptr when none could be made (a drop is marked again later).
  void* (*mark)(void* context);
  // 1 when what was queued before `mark` has finished, 0 when not yet, -1 when that cannot be known
  // (the mappings are then never closed: a leak, never an unmapping under a running kernel).
  int (*passed)(void* mark, void* context);
  void (*forget)(void* mark, void* context);
  // close_all only (the Buffer's teardown): waits for every queued kernel; false when they did not
  // finish in time (the mappings are then dropped without a close).
  bool (*quiesce)(void* context);
  void (*close)(void* mapped, void* context);
  // Staging for upload(): pinned host memory (nullptr when none), its release, and a copy from it to
  // the device queued on the stream (false when it could not be queued).
  void* (*pin)(size_t bytes, void* context);
  void (*unpin)(void* host, void* context);
  bool (*copy)(void* device, const void* host, size_t bytes, void* context);
  void* context;
  std::shared_ptr<void> owned;  // what `context` points to, when the mapper made it
};

// The mapper over legacy CUDA IPC: marks are events recorded on `stream`, copies are queued on it;
// `quiesce(context)` waits for every kernel on it.
SegmentMapper ipc_segment_mapper(cudaStream_t stream, bool (*quiesce)(void*), void* context);

// What PeerSegments keeps, and for how long (MOELINK_SEGMENT_WINDOW sets the first two,
// MOELINK_SEGMENT_MAPPED_MB the third; runtime/knobs.hpp).
struct SegmentLimits {
  static constexpr int kSecondSighting = 512;
  static constexpr int kStaleAfter = 2 * kSecondSighting;
  static constexpr long long kMappedBytes = 16384ll << 20;
  // A key is mapped when named again within this many of the peer's notes (dispatches and
  // combines that name segments); a mapping named within it is in use, and never evicted.
  int second_sighting = kSecondSighting;
  // A mapping the peer has not named in this many of its notes is dropped (>= second_sighting:
  // a key mapped on its second sighting must not go stale before its third).
  int stale_after = kStaleAfter;
  // Bytes of one peer's segments kept mapped at most: past it the mappings named longest ago
  // (and not in use) are dropped, and a key that would need one in use dropped stays unmapped.
  long long mapped_bytes = kMappedBytes;
};

class PeerSegments {
 public:
  using Limits = SegmentLimits;
  static constexpr int kSecondSighting = Limits::kSecondSighting;
  static constexpr int kStaleAfter = Limits::kStaleAfter;
  // Mappings waiting for an idle device beyond which retire() closes them even on a busy one.
  static constexpr int kCloseBacklog = 32;
  // Staging blocks for the table's copies; with every one still queued, upload() gives no table.
  static constexpr int kStagingBlocks = 8;

  // `device`: where upload() keeps the kernels' table (nullptr: upload() gives none).
  explicit PeerSegments(SegmentMapper mapper, Limits limits = {}, SegmentTable* device = nullptr);
  ~PeerSegments() { close_all(); }
  PeerSegments(const PeerSegments&) = delete;
  PeerSegments& operator=(const PeerSegments&) = delete;

  // One dispatch of `peer` as this rank's kernel saw it (or one combine that named a segment: its
  // two fields, the others 0): the key of each field (0 = not a segment), its segment's size and,
  // for keys it had not mapped, their handles. A key is mapped when it comes again, with the same
  // handle, within second_sighting of the peer's notes (a cached dispatch names fewer fields than
  // the uncached one before it): a segment named once (shapes that change every step) costs no
  // open, and a handle read while the kernel was rewriting it is never opened.
  void note(int peer, const unsigned long long (&keys)[kSegmentFields], const int (&unmapped)[kSegmentFields],
            const cudaIpcMemHandle_t (&handles)[kSegmentFields], const long long (&bytes)[kSegmentFields]);
  // The table's image, as upload() copies it: each peer's mappings hashed into its buckets.
  void fill(SegmentTable& table) const;
  // The device table the next kernel queued on the stream may read: a copy of the image is queued
  // first when the mappings changed since the last one. nullptr when none could be queued (every
  // staging block still in use, or the copy refused): that kernel names no mapping, so every
  // segment takes the rings once, and the next call tries again.
  const SegmentTable* upload();
  // Marks what was dropped since the last mark and closes what earlier marks have passed, when
  // `quiet` (the caller's streams were idle, so a close does not stall it) or past kCloseBacklog.
  // Called once after an operation's notes, before its kernel is launched (one mark covers every
  // peer's drops), and also when there was no news, so pending closes do not wait for news.
  void retire(bool quiet);
  void close_all();

  int mapped(int peer) const;  // mappings held for `peer`
  long long mapped_bytes(int peer) const;  // the size of their segments
  long long opens() const { return opens_; }
  long long closes() const { return closes_; }
  long long uploads() const { return uploads_; }  // copies of the table queued
  int closing() const;  // mappings dropped and not closed yet

 private:
  struct Slot {
    unsigned long long key = 0;
    char* base = nullptr;
    long long bytes = 0;
    long long named_at = 0;  // the peer's note count when it last named this key
  };
  struct Peer {
    std::array<Slot, kSegmentSlots> slots{};
    std::unordered_map<unsigned long long, int> slot_of;  // key -> its slot, for every mapped key
    long long notes = 0;
    long long bytes = 0;  // of the mapped segments
    // At most the earliest named_at of a mapped key (a later naming only raises that), so no
    // mapping can be stale before named_since + stale_after.
    long long named_since = std::numeric_limits<long long>::max();
    // Seen once, not mapped yet: key -> its handle and the note that saw it; and the sightings in
    // note order, so that those not repeated in time are forgotten without a walk over all of them.
    struct Candidate {
      cudaIpcMemHandle_t handle;
      long long seen_at;
    };
    std::unordered_map<unsigned long long, Candidate> candidates;
    std::deque<std::pair<long long, unsigned long long>> sightings;  // (seen_at, key), oldest first
    std::unordered_map<unsigned long long, bool> refused;  // keys whose open failed, or too large ever to fit
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
  struct Staging {
    void* host;
    void* mark;  // after the copy from it; nullptr: free
    bool lost;   // its copy could not be marked: never written again
  };
  // The slot a new mapping of `bytes` takes, with the mappings to drop for it in `victims`; -1 when
  // it would need a slot or bytes of mappings still in use.
  int make_room(const Peer& pe, long long now, long long bytes, std::vector<int>& victims) const;
  void drop(int peer, int slot);
  bool closing(int peer, unsigned long long key) const;

  SegmentMapper mapper_;
  Limits limits_;
  SegmentTable* device_;
  std::array<Peer, kSegmentPeers> peers_{};
  std::vector<Dropped> dropped_;    // not marked yet
  std::vector<Retiring> retiring_;  // marked, waiting for the mark to pass
  std::vector<Staging> staging_;
  long long version_ = 0;      // bumped whenever a mapping comes or goes
  long long uploaded_ = -1;    // the version the device table holds (or will, in stream order)
  long long opens_ = 0;
  long long closes_ = 0;
  long long uploads_ = 0;
};

}  // namespace moelink::window
