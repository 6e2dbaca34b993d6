#include "runtime/context.hpp"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "common/barrier.hpp"
#include "common/launch.hpp"
#include "common/opening.hpp"
#include "runtime/errors.hpp"
#include "runtime/knobs.hpp"
#include "runtime/pending_errors.hpp"
#include "runtime/stream_pool.hpp"
#include "runtime/wait_steps.hpp"
#include "window/nvshmem.hpp"

namespace moelink::runtime {

using detail::raise;
using detail::str;

namespace {

const char* barrier_name(int tag) {
  switch (tag) {
    case kernels::kBarrierSync: return "the sync barrier";
    case kernels::kBarrierDestroy: return "the destroy barrier";
    case kernels::kBarrierOp: return "the barrier that opens an operation";
    default: return "a barrier";
  }
}

const char* op_name(unsigned long long op) {
  switch (op) {
    case kernels::kOpDispatch: return "dispatch";
    case kernels::kOpCachedDispatch: return "cached dispatch (with a handle)";
    case kernels::kOpCombine: return "combine";
    default: return "no operation";
  }
}

// What one digest word says, in the caller's terms.
std::string describe_digest_word(int word, unsigned long long v) {
  switch (word) {
    case kernels::kDigestOperation: return str("the operation: it called ", op_name(v));
    case kernels::kDigestConfig:
      return str("the config: it has num_sms = ", 2 * (v & 0xffff), ", num_max_nvl_chunked_recv_tokens = ",
                 (v >> 16) & 0xffff, ", num_max_nvl_chunked_send_tokens = ", v >> 32);
    case kernels::kDigestRow:
      return str("the hidden size or dtype of x: it has hidden = ", v & 0xffffffffu, ", dtype ",
                 dtype_name(static_cast<DType>(v >> 32)));
    case kernels::kDigestTopK:
      return str("the top-k width or the fp8 scales: it has top-k = ", v & 0xffff, ", ", (v >> 16) & 0xffff,
                 " scales per row of dtype ", dtype_name(static_cast<DType>(v >> 32)));
    case kernels::kDigestExperts: return str("num_experts: it has ", v);
    case kernels::kDigestHandle: return str("the handle: it passed the handle of dispatch #", v);
    default: return "the operation";
  }
}

// A header whose epoch-valued words all hold epoch_start: every rank's start at the same value.
std::unique_ptr<NvlHeader> epoch_image(unsigned long long epoch_start) {
  auto image = std::make_unique<NvlHeader>();
  std::memset(static_cast<void*>(image.get()), 0, sizeof(NvlHeader));
  image->common.epoch = epoch_start;
  for (auto& s : image->common.barrier_signal) s = epoch_start;
  image->intranode.direct_target.seq = epoch_start;
  image->intranode.combine_source.seq = epoch_start;
  for (auto& part : image->intranode.direct_done)
    for (auto& channel : part)
      for (auto& s : channel) s = epoch_start;
  for (auto& part : image->intranode.pull_done)
    for (auto& channel : part)
      for (auto& s : channel) s = epoch_start;
  for (auto& opened : image->intranode.segments_opened) opened.seq = epoch_start;
  image->low_latency.seq = epoch_start;
  for (auto& parity : image->low_latency.recv_done)
    for (auto& s : parity) s = epoch_start;
  return image;
}

}  // namespace

kernels::Digest make_digest(int op, int num_channels, int slots, int chunk, int64_t hidden, DType dtype, int num_topk,
                            int num_scales, int num_experts, DType scales_dtype) {
  kernels::Digest d{};
  d.w[kernels::kDigestOperation] = static_cast<unsigned long long>(op);
  d.w[kernels::kDigestConfig] = static_cast<unsigned long long>(num_channels) |
                                (static_cast<unsigned long long>(slots) << 16) |
                                (static_cast<unsigned long long>(chunk) << 32);
  d.w[kernels::kDigestRow] =
      static_cast<unsigned long long>(hidden) | (static_cast<unsigned long long>(static_cast<int>(dtype)) << 32);
  d.w[kernels::kDigestTopK] = static_cast<unsigned long long>(num_topk) | (static_cast<unsigned long long>(num_scales) << 16) |
                              (static_cast<unsigned long long>(static_cast<int>(scales_dtype)) << 32);
  d.w[kernels::kDigestExperts] = static_cast<unsigned long long>(num_experts);
  return d;
}

Context::Context(const BufferOptions& o) {
  if (o.num_ranks < 1) raise(ErrorKind::kValue, "num_ranks: expected >= 1, got ", o.num_ranks);
  if (o.rank < 0 || o.rank >= o.num_ranks)
    raise(ErrorKind::kValue, "rank: expected 0..", o.num_ranks - 1, ", got ", o.rank);
  if (o.num_nvl_bytes < 0) raise(ErrorKind::kValue, "num_nvl_bytes: expected >= 0, got ", o.num_nvl_bytes);
  if (o.num_rdma_bytes < 0) raise(ErrorKind::kValue, "num_rdma_bytes: expected >= 0, got ", o.num_rdma_bytes);
  if (o.num_arena_bytes < 0) raise(ErrorKind::kValue, "num_arena_bytes: expected >= 0, got ", o.num_arena_bytes);
  if (o.num_qps_per_rank < 1) raise(ErrorKind::kValue, "num_qps_per_rank: expected >= 1, got ", o.num_qps_per_rank);
  knobs::log_once();
  topo = Topology::make(o.rank, o.num_ranks, o.num_nvl_ranks);
  num_nvl_bytes = o.num_nvl_bytes;
  num_rdma_bytes = o.num_rdma_bytes;
  low_latency_mode = o.low_latency_mode;
  enable_shrink = o.enable_shrink;
  if (enable_shrink && !low_latency_mode)
    raise(ErrorKind::kValue, "enable_shrink: masking lost ranks is a low-latency feature; it needs low_latency_mode=True");
  explicitly_destroy = o.explicitly_destroy;
  timeout_s = o.timeout_s > 0 ? o.timeout_s : knobs::timeout_seconds();
  spin_backoff_ns = knobs::spin_backoff_ns();
  peer_segments_enabled = knobs::peer_segments();
  segment_limits.second_sighting = knobs::segment_window();
  segment_limits.stale_after = 2 * segment_limits.second_sighting;
  segment_limits.mapped_bytes = knobs::segment_mapped_mb() << 20;
  const unsigned long long epoch_start = knobs::debug_epoch_start();
  // The kernels' per-rank tables and 32-bit mask words hold kMaxNvlRanks ranks: beyond that the
  // Buffer is built as before (no region) and the low-latency calls raise (checked_layout).
  low_latency_bytes = low_latency_mode && o.num_ranks <= kMaxNvlRanks ? num_rdma_bytes : 0;
  const knobs::LowLatencyTransport transport = knobs::low_latency_transport();
  if (low_latency_bytes > 0 && transport == knobs::LowLatencyTransport::kIpc && !topo.is_intranode())
    raise(ErrorKind::kValue, "MOELINK_LL_TRANSPORT=ipc: the ranks span ", topo.num_rdma_ranks, " NVLink domains (",
          topo.num_nvl_ranks, " ranks each), which CUDA IPC cannot reach; unset it (nvshmem is the default there)");
  low_latency_symmetric =
      low_latency_bytes > 0 && (transport == knobs::LowLatencyTransport::kNvshmem || !topo.is_intranode());
  low_latency_force_put = low_latency_symmetric && knobs::debug_low_latency_force_put();
  uses_nvshmem = num_rdma_bytes > 0 && (!low_latency_mode || low_latency_symmetric);
  // Before anything is allocated: a missing NVSHMEM is a setup error the user fixes by installing it.
  if (uses_nvshmem) window::nvshmem_require();

  if (o.device >= 0) {
    MOELINK_CUDA_CHECK(cudaSetDevice(o.device));
    device = o.device;
  } else {
    MOELINK_CUDA_CHECK(cudaGetDevice(&device));
  }
  MOELINK_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  // Loaded now, not at a first launch: with lazy module loading that launch would block the host.
  kernels::preload_kernels();
  comm_stream = acquire_comm_stream(device);
  MOELINK_CUDA_CHECK(cudaEventCreateWithFlags(&order_event, cudaEventDisableTiming));
  MOELINK_CUDA_CHECK(cudaEventCreateWithFlags(&join_event, cudaEventDisableTiming));
  launch_order = LaunchOrder(comm_stream);

  // The header (barrier signals, peer table, notify inbox) always exists so barriers work even
  // for a Buffer with no NVLink data region.
  // The low-latency region is zeroed too: its signal words must start out matching no call.
  const int64_t ipc_ll_bytes = ipc_low_latency_bytes();
  const int64_t bytes = ipc_ll_bytes > 0
                            ? kNvlHeaderBytes + low_latency_offset(num_nvl_bytes) + kernels::align_up(ipc_ll_bytes, 128)
                            : kNvlHeaderBytes + kernels::align_up(num_nvl_bytes, 128);
  const int64_t arena_at = kNvlHeaderBytes + arena_offset(num_nvl_bytes, ipc_ll_bytes);
  void* memory = nullptr;
  MOELINK_CUDA_CHECK(cudaMalloc(&memory, o.num_arena_bytes > 0 ? arena_at + o.num_arena_bytes : bytes));
  nvl_memory = std::shared_ptr<void>(memory, [](void* p) { cudaFree(p); });
  nvl_base = static_cast<char*>(memory);
  if (o.num_arena_bytes > 0)
    arena = std::make_shared<detail::RecvArena>(nvl_memory, nvl_base + arena_at, o.num_arena_bytes, kArenaAlignment);
  // The arena needs no zeroing: every output row is written before it is read.
  MOELINK_CUDA_CHECK(cudaMemsetAsync(nvl_base, 0, bytes, comm_stream));
  if (epoch_start != 0) {
    const auto image = epoch_image(epoch_start);
    MOELINK_CUDA_CHECK(cudaMemcpyAsync(nvl_base, image.get(), sizeof(NvlHeader), cudaMemcpyHostToDevice, comm_stream));
  }
  MOELINK_CUDA_CHECK(cudaStreamSynchronize(comm_stream));
  nvl_window = window::Window(window::cuda_ipc(), nvl_base, topo.nvl_rank, topo.num_nvl_ranks);

  MOELINK_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&mailbox), sizeof(HostMailbox),
                                   cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(mailbox, 0, sizeof(HostMailbox));
  MOELINK_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&mailbox_dev), mailbox, 0));

  if (uses_nvshmem) unique_id = window::nvshmem_unique_id();
}

