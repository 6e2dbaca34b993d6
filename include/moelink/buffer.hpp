#pragma once
// The communication buffer of one rank: topology, the NVLink buffer shared with the node's peers by
// CUDA IPC, the NVSHMEM (RDMA) buffer, host-mapped counters and a communication stream.
//
// Lifecycle: Buffer(...) allocates -> caller exchanges local_ipc_handle() / local_nvshmem_unique_id()
// with its peers (any bootstrap: bytes in, bytes out) -> sync(...) opens the peers -> operations ->
// destroy() (a device barrier across ranks, so no peer is still writing, then free).
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "moelink/config.hpp"
#include "moelink/event.hpp"
#include "moelink/ops.hpp"
#include "moelink/tensor.hpp"
#include "moelink/topology.hpp"

namespace moelink {

namespace runtime {
class Context;
}

struct BufferOptions {
  int rank = 0;
  int num_ranks = 1;
  int64_t num_nvl_bytes = 0;
  int64_t num_rdma_bytes = 0;
  // Receive arena: extra IPC-shared bytes that dispatch outputs may be allocated from
  // (arena_allocate). When every output of a dispatch lives there, peers write rows straight into
  // them instead of staging them in the rings: half the memory traffic. 0 = no arena.
  int64_t num_arena_bytes = 0;
  bool low_latency_mode = false;
  // Low-latency calls mask a peer that stops answering instead of failing (deep_ep's enable_shrink);
  // needs low_latency_mode.
  bool enable_shrink = false;
  bool explicitly_destroy = false;
  int num_nvl_ranks = 0;       // GPUs per node; 0 = min(num_ranks, 8)
  int num_qps_per_rank = 24;
  double timeout_s = -1;       // device/host wait limit; < 0 = MOELINK_TIMEOUT_S or 100 s
  int device = -1;             // CUDA ordinal; -1 = the current device
};

class Buffer {
 public:
  explicit Buffer(const BufferOptions& options);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  // ---- topology and resources ----
  const Topology& topology() const;
  int device_id() const;
  int64_t num_nvl_bytes() const;
  int64_t num_rdma_bytes() const;
  bool low_latency_mode() const;
  bool explicitly_destroy() const;
  double timeout_s() const;
  cudaStream_t comm_stream() const;
  void* local_nvl_buffer() const;   // num_nvl_bytes of user-visible NVLink buffer
  void* local_rdma_buffer() const;  // num_rdma_bytes of NVSHMEM symmetric memory (after sync)
  int64_t num_arena_bytes() const;
  int64_t arena_bytes_in_use() const;
  int64_t arena_largest_free() const;  // the largest block arena_allocate can return now
  // `bytes` of the receive arena, or nullopt when no free range is large enough (allocate the
  // output elsewhere: the dispatch then stages rows through the rings, correct but slower).
  // `stream` is where the caller uses the block first (the comm stream always uses it); a range is
  // handed out again only after the work queued on its streams before its release. A block
  // allocated while `stream` is being captured belongs to that graph too, until it is destroyed.
  std::optional<ArenaBlock> arena_allocate(int64_t bytes, cudaStream_t stream);
  // The arena block holding `data` is also used on `stream` (what record_stream is for torch's
  // own allocations). No-op for memory outside the arena.
  void arena_record_stream(const void* data, cudaStream_t stream);

