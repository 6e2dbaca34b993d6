"""Low-latency mode (deep_ep V1's low_latency_*): dispatch to an expert-major receive layout and a
weighted combine, each one launch with no host wait (or a send and a receive hook), CUDA-graph safe.

Within one NVLink domain the RDMA buffer (``num_rdma_bytes``) is carved from the IPC-shared memory
and NVSHMEM is not used. MOELINK_EXPERIMENTAL_LOW_LATENCY=0 switches the operations off
(docs/KNOBS.md); the size hint always works.
"""

from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple

import torch

from . import _knobs, _moelink
from ._checks import _check_bool, _check_int, _check_tensor
from ._streams import _current_raw_stream, warn_local_errors
from .event import EventOverlap

if TYPE_CHECKING:
    from .buffer import Buffer

_NOT_VALIDATED = ("low-latency mode is switched off (MOELINK_EXPERIMENTAL_LOW_LATENCY=0); unset it or set it to 1")
_PHASE_BOTH, _PHASE_SEND, _PHASE_RECEIVE = 0, 1, 2
FP8_BLOCK = 128
UE8M0_PER_INT = 4


def rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    return _moelink.Buffer.low_latency_rdma_size_hint(
        _check_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1),
        _check_int(hidden, "hidden", 1), _check_int(num_ranks, "num_ranks", 1), _check_int(num_experts, "num_experts", 1))


def _require_enabled() -> None:
    if not _knobs.experimental_low_latency():
        raise NotImplementedError(_NOT_VALIDATED)


def _order(buf: "Buffer", async_finish: bool) -> tuple:
    return (_current_raw_stream(buf._device), None, async_finish, False)