Context::~Context() { release(); }

bool Context::drain(double seconds, bool strict) {
  if (comm_stream == nullptr) return true;
  // A low-latency call may have run on the caller's stream last; a query of a stream being
  // captured would end its capture (and its queued work is none of this Buffer's eager work).
  cudaStream_t last = launch_order.eager_stream();
  if (last == comm_stream || stream_capturing(last)) last = comm_stream;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  for (;;) {
    cudaError_t status = cudaStreamQuery(last);
    if (status == cudaSuccess && last != comm_stream) status = cudaStreamQuery(comm_stream);
    if (status == cudaSuccess) return true;
    if (status != cudaErrorNotReady) {
      cudaGetLastError();
      // An unloading runtime at exit has nothing left to run. Any other refusal (a query made while
      // a capture elsewhere in the process forbids it) says nothing about the kernels, so a strict
      // caller must not free their outputs on it.
      return !strict || status == cudaErrorCudartUnloading;
    }
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

void Context::release() {
  if (destroyed) return;
  // Its mappings of peers' segments go first: closing one waits for the comm stream.
  peer_segments.reset();
  nvl_window.close();
  if (nvshmem_joined) {
    try {
      // NVSHMEM's frees and finalize are collectives of the whole world that wait without bound, and
      // the world spans more ranks than this Buffer's peers (an internode Buffer's lanes, a
      // low-latency Buffer beside them): a rank lost anywhere in it would hang every survivor here.
      // So every member first runs the world's bounded barrier, broken or not (all must take the
      // same branch), and only when every PE arrived are the allocations freed collectively; the
      // barrier also keeps any peer's puts (destroy() drained this rank's) from landing in freed
      // memory. Otherwise they are leaked with the membership.
      const int missing = window::nvshmem_world_barrier(timeout_s);
      if (missing == -1) {
        if (low_latency_allocation != nullptr) window::nvshmem_release(low_latency_allocation);
        if (lane_allocation != nullptr) window::nvshmem_release(lane_allocation);
        window::nvshmem_release(rdma);
      } else {
        std::fprintf(stderr, "moelink: rank %d: NVSHMEM pe %d did not reach the world's barrier in destroy() within "
                     "%g s; leaving the symmetric memory and the NVSHMEM world without its collectives\n", topo.rank,
                     missing, timeout_s);
      }
      low_latency_allocation = lane_allocation = rdma = nullptr;
      lane_puts = false;
      window::nvshmem_leave();
    } catch (const Error&) {
    }
    nvshmem_joined = false;
  }
  // Outputs still allocated in the arena keep the allocation alive until they are freed.
  arena.reset();
  nvl_memory.reset();
  nvl_base = nullptr;
  if (mailbox) cudaFreeHost(mailbox);
  mailbox = mailbox_dev = nullptr;
  if (order_event) cudaEventDestroy(order_event);
  order_event = nullptr;
  if (join_event) cudaEventDestroy(join_event);
  join_event = nullptr;
  give_back_comm_stream(comm_stream, device);
  comm_stream = nullptr;
  destroyed = true;
  available = false;
}

void Context::open_symmetric_low_latency() {
  const int R = topo.num_ranks;
  const int64_t bytes = low_latency::kSymmetricHeaderBytes + kernels::align_up(low_latency_bytes, 128);
  low_latency_allocation = window::nvshmem_alloc(bytes);  // zeroed: no signal word matches a call yet
  auto* head = static_cast<low_latency::SymmetricHeader*>(low_latency_allocation);
  const unsigned long long epoch_start = knobs::debug_epoch_start();
  if (epoch_start != 0) {
    // As the NVLink header's section (the constructor): every rank's numbers start at one value.
    auto image = std::make_unique<low_latency::HeaderSection>();
    std::memset(static_cast<void*>(image.get()), 0, sizeof(low_latency::HeaderSection));
    image->seq = epoch_start;
    for (auto& parity : image->recv_done)
      for (auto& v : parity) v = epoch_start;
    MOELINK_CUDA_CHECK(cudaMemcpy(&head->header, image.get(), sizeof(low_latency::HeaderSection),
                                  cudaMemcpyHostToDevice));
  }
  // Ranks are the PEs of the low-latency job, in order (buffer.cpp's sync joins it so).
  for (int p = 0; p < R; ++p) {
    low_latency_pes[p] = p;
    void* mapped = p == topo.rank ? low_latency_allocation
                   : low_latency_force_put ? nullptr
                                           : window::nvshmem_peer_pointer(low_latency_allocation, p);
    low_latency_headers[p] = mapped != nullptr ? &static_cast<low_latency::SymmetricHeader*>(mapped)->header : nullptr;
    low_latency_regions[p] = mapped != nullptr ? static_cast<char*>(mapped) + low_latency::kSymmetricHeaderBytes : nullptr;
    low_latency_puts |= mapped == nullptr;
  }
}

void Context::open_symmetric_lane(const std::vector<uint8_t>& root_unique_id, int world_pe, int world_size,
                                  const std::vector<int>& lane_pes) {
  const int R = topo.num_nvl_ranks;
  if (arena || nvshmem_joined || R != topo.num_ranks)
    raise(ErrorKind::kState, "MOELINK_DEBUG_LANE_FORCE_PUT=nvshmem: rank ", topo.rank, " is not an inner lane Buffer "
          "(one NVLink domain, no arena, no NVSHMEM of its own); only internode mode makes lanes");
  try {
    MOELINK_CUDA_CHECK(cudaSetDevice(device));  // NVSHMEM binds to the current device at its join
    // Every rank of the internode group is here at once (the world's collectives below are over
    // all of them, not over the lane).
    window::nvshmem_join(world_pe, world_size, root_unique_id);
    nvshmem_joined = true;
    // Zeroed, as the IPC header was at construction: no barrier word or tail matches a call yet.
    lane_allocation = window::nvshmem_alloc(kNvlHeaderBytes + kernels::align_up(num_nvl_bytes, 128));
    char* base = static_cast<char*>(lane_allocation);
    const unsigned long long epoch_start = knobs::debug_epoch_start();
    if (epoch_start != 0) {
      const auto image = epoch_image(epoch_start);
      MOELINK_CUDA_CHECK(cudaMemcpy(base, image.get(), sizeof(NvlHeader), cudaMemcpyHostToDevice));
    }
    // The IPC region is not used again (sync's barrier has drained from it): every rank unmaps its
    // peers' before any rank frees its own.
    nvl_window.close();
    window::nvshmem_barrier_all();
    nvl_memory.reset();
    nvl_base = base;
    // A peer's copy is reached by its PE, at this rank's own symmetric address (window::Puts).
    for (int p = 0; p < R; ++p) {
      peers.header[p] = reinterpret_cast<kernels::CommonHeader*>(base);
      peers.data[p] = base + kNvlHeaderBytes;
      void* mapped = p == topo.rank ? base : window::nvshmem_peer_pointer(base, lane_pes[p]);
      fault_peers[p] = static_cast<kernels::CommonHeader*>(mapped);
    }
    MOELINK_CUDA_CHECK(cudaMemcpy(header()->common.peer_data, peers.data, sizeof(peers.data), cudaMemcpyHostToDevice));
    window::nvshmem_lane_peers(lane_pes);
    // Its occupancy queries load the plugin's kernels now, as the constructor's preload does
    // libmoelink's: with lazy module loading a first launch would block the host.
    lane_blocks_per_sm = window::nvshmem_lane_blocks_per_sm();
    lane_puts = true;
    // No rank's first put may land before its peer's region holds the epoch image.
    window::nvshmem_barrier_all();
  } catch (const Error& e) {
    broken = str(e.what(), " (making lane rank ", topo.rank, " an NVSHMEM lane; this Buffer is unusable now: destroy "
                 "it)");
    broken_kind = e.kind();
    throw Error(broken_kind, broken);
  }
}

int64_t Context::offset_in_arena(const TensorRef& ref, int64_t bytes) const {
  if (ref.data == nullptr || !arena || !arena->contains(ref.data, bytes)) return -1;
  return static_cast<const char*>(ref.data) - static_cast<const char*>(data());
}

kernels::ErrorSink Context::error_sink(double timeout) const {
  kernels::ErrorSink sink{};
  sink.fault = &mailbox_dev->fault;
  sink.data = &mailbox_dev->data;
  sink.local = &mailbox_dev->local;
  sink.data_lost = &mailbox_dev->data_lost;
  sink.self = &header()->common;
  for (int p = 0; p < topo.num_nvl_ranks; ++p) sink.peers[p] = fault_peers[p];
  sink.rank = topo.nvl_rank;
  sink.num_ranks = topo.num_nvl_ranks;
  sink.timeout_ns = static_cast<uint64_t>((timeout > 0 ? timeout : timeout_s) * 1e9);
  sink.backoff_ns = spin_backoff_ns;
  return sink;
}

void Context::require_usable(const char* op) const {
  if (destroyed) raise(ErrorKind::kState, op, ": the Buffer on rank ", topo.rank, " was destroyed");
  if (!available) raise(ErrorKind::kState, op, ": the Buffer on rank ", topo.rank, " is not synced yet (call sync())");
  // The same message every time: the lost rank and the step, and what to do about it.
  if (!broken.empty()) throw Error(broken_kind, broken);
}

void Context::check_faults() {
  if (mailbox == nullptr) return;
  const int rank = topo.rank;
  const auto global = [&](int nvl_rank) { return nvl_rank >= 0 ? topo.global_rank(topo.rdma_rank, nvl_rank) : -1; };
  // A lost peer as the caller knows it: on an internode Buffer's lane, rank n is node n's GPU of
  // this lane (the internode layer adds its global rank).
  const auto who = [&](int r) { return ring_only ? str("rank ", r, " (node ", r, ")") : str("rank ", r); };
  volatile kernels::ErrorRecord* fault = &mailbox->fault;
  if (fault->code != kernels::kErrNone) {
    if (broken.empty()) {
      std::atomic_thread_fence(std::memory_order_acquire);
      const int lost = global(fault->peer);
      if (fault->code == kernels::kErrBadSignal) {
        broken_kind = ErrorKind::kState;
        broken = str("moelink: rank ", rank, ": a low-latency signal word from rank ", lost, " held ", fault->detail,
                     ", not a count any sender writes: words left by a layout with another expert count (call "
                     "clean_low_latency_buffer after changing num_experts); this Buffer is unusable now: destroy it "
                     "and create a new one");
      } else if (fault->code == kernels::kErrSegmentMissing) {
        broken_kind = ErrorKind::kState;
        broken = str("moelink: rank ", rank, ": rank ", lost, " named a segment (a direct dispatch's output or a pulled combine's input) that rank ", rank,
                     " had not mapped (an internal error: please report it; MOELINK_PEER_SEGMENTS=0 avoids the path); "
                     "this Buffer is unusable now: destroy it and create a new one");
      } else if (fault->code == kernels::kErrTimeout) {
        broken = str("moelink: rank ", rank, " timed out after ", timeout_s, " s ");
        if (fault->step == kernels::kStepBarrier)
          broken += str("in ", barrier_name(fault->barrier_tag), ": ", who(lost), " never arrived");
        else
          broken += str("in ", wait_step_description(fault->step), " rank ", lost, ", channel ", fault->channel,
                        "): ", who(lost), " stopped making progress");
        broken += " (raise MOELINK_TIMEOUT_S if the peer is just slow)";
        broken += "; this Buffer is unusable now: destroy it and create a new one";
      } else {
        const int reporter = global(static_cast<int>(fault->detail));
        if (fault->step == kernels::kStepBarrier)
          broken = str("moelink: rank ", rank, " stopped: rank ", reporter, " gave up waiting for ", who(lost), " in ",
                       barrier_name(fault->barrier_tag));
        else
          broken = str("moelink: rank ", rank, " stopped: rank ", reporter, " gave up in ",
                       wait_step_description(fault->step), " rank ", lost, ")");
        if (ring_only) broken += str(": rank ", lost, " is node ", lost);
        broken += " (a lost or stuck peer; raise MOELINK_TIMEOUT_S if it is just slow); this Buffer is unusable now: "
                  "destroy it and create a new one";
      }
    }
    throw Error(broken_kind, broken);
  }
}

namespace {
bool recorded(const volatile kernels::ErrorRecord& record) { return record.code != kernels::kErrNone; }
}  // namespace

bool Context::fault_recorded() const { return mailbox != nullptr && recorded(mailbox->fault); }

bool Context::data_error_recorded() const { return mailbox != nullptr && recorded(mailbox->data); }

void Context::raise_data_error() { raise_recorded_data_error(*this); }

std::string Context::describe_data_error() const {
  const int rank = topo.rank;
  const auto global = [&](int nvl_rank) { return nvl_rank >= 0 ? topo.global_rank(topo.rdma_rank, nvl_rank) : -1; };
  const volatile kernels::ErrorRecord* data = &mailbox->data;
  const int code = data->code;
  std::atomic_thread_fence(std::memory_order_acquire);
  const int peer = global(data->peer);
  const long long detail = data->detail;
  const int word = data->channel;
  std::string message;
  switch (code) {
    case kernels::kErrWorstTokensOverflow:
      message = str("moelink: num_worst_tokens: rank ", peer, " would receive ", detail,
                    " rows, more than its num_worst_tokens; no rank ran the dispatch and its outputs are poisoned "
                    "(raise num_worst_tokens)");
      break;
    case kernels::kErrBadExpertId:
      message = str("moelink: topk_idx: rank ", peer, " token ", detail / kernels::kMaxTopK, " slot ",
                    detail % kernels::kMaxTopK,
                    " holds an expert id outside [-1, num_experts); no rank ran the dispatch (or the operation after "
                    "get_dispatch_layout saw it)");
      break;
    case kernels::kErrDisagree:
      message = str("moelink: ranks disagree on ", describe_digest_word(word, static_cast<unsigned long long>(detail)),
                    " on rank ", peer, ", unlike rank ", rank, "; every rank must make the same call with the same "
                    "config, hidden size, dtype and handle (no rank ran it; its outputs are poisoned)");
      break;
    case kernels::kErrPeerRejected:
      message = str("moelink: rank ", peer, " rejected its own arguments for this operation (see the error raised "
                    "there); no rank ran it and its outputs are poisoned");
      break;
    case kernels::kErrHandleFailed:
      message = str("moelink: handle: rank ", peer, " passed the handle of a dispatch that failed; no rank ran the "
                    "operation and its outputs are poisoned");
      break;
    case kernels::kErrInputRows:
      message = str("moelink: x: the combine input on rank ", peer, " has fewer rows than its handle needs (", detail,
                    "); no rank ran the combine and its outputs are poisoned");
      break;
    default: message = str("moelink: rank ", rank, ": device error code ", code);
  }
  return message;
}

unsigned Context::data_lost_total() const { return *static_cast<const volatile unsigned*>(&mailbox->data_lost); }

void Context::clear_data_error() {
  // Data errors leave the protocol intact: clear the record so the Buffer stays usable.
  volatile kernels::ErrorRecord* data = &mailbox->data;
  data->code = kernels::kErrNone;
  release_claim(&header()->common.data_claim);
}

void Context::check_device_errors() {
  check_faults();
  raise_data_error();
}

void Context::check_on_entry(bool opens_collective) { runtime::check_on_entry(*this, opens_collective); }


void Context::fail_host_wait(const std::string& message, int step) {
  broken = message;
  // The kernels queued behind the wait, and the peers, must stop too: raise this rank's fault word
  // and its peers' on a stream of its own (the comm stream may be the thing that is stuck).
  if (available && !destroyed) {
    const int word = kernels::encode_fault(topo.nvl_rank, topo.nvl_rank, step, -1);
    cudaStream_t side = nullptr;
    if (cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking) == cudaSuccess) {
      for (int p = 0; p < topo.num_nvl_ranks; ++p)
        if (fault_peers[p] != nullptr)
          cudaMemcpyAsync(&fault_peers[p]->fault, &word, sizeof(int), cudaMemcpyHostToDevice, side);
      cudaStreamSynchronize(side);
      cudaStreamDestroy(side);
    }
    cudaGetLastError();
  }
  throw Error(ErrorKind::kTimeout, message);
}

namespace {
bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream, &status) == cudaSuccess && status != cudaStreamCaptureStatusNone;
}

