"""The deep_ep-compatible Python API on one GPU with a 1-rank gloo group: the documented result
tuples, the stream options, and that bad input raises the documented exception naming the argument.

Run: pytest tests/gpu/test_api_validation.py (one process, one GPU).
"""

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import torch.distributed as dist  # noqa: E402

import moelink  # noqa: E402
from moelink.buffer import _ref  # noqa: E402

HIDDEN = 256
NUM_TOKENS = 64
NUM_TOPK = 4
NUM_EXPERTS = 16
NUM_SCALES = HIDDEN // 128
OTHER_NUM_SMS = 24  # a config that differs from Buffer.num_sms (20)


def _nvl_bytes() -> int:
    configs = [moelink.Buffer.get_dispatch_config(1), moelink.Buffer.get_combine_config(1),
               moelink.Config(OTHER_NUM_SMS, 6, 256)]
    return max(c.get_nvl_buffer_size_hint(HIDDEN * 2, 1) for c in configs)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    torch.cuda.set_device(0)
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            pytest.skip("single-process test; the default group already has several ranks")
        yield dist.group.WORLD
        return
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def buffer(group):
    buf = moelink.Buffer(group, num_nvl_bytes=_nvl_bytes(), explicitly_destroy=True)
    yield buf
    buf.destroy()


def make_inputs(num_tokens: int = NUM_TOKENS):
    generator = torch.Generator(device="cuda").manual_seed(num_tokens)
    scores = torch.rand(num_tokens, NUM_EXPERTS, device="cuda", generator=generator)
    topk_idx = scores.topk(NUM_TOPK, dim=1).indices.to(moelink.topk_idx_t)  # distinct experts per token
    topk_weights = torch.rand(num_tokens, NUM_TOPK, device="cuda", generator=generator)
    x = torch.randn(num_tokens, HIDDEN, device="cuda", generator=generator).to(torch.bfloat16)
    return x, topk_idx, topk_weights


def layout_kwargs(buf, topk_idx):
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
        buf.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    return dict(num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert)


def fp8_inputs(x: torch.Tensor, column_major: bool):
    x_fp8 = x.float().to(torch.float8_e4m3fn)
    scales = torch.ones(x.size(0), NUM_SCALES, device="cuda", dtype=torch.float32)
    if column_major:
        scales = scales.t().contiguous().t()
    return x_fp8, scales


@pytest.fixture(scope="module")
def dispatched(buffer):
    x, topk_idx, topk_weights = make_inputs()
    result = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, **layout_kwargs(buffer, topk_idx))
    torch.cuda.synchronize()
    return x, topk_idx, topk_weights, result


# ---- the documented results ------------------------------------------------------------------------

def test_layout_results(buffer):
    _, topk_idx, _ = make_inputs()
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
        buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    assert num_tokens_per_rank.dtype == torch.int32 and num_tokens_per_rank.shape == (1,)
    assert num_tokens_per_rdma_rank is None
    assert num_tokens_per_expert.dtype == torch.int32 and num_tokens_per_expert.shape == (NUM_EXPERTS,)
    assert is_token_in_rank.dtype == torch.bool and is_token_in_rank.shape == (NUM_TOKENS, 1)
    assert isinstance(event, moelink.EventOverlap)
    assert num_tokens_per_rank.item() == NUM_TOKENS
    expected = torch.bincount(topk_idx.flatten(), minlength=NUM_EXPERTS).to(torch.int32)
    assert torch.equal(num_tokens_per_expert, expected)


