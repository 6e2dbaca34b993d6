#pragma once
// The runtime context of one rank: everything the operations share and that lives as long as the
// Buffer does (topology, the memory map, the comm stream, the error records, the order event), and
// the steps every operation takes (entry checks, the opening, stream ordering, the device barrier,
// error decoding). Modes are free functions over a Context (modes/<mode>/host.hpp); the Buffer owns
// one and forwards to them. Per-call values are small structs (moelink/ops.hpp).
#include <cuda_runtime_api.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/header.hpp"
#include "moelink/buffer.hpp"
#include "moelink/error.hpp"
#include "runtime/arena.hpp"
#include "runtime/launch_order.hpp"
#include "runtime/memory_map.hpp"
#include "runtime/pending_errors.hpp"
#include "window/peer_segments.hpp"
#include "window/window.hpp"

namespace moelink::runtime {

class Context {
 public:
  explicit Context(const BufferOptions& options);
  ~Context();  // release()
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  // ---- the rank and its resources (read by modes; written by the lifecycle in buffer.cpp) ----
  Topology topo;
  int device = 0;
  int sm_count = 0;
  int ranks_per_gpu = 1;  // NVLink peers (this rank included) on this very GPU, from sync()
  int64_t num_nvl_bytes = 0;
  int64_t num_rdma_bytes = 0;
  // With low_latency_mode the RDMA buffer is the low-latency region. With every rank in this NVLink
  // domain (and MOELINK_LL_TRANSPORT not nvshmem) it is carved from the IPC-shared allocation (peers
  // reach it by stores) and NVSHMEM is not used at all; otherwise (low_latency_symmetric) it is one
  // symmetric NVSHMEM allocation made at sync(): SymmetricHeader (the mode's header section and the
  // put path's counters), then the region (modes/low_latency/contract.hpp).
  int64_t low_latency_bytes = 0;
  bool low_latency_symmetric = false;
  bool low_latency_force_put = false;  // MOELINK_DEBUG_LL_FORCE_PUT: no other rank mapped
  bool uses_nvshmem = false;
  bool low_latency_mode = false;
  bool enable_shrink = false;
  bool explicitly_destroy = false;
  double timeout_s = 100.0;
  unsigned spin_backoff_ns = 0;  // knobs::spin_backoff_ns(), for every wait's ErrorSink
  bool available = false;
  bool destroyed = false;
  cudaStream_t comm_stream = nullptr;