// For LaunchOrder. The legacy stream is never captured, and a query of it while another stream is
// being captured (in the global mode) would end that capture, so it is not asked.
Capture capture_of(cudaStream_t stream) {
  Capture c;
  if (stream == nullptr) return c;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamGetCaptureInfo(stream, &status, &c.id) != cudaSuccess) {
    cudaGetLastError();
    return Capture{};
  }
  c.active = status != cudaStreamCaptureStatusNone;
  return c;
}
}  // namespace

bool Context::comm_stream_capturing() const { return capturing(comm_stream); }

bool Context::stream_idle(cudaStream_t stream) {
  const cudaError_t e = cudaStreamQuery(stream);
  if (e != cudaSuccess) cudaGetLastError();
  return e == cudaSuccess;
}
bool Context::stream_capturing(cudaStream_t stream) { return stream != nullptr && capturing(stream); }

void Context::raise_at_end(cudaStream_t compute_stream) {
  // Every call ends here, and nearly always with nothing recorded: a host-mapped read answers that
  // without the CUDA calls below.
  if (defer_data_errors || !data_error_recorded()) return;
  // The caller's stream may be captured while the comm stream is not (previous_event recorded
  // before the capture); a query of any stream could then end the capture too.
  if (compute_stream != nullptr && capturing(compute_stream)) return;
  runtime::raise_at_end(*this, host_wait_limit_s());
}