  // ---- bootstrap (bytes in, bytes out) ----
  std::vector<uint8_t> local_ipc_handle() const;
  // Whether sync() needs the NVSHMEM root's unique id: num_rdma_bytes > 0, except for a low-latency
  // Buffer whose ranks all share one NVLink domain (its RDMA buffer is IPC memory then).
  bool uses_nvshmem() const;
  // After sync(): whether the low-latency kernels reach some rank by NVSHMEM puts (the plugin's
  // put-path build runs), i.e. the region is symmetric and some rank is not mapped (or
  // MOELINK_DEBUG_LL_FORCE_PUT). For tests and diagnostics.
  bool low_latency_puts() const;
  // After an intranode dispatch has run: whether peers wrote its rows straight into this rank's
  // outputs (its receive arena, or its caching-allocator segments they had mapped), and how many
  // peer segments this rank holds mapped now (MOELINK_PEER_SEGMENTS). For tests and diagnostics.
  bool last_dispatch_direct() const;
  // After an intranode combine has run: whether the token owners read this rank's input rows in
  // place (its receive arena, or its caching-allocator segments they had mapped). For tests.
  bool last_combine_pulled() const;
  int peer_segments_mapped() const;
  // Peer segment mappings closed so far (stale or evicted, once the kernels that could use them
  // had finished).
  long long peer_segments_closed() const;
  // The NVSHMEM unique id; only meaningful on the rank whose rdma_rank == 0 and when RDMA is used.
  std::vector<uint8_t> local_nvshmem_unique_id() const;
  // The process's NVSHMEM world. There is one per process (NVSHMEM is a singleton), shared by every
  // Buffer over its ranks: a low-latency Buffer and an internode Buffer's lanes over one group join
  // it once, and it is finalised when the last of them is destroyed. `id` is the root unique id it
  // was joined with, empty when the process is in none. A bootstrap that finds every rank in one
  // world as pe == rank of num_ranks passes that id to sync() as root_unique_id to share it; sync
  // raises kState for any other id while the process is in a world.
  struct NvshmemWorld {
    std::vector<uint8_t> id;
    int pe = -1;
    int num_pes = 0;
  };
  static NvshmemWorld nvshmem_world();
  // device_ids / ipc_handles: one entry per global rank. root_unique_id: empty when no RDMA.
  void sync(const std::vector<int>& device_ids, const std::vector<std::vector<uint8_t>>& ipc_handles,
            const std::vector<uint8_t>& root_unique_id);
  bool is_available() const;
  // Barrier across ranks, then free everything. Idempotent.
  void destroy();

  // ---- operations ----
  // Every operation runs on the comm stream after `order` (previous_event or the compute stream),
  // and returns the event recorded at its end; without async_finish the compute stream waits on it.
  // A collective one raises, after its last launch, a data error its host sees recorded then
  // (raise_pending_errors); get_dispatch_layout raises it on entry.
  EventHandle get_dispatch_layout(const TensorRef& topk_idx, int num_experts, const LayoutOutputs& out,
                                  const StreamOrder& order);

  // Intranode dispatch is two steps so the caller can allocate outputs in between:
  // notify exchanges the counts (and, unless num_worst_tokens > 0, waits on the host for them),
  // dispatch moves the rows and fills the handle's tensors (notify only checks them). A cached
  // dispatch (handle from an earlier call) skips notify.
  DispatchPlan intranode_notify(const DispatchInputs& in, const DispatchHandle& handle, const Config& config,
                                const StreamOrder& order);
  // The notify in two halves, so that the handle's tensors can be allocated while it runs: the
  // launch checks the arguments, opens the dispatch and returns at once; the wait waits on the
  // host for the counts (with num_worst_tokens > 0 it returns at once, num_recv_tokens =
  // num_worst_tokens). Each launch is waited for once, before its dispatch.
  void intranode_notify_launch(const DispatchInputs& in, const Config& config, const StreamOrder& order);
  DispatchPlan intranode_notify_wait();
  EventHandle intranode_dispatch(const DispatchInputs& in, const DispatchHandle& handle,
                                 const DispatchOutputs& out, const Config& config, const StreamOrder& order,
                                 bool cached);
  EventHandle intranode_combine(const CombineInputs& in, const DispatchHandle& handle, const CombineOutputs& out,
                                const Config& config, const StreamOrder& order);