def test_dispatch_results(dispatched):
    x, topk_idx, topk_weights, result = dispatched
    assert len(result) == 6
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = result
    # One rank holds every expert, so every token comes back once, in source order.
    assert torch.equal(recv_x, x)
    assert recv_topk_idx.dtype == torch.int64 and torch.equal(recv_topk_idx, topk_idx)
    assert recv_topk_weights.dtype == torch.float32 and torch.equal(recv_topk_weights, topk_weights)
    assert isinstance(num_recv_tokens_per_expert_list, list)
    assert num_recv_tokens_per_expert_list == torch.bincount(topk_idx.flatten(), minlength=NUM_EXPERTS).tolist()
    assert isinstance(handle, tuple) and len(handle) == 6
    # handle[5]: the dispatch's id and status, written on the device
    assert handle[5].dtype == torch.int64 and tuple(handle[5].shape) == (2,) and int(handle[5][1]) == 0
    rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank = handle[:5]
    num_channels = moelink.Buffer.get_dispatch_config(1).num_sms // 2
    assert rank_prefix_matrix.shape == (1, 1) and rank_prefix_matrix.dtype == torch.int32
    assert channel_prefix_matrix.shape == (1, num_channels)
    assert recv_channel_prefix_matrix.shape == (1, num_channels)
    assert torch.equal(recv_src_idx, torch.arange(NUM_TOKENS, device="cuda", dtype=torch.int32))
    assert is_token_in_rank.shape == (NUM_TOKENS, 1)
    assert isinstance(event, moelink.EventOverlap)


def test_cached_dispatch_and_combine(buffer, dispatched):
    x, _, topk_weights, (recv_x, _, recv_topk_weights, _, handle, _) = dispatched
    cached = buffer.dispatch(x, handle=handle)
    assert len(cached) == 6 and cached[1:4] == (None, None, None) and cached[4] is handle
    assert torch.equal(cached[0], x)
    combined_x, combined_topk_weights, event = buffer.combine(recv_x, handle, topk_weights=recv_topk_weights)
    assert combined_x.dtype == torch.bfloat16 and torch.equal(combined_x, x)
    assert torch.allclose(combined_topk_weights, topk_weights)
    assert isinstance(event, moelink.EventOverlap)
    combined_x, combined_topk_weights, _ = buffer.combine(recv_x, handle)
    assert combined_topk_weights is None


def test_combine_bias(buffer, dispatched):
    x, _, _, (recv_x, _, _, _, handle, _) = dispatched
    bias = torch.ones_like(x)
    combined_x, _, _ = buffer.combine(recv_x, handle, bias=(bias, bias))
    assert torch.allclose(combined_x.float(), x.float() + 2, atol=0.1)


@pytest.mark.parametrize("column_major", [False, True])
def test_fp8_dispatch_keeps_scale_layout(buffer, column_major):
    x, topk_idx, _ = make_inputs()
    x_fp8, scales = fp8_inputs(x, column_major)
    (recv_x, recv_scales), *_ = buffer.dispatch((x_fp8, scales), topk_idx=topk_idx, **layout_kwargs(buffer, topk_idx))
    assert recv_x.dtype == torch.float8_e4m3fn and recv_scales.dtype == torch.float32
    assert recv_scales.shape == (NUM_TOKENS, NUM_SCALES)
    assert (recv_scales.stride(0) == 1) == column_major
    assert torch.equal(recv_x.view(torch.uint8), x_fp8.view(torch.uint8))