void Context::release_claim(int* claim, std::optional<cudaStream_t> op_stream) {
  // Captured inside an operation, the memset gives the claim back at each replay (a Buffer may be
  // used by replays alone); and, deferred, once outside the capture for the eager calls after it.
  const cudaStream_t stream = op_stream ? *op_stream : comm_stream;
  const bool captured = op_stream ? capturing(stream) : capture_in_the_way(stream);
  if (!captured || op_stream) {
    // Never throws: an operation's end (op_stream, entered already) joins nothing; elsewhere a join
    // that cannot be made leaves the claim taken, as a failed memset would.
    try {
      queue_on(stream);
      cudaMemsetAsync(claim, 0, sizeof(int), stream);
    } catch (const Error&) {
    }
  }
  if (!captured) return;
  for (int*& slot : deferred_claims)
    if (slot == nullptr || slot == claim) {
      slot = claim;
      return;
    }
}

bool Context::capture_in_the_way(cudaStream_t stream) const {
  const cudaStream_t eager = launch_order.eager_stream(), captured = launch_order.captured_stream();
  return capturing(stream) || (eager != stream && stream_capturing(eager)) ||
         (captured != stream && stream_capturing(captured));
}

void Context::release_deferred_claims(cudaStream_t stream) {
  if (deferred_claims[0] == nullptr || capture_in_the_way(stream)) return;
  queue_on(stream);
  for (int*& slot : deferred_claims) {
    if (slot != nullptr) cudaMemsetAsync(slot, 0, sizeof(int), stream);
    slot = nullptr;
  }
}