def _column_major(rows: int, columns: int, num_local_experts: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[E_local, rows, columns] whose last two dims are column-major (what fp8 grouped GEMMs read)."""
    return torch.empty((num_local_experts, columns, rows), dtype=dtype, device=device).transpose(1, 2)


class LowLatencyHandle(tuple):
    """deep_ep V1's handle (src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden,
    num_experts); a plain tuple to anyone who unpacks it. ``state`` keeps the dispatch's state tensor,
    from which (with enable_shrink) the combine learns which ranks the dispatch skipped."""

    state: Optional[torch.Tensor] = None
    # Set by dispatch: the entries are the tensors and ints it made, so combine's express call may
    # take them without _unpack_handle's checks.
    _from_dispatch: bool = False


def dispatch(buf: "Buffer", x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor],
             dispatch_wait_recv_cost_stats: Optional[torch.Tensor], use_fp8: bool, round_scale: bool,
             use_ue8m0: bool, async_finish: bool, return_recv_hook: bool
             ) -> Tuple[Any, torch.Tensor, tuple, EventOverlap, Callable]:
    m = num_max_dispatch_tokens_per_rank
    if (buf._express and not buf._destroyed and type(m) is int and m >= 1 and type(num_experts) is int
            and num_experts >= 1 and type(use_fp8) is bool and type(round_scale) is bool and type(use_ue8m0) is bool
            and type(async_finish) is bool and type(return_recv_hook) is bool
            and not (async_finish and return_recv_hook) and _knobs.experimental_low_latency()):
        # One extension call that makes the outputs and launches (the normal mode's express calls,
        # _intranode.py); None, having done nothing, where an argument needs the checks below.
        result = buf.runtime.low_latency_dispatch_express(
            x, topk_idx, m, num_experts, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8,
            round_scale, use_ue8m0, _PHASE_SEND if return_recv_hook else _PHASE_BOTH, _current_raw_stream(buf._device),
            async_finish)
        if result is not None:
            event, recv_x, scales, recv_count, src_info, layout_range, state, errors = result
            if errors:
                warn_local_errors(buf, errors)
            refs = (x, topk_idx, m, num_experts, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats,
                    use_fp8, round_scale, use_ue8m0, recv_x, scales, recv_count, src_info, layout_range, state)
            return _dispatch_result(buf, refs, event, async_finish, return_recv_hook)
    buf._check_usable("low_latency_dispatch")
    _require_enabled()
    _check_tensor(x, "x")
    _check_tensor(topk_idx, "topk_idx")
    _check_tensor(cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats", optional=True)
    _check_tensor(dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats", optional=True)
    m = _check_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1)
    num_experts = _check_int(num_experts, "num_experts", 1)
    use_fp8, round_scale, use_ue8m0 = (_check_bool(v, n) for v, n in ((use_fp8, "use_fp8"),
                                                                      (round_scale, "round_scale"),
                                                                      (use_ue8m0, "use_ue8m0")))
    async_finish = _check_bool(async_finish, "async_finish")
    return_recv_hook = _check_bool(return_recv_hook, "return_recv_hook")
    if async_finish and return_recv_hook:
        raise ValueError("async_finish and return_recv_hook cannot both be set")
    if x.dim() != 2:
        raise ValueError(f"x must be [num_tokens, hidden], got shape {tuple(x.shape)}")
    num_ranks, device, hidden = buf.group_size, buf._device, x.size(1)
    if num_experts % num_ranks:
        raise ValueError(f"num_experts must be a multiple of the number of ranks ({num_ranks}), got {num_experts}")
    num_local_experts, rows = num_experts // num_ranks, num_ranks * m
    if use_fp8:
        recv_x = torch.empty((num_local_experts, rows, hidden), dtype=torch.float8_e4m3fn, device=device)
        columns = hidden // FP8_BLOCK // (UE8M0_PER_INT if use_ue8m0 else 1)
        scales = _column_major(rows, columns, num_local_experts, torch.int32 if use_ue8m0 else torch.float32, device)
    else:
        recv_x = torch.empty((num_local_experts, rows, hidden), dtype=torch.bfloat16, device=device)
        scales = None
    recv_count = torch.empty((num_local_experts,), dtype=torch.int32, device=device)
    src_info = torch.empty((num_local_experts, rows), dtype=torch.int32, device=device)
    layout_range = torch.empty((num_local_experts, num_ranks), dtype=torch.int64, device=device)
    state = torch.empty((2,), dtype=torch.int64, device=device)  # written by the kernel (ll_state)
    # Tensors go to the extension as they are (it reads their attributes): the hook reuses them.
    refs = (x, topk_idx, m, num_experts, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8,
            round_scale, use_ue8m0, recv_x, scales, recv_count, src_info, layout_range, state)
    event = buf.runtime.low_latency_dispatch(*refs, _PHASE_SEND if return_recv_hook else _PHASE_BOTH,
                                             _order(buf, async_finish))
    warn_local_errors(buf)
    return _dispatch_result(buf, refs, event, async_finish, return_recv_hook)


def _dispatch_result(buf: "Buffer", refs: tuple, event: Any, async_finish: bool, return_recv_hook: bool
                     ) -> Tuple[Any, torch.Tensor, tuple, EventOverlap, Callable]:
    """dispatch's 5-tuple from the extension call's arguments (`refs`, which the hook passes again)."""
    x, topk_idx, m, num_experts, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8, _, _, \
        recv_x, scales, recv_count, src_info, layout_range, state = refs
    hidden = x.size(1)
    keep = (x, topk_idx, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, recv_x, scales,
            recv_count, src_info, layout_range, state)
    if return_recv_hook:
        keep_alive = list(keep)

        def hook() -> None:
            buf._check_usable("the low-latency dispatch hook")
            buf.runtime.low_latency_dispatch(*refs, _PHASE_RECEIVE, _order(buf, False))
            warn_local_errors(buf)
            del keep_alive[:]  # the receive is queued on the caller's stream, which now holds them
    else:
        hook = _no_hook
    handle = LowLatencyHandle((src_info, layout_range, m, hidden, num_experts))
    handle.state = state
    handle._from_dispatch = True
    return ((recv_x, scales) if use_fp8 else recv_x, recv_count, handle,
            EventOverlap(event, extra_tensors=keep if async_finish else None), hook)


def _no_hook() -> None:
    """What return_recv_hook=False returns: nothing is left to receive."""


def _unpack_handle(handle: Any) -> Tuple[torch.Tensor, torch.Tensor, int, int, int]:
    if not isinstance(handle, (tuple, list)) or len(handle) != 5:
        raise ValueError("handle must be the 5-tuple low_latency_dispatch returned")
    src_info, layout_range, m, hidden, num_experts = handle
    _check_tensor(src_info, "handle[0] (src_info)")
    _check_tensor(layout_range, "handle[1] (layout_range)")
    return src_info, layout_range, _check_int(m, "handle[2]"), _check_int(hidden, "handle[3]"), \
        _check_int(num_experts, "handle[4]")


def combine(buf: "Buffer", x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: tuple,
            use_logfmt: bool, zero_copy: bool, async_finish: bool, return_recv_hook: bool,
            out: Optional[torch.Tensor], combine_wait_recv_cost_stats: Optional[torch.Tensor]
            ) -> Tuple[torch.Tensor, EventOverlap, Callable]:
    if (buf._express and not buf._destroyed and type(handle) is LowLatencyHandle and handle._from_dispatch
            and type(use_logfmt) is bool and type(zero_copy) is bool and type(async_finish) is bool
            and type(return_recv_hook) is bool and not (async_finish and return_recv_hook)
            and _knobs.experimental_low_latency()):
        src_info, layout_range, m, hidden, num_experts = handle
        dispatch_state = handle.state
        result = buf.runtime.low_latency_combine_express(
            x, topk_idx, topk_weights, src_info, layout_range, m, hidden, num_experts, combine_wait_recv_cost_stats, out,
            _PHASE_SEND if return_recv_hook else _PHASE_BOTH, _current_raw_stream(buf._device), async_finish,
            dispatch_state, use_logfmt)
        if result is not None:
            event, out, state, errors = result
            if errors:
                warn_local_errors(buf, errors)
            refs = (x, topk_idx, topk_weights, src_info, layout_range, m, num_experts, combine_wait_recv_cost_stats,
                    out, state)
            return _combine_result(buf, refs, event, dispatch_state, use_logfmt, async_finish, return_recv_hook)
    buf._check_usable("low_latency_combine")
    _require_enabled()
    for name, value in (("x", x), ("topk_idx", topk_idx), ("topk_weights", topk_weights)):
        _check_tensor(value, name)
    _check_tensor(out, "out", optional=True)
    _check_tensor(combine_wait_recv_cost_stats, "combine_wait_recv_cost_stats", optional=True)
    use_logfmt = _check_bool(use_logfmt, "use_logfmt")
    _check_bool(zero_copy, "zero_copy")  # x is read where it is, in the zero-copy buffer or not
    async_finish = _check_bool(async_finish, "async_finish")
    return_recv_hook = _check_bool(return_recv_hook, "return_recv_hook")
    if async_finish and return_recv_hook:
        raise ValueError("async_finish and return_recv_hook cannot both be set")
    src_info, layout_range, m, hidden, num_experts = _unpack_handle(handle)
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must be [num_tokens, num_topk], got shape {tuple(topk_idx.shape)}")
    if out is None:
        out = torch.empty((topk_idx.size(0), hidden), dtype=torch.bfloat16, device=buf._device)
    state = torch.empty((2,), dtype=torch.int64, device=buf._device)
    refs = (x, topk_idx, topk_weights, src_info, layout_range, m, num_experts, combine_wait_recv_cost_stats, out, state)
    dispatch_state = getattr(handle, "state", None)
    event = buf.runtime.low_latency_combine(*refs, _PHASE_SEND if return_recv_hook else _PHASE_BOTH,
                                            _order(buf, async_finish), dispatch_state, use_logfmt)
    warn_local_errors(buf)
    return _combine_result(buf, refs, event, dispatch_state, use_logfmt, async_finish, return_recv_hook)


def _combine_result(buf: "Buffer", refs: tuple, event: Any, dispatch_state: Optional[torch.Tensor], use_logfmt: bool,
                    async_finish: bool, return_recv_hook: bool) -> Tuple[torch.Tensor, EventOverlap, Callable]:
    """combine's 3-tuple from the extension call's arguments (`refs`, which the hook passes again)."""
    x, topk_idx, topk_weights, src_info, layout_range, _, _, combine_wait_recv_cost_stats, out, state = refs
    buf._low_latency_combines += 1
    keep = (x, topk_idx, topk_weights, src_info, layout_range, combine_wait_recv_cost_stats, out, state, dispatch_state)
    if return_recv_hook:
        keep_alive = list(keep)

        def hook() -> None:
            buf._check_usable("the low-latency combine hook")
            buf.runtime.low_latency_combine(*refs, _PHASE_RECEIVE, _order(buf, False), dispatch_state, use_logfmt)
            warn_local_errors(buf)
            del keep_alive[:]
    else:
        hook = _no_hook
    return out, EventOverlap(event, extra_tensors=keep if async_finish else None), hook


def next_combine_buffer(buf: "Buffer", handle: tuple) -> torch.Tensor:
    """[E_local, R * M, H] bf16 in this rank's low-latency region: write the experts' outputs here
    and pass it to low_latency_combine (zero_copy=True is then free). Consecutive combines alternate
    between two such areas, so one combine's input is not the next one's."""
    buf._check_usable("get_next_low_latency_combine_buffer")
    _require_enabled()
    _, _, m, hidden, num_experts = _unpack_handle(handle)
    num_local_experts = num_experts // buf.group_size
    address = buf.runtime.low_latency_combine_buffer(m, hidden, num_experts, buf._low_latency_combines & 1)
    base = buf.runtime.local_rdma_buffer()
    raw = torch.from_dlpack(buf.runtime.local_buffer_dlpack(True))
    size = num_local_experts * buf.group_size * m * hidden * 2
    view = raw[address - base:address - base + size].view(torch.bfloat16)
    return view.view(num_local_experts, buf.group_size * m, hidden)


def clean_buffer(buf: "Buffer", num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
    """Zeroes this rank's signal words for the layout, between two barriers (collective, as deep_ep's).
    Signals carry their call's number, so calls of one layout never need it; a new expert count does."""
    buf._check_usable("clean_low_latency_buffer")
    rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, buf.group_size, num_experts)
    buf.runtime.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)


def update_mask_buffer(buf: "Buffer", rank_to_mask: int, mask: bool) -> None:
    _require_enabled()
    buf._check_usable("low_latency_update_mask_buffer")
    rank_to_mask = _check_int(rank_to_mask, "rank_to_mask", 0)
    buf.runtime.low_latency_update_mask(rank_to_mask, _check_bool(mask, "mask"), _order(buf, False))


def query_mask_buffer(buf: "Buffer", mask_status: torch.Tensor) -> None:
    _require_enabled()
    buf._check_usable("low_latency_query_mask_buffer")
    _check_tensor(mask_status, "mask_status")
    buf.runtime.low_latency_query_mask(mask_status, _order(buf, False))


def clean_mask_buffer(buf: "Buffer") -> None:
    _require_enabled()
    buf._check_usable("low_latency_clean_mask_buffer")
    buf.runtime.low_latency_clean_mask(_order(buf, False))