  // ---- low-latency mode (deep_ep's low_latency_*; Buffer built with low_latency_mode) ----
  // Bytes of num_rdma_bytes a low-latency Buffer needs: never below deep_ep V1's hint for the same
  // arguments, so a deep_ep-sized buffer fits.
  static int64_t low_latency_rdma_size_hint(int num_max_dispatch_tokens_per_rank, int hidden, int num_ranks,
                                            int num_experts);
  EventHandle low_latency_dispatch(const LowLatencyDispatchInputs& in, const LowLatencyDispatchOutputs& out,
                                   LowLatencyPhase phase, const StreamOrder& order);
  EventHandle low_latency_combine(const LowLatencyCombineInputs& in, const LowLatencyCombineOutputs& out,
                                  LowLatencyPhase phase, const StreamOrder& order);
  // Collective: after every rank's earlier calls, zeroes this rank's signal words for the layout of
  // (M, hidden, num_experts), then waits for every rank again. Needed before the first low-latency
  // call with another expert count than the last one, or after the region held normal-mode data.
  void clean_low_latency_buffer(int num_max_dispatch_tokens_per_rank, int hidden, int num_experts);
  // Shrink's mask (enable_shrink), in stream order with the low-latency calls: mask or unmask one
  // rank, copy the mask into an int32 [num_ranks] tensor (1 = masked), or clear it.
  EventHandle low_latency_update_mask(int rank, bool mask, const StreamOrder& order);
  EventHandle low_latency_query_mask(const TensorRef& mask_status, const StreamOrder& order);
  EventHandle low_latency_clean_mask(const StreamOrder& order);
  // Where a zero-copy combine's input may be written: [E_local, R * M, H] bf16 in this rank's
  // low-latency region (`which` alternates between two such areas).
  void* low_latency_combine_buffer(int num_max_dispatch_tokens_per_rank, int hidden, int num_experts, int which) const;

  // This rank will not make the collective call its peers are making now, because its own
  // arguments were rejected (the operations do this themselves when their checks fail; a caller
  // whose own checks fail before it reaches the Buffer calls it). It takes part in the operation's
  // opening with that verdict, so every peer skips the operation and raises instead of waiting.
  // This rank records nothing: it raises its own error, and the peers' record of it, raised at a
  // later call's end, would cost that call's outputs. waits_on_host is ignored (it chose whether
  // to record, which kept this rank in step while errors were raised on entry); kept, with a
  // default, for callers that pass it.
  void abstain(bool waits_on_host = false);

  // The largest num_sms at which the normal-mode kernels of every rank sharing this GPU can be
  // resident at once (they wait for each other, so they must be); num_sms above it is refused.
  // ranks_per_gpu > 0: for that many ranks on this GPU instead of this Buffer's own peers (internode
  // mode, whose inner Buffers each see only some of them).
  int max_num_sms(int ranks_per_gpu = 0) const;