void Context::queue_on(cudaStream_t stream, std::optional<cudaStream_t> covered) {
  if (launch_order.settled(stream)) return;
  const LaunchOrder::Join join = launch_order.plan(stream, capture_of(stream), capture_of, covered);
  if (join.hidden)
    raise(ErrorKind::kState, "moelink: rank ", topo.rank, ": this Buffer's previous call was queued on a stream that "
          "is being captured into a CUDA graph now, before that capture began, and this call is not part of the "
          "capture: nothing can order it after that call. End the capture first, or make this call inside it");
  if (join.needed) {
    MOELINK_CUDA_CHECK(cudaEventRecord(join_event, join.record_on));
    MOELINK_CUDA_CHECK(cudaStreamWaitEvent(stream, join_event, 0));
  }
  launch_order.take(join);
}

void Context::begin_op(const StreamOrder& order) {
  notify_join = {};
  release_deferred_claims();
  idle_at_begin = peer_segments && peer_segments->closing() > 0 && !comm_stream_capturing() &&
                  !stream_capturing(order.compute_stream) && stream_idle(comm_stream) &&
                  stream_idle(order.compute_stream);
  check_allocation_order(order);
  if (order.previous_event) {
    MOELINK_CUDA_CHECK(cudaStreamWaitEvent(comm_stream, order.previous_event->get(), 0));
  } else {
    MOELINK_CUDA_CHECK(cudaEventRecord(order_event, order.compute_stream));
    MOELINK_CUDA_CHECK(cudaStreamWaitEvent(comm_stream, order_event, 0));
  }
  // After the join above, so that the comm stream's capture state is the operation's. With
  // previous_event the comm stream has not waited for the caller's stream, which may hold the
  // Buffer's latest work (a low-latency call launched there): queue_on joins it then.
  queue_on(comm_stream, order.previous_event ? std::nullopt : std::optional<cudaStream_t>(order.compute_stream));
}

