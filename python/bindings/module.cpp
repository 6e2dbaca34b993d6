// moelink._moelink: the nanobind glue over the C++ core. It only translates Python values to core
// structs (convert.hpp) and core errors to Python exceptions; every check and decision lives in the
// core. The surface is documented in docs/internal/BINDING_API.md.
#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "convert.hpp"
#include "moelink/buffer.hpp"
#include "moelink/config.hpp"
#include "moelink/error.hpp"
#include "moelink/event.hpp"
#include "moelink/tensor.hpp"
#include "moelink/topology.hpp"
#include "common/header.hpp"       // kMaxLocalExperts: one definition for C++ and Python
#include "runtime/knobs.hpp"       // MOELINK_DEBUG_LANE_FORCE_PUT, read where the core reads it
#include "runtime/memory_map.hpp"  // kArenaAlignment: one definition for C++ and Python
#include "window/nvshmem.hpp"  // nvshmem_compiled(): a build property, not public API

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using moelink::bindings::to_byte_vector;
using moelink::bindings::to_bytes;
using moelink::bindings::to_stream_order;
using moelink::bindings::to_tensor_ref;
using moelink::bindings::to_tensor_refs;
using moelink::bindings::Torch;
using moelink::bindings::template_for;
using moelink::bindings::Outputs;
using moelink::bindings::torch_objects;
using moelink::bindings::is_tensor;

void translate_error(const std::exception_ptr& error, void*) {
  try {
    std::rethrow_exception(error);
  } catch (const moelink::Error& e) {
    PyObject* type = PyExc_RuntimeError;
    switch (e.kind()) {
      case moelink::ErrorKind::kValue: type = PyExc_ValueError; break;
      case moelink::ErrorKind::kType: type = PyExc_TypeError; break;
      case moelink::ErrorKind::kTimeout: type = PyExc_TimeoutError; break;
      case moelink::ErrorKind::kCuda:
      case moelink::ErrorKind::kState: type = PyExc_RuntimeError; break;
    }
    PyErr_SetString(type, e.what());
  }
}

// Never raises: Python asks this before deciding whether to touch CUDA at all.
int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // a missing driver leaves a (non-sticky) error behind; clear it
    return 0;
  }
  return count;
}

bool is_sm90_compiled() {
  // A build-time property of libmoelink: the build defines MOELINK_DISABLE_SM90 when it targets
  // architectures without the SM90 features (TMA, cluster launch).
#ifdef MOELINK_DISABLE_SM90
  return false;
#else
  return true;
#endif
}

std::string topology_repr(const moelink::Topology& t) {
  return "Topology(rank=" + std::to_string(t.rank) + ", num_ranks=" + std::to_string(t.num_ranks) +
         ", num_nvl_ranks=" + std::to_string(t.num_nvl_ranks) + ", num_rdma_ranks=" +
         std::to_string(t.num_rdma_ranks) + ", nvl_rank=" + std::to_string(t.nvl_rank) +
         ", rdma_rank=" + std::to_string(t.rdma_rank) + ")";
}

std::string config_repr(const moelink::Config& c) {
  return "Config(num_sms=" + std::to_string(c.num_sms) +
         ", num_max_nvl_chunked_send_tokens=" + std::to_string(c.num_max_nvl_chunked_send_tokens) +
         ", num_max_nvl_chunked_recv_tokens=" + std::to_string(c.num_max_nvl_chunked_recv_tokens) +
         ", num_max_rdma_chunked_send_tokens=" + std::to_string(c.num_max_rdma_chunked_send_tokens) +
         ", num_max_rdma_chunked_recv_tokens=" + std::to_string(c.num_max_rdma_chunked_recv_tokens) + ")";
}

// A 1-D uint8 view of the whole local buffer as a plain DLPack producer (__dlpack__ /
// __dlpack_device__): torch.from_dlpack takes it without the extension carrying a PyTorch ABI
// dependency. The owner handle keeps the Python Buffer (and so the memory) alive for as long as any
// consumer tensor does.
using ByteView = nb::ndarray<uint8_t, nb::ndim<1>, nb::device::cuda, nb::array_api>;

ByteView local_buffer_dlpack(moelink::Buffer& self, bool use_rdma_buffer) {
  void* data = use_rdma_buffer ? self.local_rdma_buffer() : self.local_nvl_buffer();
  const int64_t bytes = use_rdma_buffer ? self.num_rdma_bytes() : self.num_nvl_bytes();
  nb::object owner = nb::find(&self);
  const size_t shape[1] = {static_cast<size_t>(bytes)};
  return ByteView(data, 1, shape, owner, nullptr, nb::dtype<uint8_t>(), nb::device::cuda::value,
                  self.device_id());
}

// `bytes` of the receive arena as a 1-D uint8 DLPack array, or None when the arena has no room.
// The capsule owns the block: the range returns to the arena when the last tensor viewing it dies.
nb::object arena_dlpack(moelink::Buffer& self, int64_t bytes, uintptr_t stream) {
  std::optional<moelink::ArenaBlock> block = self.arena_allocate(bytes, reinterpret_cast<cudaStream_t>(stream));
  if (!block) return nb::none();
  auto* owner = new std::shared_ptr<void>(std::move(block->owner));
  nb::capsule capsule(owner, [](void* p) noexcept { delete static_cast<std::shared_ptr<void>*>(p); });
  const size_t shape[1] = {static_cast<size_t>(bytes)};
  return nb::cast(ByteView(block->data, 1, shape, capsule, nullptr, nb::dtype<uint8_t>(), nb::device::cuda::value,
                           self.device_id()));
}

// 0: send and receive, 1: send only, 2: receive only (what Python passes).
moelink::LowLatencyPhase to_phase(int phase) {
  switch (phase) {
    case 0: return moelink::LowLatencyPhase::kSendAndReceive;
    case 1: return moelink::LowLatencyPhase::kSend;
    case 2: return moelink::LowLatencyPhase::kReceive;
    default: throw moelink::Error(moelink::ErrorKind::kValue, "moelink: phase: expected 0, 1 or 2, got " + std::to_string(phase));
  }
}

// The arguments of a collective that the extension cannot read (a dtype it does not know, an
// object that is no tensor) are this rank's own rejection: it abstains, as the runtime does when
// its own checks fail, so that its peers skip the operation and raise instead of waiting for it.
template <typename Read>
void read_or_abstain(moelink::Buffer& self, Read&& read) {
  try {
    read();
  } catch (...) {
    self.abstain();
    throw;
  }
}

// An uncached dispatch's inputs, as its notify reads them (abstaining when one cannot be read).
// A null `order` leaves *stream_order as the caller set it (the express calls).
moelink::DispatchInputs notify_inputs(moelink::Buffer& self, nb::handle x, nb::handle x_scales, nb::handle topk_idx,
                                      nb::handle topk_weights, nb::handle is_token_in_rank,
                                      nb::handle num_tokens_per_rank, nb::handle num_tokens_per_expert,
                                      int num_experts, int expert_alignment, int num_worst_tokens, nb::handle order,
                                      moelink::StreamOrder* stream_order) {
  moelink::DispatchInputs in;
  read_or_abstain(self, [&] {
    to_tensor_refs({{x, "x", &in.x},
                    {x_scales, "x_scales", &in.x_scales},
                    {topk_idx, "topk_idx", &in.topk_idx},
                    {topk_weights, "topk_weights", &in.topk_weights},
                    {is_token_in_rank, "is_token_in_rank", &in.is_token_in_rank},
                    {num_tokens_per_rank, "num_tokens_per_rank", &in.num_tokens_per_rank},
                    {num_tokens_per_expert, "num_tokens_per_expert", &in.num_tokens_per_expert}});
    if (order.is_valid()) *stream_order = to_stream_order(order);
  });
  in.num_experts = num_experts;
  in.expert_alignment = expert_alignment;
  in.num_worst_tokens = num_worst_tokens;
  return in;
}

