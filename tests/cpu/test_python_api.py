"""The Python surface of moelink that needs no GPU: the extension's Config / Topology / size hints /
default configs, and the pure-Python argument checks of Buffer and EventOverlap (those need torch)."""

import importlib.util
import re

import pytest

# The extension is built by CMake into build/python/moelink; skip (not fail) where it was not built.
try:
    import moelink
    from moelink import _moelink
except ImportError as e:  # pragma: no cover - depends on the build
    pytest.skip(f"moelink._moelink is not importable: {e}", allow_module_level=True)

HAS_TORCH = importlib.util.find_spec("torch") is not None


# ---- Config ------------------------------------------------------------------------------------------

def test_config_is_the_extension_class():
    assert moelink.Config is _moelink.Config


def test_config_fields_and_defaults():
    config = moelink.Config(24, 6, 256)
    assert config.num_sms == 24
    assert config.num_max_nvl_chunked_send_tokens == 6
    assert config.num_max_nvl_chunked_recv_tokens == 256
    assert config.num_max_rdma_chunked_send_tokens == 6
    assert config.num_max_rdma_chunked_recv_tokens == 256
    config = moelink.Config(num_sms=20, num_max_nvl_chunked_send_tokens=8, num_max_nvl_chunked_recv_tokens=288,
                            num_max_rdma_chunked_send_tokens=16, num_max_rdma_chunked_recv_tokens=128)
    assert (config.num_max_rdma_chunked_send_tokens, config.num_max_rdma_chunked_recv_tokens) == (16, 128)
    assert "num_sms=20" in repr(config)


@pytest.mark.parametrize("args, field", [
    ((0, 6, 256), "num_sms"),
    ((-2, 6, 256), "num_sms"),
    ((20, 0, 256), "num_max_nvl_chunked_send_tokens"),
    ((20, -1, 256), "num_max_nvl_chunked_send_tokens"),
    ((20, 6, 0), "num_max_nvl_chunked_recv_tokens"),
    ((20, 6, 256, 0, 256), "num_max_rdma_chunked_send_tokens"),
    ((20, 6, 256, 6, -4), "num_max_rdma_chunked_recv_tokens"),
])
def test_config_rejects_bad_fields(args, field):
    with pytest.raises(ValueError, match=field):
        moelink.Config(*args)


def test_config_rejects_non_ints():
    with pytest.raises(TypeError):
        moelink.Config("20", 6, 256)


def test_config_is_read_only():
    config = moelink.Config(20, 6, 256)
    with pytest.raises(AttributeError):
        config.num_sms = 4


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_nvl_size_hint_grows_with_hidden(num_ranks):
    config = moelink.Config(20, 6, 256)
    small = config.get_nvl_buffer_size_hint(2048, num_ranks)
    large = config.get_nvl_buffer_size_hint(2 * 2048, num_ranks)
    assert isinstance(small, int) and small > 0
    assert large > small


def test_nvl_size_hint_grows_with_recv_chunk():
    assert (moelink.Config(20, 6, 512).get_nvl_buffer_size_hint(7168 * 2, 8)
            > moelink.Config(20, 6, 256).get_nvl_buffer_size_hint(7168 * 2, 8))


def test_rdma_size_hint_is_an_int():
    hint = moelink.Config(20, 6, 256).get_rdma_buffer_size_hint(7168 * 2, 16)
    assert isinstance(hint, int) and hint >= 0


# ---- default configs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("make", ["default_dispatch_config", "default_combine_config"])
def test_default_configs(make, num_ranks):
    config = getattr(_moelink, make)(num_ranks, 20)
    assert isinstance(config, moelink.Config)
    assert 2 <= config.num_sms <= 20 and config.num_sms % 2 == 0
    assert config.num_max_nvl_chunked_send_tokens > 0
    assert config.num_max_nvl_chunked_recv_tokens > 0
    assert config.get_nvl_buffer_size_hint(7168 * 2, num_ranks) > 0


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
def test_default_dispatch_and_combine_configs_share_num_sms(num_ranks):
    # A cached dispatch / combine must run with the num_sms of the dispatch that made the handle.
    assert (_moelink.default_dispatch_config(num_ranks, 24).num_sms
            == _moelink.default_combine_config(num_ranks, 24).num_sms)


# ---- Topology ----------------------------------------------------------------------------------------

def test_topology_intranode():
    topology = _moelink.Topology.make(3, 8)
    assert (topology.rank, topology.num_ranks, topology.num_nvl_ranks, topology.num_rdma_ranks) == (3, 8, 8, 1)
    assert (topology.nvl_rank, topology.rdma_rank) == (3, 0)
    assert topology.is_intranode()
    assert _moelink.Topology.make(0, 4).num_nvl_ranks == 4


def test_topology_internode():
    topology = _moelink.Topology.make(10, 16, 8)
    assert (topology.num_nvl_ranks, topology.num_rdma_ranks, topology.nvl_rank, topology.rdma_rank) == (8, 2, 2, 1)
    assert not topology.is_intranode()
    assert topology.root_rdma_rank_global() == 2
    assert _moelink.Topology.make(5, 8, 4).rdma_rank == 1


@pytest.mark.parametrize("args", [
    (0, 6, 4),     # num_ranks not a multiple of num_nvl_ranks
    (8, 8, 0),     # rank out of range
    (-1, 8, 0),    # rank out of range
    (0, 16, 16),   # more than 8 GPUs per node
    (0, 0, 0),     # no ranks
])
def test_topology_rejects_bad_values(args):
    with pytest.raises(ValueError):
        _moelink.Topology.make(*args)


# ---- module functions --------------------------------------------------------------------------------

def test_device_count_is_an_int():
    count = _moelink.device_count()
    assert isinstance(count, int) and count >= 0


def test_build_flags_are_bools():
    assert isinstance(_moelink.is_sm90_compiled(), bool)
    assert isinstance(_moelink.nvshmem_compiled(), bool)
    assert _moelink.nvshmem_world() is None  # no Buffer joined one in this process


def test_version():
    assert isinstance(moelink.__version__, str)


def test_event_handle_empty():
    assert not _moelink.EventHandle().valid


class _FakeDtype:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return self.name


class _FakeTensor:
    """What the extension reads from a tensor argument, without torch: data_ptr(), dtype (its str()
    names it), shape, stride() and get_device()."""

    def __init__(self, ptr, dtype, shape, strides, device):
        self._ptr, self.dtype, self.shape, self._strides, self._device = ptr, dtype, shape, strides, device

    def data_ptr(self):
        return self._ptr

    def stride(self):
        return self._strides

    def get_device(self):
        return self._device