@pytest.mark.parametrize("column_major", [False, True])
def test_fp8_dispatch_packed_ue8m0_scales(buffer, column_major):
    """UE8M0 exponents packed four to an int32 travel as they are, in the caller's layout, uncached
    and cached. Random words include float NaN patterns, so a copy through float arithmetic shows."""
    x, topk_idx, _ = make_inputs()
    x_fp8 = x.float().to(torch.float8_e4m3fn)

    def packed_scales(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        words = torch.randint(-2**31, 2**31 - 1, (NUM_TOKENS, (NUM_SCALES + 3) // 4), dtype=torch.int32,
                              device="cuda", generator=g)
        if not column_major:
            return words
        # Built from a [scales, tokens] tensor, so the strides say column-major even for one column
        # (a [T, 1] .t().contiguous().t() keeps unit strides).
        return torch.empty((words.size(1), NUM_TOKENS), dtype=torch.int32, device="cuda").t().copy_(words)

    packed = packed_scales(1)
    (recv_x, recv_scales), _, _, _, handle, _ = buffer.dispatch((x_fp8, packed), topk_idx=topk_idx,
                                                                **layout_kwargs(buffer, topk_idx))
    assert recv_scales.dtype == torch.int32 and recv_scales.shape == packed.shape
    assert (recv_scales.stride(1) != 1) == column_major
    assert torch.equal(recv_scales, packed) and torch.equal(recv_x.view(torch.uint8), x_fp8.view(torch.uint8))
    fresh = packed_scales(2)
    (_, cached_scales), *_ = buffer.dispatch((x_fp8, fresh), handle=handle)
    assert cached_scales.dtype == torch.int32 and torch.equal(cached_scales, fresh)
    with pytest.raises(ValueError, match="x_scales: expected ceil"):
        buffer.dispatch((x_fp8, torch.zeros(NUM_TOKENS, NUM_SCALES, dtype=torch.int32, device="cuda")),
                        topk_idx=topk_idx, **layout_kwargs(buffer, topk_idx))


def test_async_and_comm_stream_allocation(buffer):
    x, topk_idx, _ = make_inputs()
    expected = layout_kwargs(buffer, topk_idx)
    *layout, event = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS, previous_event=buffer.capture(),
                                                async_finish=True, allocate_on_comm_stream=True)
    event.current_stream_wait()
    assert torch.equal(layout[0], expected["num_tokens_per_rank"])
    assert torch.equal(layout[2], expected["num_tokens_per_expert"])
    recv_x, _, _, _, handle, event = buffer.dispatch(
        x, topk_idx=topk_idx, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
        num_tokens_per_expert=layout[2], previous_event=event, async_finish=True)
    assert event.extra_tensors  # keeps the tensors the comm stream still uses alive
    with event:
        pass
    combined_x, _, event = buffer.combine(recv_x, handle, async_finish=True)
    event.current_stream_wait()
    assert torch.equal(combined_x, x)


def test_local_buffer_tensor(buffer):
    base = buffer.runtime.local_nvl_buffer()
    whole = buffer.get_local_buffer_tensor(torch.uint8)
    assert whole.numel() == buffer.num_nvl_bytes and whole.data_ptr() == base and whole.is_cuda
    view = buffer.get_local_buffer_tensor(torch.int32, (4, 8), offset=64)
    assert view.shape == (4, 8) and view.dtype == torch.int32 and view.data_ptr() == base + 64
    with pytest.raises(ValueError, match="num_nvl_bytes"):
        buffer.get_local_buffer_tensor(torch.int32, (buffer.num_nvl_bytes,))
    with pytest.raises(ValueError, match="offset"):
        buffer.get_local_buffer_tensor(torch.int32, offset=2)
    with pytest.raises(ValueError, match="num_rdma_bytes"):
        buffer.get_local_buffer_tensor(torch.int32, use_rdma_buffer=True)


def test_comm_stream(buffer):
    stream = buffer.get_comm_stream()
    assert isinstance(stream, torch.cuda.Stream)
    assert stream.cuda_stream == buffer.runtime.comm_stream()


def test_not_implemented(buffer, dispatched, monkeypatch):
    x, topk_idx, _, (recv_x, _, _, _, handle, _) = dispatched
    with pytest.raises(NotImplementedError, match="internode"):
        buffer.internode_dispatch(x, handle=handle)
    with pytest.raises(NotImplementedError, match="internode"):
        buffer.internode_combine(recv_x, handle)
    # MOELINK_EXPERIMENTAL_LOW_LATENCY=0 switches low-latency mode off, before any argument check.
    monkeypatch.setenv("MOELINK_EXPERIMENTAL_LOW_LATENCY", "0")
    for call in (lambda: buffer.low_latency_dispatch(x, topk_idx, 128, NUM_EXPERTS),
                 lambda: buffer.low_latency_combine(x, topk_idx, None, None),
                 lambda: buffer.get_next_low_latency_combine_buffer(None),
                 lambda: buffer.low_latency_update_mask_buffer(0),
                 lambda: buffer.low_latency_query_mask_buffer(None),
                 lambda: buffer.low_latency_clean_mask_buffer()):
        with pytest.raises(NotImplementedError, match="low-latency"):
            call()


# ---- get_dispatch_layout: bad input ------------------------------------------------------------------

def test_layout_topk_idx_wrong_dtype(buffer):
    _, topk_idx, _ = make_inputs()
    with pytest.raises(TypeError, match="topk_idx"):
        buffer.get_dispatch_layout(topk_idx.to(torch.int32), NUM_EXPERTS)


def test_layout_topk_idx_not_a_tensor(buffer):
    with pytest.raises(TypeError, match="topk_idx"):
        buffer.get_dispatch_layout([[0, 1]], NUM_EXPERTS)


@pytest.mark.parametrize("make_bad", [
    pytest.param(lambda t: t.flatten(), id="1-D"),
    pytest.param(lambda t: t.unsqueeze(0), id="3-D"),
    pytest.param(lambda t: t.cpu(), id="cpu"),
    pytest.param(lambda t: torch.cat([t, t], dim=1)[:, ::2], id="non-contiguous"),
])
def test_layout_topk_idx_bad_layout(buffer, make_bad):
    _, topk_idx, _ = make_inputs()
    with pytest.raises(ValueError, match="topk_idx"):
        buffer.get_dispatch_layout(make_bad(topk_idx), NUM_EXPERTS)


@pytest.mark.parametrize("num_experts, error", [(0, ValueError), (-NUM_EXPERTS, ValueError),
                                                (float(NUM_EXPERTS), TypeError), ("16", TypeError)])
def test_layout_bad_num_experts(buffer, num_experts, error):
    # Divisibility by the number of ranks cannot fail with one rank; tests/gpu multi-rank runs cover it.
    _, topk_idx, _ = make_inputs()
    with pytest.raises(error, match="num_experts"):
        buffer.get_dispatch_layout(topk_idx, num_experts)


def test_allocate_on_comm_stream_needs_previous_event(buffer):
    _, topk_idx, _ = make_inputs()
    with pytest.raises(ValueError, match="previous_event"):
        buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS, async_finish=True, allocate_on_comm_stream=True)
    with pytest.raises(ValueError, match="async_finish"):
        buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS, previous_event=buffer.capture(),
                                   allocate_on_comm_stream=True)