moelink::DispatchHandle dispatch_handle(nb::handle rank_prefix_matrix, nb::handle channel_prefix_matrix,
                                        nb::handle recv_channel_prefix_matrix, nb::handle recv_src_idx,
                                        nb::handle is_token_in_rank, nb::handle info, int64_t hidden) {
  moelink::DispatchHandle handle;
  handle.info = to_tensor_ref(info, "handle_info");
  handle.hidden = hidden;
  handle.rank_prefix_matrix = to_tensor_ref(rank_prefix_matrix, "rank_prefix_matrix");
  handle.channel_prefix_matrix = to_tensor_ref(channel_prefix_matrix, "channel_prefix_matrix");
  handle.recv_channel_prefix_matrix = to_tensor_ref(recv_channel_prefix_matrix, "recv_channel_prefix_matrix");
  handle.recv_src_idx = to_tensor_ref(recv_src_idx, "recv_src_idx");
  handle.is_token_in_rank = to_tensor_ref(is_token_in_rank, "is_token_in_rank");
  return handle;
}

// recv_x and recv_x_scales of n rows, as alloc_dispatch_outputs (python/moelink/_arena.py) makes
// them without an arena, in its order: the scales keep the caller's layout (column-major is what
// fp8 GEMMs read). Their slots in `outs` (recv_x_scales kNone without scales).
// recv_x_scales of n rows, as add_recv_x adds it.
Outputs::Part recv_scales_part(nb::handle x_scales, const moelink::DispatchInputs& in, int64_t n, int device,
                               moelink::DispatchOutputs* out) {
  const moelink::TensorRef& ref = in.x_scales;
  moelink::check::dim(ref, 2, "x_scales");
  // Column-major (_arena.scales_column_major's test: a token stride of 1, and more than one scale or
  // a scale stride other than 1): the strides of empty((num_scales, n)).t(), as the Python path makes
  // them (for n = 0 too).
  std::vector<int64_t> strides;
  if (ref.stride(0) == 1 && (ref.size(1) > 1 || ref.stride(1) != 1)) strides = {1, std::max<int64_t>(n, 1)};
  return {{n, ref.size(1)}, ref.dtype, &out->recv_x_scales, std::move(strides),
          template_for(x_scales, ref, ref.dtype, device)};
}

int add_recv_x_only(Outputs& outs, nb::handle x, const moelink::DispatchInputs& in, int64_t n, int device,
                    moelink::DispatchOutputs* out) {
  moelink::check::dim(in.x, 2, "x");
  return outs.add({n, in.x.size(1)}, in.x.dtype, device, &out->recv_x, {}, template_for(x, in.x, in.x.dtype, device));
}

std::pair<int, int> add_recv_x(Outputs& outs, nb::handle x, nb::handle x_scales, const moelink::DispatchInputs& in,
                               int64_t n, int device, moelink::DispatchOutputs* out) {
  const int recv_x = add_recv_x_only(outs, x, in, n, device, out);
  if (!in.x_scales.defined()) return {recv_x, Outputs::kNone};
  return {recv_x, outs.add(device, recv_scales_part(x_scales, in, n, device, out))};
}

// dispatch's x, a tensor or a (data, scales) pair of tensors, split; false for anything else (the
// Python layer then raises its error for it).
bool split_x(nb::handle x, nb::handle* data, nb::handle* scales) {
  PyObject* o = x.ptr();
  if (is_tensor(x)) {
    *data = x;
    *scales = nb::handle(Py_None);
    return true;
  }
  if ((PyTuple_Check(o) || PyList_Check(o)) && PySequence_Fast_GET_SIZE(o) == 2) {
    nb::handle first(PySequence_Fast_GET_ITEM(o, 0)), second(PySequence_Fast_GET_ITEM(o, 1));
    if (is_tensor(first) && is_tensor(second)) {
      *data = first;
      *scales = second;
      return true;
    }
  }
  return false;
}

bool tensor_or_none(nb::handle value) { return value.is_none() || is_tensor(value); }

// Reads a tensor and an optional second one; false when one is not 2-D (the Python layer's checks
// name that error).
bool read_2d(nb::handle first, const char* first_name, nb::handle second, const char* second_name,
             moelink::TensorRef* first_ref, moelink::TensorRef* second_ref) {
  to_tensor_refs({{first, first_name, first_ref}, {second, second_name, second_ref}});
  return first_ref->dim() == 2 && (!second_ref->defined() || second_ref->dim() == 2);
}

// The express calls' order: the caller's stream, no previous event.
moelink::StreamOrder default_order(uintptr_t compute_stream, bool async_finish = false) {
  moelink::StreamOrder order;
  order.compute_stream = reinterpret_cast<cudaStream_t>(compute_stream);
  order.async_finish = async_finish;
  return order;
}

// A low-latency call's state tensor ([2] int64), as the Python layer makes it. Not zeroed: the
// kernel's send half writes both words in its last block, faulted or not (low_latency/call.cuh's
// run_call), before anything reads them, and a fill is one more launch on a host path that is the
// whole of a hook's send call.
Outputs::Part ll_state_part(moelink::TensorRef* ref, nb::handle like_int64) {
  return {{2}, moelink::DType::kInt64, ref, {}, like_int64};
}

int add_ll_state(Outputs& outs, int device, moelink::TensorRef* ref, nb::handle like_int64) {
  return outs.add(device, ll_state_part(ref, like_int64));
}

// The local errors an operation left (what EventOverlap's finish would warn about), or None.
nb::object local_errors(moelink::Buffer& self) {
  std::vector<std::string> errors = self.take_local_errors();
  if (errors.empty()) return nb::none();
  return nb::cast(errors);
}

// A low-latency dispatch's and combine's inputs, as both their calls read them.
moelink::LowLatencyDispatchInputs ll_dispatch_inputs(nb::handle x, nb::handle topk_idx, int max_tokens,
                                                     int num_experts, nb::handle cumulative_stats,
                                                     nb::handle wait_stats, bool use_fp8, bool round_scale,
                                                     bool use_ue8m0) {
  moelink::LowLatencyDispatchInputs in;
  to_tensor_refs({{x, "x", &in.x},
                  {topk_idx, "topk_idx", &in.topk_idx},
                  {cumulative_stats, "cumulative_local_expert_recv_stats", &in.cumulative_local_expert_recv_stats},
                  {wait_stats, "dispatch_wait_recv_cost_stats", &in.dispatch_wait_recv_cost_stats}});
  in.num_max_dispatch_tokens_per_rank = max_tokens;
  in.num_experts = num_experts;
  in.use_fp8 = use_fp8;
  in.round_scale = round_scale;
  in.use_ue8m0 = use_ue8m0;
  return in;
}

moelink::LowLatencyCombineInputs ll_combine_inputs(nb::handle x, nb::handle topk_idx, nb::handle topk_weights,
                                                   nb::handle src_info, nb::handle layout_range, int max_tokens,
                                                   int num_experts, nb::handle wait_stats, nb::handle dispatch_state,
                                                   bool use_logfmt) {
  moelink::LowLatencyCombineInputs in;
  in.use_logfmt = use_logfmt;
  to_tensor_refs({{x, "x", &in.x},
                  {topk_idx, "topk_idx", &in.topk_idx},
                  {topk_weights, "topk_weights", &in.topk_weights},
                  {src_info, "src_info", &in.src_info},
                  {layout_range, "layout_range", &in.layout_range},
                  {wait_stats, "combine_wait_recv_cost_stats", &in.combine_wait_recv_cost_stats},
                  {dispatch_state, "handle state", &in.dispatch_state}});
  in.num_max_dispatch_tokens_per_rank = max_tokens;
  in.num_experts = num_experts;
  return in;
}