cudaStream_t Context::begin_op_on_caller(const StreamOrder& order) {
  if (!on_caller_stream(order)) {
    begin_op(order);
    return comm_stream;
  }
  notify_join = {};
  idle_at_begin = peer_segments && peer_segments->closing() > 0 && !comm_stream_capturing() &&
                  !stream_capturing(order.compute_stream) && stream_idle(comm_stream) &&
                  stream_idle(order.compute_stream);
  queue_on(order.compute_stream);
  release_deferred_claims(order.compute_stream);
  return order.compute_stream;
}

EventHandle Context::end_op_on_caller(const StreamOrder& order) {
  if (!on_caller_stream(order)) return end_op(order);
  // The claim's memset on the launch stream, after the kernel; the caller's stream holds both, so
  // there is nothing to join and the event is recorded only if someone waits for it.
  collect_local_errors(order.compute_stream);
  return EventHandle::deferred(order.compute_stream, device);
}

void Context::begin_dispatch_after_notify(const StreamOrder& order, int seq) {
  const NotifyJoin join = std::exchange(notify_join, {});
  const cudaEvent_t previous = order.previous_event ? order.previous_event->get() : nullptr;
  if (join.seq == 0 || join.seq != seq || join.compute_stream != order.compute_stream || join.previous_event != previous) {
    begin_op(order);
    return;
  }
  release_deferred_claims();
  check_allocation_order(order);
}