def test_previous_event_must_be_event_overlap(buffer):
    _, topk_idx, _ = make_inputs()
    with pytest.raises(TypeError, match="previous_event"):
        buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS, previous_event=torch.cuda.Event())


# ---- dispatch: bad input -----------------------------------------------------------------------------

def test_dispatch_x_wrong_dtype(buffer):
    x, topk_idx, _ = make_inputs()
    with pytest.raises(TypeError, match=r"\bx\b"):
        buffer.dispatch(x.float(), topk_idx=topk_idx, **layout_kwargs(buffer, topk_idx))


def test_dispatch_x_not_a_tensor(buffer):
    _, topk_idx, _ = make_inputs()
    with pytest.raises(TypeError, match=r"\bx\b"):
        buffer.dispatch([1.0], topk_idx=topk_idx, **layout_kwargs(buffer, topk_idx))


def test_dispatch_x_wrong_ndim(buffer):
    x, topk_idx, _ = make_inputs()
    with pytest.raises(ValueError, match=r"\bx\b"):
        buffer.dispatch(x.flatten(), topk_idx=topk_idx, **layout_kwargs(buffer, topk_idx))


def test_dispatch_scales_shape_mismatch(buffer):
    x, topk_idx, _ = make_inputs()
    x_fp8, _ = fp8_inputs(x, column_major=False)
    scales = torch.ones(NUM_TOKENS + 1, NUM_SCALES, device="cuda", dtype=torch.float32)
    with pytest.raises(ValueError, match="scales"):
        buffer.dispatch((x_fp8, scales), topk_idx=topk_idx, **layout_kwargs(buffer, topk_idx))