// An uncached dispatch after its inputs were read: the notify launch, the handle's tensors
// (allocated while it runs), the host wait, the outputs and the dispatch launch, as
// intranode_dispatch_uncached returns them; `express` appends the hidden size and local_errors.
nb::tuple dispatch_uncached(moelink::Buffer& self, const moelink::DispatchInputs& in, nb::handle x,
                            nb::handle x_scales, nb::handle topk_idx, nb::handle topk_weights,
                            nb::handle num_tokens_per_rank, const moelink::Config& config,
                            const moelink::StreamOrder& stream_order, bool express) {
  {
    nb::gil_scoped_release release;
    self.intranode_notify_launch(in, config, stream_order);
  }
  // The handle's matrices and info, allocated while the notify runs (its kernel fills them).
  using moelink::DType;
  const int device = in.x.device;
  const int64_t num_ranks = self.topology().num_ranks, num_channels = config.num_sms / 2;
  // The notify checked these inputs' dtypes and devices: outputs of the same dtype are made from them.
  const nb::handle like_int32 = template_for(num_tokens_per_rank, in.num_tokens_per_rank, DType::kInt32, device);
  const nb::handle like_int64 = template_for(topk_idx, in.topk_idx, DType::kInt64, device);
  const nb::handle like_float32 = template_for(topk_weights, in.topk_weights, DType::kFloat32, device);
  moelink::DispatchHandle handle;
  Outputs outs;
  // The handle's four live as long as it does: one allocation (Outputs::add_packed).
  const std::vector<int> matrices = outs.add_packed(
      device, {{{num_ranks, num_ranks}, DType::kInt32, &handle.rank_prefix_matrix, {}, like_int32},
               {{num_ranks, num_channels}, DType::kInt32, &handle.channel_prefix_matrix, {}, like_int32},
               {{num_ranks, num_channels}, DType::kInt32, &handle.recv_channel_prefix_matrix, {}, like_int32},
               {{2}, DType::kInt64, &handle.info, {}, like_int64}});
  const int rank_prefix_matrix = matrices[0], channel_prefix_matrix = matrices[1],
            recv_channel_prefix_matrix = matrices[2], info = matrices[3];
  handle.is_token_in_rank = in.is_token_in_rank;
  moelink::DispatchPlan plan;
  {
    nb::gil_scoped_release release;  // blocks the host until the peers' counts arrive
    plan = self.intranode_notify_wait();
  }
  const int64_t n = plan.num_recv_tokens;
  moelink::DispatchOutputs out;
  // Between the wait and the launch every allocation is on the critical path: recv_x gets its own
  // (its life ends when the experts are done with it), the small ones share one (add_packed).
  const int recv_x = add_recv_x_only(outs, x, in, n, device, &out);
  std::vector<Outputs::Part> small;
  if (in.x_scales.defined()) small.push_back(recv_scales_part(x_scales, in, n, device, &out));
  if (in.topk_idx.defined()) {
    moelink::check::dim(in.topk_idx, 2, "topk_idx");
    const int64_t k = in.topk_idx.size(1);
    small.push_back({{n, k}, DType::kInt64, &out.recv_topk_idx, {}, like_int64});
    if (in.topk_weights.defined()) small.push_back({{n, k}, DType::kFloat32, &out.recv_topk_weights, {}, like_float32});
  }
  small.push_back({{n}, DType::kInt32, &handle.recv_src_idx, {}, like_int32});
  const std::vector<int> slots = outs.add_packed(device, std::move(small));
  size_t next = 0;
  const int recv_x_scales = in.x_scales.defined() ? slots[next++] : Outputs::kNone;
  const int recv_topk_idx = in.topk_idx.defined() ? slots[next++] : Outputs::kNone;
  const int recv_topk_weights = in.topk_idx.defined() && in.topk_weights.defined() ? slots[next++] : Outputs::kNone;
  const int recv_src_idx = slots[next];
  moelink::EventHandle event;
  {
    nb::gil_scoped_release release;
    event = self.intranode_dispatch(in, handle, out, config, stream_order, false);
  }
  outs.finish();
  nb::object per_expert = nb::cast(plan.num_recv_tokens_per_expert);
  if (!express)
    return nb::make_tuple(event, per_expert, outs.get(recv_x), outs.get(recv_x_scales), outs.get(recv_topk_idx),
                          outs.get(recv_topk_weights), outs.get(rank_prefix_matrix), outs.get(channel_prefix_matrix),
                          outs.get(recv_channel_prefix_matrix), outs.get(recv_src_idx), outs.get(info),
                          nb::cast(handle));
  return nb::make_tuple(event, per_expert, outs.get(recv_x), outs.get(recv_x_scales), outs.get(recv_topk_idx),
                        outs.get(recv_topk_weights), outs.get(rank_prefix_matrix), outs.get(channel_prefix_matrix),
                        outs.get(recv_channel_prefix_matrix), outs.get(recv_src_idx), outs.get(info),
                        nb::cast(handle), in.x.size(1), local_errors(self));
}

void bind_config(nb::module_& m) {
  nb::class_<moelink::Config>(m, "Config")
      // deep_ep V1's defaults, so that Config(**fields) with any subset of the fields works.
      .def(nb::init<int, int, int, int, int>(), "num_sms"_a = 20, "num_max_nvl_chunked_send_tokens"_a = 6,
           "num_max_nvl_chunked_recv_tokens"_a = 256, "num_max_rdma_chunked_send_tokens"_a = 6,
           "num_max_rdma_chunked_recv_tokens"_a = 256)
      // Read-only: a Config is validated once, at construction.
      .def_ro("num_sms", &moelink::Config::num_sms)
      .def_ro("num_max_nvl_chunked_send_tokens", &moelink::Config::num_max_nvl_chunked_send_tokens)
      .def_ro("num_max_nvl_chunked_recv_tokens", &moelink::Config::num_max_nvl_chunked_recv_tokens)
      .def_ro("num_max_rdma_chunked_send_tokens", &moelink::Config::num_max_rdma_chunked_send_tokens)
      .def_ro("num_max_rdma_chunked_recv_tokens", &moelink::Config::num_max_rdma_chunked_recv_tokens)
      .def("get_nvl_buffer_size_hint", &moelink::Config::get_nvl_buffer_size_hint, "hidden_bytes"_a,
           "num_ranks"_a)
      .def("get_rdma_buffer_size_hint", &moelink::Config::get_rdma_buffer_size_hint, "hidden_bytes"_a,
           "num_ranks"_a)
      .def("__repr__", &config_repr);

  m.def("default_dispatch_config", &moelink::default_dispatch_config, "num_ranks"_a, "num_sms"_a);
  m.def("default_combine_config", &moelink::default_combine_config, "num_ranks"_a, "num_sms"_a);
}

void bind_event(nb::module_& m) {
  nb::class_<moelink::EventHandle>(m, "EventHandle")
      .def(nb::init<>())
      .def(
          "__init__",
          [](moelink::EventHandle* self, uintptr_t stream) {
            new (self) moelink::EventHandle(reinterpret_cast<cudaStream_t>(stream));
          },
          "stream"_a, "Records a new event on the CUDA stream whose handle is `stream`.")
      .def_prop_ro("valid", &moelink::EventHandle::valid)
      .def(
          "stream_wait",
          [](const moelink::EventHandle& self, uintptr_t stream) {
            self.stream_wait(reinterpret_cast<cudaStream_t>(stream));
          },
          "stream"_a)
      .def("synchronize", &moelink::EventHandle::synchronize, nb::call_guard<nb::gil_scoped_release>())
      .def("query", &moelink::EventHandle::query);
}

void bind_topology(nb::module_& m) {
  // A dispatch handle's tensors as the extension read them when the uncached dispatch made them:
  // a cached dispatch or a combine of that handle passes it back (handle._refs) instead of having
  // six tensors read again through the C API (30 Python calls of the host path its kernel waits
  // for, more than half of a call's tensor reads). Opaque to Python.
  nb::class_<moelink::DispatchHandle>(m, "HandleRefs");
  nb::class_<moelink::Topology>(m, "Topology")
      .def_static("make", &moelink::Topology::make, "rank"_a, "num_ranks"_a, "num_nvl_ranks"_a = 0)
      .def_ro("rank", &moelink::Topology::rank)
      .def_ro("num_ranks", &moelink::Topology::num_ranks)
      .def_ro("num_nvl_ranks", &moelink::Topology::num_nvl_ranks)
      .def_ro("num_rdma_ranks", &moelink::Topology::num_rdma_ranks)
      .def_ro("nvl_rank", &moelink::Topology::nvl_rank)
      .def_ro("rdma_rank", &moelink::Topology::rdma_rank)
      .def("is_intranode", &moelink::Topology::is_intranode)
      .def("root_rdma_rank_global", &moelink::Topology::root_rdma_rank_global)
      .def("__repr__", &topology_repr);
}