  // Raises the error a kernel recorded: a lost peer (TimeoutError; the Buffer is broken and every
  // later call raises it again) or a data error every rank of an operation found (ValueError, once).
  void check_device_errors() const;
  // A lost peer only: what every collective operation checks on entry, before any check of its
  // own arguments. A data error is not raised there: the host sees the device's record
  // asynchronously, so a rank raising it on entry would open nothing while its peers, whose hosts
  // had not seen it yet, open the operation and wait for it.
  void check_faults() const;
  // What every collective operation does after its last launch: raises the data error recorded
  // now (this operation's or an earlier one's), once the comm stream has drained (bounded by the
  // timeout; a refused stream query counts as not drained), so that no tensor its kernels still
  // write is freed by the exception. Nothing while
  // defer_data_errors is set or the comm stream is being captured: the error then stays recorded
  // for a later call's end. get_dispatch_layout, which opens nothing, raises it on entry instead.
  void raise_pending_errors() const;
  // While set, the end of every dispatch and combine and the entry of get_dispatch_layout hold
  // data errors back (not barrier, destroy or clean_low_latency_buffer: once joined, they raise
  // what they find) (faults still raise, and so does what a host wait found); internode mode
  // sets it on its inner Buffers and calls raise_pending_errors at the end of its own operation
  // (runtime/context.hpp says why).
  void defer_data_errors(bool defer);
  // Makes this Buffer an internode Buffer's lane (its node-to-node leg), before its first operation:
  // every dispatch and combine row goes through the rings (no direct writes, no pull combine, no
  // peer segments), and with MOELINK_DEBUG_LANE_FORCE_PUT=fake its kernels (the ring senders, the
  // notify's inbox, the openings and barriers) move their bytes by the put path's protocol over IPC.
  // With =nvshmem it joins NVSHMEM (below), moves its header and rings into one symmetric
  // allocation, and its kernels are the plugin's builds over NVSHMEM puts
  // (docs/internal/INTERNODE_LANE.md, step 3).
  // A lost peer is then named "rank n (node n)": a lane's rank n is node n. Raises kValue when
  // root_unique_id is missing with =nvshmem or given without it, kState when an operation already
  // mapped peer segments.
  //
  // With =nvshmem the lane's ranks are PEs of the internode group's NVSHMEM world (every rank of the
  // group, PE = its global rank: world_pe of world_size, the world's root id from
  // prepare_nvshmem_lane on global rank 0, or the id of the world the process shares already,
  // nvshmem_world()); lane_pes[p] is the PE of lane rank p. The call is then collective over the
  // whole group, and every rank's lane must have the same num_nvl_bytes (one symmetric allocation).
  // One world, not one job per lane: each job's init has its first PE ask the MPS control daemon,
  // and NVSHMEM exits the process when a concurrent job's ask gets that refused.
  void serve_as_internode_lane(const std::vector<uint8_t>& root_unique_id = {}, int world_pe = -1, int world_size = 0,
                               const std::vector<int>& lane_pes = {});
  // Before serve_as_internode_lane with =nvshmem, on every rank of the group: loads the NVSHMEM
  // plugin (a rank without it raises before any rank joins) and returns a new root unique id when
  // world_root (empty otherwise).
  std::vector<uint8_t> prepare_nvshmem_lane(bool world_root) const;
  // How this Buffer's ring senders write: "" (not a lane), "stores", "fake" (the put protocol over
  // IPC) or "nvshmem". For tests and diagnostics.
  std::string lane_window() const;
  // Bad input this rank alone saw in a low-latency call, which went on (its peers with it): expert
  // ids outside [-1, num_experts) or named twice in a token. The rows they spoilt are poisoned; each
  // operation collects these, and this hands them out (the Python package warns with them).
  // check_device_errors() raises them as kValue.
  std::vector<std::string> take_local_errors();

  // Device barrier across the NVLink peers (the same one destroy() uses). Blocks the host.
  void barrier(const char* step);

  // Test hook: the senders of the next intranode dispatch or combine kernel stop after their first
  // batch of rows, which lands in the peers' rings (or, with a receive arena, their outputs) with no
  // counter or done flag telling them: what the peers see of a rank that dies mid-kernel. On one
  // GPU shared under MPS a process killed mid-kernel faults every client, so tests halt it this way
  // and kill it once its kernel is over. Taken by the next intranode dispatch or combine call
  // (cached dispatch included), even one that raises before launching; nothing else consumes it
  // (low-latency calls, an internode Buffer's own runtime). A pull combine (input in the receive
  // arena) has no senders to halt: its peers read the rows in place and finish. Captured into a
  // graph, the halting kernel is what every replay runs.
  void debug_halt_next_sends();

 private:
  // Everything the operations share lives in the runtime context; the modes are free functions
  // over it, so the Buffer is lifecycle plus forwards.
  std::unique_ptr<runtime::Context> ctx_;
};

}  // namespace moelink