def test_extension_reads_tensor_attributes():
    """Operations take tensors as they are (no TRef tuple built in Python): the extension reads the
    pointer, the dtype (by identity after the first time, so a second read must agree), the shape
    and strides, and the device; TRef tuples and None still work."""
    bf16, fp8 = _FakeDtype("torch.bfloat16"), _FakeDtype("torch.float8_e4m3fn")
    x = _FakeTensor(4096, bf16, (6, 4), (8, 2), 3)
    for _ in range(2):
        assert _moelink.tensor_ref(x, "x") == (4096, "bfloat16", (6, 4), (8, 2), 3)
    assert _moelink.tensor_ref(_FakeTensor(8192, fp8, (5,), (1,), -1))[1:] == ("float8_e4m3fn", (5,), (1,), -1)
    assert _moelink.tensor_ref(None) is None
    assert _moelink.tensor_ref((16, "int64", (2, 3), (3, 1), 0)) == (16, "int64", (2, 3), (3, 1), 0)


@pytest.mark.parametrize("bad, message", [
    ([1, 2], "topk_idx: expected a torch.Tensor or None, got list"),
    (_FakeTensor(0, _FakeDtype("torch.float64"), (2,), (1,), 0), "topk_idx: dtype: expected one of"),
    (_FakeTensor(0, _FakeDtype("torch.int64"), [2], (1,), 0), "topk_idx: expected a tensor whose shape"),
    (_FakeTensor(0, _FakeDtype("torch.int64"), (2,), (1,), "cuda"), "topk_idx: expected a tensor whose get_device"),
    ((1, 2, 3), "topk_idx: expected a torch.Tensor, a TRef tuple"),
])
def test_extension_names_the_argument_of_a_bad_tensor(bad, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        _moelink.tensor_ref(bad, "topk_idx")


def test_extension_reads_torch_tensors(torch_and_buffer):
    torch, _ = torch_and_buffer
    x = torch.empty((6, 8), dtype=torch.bfloat16)[:, ::2]
    assert _moelink.tensor_ref(x, "x") == (x.data_ptr(), "bfloat16", (6, 4), (8, 2), -1)
    for dtype, name in ((torch.float8_e4m3fn, "float8_e4m3fn"), (torch.int64, "int64"), (torch.bool, "bool")):
        assert _moelink.tensor_ref(torch.empty(3, dtype=dtype))[1] == name


# deep_ep's Buffer.runtime methods that frameworks read.
@pytest.mark.parametrize("name", ["get_num_rdma_ranks", "get_rdma_rank", "get_root_rdma_rank", "get_local_device_id",
                                  "get_num_max_nvl_peers", "get_local_ipc_handle", "get_local_nvshmem_unique_id",
                                  "is_available", "is_internode_available", "sync", "destroy"])
def test_runtime_has_deep_eps_method_names(name):
    assert callable(getattr(_moelink.Buffer, name))


# ---- without torch -----------------------------------------------------------------------------------

@pytest.mark.skipif(HAS_TORCH, reason="checks the torch-free fallbacks")
def test_torch_classes_need_torch():
    with pytest.raises(ImportError, match="needs PyTorch"):
        moelink.Buffer(None)
    with pytest.raises(ImportError, match="needs PyTorch"):
        moelink.EventOverlap()
    with pytest.raises(ImportError, match="needs PyTorch"):
        moelink.EventHandle()
    with pytest.raises(ImportError, match="needs PyTorch"):
        moelink.check_nvlink_connections()
    with pytest.raises(ImportError, match="needs PyTorch"):
        moelink.Buffer.set_num_sms(20)
    with pytest.raises(ImportError):
        moelink.topk_idx_t


# ---- pure-Python checks that need torch but no GPU ---------------------------------------------------

@pytest.fixture
def torch_and_buffer():
    torch = pytest.importorskip("torch")
    saved = moelink.Buffer.num_sms
    yield torch, moelink.Buffer
    moelink.Buffer.num_sms = saved


def test_topk_idx_t(torch_and_buffer):
    torch, _ = torch_and_buffer
    assert moelink.topk_idx_t is torch.int64


@pytest.mark.parametrize("value, error", [(3, ValueError), (0, ValueError), (-2, ValueError),
                                          ("4", TypeError), (4.0, TypeError), (None, TypeError)])
def test_set_num_sms_rejects(torch_and_buffer, value, error):
    _, Buffer = torch_and_buffer
    with pytest.raises(error, match="num_sms"):
        Buffer.set_num_sms(value)


def test_set_num_sms_changes_default_configs(torch_and_buffer):
    _, Buffer = torch_and_buffer
    Buffer.set_num_sms(24)
    assert Buffer.num_sms == 24
    assert Buffer.get_dispatch_config(8).num_sms <= 24
    assert Buffer.get_dispatch_config(8).num_sms == Buffer.get_combine_config(8).num_sms


def test_event_overlap_without_event(torch_and_buffer):
    event = moelink.EventOverlap()
    with event as entered:
        assert entered is event
    event.current_stream_wait()  # nothing to wait for; must not touch CUDA
    kept = object()
    assert moelink.EventOverlap(None, extra_tensors=(kept,)).extra_tensors == (kept,)


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, ValueError, "group"),
    ({"num_nvl_bytes": -1}, ValueError, "num_nvl_bytes"),
    ({"num_nvl_bytes": 1.5}, TypeError, "num_nvl_bytes"),
    ({"num_rdma_bytes": -1}, ValueError, "num_rdma_bytes"),
    ({"num_qps_per_rank": 0}, ValueError, "num_qps_per_rank"),
    ({"allow_mnnvl": True}, ValueError, "group"),  # accepted: it gets as far as the missing group
    ({"use_fabric": True}, NotImplementedError, "use_fabric"),
    ({"enable_shrink": True}, ValueError, "enable_shrink"),  # needs low_latency_mode
    ({"enable_shrink": True, "low_latency_mode": True}, ValueError, "group"),  # accepted
])
def test_buffer_constructor_checks(torch_and_buffer, kwargs, error, match):
    _, Buffer = torch_and_buffer
    with pytest.raises(error, match=match):
        Buffer(None, **kwargs)


def test_buffer_needs_exactly_one_of_group_and_comm(torch_and_buffer):
    _, Buffer = torch_and_buffer
    with pytest.raises(ValueError, match="comm"):
        Buffer(object(), comm=object())