def test_dispatch_scales_wrong_dtype(buffer):
    x, topk_idx, _ = make_inputs()
    x_fp8, scales = fp8_inputs(x, column_major=False)
    with pytest.raises(TypeError, match="scales"):
        buffer.dispatch((x_fp8, scales.to(torch.bfloat16)), topk_idx=topk_idx, **layout_kwargs(buffer, topk_idx))


def test_dispatch_fp8_hidden_not_multiple_of_128(buffer):
    # Scales for the whole 128-blocks only, so the one thing wrong is x's hidden size.
    hidden = HIDDEN - 64
    _, topk_idx, _ = make_inputs()
    x_fp8 = torch.randn(NUM_TOKENS, hidden, device="cuda").to(torch.float8_e4m3fn)
    scales = torch.ones(NUM_TOKENS, hidden // 128, device="cuda", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"(?<![A-Za-z0-9_])x(?![A-Za-z0-9_])"):
        buffer.dispatch((x_fp8, scales), topk_idx=topk_idx, **layout_kwargs(buffer, topk_idx))


@pytest.mark.parametrize("num_scales", [NUM_SCALES - 1, NUM_SCALES + 1])
@pytest.mark.parametrize("column_major", [False, True])
def test_dispatch_scales_columns_mismatch(buffer, num_scales, column_major):
    x, topk_idx, _ = make_inputs()
    x_fp8, _ = fp8_inputs(x, column_major=False)
    scales = torch.ones(NUM_TOKENS, num_scales, device="cuda", dtype=torch.float32)
    if column_major:
        scales = scales.t().contiguous().t()
    with pytest.raises(ValueError, match="x_scales"):
        buffer.dispatch((x_fp8, scales), topk_idx=topk_idx, **layout_kwargs(buffer, topk_idx))


@pytest.mark.parametrize("missing", ["num_tokens_per_rank", "is_token_in_rank", "num_tokens_per_expert"])
def test_dispatch_missing_layout(buffer, missing):
    x, topk_idx, _ = make_inputs()
    kwargs = dict(layout_kwargs(buffer, topk_idx), topk_idx=topk_idx)
    kwargs[missing] = None
    with pytest.raises(ValueError, match=missing):
        buffer.dispatch(x, **kwargs)


def test_dispatch_weights_without_topk_idx(buffer):
    x, topk_idx, topk_weights = make_inputs()
    with pytest.raises(ValueError, match="topk_weights"):
        buffer.dispatch(x, topk_weights=topk_weights, **layout_kwargs(buffer, topk_idx))


def test_dispatch_without_topk_routes_by_is_token_in_rank(buffer):
    """deep_ep V1's first test case: layout tensors only. One rank receives every routed token
    (rows in token order), no top-k outputs, the per-expert list from num_tokens_per_expert."""
    x, topk_idx, _ = make_inputs()
    kwargs = layout_kwargs(buffer, topk_idx)
    recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, _ = buffer.dispatch(x, **kwargs)
    routed = torch.nonzero(kwargs["is_token_in_rank"][:, 0]).flatten()
    assert recv_topk_idx is None and recv_topk_weights is None
    assert torch.equal(recv_x.view(torch.int16), x[routed].view(torch.int16))
    assert per_expert == kwargs["num_tokens_per_expert"].tolist()
    assert torch.equal(handle[3].long(), routed)
    combined, weights, _ = buffer.combine(recv_x, handle)
    assert weights is None
    # One rank: each routed row comes back from one source, a sum of one term, so exactly.
    assert torch.equal(combined[routed].view(torch.int16), x[routed].view(torch.int16))


def test_dispatch_topk_weights_shape_mismatch(buffer):
    x, topk_idx, topk_weights = make_inputs()
    with pytest.raises(ValueError, match="topk_weights"):
        buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights[:, :2].contiguous(),
                        **layout_kwargs(buffer, topk_idx))