void Context::check_allocation_order(const StreamOrder& order) {
  if (order.allocate_on_comm_stream && !(order.previous_event && order.async_finish))
    raise(ErrorKind::kValue, "allocate_on_comm_stream: requires previous_event and async_finish");
}

EventHandle Context::end_op(const StreamOrder& order) {
  // Collected before the event, so that a claim given back here is ordered after the kernel and
  // covered by what the caller joins, captured or not (async_finish included).
  collect_local_errors(comm_stream);
  EventHandle done(comm_stream);
  if (!order.async_finish) done.stream_wait(order.compute_stream);
  return done;
}

void Context::collect_local_errors(std::optional<cudaStream_t> op_stream) {
  if (mailbox == nullptr) return;
  volatile kernels::ErrorRecord* local = &mailbox->local;
  const int code = local->code;
  if (code == kernels::kErrNone) return;
  std::atomic_thread_fence(std::memory_order_acquire);
  const long long detail = local->detail;
  const char* call = local->channel == 0 ? "low_latency_dispatch" : "low_latency_combine";
  const long long token = detail / kernels::kMaxTopK, slot = detail % kernels::kMaxTopK;
  std::string message;
  switch (code) {
    case kernels::kErrLowLatencyBadExpertId:
      message = str("moelink: topk_idx: token ", token, " slot ", slot, " of a ", call, " on rank ", topo.rank,
                    " held an expert id outside [-1, num_experts); the slot was skipped",
                    local->channel == 0 ? " (its row went to no expert)" : " and the token's combined row is poisoned");
      break;
    case kernels::kErrLowLatencyDuplicateExpert:
      message = str("moelink: topk_idx: token ", token, " of a ", call, " on rank ", topo.rank, " names one expert in "
                    "slot ", slot, " and in an earlier slot; slot ", slot, " was skipped",
                    local->channel == 0 ? "" : " and the token's combined row is poisoned");
      break;
    case kernels::kErrLowLatencyMaskedPeer:
      message = str("moelink: rank ", topo.rank, ": rank ", detail, " did not answer a low-latency call within ", timeout_s,
                    " s and is masked now (enable_shrink): the calls go on without it");
      break;
    case kernels::kErrLowLatencyFormatMismatch:
      message = str("moelink: use_logfmt: the low_latency_combine on rank ", topo.rank, " received expert ", detail,
                    "'s rows in the other format (every rank, and a hook's receive, must pass the same use_logfmt); "
                    "the combined rows of the tokens that needed them are poisoned");
      break;
    case kernels::kErrLowLatencyTooManyRows:
      message = str("moelink: topk_idx: a low_latency_dispatch on rank ", topo.rank, " sent more than "
                    "num_max_dispatch_tokens_per_rank rows to expert ", detail, "; the extra rows were dropped");
      break;
    default: message = str("moelink: rank ", topo.rank, ": local device error code ", code);
  }
  // Only the first local error since the last read is kept; the next one may be recorded now.
  local->code = kernels::kErrNone;
  release_claim(&header()->common.local_claim, op_stream);
  local_errors.push_back(std::move(message));
}