def test_low_latency_size_hint_is_deep_eps(torch_and_buffer):
    from reference import low_latency_reference as ll
    _, Buffer = torch_and_buffer
    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 64) == ll.deep_ep_rdma_size_hint(128, 7168, 8, 64)
    with pytest.raises(ValueError, match="hidden"):
        Buffer.get_low_latency_rdma_size_hint(128, 100, 8, 64)


def test_buffer_signature_matches_deep_ep(torch_and_buffer):
    import inspect
    _, Buffer = torch_and_buffer
    params = list(inspect.signature(Buffer.__init__).parameters.items())[1:]
    # deep_ep's parameters, in its order; moelink's own additions may only follow, keyword-only,
    # so no positional call written for deep_ep can reach them.
    extras = [(name, p) for name, p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert [name for name, _ in extras] == ["num_arena_bytes"]
    assert all(p.default is None for _, p in extras)
    params = params[:len(params) - len(extras)]
    assert [(name, p.default) for name, p in params] == [
        ("group", inspect.Parameter.empty), ("num_nvl_bytes", 0), ("num_rdma_bytes", 0),
        ("low_latency_mode", False), ("num_qps_per_rank", 24), ("allow_nvlink_for_low_latency_mode", True),
        ("allow_mnnvl", False), ("use_fabric", False), ("explicitly_destroy", False), ("enable_shrink", False),
        ("comm", None)]
    dispatch = inspect.signature(Buffer.dispatch).parameters
    assert list(dispatch)[1:] == ["x", "handle", "num_tokens_per_rank", "num_tokens_per_rdma_rank",
                                  "is_token_in_rank", "num_tokens_per_expert", "topk_idx", "topk_weights",
                                  "expert_alignment", "num_worst_tokens", "config", "previous_event",
                                  "async_finish", "allocate_on_comm_stream"]
    combine = inspect.signature(Buffer.combine).parameters
    assert list(combine)[1:] == ["x", "handle", "topk_weights", "bias", "config", "previous_event",
                                 "async_finish", "allocate_on_comm_stream"]


def test_tensor_refs_are_what_the_extension_reads(torch_and_buffer):
    """_ref was trimmed for the host path: it must still give the data pointer, the dtype's name,
    the shape and strides as tuples (torch.Size is one), -1 as the device of a tensor not on CUDA,
    None for None, and a TypeError naming the argument for anything else."""
    torch, _ = torch_and_buffer
    from moelink._checks import _ref

    x = torch.empty((6, 8), dtype=torch.bfloat16)[:, ::2]  # a strided view keeps its strides
    ref = _ref(x, "x")
    assert ref == (x.data_ptr(), "bfloat16", (6, 4), (8, 2), -1)
    assert isinstance(ref[2], tuple) and isinstance(ref[3], tuple)
    for dtype, name in ((torch.float8_e4m3fn, "float8_e4m3fn"), (torch.int64, "int64"), (torch.bool, "bool")):
        assert _ref(torch.empty(3, dtype=dtype))[1] == name
        assert _ref(torch.empty(3, dtype=dtype))[1] == name  # and again, from the cache
    assert _ref(None) is None
    with pytest.raises(TypeError, match="topk_idx"):
        _ref([1, 2], "topk_idx")


class _FakeRuntime:
    """What _intranode's argument checks and default configs ask of a Buffer's runtime."""

    def __init__(self, max_num_sms):
        self.max_sms, self.abstained, self.config_calls = max_num_sms, [], 0

    def max_num_sms(self):
        self.config_calls += 1
        return self.max_sms

    def abstain(self, *args):
        self.abstained.append(args)

    def check_faults(self):
        pass


def _fake_buffer(max_num_sms=40, group_size=4):
    class Topology:
        num_rdma_ranks = 1

    class FakeBuffer:
        num_sms = 24
        _express = False  # the full path: these fakes have no express calls

        def _check_usable(self, op):
            pass

    buf = FakeBuffer()
    buf.group_size, buf.runtime, buf._topology = group_size, _FakeRuntime(max_num_sms), Topology()
    return buf


def test_default_configs_are_kept_per_num_sms_and_follow_it():
    """The operations keep their default configs per Buffer: a repeated call must not ask the
    runtime again, a changed num_sms must give that num_sms' preset, and the preset is lowered to
    what fits the GPU's share (max_num_sms)."""
    pytest.importorskip("torch")  # moelink._intranode imports it
    from moelink._intranode import default_config

    buf = _fake_buffer(max_num_sms=40)
    first = default_config(buf, "dispatch")
    assert first.num_sms == 24
    assert default_config(buf, "dispatch") is first and buf.runtime.config_calls == 1
    assert default_config(buf, "combine").num_sms == 24 and buf.runtime.config_calls == 2
    type(buf).num_sms = 16
    assert default_config(buf, "dispatch").num_sms == 16
    type(buf).num_sms = 64
    assert default_config(buf, "dispatch").num_sms == 40  # lowered to what fits
    assert _fake_buffer(max_num_sms=40).__dict__.get("_default_configs") is None  # per Buffer


def test_a_hand_built_dispatch_handle_is_checked_in_full(torch_and_buffer):
    """Only handles that dispatch returned skip the handle checks; a DispatchHandle built by hand
    with a bad entry is refused with the checks' error, and the rank abstains so its peers do not
    wait for it."""
    torch, _ = torch_and_buffer
    from moelink._intranode import DispatchHandle, combine

    buf = _fake_buffer()
    m = torch.zeros((4, 12), dtype=torch.int32)
    handle = DispatchHandle((torch.zeros((4, 4), dtype=torch.int32), m, m, None,
                             torch.zeros((8, 4), dtype=torch.bool), torch.zeros(2, dtype=torch.int64)), 64)
    with pytest.raises(TypeError, match=r"handle\[3\] \(recv_src_idx\)"):
        combine(buf, torch.zeros((0, 64), dtype=torch.bfloat16), handle, None, None, None, None, False, False)
    assert buf.runtime.abstained == [()]  # no argument: the rank records nothing of its own error


class _PendingErrorRuntime(_FakeRuntime):
    """A runtime whose device has recorded a data error that its host sees: it raises a fault on
    entry when it has one, and the data error only at the end of a collective's last launch (what
    the C++ operations do; tests/cpu/test_pending_errors.cpp checks that they drain first)."""

    def __init__(self, max_num_sms=40, fault=False):
        super().__init__(max_num_sms)
        self.pending = "moelink: num_worst_tokens: rank 1 would receive 9 rows, more than its num_worst_tokens"
        self.fault, self.log = fault, []

    def check_faults(self):
        self.log.append("check_faults")
        if self.fault:
            raise TimeoutError("moelink: rank 0 timed out after 100 s in the barrier that opens an operation")

    def raise_pending_errors(self):  # not the collectives' entry check any more
        raise AssertionError("a collective must not raise a pending data error on entry")

    def _end(self, op):
        self.log.append(op)
        if self.pending:
            message, self.pending = self.pending, None
            raise ValueError(message)
        return None  # the event

    def intranode_notify_launch(self, *args):
        self.log.append("notify")
        self.notify_args = args

    def intranode_notify_wait(self):
        self.log.append("notify_wait")
        return 2, [2, 0]

    def intranode_dispatch(self, *args, handle_refs=None):
        return self._end("dispatch (cached)" if args[-1] else "dispatch")

    def intranode_dispatch_uncached(self, *args):
        """The extension's one call of the default path, in its order: the notify's launch (the same
        twelve arguments), its wait, then the dispatch's launch, with outputs the extension allocates."""
        import torch

        self.intranode_notify_launch(*args)
        num_recv, per_expert = self.intranode_notify_wait()
        x, x_scales, topk_idx, topk_weights, config = args[0], args[1], args[2], args[3], args[10]
        ranks, channels, k = 2, config.num_sms // 2, topk_idx.size(1)
        outputs = (torch.empty((num_recv, x.size(1)), dtype=x.dtype),
                   None if x_scales is None else torch.empty((num_recv, x_scales.size(1)), dtype=x_scales.dtype),
                   torch.empty((num_recv, k), dtype=torch.int64),
                   None if topk_weights is None else torch.empty((num_recv, k), dtype=torch.float32),
                   torch.empty((ranks, ranks), dtype=torch.int32), torch.empty((ranks, channels), dtype=torch.int32),
                   torch.empty((ranks, channels), dtype=torch.int32), torch.empty((num_recv,), dtype=torch.int32),
                   torch.empty((2,), dtype=torch.int64))
        return (self._end("dispatch"), per_expert, *outputs, None)  # no HandleRefs

    def intranode_combine(self, *args, handle_refs=None):
        return self._end("combine")


class _NoStreams:
    """_OpStreams without CUDA: the order tuple the runtime gets, allocation on the current device."""

    def __init__(self, buffer, previous_event, async_finish, allocate_on_comm_stream):
        self.order = (0, None, False, False)
        self.allocate_on_comm_stream = allocate_on_comm_stream

    def allocating(self):
        import contextlib

        return contextlib.nullcontext()

    def allocation_stream(self):
        return 0

    def keeps_tensors(self):
        return False

    def finish_joined(self, event):
        return event


def _routed_call(torch):
    """One rank's uncached dispatch arguments on the CPU: 2 ranks, 4 experts, 2 tokens of top-2."""
    topk_idx = torch.tensor([[0, 2], [1, -1]], dtype=torch.int64)
    return dict(x=torch.zeros((2, 64), dtype=torch.bfloat16),
                num_tokens_per_rank=torch.tensor([2, 1], dtype=torch.int32), is_token_in_rank=torch.tensor([[True, True], [True, False]]),
                num_tokens_per_expert=torch.tensor([1, 1, 1, 0], dtype=torch.int32), topk_idx=topk_idx,
                topk_weights=torch.ones((2, 2), dtype=torch.float32))


def _pending_buffer(monkeypatch, fault=False):
    from moelink import _intranode

    monkeypatch.setattr(_intranode, "_OpStreams", _NoStreams)
    buf = _fake_buffer(group_size=2)
    buf.runtime = _PendingErrorRuntime(fault=fault)
    buf._device, buf.num_arena_bytes = "cpu", 0
    buf.runtime.num_arena_bytes = 0
    return buf


def _dispatch(buf, handle=None, allocate_on_comm_stream=False, **kwargs):
    from moelink._intranode import dispatch

    args = dict(handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None, is_token_in_rank=None,
                num_tokens_per_expert=None, topk_idx=None, topk_weights=None)
    args.update(kwargs, handle=handle)
    x = args.pop("x")
    return dispatch(buf, x, args["handle"], args["num_tokens_per_rank"], args["num_tokens_per_rdma_rank"],
                    args["is_token_in_rank"], args["num_tokens_per_expert"], args["topk_idx"], args["topk_weights"], 1,
                    0, None, None, False, allocate_on_comm_stream)


def test_a_pending_error_is_raised_after_the_launch_of_a_dispatch(torch_and_buffer, monkeypatch):
    """A data error an earlier call left recorded does not stop the dispatch from opening: the entry
    checks faults only, the notify and the dispatch kernel are launched (so the peers, whose hosts
    may not have seen the record yet, are not left waiting for this rank), and the error comes out
    of the call after that, once. The rank does not abstain: it took part."""
    torch, _ = torch_and_buffer
    buf = _pending_buffer(monkeypatch)
    with pytest.raises(ValueError, match="num_worst_tokens"):
        _dispatch(buf, **_routed_call(torch))
    assert buf.runtime.log == ["check_faults", "notify", "notify_wait", "dispatch"]
    assert buf.runtime.abstained == []
    out = _dispatch(buf, **_routed_call(torch))  # raised once: the next call returns
    assert buf.runtime.log[4:] == ["check_faults", "notify", "notify_wait", "dispatch"]
    assert out[0].shape == (2, 64)


def test_an_uncached_dispatch_allocates_its_handle_while_the_notify_runs(torch_and_buffer, monkeypatch):
    """The notify is launched before the handle's four tensors are allocated and waited for after
    them (the dispatch kernel fills them): that allocation is off the path the GPU waits for. The
    launch gets the inputs, the layout counts and the config, no handle tensor. This is the Python
    path (outputs on the comm stream or in the arena); the default path's one extension call keeps
    the same order in C++ (python/bindings/module.cpp)."""
    torch, _ = torch_and_buffer
    buf = _pending_buffer(monkeypatch)
    buf.runtime.pending = None
    empty = torch.empty

    def logged_empty(*args, **kwargs):
        buf.runtime.log.append("empty")
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", logged_empty)
    out = _dispatch(buf, allocate_on_comm_stream=True, **_routed_call(torch))
    # Four handle tensors between the launch and the wait; recv_x, its top-k pair and recv_src_idx after.
    assert buf.runtime.log == ["check_faults", "notify", *["empty"] * 4, "notify_wait", *["empty"] * 4, "dispatch"]
    assert len(buf.runtime.notify_args) == 12
    from moelink._intranode import default_config

    channels = default_config(buf, "dispatch").num_sms // 2
    assert [tuple(t.shape) for t in out[4][:3]] == [(2, 2), (2, channels), (2, channels)]
    assert out[4][5].dtype == torch.int64 and tuple(out[4][5].shape) == (2,)


class _ExpressRuntime(_PendingErrorRuntime):
    """The express calls as the extension answers them: a result, or None (nothing done) to send
    the call down the full path. Logs each call with the arguments the Python layer passed."""

    def __init__(self, answer=True, errors=None):
        super().__init__()
        self.pending, self.answer, self.errors = None, answer, errors

    def intranode_dispatch_uncached_express(self, x, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_rank,
                                            num_tokens_per_expert, expert_alignment, num_worst_tokens, config,
                                            stream):
        import torch

        self.log.append(("uncached express", config.num_sms, stream))
        if not self.answer:
            return None
        data = x[0] if isinstance(x, tuple) else x
        n, k, channels = 3, topk_idx.size(1), config.num_sms // 2
        return ("event", [3, 0], torch.empty((n, data.size(1)), dtype=data.dtype),
                torch.empty((n, 1)) if isinstance(x, tuple) else None, torch.empty((n, k), dtype=torch.int64),
                torch.empty((n, k)), torch.empty((2, 2), dtype=torch.int32),
                torch.empty((2, channels), dtype=torch.int32), torch.empty((2, channels), dtype=torch.int32),
                torch.empty((n,), dtype=torch.int32), torch.empty((2,), dtype=torch.int64), "refs", data.size(1),
                self.errors)

    def intranode_dispatch_express(self, x, refs, config, stream):
        import torch

        self.log.append(("cached express", refs, config.num_sms, stream))
        return ("event", torch.empty((3, 64), dtype=torch.bfloat16), None, self.errors) if self.answer else None

    def intranode_combine_express(self, x, topk_weights, refs, hidden, config, stream):
        import torch

        self.log.append(("combine express", refs, hidden, config.num_sms, stream))
        return ("event", torch.empty((2, hidden), dtype=x.dtype), None, self.errors) if self.answer else None


def _express_buffer(monkeypatch, **runtime_args):
    from moelink import _intranode

    buf = _pending_buffer(monkeypatch)
    buf.runtime = _ExpressRuntime(**runtime_args)
    buf.runtime.num_arena_bytes = 0
    buf._express, buf._destroyed = True, False
    monkeypatch.setattr(_intranode, "_current_raw_stream", lambda device: 77)
    return buf


def test_the_default_dispatch_and_combine_take_one_express_call_each(torch_and_buffer, monkeypatch):
    """With its defaults (or a Config), a dispatch is one extension call that gets the caller's x
    as given, the default config and the caller's stream; its handle is deep_ep's 6-tuple,
    remembers the extension's reading of its tensors, and takes a cached dispatch and a combine
    through their own express calls. Nothing else reaches the runtime."""
    torch, _ = torch_and_buffer
    from moelink._intranode import DispatchHandle, combine

    buf = _express_buffer(monkeypatch)
    call = _routed_call(torch)
    recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, event = _dispatch(buf, **call)
    assert buf.runtime.log == [("uncached express", 24, 77)]
    assert recv_x.shape == (3, 64) and recv_topk_idx.shape == (3, 2) and per_expert == [3, 0]
    assert type(handle) is DispatchHandle and len(handle) == 6 and handle.hidden == 64
    assert handle._refs == "refs" and handle._from_dispatch and event.event == "event"
    assert handle[4] is call["is_token_in_rank"]
    cached = _dispatch(buf, handle=handle, x=torch.zeros((2, 64), dtype=torch.bfloat16))
    assert buf.runtime.log[1] == ("cached express", "refs", 24, 77)
    assert cached[1:5] == (None, None, None, handle) and cached[0].shape == (3, 64)
    combined_x, combined_weights, _ = combine(buf, recv_x, handle, None, None, None, None, False, False)
    assert buf.runtime.log[2] == ("combine express", "refs", 64, 24, 77)
    assert combined_x.shape == (2, 64) and combined_weights is None
    assert buf.runtime.abstained == []


def test_an_express_call_that_declines_leaves_the_call_to_the_full_path(torch_and_buffer, monkeypatch):
    """The extension answers None (an argument it leaves to the Python checks): the full path then
    runs the call from its start, so its checks and errors are the ones the caller sees."""
    torch, _ = torch_and_buffer
    buf = _express_buffer(monkeypatch, answer=False)
    out = _dispatch(buf, **_routed_call(torch))
    assert buf.runtime.log == [("uncached express", 24, 77), "check_faults", "notify", "notify_wait", "dispatch"]
    assert out[0].shape == (2, 64)


def test_local_errors_an_express_call_returns_are_warned_about(torch_and_buffer, monkeypatch):
    """What the full path's finish warns about (a low-latency call's bad input, collected at this
    call's end), the express call returns; the caller gets the same RuntimeWarning."""
    torch, _ = torch_and_buffer
    buf = _express_buffer(monkeypatch, errors=["moelink: topk_idx: token 3 slot 1 ... was skipped"])
    with pytest.warns(RuntimeWarning, match="token 3 slot 1"):
        _dispatch(buf, **_routed_call(torch))


def test_express_is_not_taken_for_options_the_full_path_handles(torch_and_buffer, monkeypatch):
    """previous_event / async_finish, a receive arena, a destroyed Buffer and a bad
    expert_alignment go the full way (which checks them), never through an express call."""
    torch, _ = torch_and_buffer
    from moelink._intranode import dispatch

    buf = _express_buffer(monkeypatch)
    call = _routed_call(torch)
    x = call.pop("x")

    def run(**options):
        kwargs = dict(expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False)
        kwargs.update(options)
        buf.runtime.log.clear()
        try:
            dispatch(buf, x, None, call["num_tokens_per_rank"], None, call["is_token_in_rank"],
                     call["num_tokens_per_expert"], call["topk_idx"], call["topk_weights"], kwargs["expert_alignment"],
                     kwargs["num_worst_tokens"], kwargs["config"], kwargs["previous_event"], kwargs["async_finish"],
                     False)
        except Exception:  # noqa: BLE001 - the full path on these fakes may fail; only the route matters
            pass
        return [entry for entry in buf.runtime.log if isinstance(entry, tuple)]

    assert run() == [("uncached express", 24, 77)]
    assert run(async_finish=True) == []
    assert run(expert_alignment=0) == []
    assert run(expert_alignment=True) == []  # a bool is not an int here
    buf.num_arena_bytes = 1 << 20
    assert run() == []
    buf.num_arena_bytes, buf._destroyed = 0, True
    assert run() == []


def test_a_skipped_notify_raises_at_its_wait_and_launches_no_dispatch(torch_and_buffer, monkeypatch):
    """Every rank skipped the dispatch (its notify says so): the wait raises the error on every
    rank, none launches the dispatch kernel, and none abstains (the operation was opened)."""
    torch, _ = torch_and_buffer
    buf = _pending_buffer(monkeypatch)
    buf.runtime.pending = None

    def skipped():
        buf.runtime.log.append("notify_wait")
        raise ValueError("moelink: topk_idx: rank 1 holds an expert id outside [-1, num_experts)")

    buf.runtime.intranode_notify_wait = skipped
    with pytest.raises(ValueError, match="expert id outside"):
        _dispatch(buf, **_routed_call(torch))
    assert buf.runtime.log == ["check_faults", "notify", "notify_wait"]
    assert buf.runtime.abstained == []


def test_a_pending_error_is_raised_after_the_launch_of_a_cached_dispatch_and_a_combine(torch_and_buffer, monkeypatch):
    torch, _ = torch_and_buffer
    from moelink._intranode import combine

    buf = _pending_buffer(monkeypatch)
    buf.runtime.pending, pending = None, buf.runtime.pending
    handle = _dispatch(buf, **_routed_call(torch))[4]
    x = torch.zeros((2, 64), dtype=torch.bfloat16)
    buf.runtime.pending = pending
    with pytest.raises(ValueError, match="num_worst_tokens"):
        _dispatch(buf, handle=handle, x=x)
    assert buf.runtime.log[4:] == ["check_faults", "dispatch (cached)"]
    buf.runtime.pending = pending
    with pytest.raises(ValueError, match="num_worst_tokens"):
        combine(buf, x, handle, None, None, None, None, False, False)
    assert buf.runtime.log[6:] == ["check_faults", "combine"]
    assert buf.runtime.abstained == []


def test_a_fault_still_raises_on_entry_before_anything_is_launched(torch_and_buffer, monkeypatch):
    """A broken Buffer raises its TimeoutError first, before the call's own checks (so it neither
    launches nor abstains), even with arguments those checks would reject."""
    torch, _ = torch_and_buffer
    from moelink._intranode import combine

    buf = _pending_buffer(monkeypatch, fault=True)
    with pytest.raises(TimeoutError, match="timed out"):
        _dispatch(buf, **_routed_call(torch))
    with pytest.raises(TimeoutError, match="timed out"):
        combine(buf, "not a tensor", None, None, None, None, None, False, False)
    assert buf.runtime.log == ["check_faults", "check_faults"]
    assert buf.runtime.abstained == []


def test_scales_majorness_is_told_in_every_corner(torch_and_buffer):
    """Column-major as torch makes it (empty((S, T)).t()), row-major as torch makes it, for one
    token (column-major strides (1, 1)), one scale (column-major (1, T): ue8m0 packs H 512 into one
    int32), both, and a column of a wider row-major tensor."""
    torch, _ = torch_and_buffer
    from moelink._arena import scales_column_major

    for t, s in ((4, 3), (1, 3), (4, 1), (1, 1)):
        assert not scales_column_major(torch.zeros((t, s)))
        assert scales_column_major(torch.zeros((s, t)).t()) == (t > 1 or s > 1)
    assert not scales_column_major(torch.zeros((4, 8))[:, :1])
    assert scales_column_major(torch.zeros((8, 4))[:1].t())


@pytest.mark.parametrize("arena", [False, True])
def test_dispatch_outputs_follow_the_inputs_and_the_row_count(torch_and_buffer, arena):
    """A dispatch's outputs: x's dtype, the scales' dtype and layout (column-major kept), the
    top-k pair only with top-k, recv_src_idx only uncached; from the receive arena when the Buffer
    has one (recv_src_idx in a block of its own), else from the allocator."""
    torch, _ = torch_and_buffer
    from moelink._arena import alloc_dispatch_outputs

    blocks = []

    class Runtime:
        num_arena_bytes = (1 << 20) if arena else 0

        def arena_dlpack(self, nbytes, stream):
            blocks.append(torch.empty(nbytes, dtype=torch.uint8))
            return blocks[-1]

    class Buf:
        _device, runtime = "cpu", Runtime()
        num_arena_bytes = Runtime.num_arena_bytes

    hidden, n = 1024, 5
    x_bf16 = torch.zeros((3, hidden), dtype=torch.bfloat16)
    x_fp8 = torch.zeros((3, hidden), dtype=torch.float8_e4m3fn)
    row_scales = torch.zeros((3, hidden // 128), dtype=torch.float32)
    col_scales = torch.zeros((hidden // 128, 3), dtype=torch.float32).t()
    packed = torch.zeros((3, 2), dtype=torch.int32)
    for x, scales in ((x_bf16, None), (x_fp8, row_scales), (x_fp8, col_scales), (x_fp8, packed)):
        for num_topk, with_weights in ((0, False), (8, False), (8, True)):
            for with_src_idx in (False, True):
                blocks.clear()
                recv_x, recv_scales, recv_topk_idx, recv_weights, recv_src_idx = alloc_dispatch_outputs(
                    Buf(), x, scales, hidden, n, num_topk, with_weights, with_src_idx, stream=0)
                assert recv_x.shape == (n, hidden) and recv_x.dtype == x.dtype
                if scales is None:
                    assert recv_scales is None
                else:
                    assert recv_scales.shape == (n, scales.size(1)) and recv_scales.dtype == scales.dtype
                    assert (recv_scales.stride(0) == 1) == (scales.stride(1) != 1)  # the same majorness
                assert (recv_topk_idx is None) == (num_topk == 0)
                if num_topk:
                    assert recv_topk_idx.shape == (n, num_topk) and recv_topk_idx.dtype == torch.int64
                assert (recv_weights is None) == (not (num_topk and with_weights))
                if recv_weights is not None:
                    assert recv_weights.shape == (n, num_topk) and recv_weights.dtype == torch.float32
                assert (recv_src_idx is None) == (not with_src_idx)
                if with_src_idx:
                    assert recv_src_idx.shape == (n,) and recv_src_idx.dtype == torch.int32
                assert len(blocks) == ((2 if with_src_idx else 1) if arena else 0)


class _LowLatencyRuntime:
    """The low-latency extension calls as the Python layer makes them: the express ones (answered
    with outputs, or None to decline) and the full ones, each logged."""

    def __init__(self, answer=True):
        self.answer, self.log = answer, []

    def take_local_errors(self):
        return []

    def low_latency_dispatch_express(self, x, topk_idx, m, num_experts, cumulative, wait, use_fp8, round_scale,
                                     use_ue8m0, phase, stream, async_finish):
        import torch

        self.log.append(("dispatch express", m, num_experts, use_fp8, phase, stream, async_finish))
        if not self.answer:
            return None
        rows, experts = 2 * m, num_experts // 2
        recv_x = torch.empty((experts, rows, x.size(1)), dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16)
        scales = torch.empty((experts, x.size(1) // 128, rows)).transpose(1, 2) if use_fp8 else None
        return ("event", recv_x, scales, torch.empty((experts,), dtype=torch.int32),
                torch.empty((experts, rows), dtype=torch.int32), torch.empty((experts, 2), dtype=torch.int64),
                torch.zeros((2,), dtype=torch.int64), None)

    def low_latency_dispatch(self, *args):
        self.log.append(("dispatch", args[-2]))  # the phase
        return "event"

    def low_latency_combine_express(self, x, topk_idx, topk_weights, src_info, layout_range, m, hidden, num_experts,
                                    wait, out, phase, stream, async_finish, dispatch_state, use_logfmt):
        import torch

        self.log.append(("combine express", m, hidden, num_experts, phase, dispatch_state is not None, use_logfmt))
        if not self.answer:
            return None
        return ("event", torch.empty((topk_idx.size(0), hidden), dtype=torch.bfloat16) if out is None else out,
                torch.zeros((2,), dtype=torch.int64), None)

    def low_latency_combine(self, *args):
        self.log.append(("combine", args[-4]))  # the phase
        return "event"


def _low_latency_buffer(monkeypatch, answer=True):
    from moelink import _low_latency

    monkeypatch.setattr(_low_latency, "_current_raw_stream", lambda device: 77)

    class FakeBuffer:
        _express, _destroyed, _low_latency_combines = True, False, 0
        group_size, _device = 2, "cpu"

        def _check_usable(self, op):
            pass

    buf = FakeBuffer()
    buf.runtime = _LowLatencyRuntime(answer)
    return buf


def _ll_dispatch(buf, x, topk_idx, use_fp8=True, hook=False):
    from moelink import _low_latency

    return _low_latency.dispatch(buf, x, topk_idx, 4, 8, None, None, use_fp8, False, False, False, hook)


@pytest.mark.parametrize("answer", [True, False])
def test_a_low_latency_dispatch_and_combine_take_the_express_calls_or_the_full_path(torch_and_buffer, monkeypatch,
                                                                                      answer):
    """With their arguments as deep_ep's defaults give them, the low-latency calls are one express
    extension call each; where it declines (None) the full path makes the outputs and calls the
    full extension calls. Either way the caller gets deep_ep's tuples: (recv_x, scales) column-major
    in their last two dims, counts, a 5-tuple handle that a combine then takes, and a hook whose
    receive reuses the send's tensors."""
    torch, _ = torch_and_buffer
    buf = _low_latency_buffer(monkeypatch, answer)
    from moelink import _low_latency

    x, topk_idx = torch.zeros((3, 256), dtype=torch.bfloat16), torch.zeros((3, 2), dtype=torch.int64)
    (recv_x, scales), recv_count, handle, _, hook = _ll_dispatch(buf, x, topk_idx, hook=True)
    sent = ("dispatch express", 4, 8, True, _low_latency._PHASE_SEND, 77, False)
    assert buf.runtime.log == ([sent] if answer else [sent, ("dispatch", _low_latency._PHASE_SEND)])
    assert recv_x.shape == (4, 8, 256) and recv_x.dtype == torch.float8_e4m3fn and recv_count.shape == (4,)
    assert scales.shape == (4, 8, 2) and scales.stride(1) == 1  # column-major in the last two dims
    assert type(handle) is _low_latency.LowLatencyHandle and handle._from_dispatch
    assert handle[2:] == (4, 256, 8) and handle.state is not None
    hook()
    assert buf.runtime.log[-1] == ("dispatch", _low_latency._PHASE_RECEIVE)
    buf.runtime.log.clear()
    y = torch.zeros((4, 8, 256), dtype=torch.bfloat16)
    combined, _, no_hook = _low_latency.combine(buf, y, topk_idx, torch.ones((3, 2)), handle, False, False, False,
                                                False, None, None)
    express = ("combine express", 4, 256, 8, _low_latency._PHASE_BOTH, True, False)
    assert buf.runtime.log == ([express] if answer else [express, ("combine", _low_latency._PHASE_BOTH)])
    assert combined.shape == (3, 256) and buf._low_latency_combines == 1
    no_hook()


def test_low_latency_arguments_the_express_calls_do_not_take_go_the_full_way(torch_and_buffer, monkeypatch):
    """An int for a bool flag, a handle not made by dispatch, a destroyed Buffer: the full path, whose
    checks accept or reject them as before; the express calls never see them."""
    torch, _ = torch_and_buffer
    from moelink import _low_latency

    buf = _low_latency_buffer(monkeypatch)
    x, topk_idx = torch.zeros((3, 256), dtype=torch.bfloat16), torch.zeros((3, 2), dtype=torch.int64)
    _low_latency.dispatch(buf, x, topk_idx, 4, 8, None, None, 1, False, False, False, False)  # use_fp8=1
    assert [entry[0] for entry in buf.runtime.log] == ["dispatch"]
    buf.runtime.log.clear()
    by_hand = _low_latency.LowLatencyHandle((torch.zeros((4, 8), dtype=torch.int32),
                                             torch.zeros((4, 2), dtype=torch.int64), 4, 256, 8))
    _low_latency.combine(buf, torch.zeros((4, 8, 256), dtype=torch.bfloat16), topk_idx, torch.ones((3, 2)), by_hand,
                         False, False, False, False, None, None)
    assert [entry[0] for entry in buf.runtime.log] == ["combine"]
    buf.runtime.log.clear()
    buf._destroyed = True
    _ll_dispatch(buf, x, topk_idx)
    assert [entry[0] for entry in buf.runtime.log] == ["dispatch"]  # the fake's _check_usable lets it through


# ---- outputs made through torch's C shim ---------------------------------------------------------

_OUTPUT_SPECS = [((3, 4), "int32", (), -1), ((5, 2), "float32", (1, 5), -1), ((0, 56), "float32", (1, 1), -1),
                 ((7,), "bool", (), -1), ((2, 3, 4), "bfloat16", (), -1), ((0, 8), "int64", (), -1),
                 ((4, 128), "float8_e4m3fn", (), -1), ((6,), "uint8", (), -1), ((2, 2), "float16", (2, 1), -1),
                 ((2, 5, 3), "int32", (15, 1, 5), -1)]


def _made(use_shim: bool):
    assert _moelink.use_torch_shim(use_shim) is use_shim
    try:
        return _moelink.make_outputs(_OUTPUT_SPECS)
    finally:
        _moelink.use_torch_shim(True)


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_outputs_are_the_same_tensors_either_way():
    import torch

    assert _moelink.use_torch_shim(True), "the CPU torch's C shim should load and pass the extension's check"
    for use_shim in (True, False):
        tensors = _made(use_shim)
        assert len(tensors) == len(_OUTPUT_SPECS)
        for t, (shape, dtype, strides, _) in zip(tensors, _OUTPUT_SPECS):
            assert type(t) is torch.Tensor and t.device.type == "cpu", (use_shim, dtype)
            assert t.dtype == getattr(torch, dtype) and tuple(t.shape) == shape, (use_shim, dtype)
            expected = strides or torch.empty(shape).stride()
            assert t.stride() == tuple(expected), (use_shim, dtype, t.stride())
        # Each its own memory, writable, and alive after the call (the handles were stolen, not freed).
        live = [t for t in tensors if t.numel() > 0]
        assert len({t.data_ptr() for t in live}) == len(live)
        for t in live:
            t.copy_(torch.ones(t.shape).to(t.dtype))
        for t in live:
            assert bool((t.to(torch.float32) == 1).all()), t.dtype


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_packed_outputs_are_the_same_tensors_in_one_block():
    """add_packed's outputs: the shapes, dtypes and strides add's have, each a view of one block at
    a 256-byte aligned offset, none overlapping another (each filled with its own value, all read
    back), alive after the call; without the shim, separate allocations as before."""
    import torch

    assert _moelink.use_torch_shim(True)
    assert _moelink.torch_shim_packs(), "the CPU torch's shim should have the view entries"
    for use_shim in (True, False):
        _moelink.use_torch_shim(use_shim)
        try:
            tensors = _moelink.make_outputs(_OUTPUT_SPECS, packed=True)
        finally:
            _moelink.use_torch_shim(True)
        assert len(tensors) == len(_OUTPUT_SPECS)
        for t, (shape, dtype, strides, _) in zip(tensors, _OUTPUT_SPECS):
            assert type(t) is torch.Tensor and t.dtype == getattr(torch, dtype) and tuple(t.shape) == shape
            assert t.stride() == tuple(strides or torch.empty(shape).stride()), (use_shim, dtype, t.stride())
        live = [t for t in tensors if t.numel() > 0]
        bases = {t.untyped_storage().data_ptr() for t in live}
        assert len(bases) == (1 if use_shim else len(live)), use_shim
        if use_shim:
            base = bases.pop()
            assert all((t.data_ptr() - base) % 256 == 0 for t in live)
        for i, t in enumerate(live):
            t.copy_(torch.full(t.shape, i + 1).to(t.dtype))
        for i, t in enumerate(live):
            want = 1 if t.dtype == torch.bool else i + 1
            assert bool((t.to(torch.float32) == want).all()), (use_shim, t.dtype)
    del tensors, live
    # Switched off (Buffer._pack_outputs), each its own allocation.
    moelink.Buffer._pack_outputs.fset(None, False)
    try:
        assert not _moelink.torch_shim_packs() and not moelink.Buffer._pack_outputs.fget(None)
        apart = [t for t in _moelink.make_outputs(_OUTPUT_SPECS, packed=True) if t.numel() > 0]
        assert len({t.untyped_storage().data_ptr() for t in apart}) == len(apart)
    finally:
        moelink.Buffer._pack_outputs.fset(None, True)
    assert _moelink.torch_shim_packs()
    # One spec alone is an allocation of its own.
    (only,) = _moelink.make_outputs(_OUTPUT_SPECS[:1], packed=True)
    assert only.shape == (3, 4) and only.untyped_storage().nbytes() == 48


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_torch_shim_switch():
    assert _moelink.use_torch_shim(False) is False and not _moelink.torch_shim_in_use()
    assert moelink.Buffer._torch_shim.fget(None) is False
    moelink.Buffer._torch_shim.fset(None, True)
    assert _moelink.torch_shim_in_use() and moelink.Buffer._torch_shim.fget(None)


def test_torch_shim_knob(monkeypatch):
    from moelink import _knobs

    monkeypatch.delenv("MOELINK_TORCH_SHIM", raising=False)
    assert _knobs.torch_shim() is True
    monkeypatch.setenv("MOELINK_TORCH_SHIM", "0")
    assert _knobs.torch_shim() is False
    monkeypatch.setenv("MOELINK_TORCH_SHIM", "yes")
    with pytest.raises(ValueError, match="MOELINK_TORCH_SHIM"):
        _knobs.torch_shim()


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_arguments_read_the_same_either_way():
    """The operations read plain tensors through the shim (to_tensor_refs) and everything else through
    Python attributes: both readings agree on views, strides, offsets, empty and 0-d tensors and
    every dtype, a subclass is read through Python, and an unknown dtype still names the argument."""
    import torch

    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)

    class Sub(torch.Tensor):
        pass

    tensors = [base, base.t(), base[2:, 3:7], base[:, ::3], torch.empty(0, 8, dtype=torch.int64),
               torch.zeros((), dtype=torch.int32), torch.empty(4, 7168, dtype=torch.bfloat16),
               torch.empty(3, dtype=torch.bool), torch.empty(2, 2, dtype=torch.float8_e4m3fn),
               torch.empty(5, dtype=torch.uint8), torch.empty(2, 3, dtype=torch.float16).t(), base.as_subclass(Sub)]
    try:
        assert _moelink.use_torch_shim(True)
        through_shim = [_moelink.tensor_ref(t) for t in tensors]
        _moelink.use_torch_shim(False)
        through_python = [_moelink.tensor_ref(t) for t in tensors]
    finally:
        _moelink.use_torch_shim(True)
    assert through_shim == through_python
    assert through_shim[2][0] == base[2:, 3:7].data_ptr() and through_shim[1][3] == (1, 10)
    with pytest.raises(TypeError, match="x: dtype"):
        _moelink.tensor_ref(torch.empty(2, dtype=torch.float64), "x")