def test_dispatch_config_wrong_type(buffer):
    x, topk_idx, _ = make_inputs()
    with pytest.raises(TypeError, match="config"):
        buffer.dispatch(x, topk_idx=topk_idx, config=(20, 6, 256), **layout_kwargs(buffer, topk_idx))


def test_cached_dispatch_rejects_routing_arguments(buffer, dispatched):
    x, topk_idx, _, (_, _, _, _, handle, _) = dispatched
    with pytest.raises(ValueError, match="topk_idx"):
        buffer.dispatch(x, handle=handle, topk_idx=topk_idx)


@pytest.mark.parametrize("make_bad, error", [
    pytest.param(lambda h: h[:3], ValueError, id="short"),
    pytest.param(lambda h: list(h) + [None], ValueError, id="long"),
    pytest.param(lambda h: "handle", ValueError, id="not-a-tuple"),
    pytest.param(lambda h: ("a",) + tuple(h[1:]), TypeError, id="not-tensors"),
])
def test_malformed_handle(buffer, dispatched, make_bad, error):
    x, _, _, (recv_x, _, _, _, handle, _) = dispatched
    with pytest.raises(error, match="handle"):
        buffer.dispatch(x, handle=make_bad(handle))
    with pytest.raises(error, match="handle"):
        buffer.combine(recv_x, make_bad(handle))


def test_handle_with_other_num_sms(buffer, dispatched):
    x, _, _, (recv_x, _, _, _, handle, _) = dispatched
    config = moelink.Config(OTHER_NUM_SMS, 6, 256)
    with pytest.raises(ValueError, match="num_sms"):
        buffer.dispatch(x, handle=handle, config=config)
    with pytest.raises(ValueError, match="num_sms"):
        buffer.combine(recv_x, handle, config=config)


# ---- combine: bad input ------------------------------------------------------------------------------

def test_combine_x_wrong_dtype(buffer, dispatched):
    _, _, _, (recv_x, _, _, _, handle, _) = dispatched
    with pytest.raises(TypeError, match=r"\bx\b"):
        buffer.combine(recv_x.float(), handle)


def test_combine_x_wrong_rows(buffer, dispatched):
    _, _, _, (recv_x, _, _, _, handle, _) = dispatched
    with pytest.raises(ValueError, match=r"\bx\b"):
        buffer.combine(recv_x[1:].contiguous(), handle)