  std::shared_ptr<void> nvl_memory;  // header + data + arena, one cudaMalloc; the arena co-owns it
  char* nvl_base = nullptr;
  std::shared_ptr<detail::RecvArena> arena;  // null when num_arena_bytes == 0
  // Direct dispatch into caching-allocator outputs and pull combine from caching-allocator inputs
  // (window/peer_segments.hpp): this rank's exported segments, and the peers' it has mapped, one
  // table for both (made at the first dispatch or combine; closed by release()).
  bool peer_segments_enabled = false;  // knobs::peer_segments()
  // An internode Buffer's lane (Buffer::serve_as_internode_lane): every row goes through the rings
  // (no direct writes, no pull, no segments), as between nodes it must; with lane_fake_puts (the
  // knob MOELINK_DEBUG_LANE_FORCE_PUT=fake) its kernels move their bytes by the put path's protocol:
  // the ring senders, the notify's inbox, the openings and the barriers (window_policy()).
  bool ring_only = false;
  bool lane_fake_puts = false;
  // With the knob nvshmem (open_symmetric_lane): the plugin's builds of the lane kernels, over the
  // lane's symmetric region, and the blocks of them one SM holds (for the co-residency check).
  bool lane_puts = false;
  int lane_blocks_per_sm = 0;
  // The lane's header and data, one symmetric allocation: nvl_base points into it then, and the
  // IPC allocation (nvl_memory) is gone.
  void* lane_allocation = nullptr;
  window::Policy window_policy() const {
    return lane_puts ? window::Policy::kPuts : lane_fake_puts ? window::Policy::kFakePuts : window::Policy::kStores;
  }
  window::PeerSegments::Limits segment_limits;  // knobs::segment_window(), segment_mapped_mb()
  window::SegmentExports segment_exports;
  std::unique_ptr<window::PeerSegments> peer_segments;
  // Whether the comm stream and the caller's stream had nothing queued when the current operation
  // began (begin_op, before it queues anything): then a pending close, which waits for the whole
  // device, costs this call nothing. Sampled only while closes are pending.
  bool idle_at_begin = false;
  kernels::Epoch segment_news_seen[kMaxNvlRanks] = {};  // per peer: the last SegmentNews taken
  kernels::Epoch combine_segment_news_seen[kMaxNvlRanks] = {};  // the same of combine's news
  window::Window nvl_window;                 // the node's NVLink buffers, ours included
  kernels::PeerTable peers{};
  // Whose fault words a kernel that gives up raises (ErrorSink::peers) and fail_host_wait writes:
  // peers.header, except on an NVSHMEM lane, whose peers' headers are reached by PE and only those
  // NVSHMEM maps here are written (null: a peer that hears of the fault by its own timeout).
  kernels::CommonHeader* fault_peers[kMaxNvlRanks] = {};
  char* low_latency_regions[kMaxNvlRanks] = {};  // every rank's low-latency region, in this process
                                                 // (null: a rank the put path reaches)
  low_latency::HeaderSection* low_latency_headers[kMaxNvlRanks] = {};  // their header sections, likewise
  int low_latency_pes[kMaxNvlRanks] = {};  // [rank]: its NVSHMEM PE (symmetric region only)
  void* low_latency_allocation = nullptr;  // the symmetric allocation, when low_latency_symmetric
  bool low_latency_puts = false;  // some rank has no mapped region: the plugin's put-path kernels run
  long long low_latency_combines = 0;  // low-latency combines launched with a send half (staging areas)
  HostMailbox* mailbox = nullptr;      // host view
  HostMailbox* mailbox_dev = nullptr;  // device alias
  cudaEvent_t order_event = nullptr;   // reused to order the comm stream after the compute stream
  // Where the Buffer's latest work is, and the event queue_on joins another stream after it with
  // (runtime/launch_order.hpp).
  LaunchOrder launch_order{nullptr};
  cudaEvent_t join_event = nullptr;
  void* rdma = nullptr;
  bool nvshmem_joined = false;
  std::vector<uint8_t> unique_id;
  int notify_seq = 0;  // numbers host waits on the mailbox only; operations are numbered on the device
  // The intranode notify launched last, until its host wait takes it: its number (0: none to wait
  // for), its num_worst_tokens (> 0: nothing to wait for) and the per-expert counts it leaves.
  struct NotifyInFlight {
    int seq = 0;
    int num_worst_tokens = 0;
    int num_local_experts = 0;
    cudaStream_t compute_stream = nullptr;  // the order it joined the comm stream with
    cudaEvent_t previous_event = nullptr;
  } notify_in_flight;
  // The order of the last notify whose wait succeeded, until the next operation begins. Its
  // uncached dispatch runs behind the same point of the caller's stream (nothing is queued there in
  // between), so it joins nothing again: a second join is two more CUDA calls on the host path the
  // GPU waits for.
  struct NotifyJoin {
    int seq = 0;
    cudaStream_t compute_stream = nullptr;
    cudaEvent_t previous_event = nullptr;
  } notify_join;
  bool halt_next_sends = false;  // test hook (Buffer::debug_halt_next_sends), taken by the next data kernel
  std::string broken;  // non-empty once a peer was lost: the protocol state can't be trusted
  ErrorKind broken_kind = ErrorKind::kTimeout;  // what raising `broken` throws

  NvlHeader* header() const { return reinterpret_cast<NvlHeader*>(nvl_base); }
  void* data() const { return nvl_base + kNvlHeaderBytes; }
  char* low_latency_base() const {
    if (low_latency_bytes == 0) return nullptr;
    if (low_latency_symmetric)
      return low_latency_allocation != nullptr
                 ? static_cast<char*>(low_latency_allocation) + low_latency::kSymmetricHeaderBytes
                 : nullptr;
    return static_cast<char*>(data()) + low_latency_offset(num_nvl_bytes);
  }
  // This rank's low-latency header section: in the NVLink header, or at the symmetric allocation's head.
  low_latency::HeaderSection* low_latency_header() const {
    return low_latency_symmetric ? low_latency_headers[topo.rank] : &header()->low_latency;
  }
  // The low-latency bytes carved from the IPC allocation (none when the region is symmetric).
  int64_t ipc_low_latency_bytes() const { return low_latency_symmetric ? 0 : low_latency_bytes; }
  // At sync(), after the NVSHMEM join: the symmetric region, its peers' addresses and their PEs.
  void open_symmetric_low_latency();
  // An internode lane with the knob nvshmem, after sync() and before its first operation
  // (collective over the internode group): joins (or shares) the group's NVSHMEM world as PE
  // world_pe of world_size, moves the header and the data region from the IPC allocation into one
  // symmetric allocation, and points the kernels' tables at it, lane rank p at PE lane_pes[p]. Any
  // failure breaks the Buffer (its tables may be half moved).
  void open_symmetric_lane(const std::vector<uint8_t>& root_unique_id, int world_pe, int world_size,
                           const std::vector<int>& lane_pes);
  NvlHeader* peer_header(int nvl_rank) const { return reinterpret_cast<NvlHeader*>(peers.header[nvl_rank]); }
  // Where `bytes` at `ref` sit relative to our data region, as peers address them; -1 unless they
  // lie wholly in our receive arena (only there may peers read or write a caller's tensor).
  int64_t offset_in_arena(const TensorRef& ref, int64_t bytes) const;