std::vector<std::string> Context::take_local_errors() {
  release_deferred_claims();
  collect_local_errors();
  std::vector<std::string> taken;
  taken.swap(local_errors);
  return taken;
}

void Context::launch_opening(const kernels::Opening& opening) {
  queue_on(comm_stream);
  kernels::launch_opening(peers, topo.nvl_rank, topo.num_nvl_ranks, opening, error_sink(), window_policy(), comm_stream);
}

void Context::abstain() noexcept {
  if (!available || destroyed || !broken.empty()) return;
  try {
    kernels::Opening opening{};
    opening.digest.w[kernels::kDigestVerdict] = kernels::kVerdictRejected;
    launch_opening(opening);
  } catch (const Error&) {
    // The caller is raising its own error already; its peers then time out instead.
  }
}

void Context::launch_barrier(int tag, double timeout) {
  queue_on(comm_stream);
  kernels::launch_barrier(peers, topo.nvl_rank, topo.num_nvl_ranks, tag, error_sink(timeout), window_policy(),
                          comm_stream);
}

void Context::barrier(int tag, double timeout, bool raise_data_errors) {
  launch_barrier(tag, timeout);
  MOELINK_CUDA_CHECK(cudaStreamSynchronize(comm_stream));
  check_faults();
  if (raise_data_errors) raise_data_error();
}

int Context::max_num_sms(int blocks_per_sm) const {
  const int fit = sm_count * blocks_per_sm / ranks_per_gpu;
  return fit - fit % 2;
}

void Context::require_coresident(int num_sms, int blocks_per_sm, const char* arg) const {
  if (ranks_per_gpu * num_sms <= sm_count * blocks_per_sm) return;
  raise(ErrorKind::kValue, arg, ": num_sms = ", num_sms, " is too many: ", ranks_per_gpu,
        " ranks share this GPU (", sm_count, " SMs, ", blocks_per_sm, " block(s) per SM), and every rank's blocks must be "
        "resident at once or the ranks wait for each other forever; use num_sms <= ", max_num_sms(blocks_per_sm),
        " (Config(num_sms=...) or Buffer.set_num_sms)");
}

}  // namespace moelink::runtime