def test_combine_hidden_differs_from_dispatch(buffer, dispatched):
    _, _, _, (recv_x, _, _, _, handle, _) = dispatched
    other = torch.randn(recv_x.size(0), HIDDEN // 2, device="cuda").to(torch.bfloat16)
    with pytest.raises(ValueError, match="hidden"):
        buffer.combine(other, handle)


def test_usable_after_value_errors(buffer):
    # Every error above left the module's Buffer usable: a full round is still exact.
    x, topk_idx, topk_weights = make_inputs(NUM_TOKENS // 2)
    x_fp8, scales = fp8_inputs(x, column_major=False)
    with pytest.raises(ValueError, match="x_scales"):
        buffer.dispatch((x_fp8, scales[:, :1].contiguous()), topk_idx=topk_idx, **layout_kwargs(buffer, topk_idx))
    recv_x, _, recv_topk_weights, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights,
                                                                 **layout_kwargs(buffer, topk_idx))
    assert torch.equal(recv_x, x)
    assert torch.equal(buffer.dispatch(x, handle=handle)[0], x)
    combined_x, combined_topk_weights, _ = buffer.combine(recv_x, handle, topk_weights=recv_topk_weights)
    assert torch.equal(combined_x, x)
    assert torch.allclose(combined_topk_weights, topk_weights)


@pytest.mark.parametrize("make_bias, error", [
    pytest.param(lambda x: (x, x, x), ValueError, id="three"),
    pytest.param(lambda x: "bias", TypeError, id="string"),
    pytest.param(lambda x: (x, 1.0), TypeError, id="not-a-tensor"),
    pytest.param(lambda x: x[:, :HIDDEN // 2].contiguous(), ValueError, id="wrong-shape"),
])
def test_combine_bad_bias(buffer, dispatched, make_bias, error):
    x, _, _, (recv_x, _, _, _, handle, _) = dispatched
    with pytest.raises(error, match="bias"):
        buffer.combine(recv_x, handle, bias=make_bias(x))


# ---- buffers that end broken or destroyed (each test has its own) ------------------------------------

def test_buffer_too_small(group):
    buf = moelink.Buffer(group, num_nvl_bytes=1024, explicitly_destroy=True)
    try:
        x, topk_idx, _ = make_inputs()
        with pytest.raises(ValueError, match="num_nvl_bytes"):
            buf.dispatch(x, topk_idx=topk_idx, **layout_kwargs(buf, topk_idx))
    finally:
        buf.destroy()


def test_use_after_destroy(group):
    buf = moelink.Buffer(group, num_nvl_bytes=_nvl_bytes(), explicitly_destroy=True)
    x, topk_idx, _ = make_inputs()
    layout = layout_kwargs(buf, topk_idx)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, topk_idx=topk_idx, **layout)
    torch.cuda.synchronize()
    buf.destroy()
    buf.destroy()  # idempotent
    with pytest.raises(RuntimeError):
        buf.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    with pytest.raises(RuntimeError):
        buf.dispatch(x, topk_idx=topk_idx, **layout)
    with pytest.raises(RuntimeError):
        buf.dispatch(x, handle=handle)
    with pytest.raises(RuntimeError):
        buf.combine(recv_x, handle)
    with pytest.raises(RuntimeError):
        buf.get_local_buffer_tensor(torch.uint8)
    # The runtime itself refuses too (not only the Python guard).
    order = (torch.cuda.current_stream().cuda_stream, None, False, False)
    with pytest.raises(RuntimeError):
        buf.runtime.get_dispatch_layout(_ref(topk_idx), NUM_EXPERTS, _ref(layout["num_tokens_per_rank"]), None,
                                        _ref(layout["num_tokens_per_expert"]), _ref(layout["is_token_in_rank"]),
                                        order)


def test_out_of_range_expert_ids(group):
    # The runtime may only see bad ids once the layout kernel ran: it reports them at the latest at
    # the next operation or at dispatch's host wait.
    buf = moelink.Buffer(group, num_nvl_bytes=_nvl_bytes(), explicitly_destroy=True)
    try:
        x, topk_idx, _ = make_inputs()
        topk_idx[3, 1] = NUM_EXPERTS + 3
        with pytest.raises(ValueError, match="topk_idx"):
            layout = layout_kwargs(buf, topk_idx)
            torch.cuda.synchronize()
            buf.dispatch(x, topk_idx=topk_idx, **layout)
    finally:
        try:
            buf.destroy()
        except (ValueError, RuntimeError, TimeoutError):
            pass  # the closing barrier may report the same failure again


def test_event_handle_records_on_the_current_stream():
    """deep_ep.utils.EventHandle(): an event on the current torch stream, which another stream can wait for."""
    side = torch.cuda.Stream()
    x = torch.zeros(1, device="cuda")
    with torch.cuda.stream(side):
        torch.cuda._sleep(int(5e7))  # long enough that a missing wait would read 0
        x.fill_(1.0)
        handle = moelink.EventHandle()
    assert isinstance(handle, moelink._moelink.EventHandle) and handle.valid
    handle.current_stream_wait()
    assert x.item() == 1.0, "the current stream did not wait for the event recorded on the side stream"
    # As Megatron passes it: EventOverlap(EventHandle()) as previous_event.
    assert moelink.EventOverlap(moelink.EventHandle()).event.valid


def test_check_nvlink_connections_one_rank(group):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NVML may be missing on the test host
        moelink.check_nvlink_connections(group)