  // Unmaps the peers and frees everything; marks the context destroyed. Idempotent. The comm
  // stream goes back to a pool instead of being destroyed: the caching allocator may still hold
  // tensors recorded on it, and freeing one records an event on the stream.
  void release();
  // Waits until the comm stream (and the stream of the latest eager work, when that is another)
  // has drained, at most `seconds`; false when it has not. Lenient
  // (destroy) takes a refused query as drained, since tearing down must go on; strict (the end of
  // a call, which frees outputs on the raise) takes it as not drained, and the error stays recorded.
  bool drain(double seconds, bool strict = false);

  // ---- steps every operation takes ----
  kernels::ErrorSink error_sink(double timeout = -1) const;
  // Raises kState when the Buffer is destroyed or not synced, kTimeout once it is broken.
  void require_usable(const char* op) const;
  // Raises the error a kernel recorded: a fault (sticky, TimeoutError; the Buffer is broken), or a
  // data error every rank of the operation found (ValueError, raised once).
  void check_device_errors();
  // Its two halves, apart because a collective raises them at different points: a fault (once seen
  // it breaks the Buffer), and a data error (its record cleared, so it is raised once; the steps
  // are raise_recorded_data_error's, in runtime/pending_errors.hpp).
  void check_faults();
  void raise_data_error();
  bool fault_recorded() const;
  bool data_error_recorded() const;
  std::string describe_data_error() const;  // the recorded data error's message
  unsigned data_lost_total() const;         // the device's count of data errors not recorded
  void clear_data_error();                  // the record, and its claim given back
  LostDataErrors lost_data_errors;
  bool comm_stream_capturing() const;
  static bool stream_capturing(cudaStream_t stream);  // false for the legacy stream (null)
  static bool stream_idle(cudaStream_t stream);       // everything queued on it has finished (a query)
  // Where an operation raises a data error (runtime/pending_errors.hpp says why): a collective
  // checks only faults on entry (check_on_entry(true)) and raises a data error after its last
  // launch (raise_at_end); get_dispatch_layout, which opens nothing, raises it on entry
  // (check_on_entry(false)). The checks after a host wait raise what that operation found.
  void check_on_entry(bool opens_collective);
  void raise_at_end(cudaStream_t compute_stream = nullptr);
  // How long the host waits for the comm stream before it gives up: the kernels bound their own
  // waits by the timeout, and the margin covers a kernel that never started.
  double host_wait_limit_s() const { return timeout_s + 2.0; }
  // While set, data errors stay recorded at the end of each collective call and at the entry of
  // get_dispatch_layout. Internode mode sets it on its inner Buffers and raises their errors at
  // the end of its own operation: were a leg to raise at its end, the rank would go no further in
  // the operation while its peers, whose hosts had not seen the error yet, open the next leg and
  // wait for it. So every member opens (or abstains from) every leg.
  bool defer_data_errors = false;
  // Local errors (header.hpp) never raise inside an operation (the rank's peers went on with it):
  // end_op moves them from the local record into local_errors, and take_local_errors hands them out.
  // op_stream: the stream the operation ending now launched on (none outside an operation).
  void collect_local_errors(std::optional<cudaStream_t> op_stream = std::nullopt);
  // Gives an error record's claim back (the word a kernel takes before it fills the record) once
  // the host has read the record: a memset in order with the kernels, on the stream of the
  // operation ending now (op_stream) or else the comm stream. While that stream is being captured
  // into a CUDA graph the memset runs at each replay and not now, so it is also issued again at
  // the next call that is not captured (begin_op, take_local_errors); without that the claim stays
  // taken and eager calls after the capture record no error.
  // Captured, the memset is queued only at an operation's end (op_stream), before the event the
  // caller joins, so it stays after the kernel; anywhere else it would be work the capture never
  // joins (ending the capture fails), so there it is deferred only, and so it is while the stream
  // of the Buffer's latest work is being captured (no join reaches it from the comm stream).
  void release_claim(int* claim, std::optional<cudaStream_t> op_stream = std::nullopt);
  // Whether work queued on `stream` now would be captured, or would have to join the Buffer's latest
  // work where a capture keeps it out of reach: then a claim's memset is deferred.
  bool capture_in_the_way(cudaStream_t stream) const;
  // The deferred memsets, on `stream` (an operation's launch stream, once queue_on entered it).
  void release_deferred_claims(cudaStream_t stream);
  void release_deferred_claims() { release_deferred_claims(comm_stream); }
  int* deferred_claims[2] = {nullptr, nullptr};
  std::vector<std::string> take_local_errors();
  std::vector<std::string> local_errors;
  // A host-side wait in `step` gave up: the Buffer is broken, and its queued kernels and its peers
  // learn so (they name this rank as the one lost).
  [[noreturn]] void fail_host_wait(const std::string& message, int step);
  // Before queuing work on `stream`: makes it wait for the Buffer's latest work where that is on
  // another stream (launch_order.hpp has the rule; nothing at all on the same stream). Every piece
  // of work the Buffer queues, on any stream, is queued after this. `covered`: a stream whose work
  // `stream` already waits for. Raises kState where the latest eager work sits behind a capture.
  void queue_on(cudaStream_t stream, std::optional<cudaStream_t> covered = std::nullopt);
  // Orders the comm stream after previous_event or the compute stream (and the Buffer's latest work).
  void begin_op(const StreamOrder& order);
  // Whether an operation with this order launches on the caller's stream (begin_op_on_caller):
  // the default order only, where the caller's stream waits for the operation's end anyway. With
  // previous_event (the comm stream waits for that event instead, deep_ep's meaning), async_finish
  // or outputs on the comm stream the operation keeps the comm stream.
  static bool on_caller_stream(const StreamOrder& order) {
    return !order.previous_event && !order.async_finish && !order.allocate_on_comm_stream;
  }
  // begin_op for an operation that may launch on the caller's stream; returns the stream it
  // launches on: the caller's with the default order, entered by queue_on (so a run of calls on
  // one stream makes no CUDA call here), else the comm stream through begin_op.
  cudaStream_t begin_op_on_caller(const StreamOrder& order);
  // Its end_op: on the caller's stream, the returned event is deferred (recorded only if used).
  EventHandle end_op_on_caller(const StreamOrder& order);
  // begin_op for the uncached dispatch whose notify (`seq`) opened it: without the join when that
  // notify joined the same order (then the close idleness sampled by its begin_op stands too).
  void begin_dispatch_after_notify(const StreamOrder& order, int seq);
  // The rule begin_op and begin_dispatch_after_notify share: outputs on the comm stream only with
  // previous_event and async_finish.
  static void check_allocation_order(const StreamOrder& order);
  // The event at the end of the op; without async_finish the compute stream waits for it. Never
  // throws; collects local errors.
  EventHandle end_op(const StreamOrder& order);
  // Launches the opening of an operation whose kernels do not open it themselves.
  void launch_opening(const kernels::Opening& opening);
  // This rank's own checks rejected its arguments: it still takes part in the opening, with that
  // verdict, so its peers skip the operation instead of waiting for it. Never throws.
  void abstain() noexcept;
  // Launches the device barrier over the NVLink peers on the comm stream.
  void launch_barrier(int tag, double timeout = -1);
  // The barrier, then a host wait for it; raises what it found. raise_data_errors = false where
  // the call goes on to another collective step (a data error is then raised at its end).
  void barrier(int tag, double timeout = -1, bool raise_data_errors = true);

  // ---- co-residency ----
  // Every rank's kernel spins until its peers' kernels run, so when ranks share a GPU all their
  // blocks must be resident at once. The largest even num_sms for which they are, for kernels of
  // which `blocks_per_sm` fit on one SM.
  int max_num_sms(int blocks_per_sm) const;
  // Raises kValue naming `arg` when `num_sms` blocks per rank cannot all be resident.
  void require_coresident(int num_sms, int blocks_per_sm, const char* arg) const;
};

// A digest word from its parts (common/header.hpp names the words).
kernels::Digest make_digest(int op, int num_channels, int slots, int chunk, int64_t hidden, DType dtype, int num_topk,
                            int num_scales, int num_experts, DType scales_dtype = DType::kFloat32);

}  // namespace moelink::runtime