void bind_buffer(nb::module_& m) {
  using moelink::Buffer;
  using Release = nb::call_guard<nb::gil_scoped_release>;

  nb::class_<Buffer>(m, "Buffer")
      .def(
          "__init__",
          [](Buffer* self, int rank, int num_ranks, int64_t num_nvl_bytes, int64_t num_rdma_bytes,
             bool low_latency_mode, bool explicitly_destroy, int num_nvl_ranks, int num_qps_per_rank,
             double timeout_s, int device, int64_t num_arena_bytes, bool enable_shrink) {
            moelink::BufferOptions options;
            options.rank = rank;
            options.num_ranks = num_ranks;
            options.num_nvl_bytes = num_nvl_bytes;
            options.num_rdma_bytes = num_rdma_bytes;
            options.low_latency_mode = low_latency_mode;
            options.explicitly_destroy = explicitly_destroy;
            options.num_nvl_ranks = num_nvl_ranks;
            options.num_qps_per_rank = num_qps_per_rank;
            options.timeout_s = timeout_s;
            options.device = device;
            options.num_arena_bytes = num_arena_bytes;
            options.enable_shrink = enable_shrink;
            new (self) Buffer(options);
          },
          "rank"_a, "num_ranks"_a, "num_nvl_bytes"_a, "num_rdma_bytes"_a, "low_latency_mode"_a = false,
          "explicitly_destroy"_a = false, "num_nvl_ranks"_a = 0, "num_qps_per_rank"_a = 24,
          "timeout_s"_a = -1.0, "device"_a = -1, "num_arena_bytes"_a = 0, "enable_shrink"_a = false)

      // ---- topology and resources ----
      .def_prop_ro("topology", [](const Buffer& self) { return self.topology(); })
      .def_prop_ro("device_id", &Buffer::device_id)
      .def_prop_ro("num_nvl_bytes", &Buffer::num_nvl_bytes)
      .def_prop_ro("num_rdma_bytes", &Buffer::num_rdma_bytes)
      .def_prop_ro("low_latency_mode", &Buffer::low_latency_mode)
      .def_prop_ro("explicitly_destroy", &Buffer::explicitly_destroy)
      .def_prop_ro("timeout_s", &Buffer::timeout_s)
      .def("comm_stream", [](const Buffer& self) { return reinterpret_cast<uintptr_t>(self.comm_stream()); })
      .def("local_nvl_buffer",
           [](const Buffer& self) { return reinterpret_cast<uintptr_t>(self.local_nvl_buffer()); })
      .def("local_rdma_buffer",
           [](const Buffer& self) { return reinterpret_cast<uintptr_t>(self.local_rdma_buffer()); })
      .def("local_buffer_dlpack", &local_buffer_dlpack, "use_rdma_buffer"_a = false)
      .def_prop_ro("num_arena_bytes", &Buffer::num_arena_bytes)
      .def("arena_bytes_in_use", &Buffer::arena_bytes_in_use)
      .def("arena_largest_free", &Buffer::arena_largest_free)
      .def("arena_dlpack", &arena_dlpack, "bytes"_a, "stream"_a = 0)
      .def(
          "arena_record_stream",
          [](Buffer& self, uintptr_t data, uintptr_t stream) {
            self.arena_record_stream(reinterpret_cast<const void*>(data), reinterpret_cast<cudaStream_t>(stream));
          },
          "data"_a, "stream"_a)
      .def("max_num_sms", &Buffer::max_num_sms, "ranks_per_gpu"_a = 0)
      .def_prop_ro("uses_nvshmem", &Buffer::uses_nvshmem)
      .def_prop_ro("low_latency_puts", &Buffer::low_latency_puts)
      .def_prop_ro("last_dispatch_direct", &Buffer::last_dispatch_direct)
      .def_prop_ro("last_combine_pulled", &Buffer::last_combine_pulled)
      .def_prop_ro("peer_segments_mapped", &Buffer::peer_segments_mapped)
      .def_prop_ro("peer_segments_closed", &Buffer::peer_segments_closed)
      .def("abstain", &Buffer::abstain, "waits_on_host"_a = false)

      // ---- bootstrap ----
      .def("local_ipc_handle", [](const Buffer& self) { return to_bytes(self.local_ipc_handle()); })
      .def("local_nvshmem_unique_id",
           [](const Buffer& self) { return to_bytes(self.local_nvshmem_unique_id()); })
      .def(
          "sync",
          [](Buffer& self, const std::vector<int>& device_ids, nb::handle ipc_handles, nb::handle root_unique_id) {
            std::vector<std::vector<uint8_t>> handles;
            if (!nb::isinstance<nb::list>(ipc_handles) && !nb::isinstance<nb::tuple>(ipc_handles)) {
              moelink::bindings::raise_type("ipc_handles", "a list of bytes");
            }
            for (nb::handle h : ipc_handles) handles.push_back(to_byte_vector(h, "ipc_handles"));
            std::vector<uint8_t> root;
            if (!root_unique_id.is_none()) root = to_byte_vector(root_unique_id, "root_unique_id");
            nb::gil_scoped_release release;  // sync waits for the peers
            self.sync(device_ids, handles, root);
          },
          "device_ids"_a, "ipc_handles"_a, "root_unique_id"_a.none())
      .def("is_available", &Buffer::is_available)

      // ---- deep_ep's runtime names (code reads them from Buffer.runtime) ----
      .def("get_num_rdma_ranks", [](const Buffer& self) { return self.topology().num_rdma_ranks; })
      .def("get_rdma_rank", [](const Buffer& self) { return self.topology().rdma_rank; })
      .def(
          "get_root_rdma_rank",
          [](const Buffer& self, bool global) { return global ? self.topology().root_rdma_rank_global() : 0; },
          "global"_a)
      .def("get_local_device_id", &Buffer::device_id)
      .def("get_num_max_nvl_peers", [](const Buffer&) { return moelink::kMaxNvlRanks; })
      .def("get_local_ipc_handle", [](const Buffer& self) { return to_bytes(self.local_ipc_handle()); })
      .def("get_local_nvshmem_unique_id",
           [](const Buffer& self) { return to_bytes(self.local_nvshmem_unique_id()); })
      .def("is_internode_available",
           [](const Buffer& self) { return self.is_available() && !self.topology().is_intranode(); })
      .def("destroy", &Buffer::destroy, Release())
      .def(
          "barrier", [](Buffer& self, const std::string& step) { self.barrier(step.c_str()); }, "step"_a,
          Release())
      .def("check_device_errors", &Buffer::check_device_errors)
      .def("check_faults", &Buffer::check_faults)
      // It drains the comm stream first (up to timeout + 2 s) when a record is pending.
      .def("raise_pending_errors", &Buffer::raise_pending_errors, Release())
      .def("defer_data_errors", &Buffer::defer_data_errors, "defer"_a)
      .def(
          "serve_as_internode_lane",
          [](Buffer& self, nb::handle root_unique_id, int world_pe, int world_size, const std::vector<int>& lane_pes) {
            std::vector<uint8_t> root;
            if (!root_unique_id.is_none()) root = to_byte_vector(root_unique_id, "root_unique_id");
            nb::gil_scoped_release release;  // an NVSHMEM lane joins with its peers
            self.serve_as_internode_lane(root, world_pe, world_size, lane_pes);
          },
          "root_unique_id"_a.none() = nb::none(), "world_pe"_a = -1, "world_size"_a = 0,
          "lane_pes"_a = std::vector<int>{})
      .def(
          "prepare_nvshmem_lane",
          [](const Buffer& self, bool world_root) { return to_bytes(self.prepare_nvshmem_lane(world_root)); },
          "world_root"_a)
      .def_prop_ro("lane_window", &Buffer::lane_window)
      .def("take_local_errors", &Buffer::take_local_errors)
      .def("debug_halt_next_sends", &Buffer::debug_halt_next_sends)

      // ---- operations ----
      .def(
          "get_dispatch_layout",
          [](Buffer& self, nb::handle topk_idx, int num_experts, nb::handle num_tokens_per_rank,
             nb::handle num_tokens_per_rdma_rank, nb::handle num_tokens_per_expert, nb::handle is_token_in_rank,
             nb::handle order) {
            const moelink::TensorRef topk = to_tensor_ref(topk_idx, "topk_idx");
            moelink::LayoutOutputs out;
            out.num_tokens_per_rank = to_tensor_ref(num_tokens_per_rank, "num_tokens_per_rank");
            out.num_tokens_per_rdma_rank = to_tensor_ref(num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank");
            out.num_tokens_per_expert = to_tensor_ref(num_tokens_per_expert, "num_tokens_per_expert");
            out.is_token_in_rank = to_tensor_ref(is_token_in_rank, "is_token_in_rank");
            const moelink::StreamOrder stream_order = to_stream_order(order);
            nb::gil_scoped_release release;
            return self.get_dispatch_layout(topk, num_experts, out, stream_order);
          },
          "topk_idx"_a.none(), "num_experts"_a, "num_tokens_per_rank"_a.none(),
          "num_tokens_per_rdma_rank"_a.none(), "num_tokens_per_expert"_a.none(), "is_token_in_rank"_a.none(),
          "order"_a)
      .def(
          "get_dispatch_layout_alloc",
          [](Buffer& self, nb::handle topk_idx, int num_experts, int num_rdma_ranks, nb::handle order) {
            // get_dispatch_layout with its outputs allocated here (torch.empty on the current stream):
            // in a training step the layout's host time is in front of every uncached dispatch.
            const moelink::TensorRef topk = to_tensor_ref(topk_idx, "topk_idx");
            const moelink::StreamOrder stream_order = to_stream_order(order);
            const int device = self.device_id();
            const int64_t num_ranks = self.topology().num_ranks;
            const int64_t num_tokens = topk.dim() >= 1 ? topk.size(0) : 0;
            using moelink::DType;
            moelink::LayoutOutputs out;
            Outputs outs;
            const int per_rank = outs.add({num_ranks}, DType::kInt32, device, &out.num_tokens_per_rank);
            const int per_rdma_rank = num_rdma_ranks > 1 ? outs.add({num_rdma_ranks}, DType::kInt32, device,
                                                                    &out.num_tokens_per_rdma_rank)
                                                         : Outputs::kNone;
            const int per_expert =
                outs.add({std::max(num_experts, 0)}, DType::kInt32, device, &out.num_tokens_per_expert);
            const int in_rank = outs.add({num_tokens, num_ranks}, DType::kBool, device, &out.is_token_in_rank);
            moelink::EventHandle event;
            {
              nb::gil_scoped_release release;
              event = self.get_dispatch_layout(topk, num_experts, out, stream_order);
            }
            outs.finish();
            return nb::make_tuple(outs.get(per_rank), outs.get(per_rdma_rank), outs.get(per_expert), outs.get(in_rank),
                                  event);
          },
          "topk_idx"_a.none(), "num_experts"_a, "num_rdma_ranks"_a, "order"_a)
      .def(
          "intranode_notify_launch",
          [](Buffer& self, nb::handle x, nb::handle x_scales, nb::handle topk_idx, nb::handle topk_weights,
             nb::handle is_token_in_rank, nb::handle num_tokens_per_rank, nb::handle num_tokens_per_expert,
             int num_experts, int expert_alignment, int num_worst_tokens, const moelink::Config& config,
             nb::handle order) {
            moelink::StreamOrder stream_order;
            const moelink::DispatchInputs in =
                notify_inputs(self, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_rank,
                              num_tokens_per_expert, num_experts, expert_alignment, num_worst_tokens, order,
                              &stream_order);
            nb::gil_scoped_release release;
            self.intranode_notify_launch(in, config, stream_order);
          },
          "x"_a.none(), "x_scales"_a.none(), "topk_idx"_a.none(), "topk_weights"_a.none(),
          "is_token_in_rank"_a.none(), "num_tokens_per_rank"_a.none(), "num_tokens_per_expert"_a.none(),
          "num_experts"_a, "expert_alignment"_a, "num_worst_tokens"_a, "config"_a, "order"_a)
      .def("intranode_notify_wait",
           [](Buffer& self) {
             moelink::DispatchPlan plan;
             {
               nb::gil_scoped_release release;  // blocks the host until the peers' counts arrive
               plan = self.intranode_notify_wait();
             }
             return std::make_pair(plan.num_recv_tokens, std::move(plan.num_recv_tokens_per_expert));
           })
      .def(
          "intranode_dispatch",
          [](Buffer& self, nb::handle x, nb::handle x_scales, nb::handle topk_idx, nb::handle topk_weights,
             nb::handle is_token_in_rank, int num_experts, int expert_alignment, int num_worst_tokens,
             nb::handle rank_prefix_matrix, nb::handle channel_prefix_matrix, nb::handle recv_channel_prefix_matrix,
             nb::handle recv_src_idx, nb::handle handle_info, nb::handle recv_x, nb::handle recv_x_scales,
             nb::handle recv_topk_idx, nb::handle recv_topk_weights, const moelink::Config& config, nb::handle order,
             bool cached, const moelink::DispatchHandle* handle_refs) {
            moelink::DispatchInputs in;
            moelink::DispatchHandle handle;
            moelink::DispatchOutputs out;
            moelink::StreamOrder stream_order;
            const auto read = [&] {
              in.x = to_tensor_ref(x, "x");
              in.x_scales = to_tensor_ref(x_scales, "x_scales");
              in.topk_idx = to_tensor_ref(topk_idx, "topk_idx");
              in.topk_weights = to_tensor_ref(topk_weights, "topk_weights");
              if (handle_refs != nullptr) {
                handle = *handle_refs;
                handle.hidden = 0;
              } else {
                handle = dispatch_handle(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix,
                                         recv_src_idx, is_token_in_rank, handle_info, 0);
              }
              in.is_token_in_rank = handle.is_token_in_rank;
              out.recv_x = to_tensor_ref(recv_x, "recv_x");
              out.recv_x_scales = to_tensor_ref(recv_x_scales, "recv_x_scales");
              out.recv_topk_idx = to_tensor_ref(recv_topk_idx, "recv_topk_idx");
              out.recv_topk_weights = to_tensor_ref(recv_topk_weights, "recv_topk_weights");
              stream_order = to_stream_order(order);
            };
            // An uncached dispatch was opened by its notify, which read the same inputs.
            if (cached)
              read_or_abstain(self, read);
            else
              read();
            in.num_experts = num_experts;
            in.expert_alignment = expert_alignment;
            in.num_worst_tokens = num_worst_tokens;
            nb::gil_scoped_release release;
            return self.intranode_dispatch(in, handle, out, config, stream_order, cached);
          },
          "x"_a.none(), "x_scales"_a.none(), "topk_idx"_a.none(), "topk_weights"_a.none(),
          "is_token_in_rank"_a.none(), "num_experts"_a, "expert_alignment"_a, "num_worst_tokens"_a,
          "rank_prefix_matrix"_a.none(), "channel_prefix_matrix"_a.none(), "recv_channel_prefix_matrix"_a.none(),
          "recv_src_idx"_a.none(), "handle_info"_a.none(), "recv_x"_a.none(), "recv_x_scales"_a.none(),
          "recv_topk_idx"_a.none(), "recv_topk_weights"_a.none(), "config"_a, "order"_a, "cached"_a,
          "handle_refs"_a.none() = nb::none())
      .def(
          "intranode_dispatch_uncached",
          [](Buffer& self, nb::handle x, nb::handle x_scales, nb::handle topk_idx, nb::handle topk_weights,
             nb::handle is_token_in_rank, nb::handle num_tokens_per_rank, nb::handle num_tokens_per_expert,
             int num_experts, int expert_alignment, int num_worst_tokens, const moelink::Config& config,
             nb::handle order) {
            moelink::StreamOrder stream_order;
            const moelink::DispatchInputs in =
                notify_inputs(self, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_rank,
                              num_tokens_per_expert, num_experts, expert_alignment, num_worst_tokens, order,
                              &stream_order);
            return dispatch_uncached(self, in, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, config,
                                     stream_order, false);
          },
          "x"_a.none(), "x_scales"_a.none(), "topk_idx"_a.none(), "topk_weights"_a.none(),
          "is_token_in_rank"_a.none(), "num_tokens_per_rank"_a.none(), "num_tokens_per_expert"_a.none(),
          "num_experts"_a, "expert_alignment"_a, "num_worst_tokens"_a, "config"_a, "order"_a)
      // The express calls: dispatch and combine as a framework calls them by default (no config,
      // previous_event, async_finish, comm-stream allocation or arena), each one extension call
      // from the Python layer's first lines, with the tensors' types and ranks checked here and the
      // handle's tensors passed as the uncached dispatch read them (HandleRefs). From the call to
      // the kernel's launch is host time every rank's kernel waits for, cold after a barrier: each
      // Python frame and tensor read it skips is time off every timed call. None, before any side
      // effect, where an argument needs the Python layer's checks (which then raise for it).
      .def(
          "intranode_dispatch_uncached_express",
          [](Buffer& self, nb::handle x, nb::handle topk_idx, nb::handle topk_weights, nb::handle is_token_in_rank,
             nb::handle num_tokens_per_rank, nb::handle num_tokens_per_expert, int expert_alignment,
             int num_worst_tokens, const moelink::Config& config, uintptr_t compute_stream) -> nb::object {
            nb::handle data, scales;
            if (!split_x(x, &data, &scales) || !is_tensor(is_token_in_rank) || !is_tensor(num_tokens_per_rank) ||
                !is_tensor(num_tokens_per_expert) || !tensor_or_none(topk_idx) || !tensor_or_none(topk_weights) ||
                (topk_idx.is_none() && !topk_weights.is_none()))
              return nb::none();
            self.check_faults();  // first, as the Python layer does
            moelink::StreamOrder stream_order = default_order(compute_stream);
            moelink::DispatchInputs in =
                notify_inputs(self, data, scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_rank,
                              num_tokens_per_expert, 0, expert_alignment, num_worst_tokens, nb::handle(),
                              &stream_order);
            if (in.x.dim() != 2 || (in.x_scales.defined() && in.x_scales.dim() != 2) ||
                (in.topk_idx.defined() && in.topk_idx.dim() != 2))
              return nb::none();
            in.num_experts = static_cast<int>(in.num_tokens_per_expert.numel());
            return dispatch_uncached(self, in, data, scales, topk_idx, topk_weights, num_tokens_per_rank, config,
                                     stream_order, true);
          },
          "x"_a.none(), "topk_idx"_a.none(), "topk_weights"_a.none(), "is_token_in_rank"_a.none(),
          "num_tokens_per_rank"_a.none(), "num_tokens_per_expert"_a.none(), "expert_alignment"_a,
          "num_worst_tokens"_a, "config"_a, "compute_stream"_a)
      .def(
          "intranode_dispatch_express",
          [](Buffer& self, nb::handle x, const moelink::DispatchHandle& refs, const moelink::Config& config,
             uintptr_t compute_stream) -> nb::object {
            // The cached dispatch: recv_x and its scales allocated here, as the uncached one does.
            nb::handle data, scales;
            if (!split_x(x, &data, &scales) || refs.channel_prefix_matrix.size(1) != config.num_channels())
              return nb::none();
            self.check_faults();
            moelink::DispatchInputs in;
            moelink::DispatchOutputs out;
            Outputs outs;
            int recv_x = Outputs::kNone, recv_x_scales = Outputs::kNone;
            bool checked = true;
            // The kernel opens the operation: a rank that raises before its launch abstains.
            read_or_abstain(self, [&] {
              checked = read_2d(data, "x", scales, "x_scales", &in.x, &in.x_scales);
              if (!checked) return;
              in.is_token_in_rank = refs.is_token_in_rank;
              std::tie(recv_x, recv_x_scales) =
                  add_recv_x(outs, data, scales, in, refs.recv_src_idx.size(0), self.device_id(), &out);
            });
            if (!checked) return nb::none();
            in.expert_alignment = 1;
            moelink::DispatchHandle handle = refs;
            handle.hidden = 0;
            moelink::EventHandle event;
            {
              nb::gil_scoped_release release;
              event = self.intranode_dispatch(in, handle, out, config, default_order(compute_stream), true);
            }
            outs.finish();
            return nb::make_tuple(event, outs.get(recv_x), outs.get(recv_x_scales), local_errors(self));
          },
          "x"_a.none(), "refs"_a, "config"_a, "compute_stream"_a)
      .def(
          "intranode_combine_express",
          [](Buffer& self, nb::handle x, nb::handle topk_weights, const moelink::DispatchHandle& refs, int64_t hidden,
             const moelink::Config& config, uintptr_t compute_stream) -> nb::object {
            if (!is_tensor(x) || !tensor_or_none(topk_weights) ||
                refs.channel_prefix_matrix.size(1) != config.num_channels())
              return nb::none();
            self.check_faults();
            moelink::CombineInputs in;
            moelink::CombineOutputs out;
            Outputs outs;
            int combined_x = Outputs::kNone, combined_topk_weights = Outputs::kNone;
            bool checked = true;
            read_or_abstain(self, [&] {
              checked = read_2d(x, "x", topk_weights, "topk_weights", &in.x, &in.topk_weights);
              if (!checked) return;
              // As combine (python/moelink/_intranode.py) allocates them, on the caller's stream.
              const int64_t num_tokens = refs.is_token_in_rank.size(0);
              const int device = self.device_id();
              combined_x = outs.add({num_tokens, in.x.size(1)}, in.x.dtype, device, &out.combined_x, {},
                                    template_for(x, in.x, in.x.dtype, device));
              if (in.topk_weights.defined())
                combined_topk_weights =
                    outs.add({num_tokens, in.topk_weights.size(1)}, moelink::DType::kFloat32, device,
                             &out.combined_topk_weights, {},
                             template_for(topk_weights, in.topk_weights, moelink::DType::kFloat32, device));
            });
            if (!checked) return nb::none();
            moelink::DispatchHandle handle = refs;
            handle.hidden = hidden;
            moelink::EventHandle event;
            {
              nb::gil_scoped_release release;
              event = self.intranode_combine(in, handle, out, config, default_order(compute_stream));
            }
            outs.finish();
            return nb::make_tuple(event, outs.get(combined_x), outs.get(combined_topk_weights), local_errors(self));
          },
          "x"_a.none(), "topk_weights"_a.none(), "refs"_a, "hidden"_a, "config"_a, "compute_stream"_a)
      .def(
          "intranode_combine",
          [](Buffer& self, nb::handle x, nb::handle topk_weights, nb::handle bias_0, nb::handle bias_1,
             nb::handle rank_prefix_matrix, nb::handle channel_prefix_matrix, nb::handle recv_channel_prefix_matrix,
             nb::handle recv_src_idx, nb::handle is_token_in_rank, nb::handle handle_info, int64_t hidden,
             nb::handle combined_x, nb::handle combined_topk_weights, const moelink::Config& config,
             nb::handle order, const moelink::DispatchHandle* handle_refs) {
            moelink::CombineInputs in;
            moelink::DispatchHandle handle;
            moelink::CombineOutputs out;
            moelink::StreamOrder stream_order;
            read_or_abstain(self, [&] {
              in.x = to_tensor_ref(x, "x");
              in.topk_weights = to_tensor_ref(topk_weights, "topk_weights");
              in.bias_0 = to_tensor_ref(bias_0, "bias_0");
              in.bias_1 = to_tensor_ref(bias_1, "bias_1");
              if (handle_refs != nullptr) {
                handle = *handle_refs;
                handle.hidden = hidden;
              } else {
                handle = dispatch_handle(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix,
                                         recv_src_idx, is_token_in_rank, handle_info, hidden);
              }
              out.combined_x = to_tensor_ref(combined_x, "combined_x");
              out.combined_topk_weights = to_tensor_ref(combined_topk_weights, "combined_topk_weights");
              stream_order = to_stream_order(order);
            });
            nb::gil_scoped_release release;
            return self.intranode_combine(in, handle, out, config, stream_order);
          },
          "x"_a.none(), "topk_weights"_a.none(), "bias_0"_a.none(), "bias_1"_a.none(),
          "rank_prefix_matrix"_a.none(), "channel_prefix_matrix"_a.none(), "recv_channel_prefix_matrix"_a.none(),
          "recv_src_idx"_a.none(), "is_token_in_rank"_a.none(), "handle_info"_a.none(), "hidden"_a = 0,
          "combined_x"_a.none(), "combined_topk_weights"_a.none(), "config"_a, "order"_a,
          "handle_refs"_a.none() = nb::none())

      // ---- low-latency mode ----
      .def_static("low_latency_rdma_size_hint", &Buffer::low_latency_rdma_size_hint,
                  "num_max_dispatch_tokens_per_rank"_a, "hidden"_a, "num_ranks"_a, "num_experts"_a)
      .def(
          "low_latency_dispatch",
          [](Buffer& self, nb::handle x, nb::handle topk_idx, int num_max_dispatch_tokens_per_rank, int num_experts,
             nb::handle cumulative_stats, nb::handle wait_stats, bool use_fp8, bool round_scale, bool use_ue8m0,
             nb::handle recv_x, nb::handle recv_x_scales, nb::handle recv_count, nb::handle src_info,
             nb::handle layout_range, nb::handle state, int phase, nb::handle order) {
            const moelink::LowLatencyDispatchInputs in =
                ll_dispatch_inputs(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, cumulative_stats,
                                   wait_stats, use_fp8, round_scale, use_ue8m0);
            moelink::LowLatencyDispatchOutputs out;
            out.recv_x = to_tensor_ref(recv_x, "recv_x");
            out.recv_x_scales = to_tensor_ref(recv_x_scales, "recv_x_scales");
            out.recv_count = to_tensor_ref(recv_count, "recv_count");
            out.src_info = to_tensor_ref(src_info, "src_info");
            out.layout_range = to_tensor_ref(layout_range, "layout_range");
            out.state = to_tensor_ref(state, "state");
            const moelink::StreamOrder stream_order = to_stream_order(order);
            nb::gil_scoped_release release;
            return self.low_latency_dispatch(in, out, to_phase(phase), stream_order);
          },
          "x"_a.none(), "topk_idx"_a.none(), "num_max_dispatch_tokens_per_rank"_a, "num_experts"_a,
          "cumulative_local_expert_recv_stats"_a.none(), "dispatch_wait_recv_cost_stats"_a.none(), "use_fp8"_a,
          "round_scale"_a, "use_ue8m0"_a, "recv_x"_a.none(), "recv_x_scales"_a.none(), "recv_count"_a.none(),
          "src_info"_a.none(), "layout_range"_a.none(), "state"_a.none(), "phase"_a, "order"_a)
      // The express calls of low-latency mode (as the normal-mode ones above): the outputs made
      // here, in the call that launches, so the Python layer neither allocates nor passes them;
      // None, with nothing done, where an argument needs the Python layer's checks. In a decode
      // step not replayed from a graph this host path is the call's latency (a hook's send call
      // is nothing else).
      .def(
          "low_latency_dispatch_express",
          [](Buffer& self, nb::handle x, nb::handle topk_idx, int num_max_dispatch_tokens_per_rank, int num_experts,
             nb::handle cumulative_stats, nb::handle wait_stats, bool use_fp8, bool round_scale, bool use_ue8m0,
             int phase, uintptr_t compute_stream, bool async_finish) -> nb::object {
            const int64_t R = self.topology().num_ranks;
            if (!is_tensor(x) || !is_tensor(topk_idx) || !tensor_or_none(cumulative_stats) ||
                !tensor_or_none(wait_stats) || num_experts % R != 0)
              return nb::none();
            const moelink::LowLatencyDispatchInputs in =
                ll_dispatch_inputs(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, cumulative_stats,
                                   wait_stats, use_fp8, round_scale, use_ue8m0);
            if (in.x.dim() != 2) return nb::none();
            // As python/moelink/_low_latency.py's dispatch makes them.
            using moelink::DType;
            const int device = self.device_id();
            const int64_t E = num_experts / R, rows = R * num_max_dispatch_tokens_per_rank, H = in.x.size(1);
            moelink::LowLatencyDispatchOutputs out;
            Outputs outs;
            const nb::handle like_int64 = template_for(topk_idx, in.topk_idx, DType::kInt64, device);
            const int recv_x = outs.add({E, rows, H}, use_fp8 ? DType::kFloat8E4M3 : DType::kBFloat16, device,
                                        &out.recv_x, {},
                                        use_fp8 ? nb::handle() : template_for(x, in.x, DType::kBFloat16, device));
            // The rest share one allocation (Outputs::add_packed): the handle's three and the counts
            // live as long as each other, the scales about as long as recv_x.
            std::vector<Outputs::Part> small;
            if (use_fp8) {
              // Column-major in the last two dims: the strides of empty((E, columns, rows)).transpose(1, 2).
              const int64_t columns = H / 128 / (use_ue8m0 ? 4 : 1);
              small.push_back({{E, rows, columns}, use_ue8m0 ? DType::kInt32 : DType::kFloat32, &out.recv_x_scales,
                               {rows * std::max<int64_t>(columns, 1), 1, rows}});
            }
            small.push_back({{E}, DType::kInt32, &out.recv_count});
            small.push_back({{E, rows}, DType::kInt32, &out.src_info});
            small.push_back({{E, R}, DType::kInt64, &out.layout_range, {}, like_int64});
            small.push_back(ll_state_part(&out.state, like_int64));
            const std::vector<int> slots = outs.add_packed(device, std::move(small));
            const int recv_x_scales = use_fp8 ? slots[0] : Outputs::kNone;
            const int recv_count = slots[use_fp8 ? 1 : 0], src_info = slots[use_fp8 ? 2 : 1],
                      layout_range = slots[use_fp8 ? 3 : 2], state = slots[use_fp8 ? 4 : 3];
            moelink::EventHandle event;
            {
              nb::gil_scoped_release release;
              event = self.low_latency_dispatch(in, out, to_phase(phase), default_order(compute_stream, async_finish));
            }
            outs.finish();
            return nb::make_tuple(event, outs.get(recv_x), outs.get(recv_x_scales), outs.get(recv_count),
                                  outs.get(src_info), outs.get(layout_range), outs.get(state), local_errors(self));
          },
          "x"_a.none(), "topk_idx"_a.none(), "num_max_dispatch_tokens_per_rank"_a, "num_experts"_a,
          "cumulative_local_expert_recv_stats"_a.none(), "dispatch_wait_recv_cost_stats"_a.none(), "use_fp8"_a,
          "round_scale"_a, "use_ue8m0"_a, "phase"_a, "compute_stream"_a, "async_finish"_a)
      .def(
          "low_latency_combine_express",
          [](Buffer& self, nb::handle x, nb::handle topk_idx, nb::handle topk_weights, nb::handle src_info,
             nb::handle layout_range, int num_max_dispatch_tokens_per_rank, int hidden, int num_experts,
             nb::handle wait_stats, nb::handle combined_x, int phase, uintptr_t compute_stream, bool async_finish,
             nb::handle dispatch_state, bool use_logfmt) -> nb::object {
            if (!is_tensor(x) || !is_tensor(topk_idx) || !is_tensor(topk_weights) || !is_tensor(src_info) ||
                !is_tensor(layout_range) || !tensor_or_none(wait_stats) || !tensor_or_none(combined_x) ||
                !tensor_or_none(dispatch_state))
              return nb::none();
            const moelink::LowLatencyCombineInputs in =
                ll_combine_inputs(x, topk_idx, topk_weights, src_info, layout_range, num_max_dispatch_tokens_per_rank,
                                  num_experts, wait_stats, dispatch_state, use_logfmt);
            if (in.topk_idx.dim() != 2) return nb::none();
            const int device = self.device_id();
            moelink::LowLatencyCombineOutputs out;
            Outputs outs;
            int result = Outputs::kNone;
            if (combined_x.is_none())
              result = outs.add({in.topk_idx.size(0), hidden}, moelink::DType::kBFloat16, device, &out.combined_x, {},
                                template_for(x, in.x, moelink::DType::kBFloat16, device));
            else
              out.combined_x = to_tensor_ref(combined_x, "out");
            const nb::handle like_int64 = template_for(topk_idx, in.topk_idx, moelink::DType::kInt64, device);
            const int state = add_ll_state(outs, device, &out.state, like_int64);
            moelink::EventHandle event;
            {
              nb::gil_scoped_release release;
              event = self.low_latency_combine(in, out, to_phase(phase), default_order(compute_stream, async_finish));
            }
            outs.finish();
            return nb::make_tuple(event, result == Outputs::kNone ? nb::borrow(combined_x) : outs.get(result),
                                  outs.get(state), local_errors(self));
          },
          "x"_a.none(), "topk_idx"_a.none(), "topk_weights"_a.none(), "src_info"_a.none(), "layout_range"_a.none(),
          "num_max_dispatch_tokens_per_rank"_a, "hidden"_a, "num_experts"_a, "combine_wait_recv_cost_stats"_a.none(),
          "combined_x"_a.none(), "phase"_a, "compute_stream"_a, "async_finish"_a, "dispatch_state"_a.none(),
          "use_logfmt"_a)
      .def(
          "low_latency_combine",
          [](Buffer& self, nb::handle x, nb::handle topk_idx, nb::handle topk_weights, nb::handle src_info,
             nb::handle layout_range, int num_max_dispatch_tokens_per_rank, int num_experts, nb::handle wait_stats,
             nb::handle combined_x, nb::handle state, int phase, nb::handle order, nb::handle dispatch_state,
             bool use_logfmt) {
            const moelink::LowLatencyCombineInputs in =
                ll_combine_inputs(x, topk_idx, topk_weights, src_info, layout_range, num_max_dispatch_tokens_per_rank,
                                  num_experts, wait_stats, dispatch_state, use_logfmt);
            moelink::LowLatencyCombineOutputs out;
            out.combined_x = to_tensor_ref(combined_x, "out");
            out.state = to_tensor_ref(state, "state");
            const moelink::StreamOrder stream_order = to_stream_order(order);
            nb::gil_scoped_release release;
            return self.low_latency_combine(in, out, to_phase(phase), stream_order);
          },
          "x"_a.none(), "topk_idx"_a.none(), "topk_weights"_a.none(), "src_info"_a.none(), "layout_range"_a.none(),
          "num_max_dispatch_tokens_per_rank"_a, "num_experts"_a, "combine_wait_recv_cost_stats"_a.none(),
          "combined_x"_a.none(), "state"_a.none(), "phase"_a, "order"_a, "dispatch_state"_a.none() = nb::none(),
          "use_logfmt"_a = false)
      .def("clean_low_latency_buffer", &Buffer::clean_low_latency_buffer, "num_max_dispatch_tokens_per_rank"_a,
           "hidden"_a, "num_experts"_a, Release())
      .def(
          "low_latency_update_mask",
          [](Buffer& self, int rank, bool mask, nb::handle order) {
            return self.low_latency_update_mask(rank, mask, to_stream_order(order));
          },
          "rank"_a, "mask"_a, "order"_a)
      .def(
          "low_latency_query_mask",
          [](Buffer& self, nb::handle mask_status, nb::handle order) {
            return self.low_latency_query_mask(to_tensor_ref(mask_status, "mask_status"), to_stream_order(order));
          },
          "mask_status"_a.none(), "order"_a)
      .def(
          "low_latency_clean_mask", [](Buffer& self, nb::handle order) { return self.low_latency_clean_mask(to_stream_order(order)); },
          "order"_a)
      .def(
          "low_latency_combine_buffer",
          [](const Buffer& self, int num_max_dispatch_tokens_per_rank, int hidden, int num_experts, int which) {
            return reinterpret_cast<uintptr_t>(
                self.low_latency_combine_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts, which));
          },
          "num_max_dispatch_tokens_per_rank"_a, "hidden"_a, "num_experts"_a, "which"_a);
}

}  // namespace

NB_MODULE(_moelink, m) {
  m.doc() = "moelink C++ core (internal; use the moelink package)";
  nb::register_exception_translator(&translate_error);

  bind_config(m);
  bind_event(m);
  bind_topology(m);
  bind_buffer(m);

  m.def("is_sm90_compiled", &is_sm90_compiled);
  // Every arena range starts at a multiple of this; the Python layer lays tensors out in blocks by it.
  m.attr("ARENA_ALIGNMENT") = moelink::runtime::kArenaAlignment;
  // The most experts one rank's exchanges route; internode checks its per-node experts against it
  // before any leg, so every rank raises it with its own message instead of a leg's.
  m.attr("MAX_LOCAL_EXPERTS") = moelink::kernels::kMaxLocalExperts;
  m.def("nvshmem_compiled", &moelink::window::nvshmem_compiled);
  // (root unique id, pe, num_pes) of the process's NVSHMEM world, or None when it is in none.
  m.def("nvshmem_world", []() -> nb::object {
    const moelink::Buffer::NvshmemWorld world = moelink::Buffer::nvshmem_world();
    if (world.id.empty()) return nb::none();
    return nb::make_tuple(to_bytes(world.id), world.pe, world.num_pes);
  });
  // MOELINK_DEBUG_LANE_FORCE_PUT as internode mode's construction reads it: every rank gathers it
  // (they must agree) before an NVSHMEM lane joins. Raises ValueError on a malformed value.
  m.def("debug_lane_force_put", [] {
    switch (moelink::knobs::debug_lane_force_put()) {
      case moelink::knobs::LanePut::kFake: return "fake";
      case moelink::knobs::LanePut::kNvshmem: return "nvshmem";
      default: return "stores";
    }
  });
  m.def("nvshmem_require", &moelink::window::nvshmem_require,
        "Loads the NVSHMEM transport plugin, or raises RuntimeError saying what to install.");
  m.def("device_count", &device_count);
  // Whether outputs are made through torch's C shim (convert.hpp's TorchShim) when it loaded: the
  // Python layer passes MOELINK_TORCH_SHIM once (Buffer._torch_shim sets it too, for side-by-side
  // timing). Returns whether the shim is in use now.
  m.def(
      "use_torch_shim",
      [](bool use) {
        moelink::bindings::detail::torch_shim_wanted() = use;
        return moelink::bindings::torch_shim() != nullptr;
      },
      "use"_a);
  m.def("torch_shim_in_use", [] { return moelink::bindings::torch_shim() != nullptr; });
  // Whether small outputs share one allocation (Outputs::add_packed): the shim in use, with views,
  // and packing not switched off (use_packing, Buffer._pack_outputs).
  m.def("torch_shim_packs", [] { return moelink::bindings::packs_with(moelink::bindings::torch_shim()); });
  m.def(
      "use_packing",
      [](bool use) {
        moelink::bindings::packing_wanted() = use;
        return moelink::bindings::packs_with(moelink::bindings::torch_shim());
      },
      "use"_a);
  // Tensors made as the operations make their outputs (Outputs), from (shape, dtype name, strides,
  // device) tuples (strides () for contiguous, device -1 for the CPU), each its own allocation or
  // (packed) all in one, as add_packed makes them (every spec on the first one's device): for tests
  // of the ways of making them, and for timing them (bench/probe_calls.py).
  m.def(
      "make_outputs",
      [](nb::handle specs, bool packed) {
        Outputs outs;
        std::vector<int> slots;
        std::vector<Outputs::Part> parts;
        std::vector<moelink::TensorRef> refs(nb::len(specs));
        int device = 0;
        size_t i = 0;
        for (nb::handle spec : specs) {
          nb::tuple t = nb::borrow<nb::tuple>(spec);
          std::vector<int64_t> shape = moelink::bindings::to_int_vector(t[0], "specs", "shape");
          std::vector<int64_t> strides = moelink::bindings::to_int_vector(t[2], "specs", "strides");
          const moelink::DType dtype = moelink::bindings::dtype_for_arg(nb::cast<std::string>(t[1]), "specs");
          if (i == 0) device = nb::cast<int>(t[3]);
          if (packed)
            parts.push_back({std::move(shape), dtype, &refs[i], std::move(strides)});
          else
            slots.push_back(outs.add(std::move(shape), dtype, nb::cast<int>(t[3]), &refs[i], std::move(strides)));
          ++i;
        }
        if (packed) slots = outs.add_packed(device, std::move(parts));
        outs.finish();
        nb::list tensors;
        for (int slot : slots) tensors.append(outs.get(slot));
        return tensors;
      },
      "specs"_a, "packed"_a = false);
  // What the extension reads from a tensor argument, as a TRef tuple: for tests (a torch.Tensor,
  // or any object with its attributes) and for callers checking their own tensor types.
  m.def(
      "tensor_ref",
      [](nb::handle tensor, const char* arg) -> nb::object {
        if (tensor.is_none()) return nb::none();
        moelink::TensorRef ref;
        to_tensor_refs({{tensor, arg, &ref}});  // as the operations read their arguments
        return nb::make_tuple(reinterpret_cast<uintptr_t>(ref.data), moelink::dtype_name(ref.dtype),
                              nb::tuple(nb::cast(ref.shape)), nb::tuple(nb::cast(ref.strides)), ref.device);
      },
      "tensor"_a.none(), "arg"_a = "tensor");
}
