"""Intranode normal mode (all ranks in one NVLink domain): the bodies of Buffer's layout, dispatch
and combine. Each takes the Buffer it runs on; Buffer keeps the documented signatures."""

from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple, Union

import torch

from . import _moelink
from ._arena import alloc_dispatch_outputs
from ._checks import _check_config, _check_dim, _check_int, _check_tensor, _split_bias, _split_x
from ._moelink import Config
from ._streams import _OpStreams, _current_raw_stream, warn_local_errors
from .event import EventOverlap

if TYPE_CHECKING:
    from .buffer import Buffer

class DispatchHandle(tuple):
    """What a dispatch returns as ``handle``: deep_ep V1's 6-tuple (rank_prefix_matrix,
    channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, info) -- a
    plain tuple to anyone who indexes or unpacks it. ``info`` (int64 [2], written on the device) is
    the dispatch's id, the same on every rank, and whether it failed; later operations check it on
    the device, so a handle from another dispatch, or from a failed one, is refused on every rank.
    ``hidden`` is the dispatch's hidden size (0 when the handle was rebuilt as a plain tuple)."""

    hidden: int
    # Set by dispatch on the handles it returns: their entries are known to be the tensors
    # _unpack_handle checks, so it skips those checks. A handle built any other way (the class can
    # be imported) is checked in full.
    _from_dispatch: bool = False
    # What the extension read of the tensors when the dispatch made them (an opaque HandleRefs), so
    # that a cached dispatch and a combine need not read them again; None when made another way.
    _refs: Any = None

    def __new__(cls, items: Sequence[Any], hidden: int) -> "DispatchHandle":
        handle = super().__new__(cls, items)
        handle.hidden = hidden
        return handle


def default_config(buf: "Buffer", which: str) -> Config:
    """The preset for this many ranks at Buffer.num_sms SMs, lowered to what lets every rank
    sharing this GPU be resident at once (the ranks wait for each other, so they must be). Kept per
    Buffer and num_sms: an operation that makes it afresh pays two extension calls on the host path
    the GPU waits for. Only the runtime ever sees it, so sharing one object is safe."""
    num_sms = type(buf).num_sms
    cache = buf.__dict__.setdefault("_default_configs", {})
    config = cache.get((which, num_sms))
    if config is None:
        preset = getattr(_moelink, f"default_{which}_config")
        config = cache[(which, num_sms)] = preset(buf.group_size, max(2, min(num_sms, buf.runtime.max_num_sms())))
    return config


def get_dispatch_layout(buf: "Buffer", topk_idx: torch.Tensor, num_experts: int,
                        previous_event: Optional[EventOverlap], async_finish: bool, allocate_on_comm_stream: bool
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
    buf._check_usable("get_dispatch_layout")
    _check_tensor(topk_idx, "topk_idx")
    num_experts = _check_int(num_experts, "num_experts")
    if num_experts <= 0 or num_experts % buf.group_size != 0:
        raise ValueError(f"num_experts must be > 0 and a multiple of the number of ranks ({buf.group_size}), "
                         f"got {num_experts}")
    streams = _OpStreams(buf, previous_event, async_finish, allocate_on_comm_stream)
    num_rdma_ranks = buf._topology.num_rdma_ranks
    if not streams.allocate_on_comm_stream:
        # The extension allocates the outputs (torch.empty on the current stream) and launches.
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
            buf.runtime.get_dispatch_layout_alloc(topk_idx, num_experts, num_rdma_ranks, streams.order)
    else:
        num_tokens = topk_idx.size(0) if topk_idx.dim() >= 1 else 0
        with streams.allocating():
            num_tokens_per_rank = torch.empty((buf.group_size,), dtype=torch.int32, device=buf._device)
            num_tokens_per_rdma_rank = (torch.empty((num_rdma_ranks,), dtype=torch.int32, device=buf._device)
                                        if num_rdma_ranks > 1 else None)
            num_tokens_per_expert = torch.empty((num_experts,), dtype=torch.int32, device=buf._device)
            is_token_in_rank = torch.empty((num_tokens, buf.group_size), dtype=torch.bool, device=buf._device)
        # Tensors go to the extension as they are: it reads their attributes itself (no TRef tuples).
        event = buf.runtime.get_dispatch_layout(topk_idx, num_experts, num_tokens_per_rank, num_tokens_per_rdma_rank,
                                                num_tokens_per_expert, is_token_in_rank, streams.order)
    outputs = (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank)
    if not streams.keeps_tensors():
        return (*outputs, streams.finish_joined(event))
    return (*outputs, streams.finish(event, [topk_idx], outputs))


def dispatch(buf: "Buffer", x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
             handle: Optional[DispatchHandle], num_tokens_per_rank: Optional[torch.Tensor],
             num_tokens_per_rdma_rank: Optional[torch.Tensor], is_token_in_rank: Optional[torch.Tensor],
             num_tokens_per_expert: Optional[torch.Tensor], topk_idx: Optional[torch.Tensor],
             topk_weights: Optional[torch.Tensor], expert_alignment: int, num_worst_tokens: int,
             config: Optional[Config], previous_event: Optional[EventOverlap], async_finish: bool,
             allocate_on_comm_stream: bool
             ) -> Tuple[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], Optional[torch.Tensor],
                        Optional[torch.Tensor], Optional[List[int]], DispatchHandle, EventOverlap]:
    if (buf._express and (config is None or type(config) is Config) and previous_event is None
            and async_finish is False and allocate_on_comm_stream is False and num_tokens_per_rdma_rank is None
            and type(expert_alignment) is int and expert_alignment >= 1 and type(num_worst_tokens) is int
            and num_worst_tokens >= 0 and not buf._destroyed and not buf.num_arena_bytes
            and buf._topology.num_rdma_ranks == 1):
        # The default call, the one frameworks make, in one extension call (express): up to the
        # kernel's launch this is host time the GPU waits for, cold after every barrier, and each
        # frame the full path below runs is part of it. The extension answers None, having done
        # nothing, where an argument needs the checks below.
        stream = _current_raw_stream(buf._device)
        if config is None:
            config = default_config(buf, "dispatch")
        if handle is None:
            result = buf.runtime.intranode_dispatch_uncached_express(
                x, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert,
                expert_alignment, num_worst_tokens, config, stream)
            if result is not None:
                event, num_recv_tokens_per_expert_list, recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, \
                    rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, info, refs, \
                    hidden, errors = result
                handle = DispatchHandle((rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix,
                                         recv_src_idx, is_token_in_rank, info), hidden)
                handle._from_dispatch = True
                handle._refs = refs
                if errors:
                    warn_local_errors(buf, errors)
                return ((recv_x, recv_x_scales) if recv_x_scales is not None else recv_x, recv_topk_idx,
                        recv_topk_weights, num_recv_tokens_per_expert_list, handle, EventOverlap(event))
        elif (type(handle) is DispatchHandle and handle._refs is not None and num_tokens_per_rank is None
              and is_token_in_rank is None and num_tokens_per_expert is None and topk_idx is None
              and topk_weights is None):
            result = buf.runtime.intranode_dispatch_express(x, handle._refs, config, stream)
            if result is not None:
                event, recv_x, recv_x_scales, errors = result
                if errors:
                    warn_local_errors(buf, errors)
                return ((recv_x, recv_x_scales) if recv_x_scales is not None else recv_x, None, None, None, handle,
                        EventOverlap(event))
    buf._check_usable("dispatch")
    if buf._topology.num_rdma_ranks > 1:
        # Internode mode runs on Buffers of its own; this one's kernels take no part (nor abstain).
        return buf.internode_dispatch(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                                      num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
                                      num_worst_tokens, config, previous_event, async_finish,
                                      allocate_on_comm_stream)
    # A lost peer first, as the runtime raises it on entry: a broken Buffer says so before any
    # check of this call's arguments. A pending data error is raised by the runtime at the end of
    # the call, after its launches, not here: a rank whose host has seen the record would open
    # nothing while its peers, whose hosts had not, open the operation and wait for it.
    runtime = buf.runtime
    runtime.check_faults()
    # When the checks reject the arguments on this rank, it still opens the operation with that
    # verdict (abstain), so its peers skip it and raise instead of waiting for it; the runtime does
    # the same for its own checks. They are inline, not in a context manager or a helper per
    # argument: up to the kernel's launch this is host time the GPU waits for (an uncached dispatch
    # blocks on its counts), and those calls were half of it.
    try:
        x, x_scales = _split_x(x)
        config = default_config(buf, "dispatch") if config is None else _check_config(config)
        expert_alignment = _check_int(expert_alignment, "expert_alignment", 1)
        num_worst_tokens = _check_int(num_worst_tokens, "num_worst_tokens", 0)
        routing = (num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                   topk_weights)
        for name, value in zip(_ROUTING_ARGS, routing):
            if value is not None and not isinstance(value, torch.Tensor):
                _check_tensor(value, name, optional=True)
        if x.dim() != 2:
            _check_dim(x, "x", 2)
        hidden = x.size(1)
        if x_scales is not None and x_scales.dim() != 2:
            _check_dim(x_scales, "x_scales", 2)

        if handle is not None:
            for name, value in zip(_ROUTING_ARGS, routing):
                if value is not None:
                    raise ValueError(f"dispatch with a handle (cached mode) repeats the handle's routing; "
                                     f"{name} must be None")
            parts = _unpack_handle(handle, config, "dispatch")
        else:
            # Without top-k, rows are routed by is_token_in_rank alone (deep_ep V1 allows it).
            if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
                name = ("num_tokens_per_rank" if num_tokens_per_rank is None else
                        "is_token_in_rank" if is_token_in_rank is None else "num_tokens_per_expert")
                raise ValueError(f"dispatch without a handle needs {name} (see get_dispatch_layout)")
            if topk_weights is not None and topk_idx is None:
                raise ValueError("dispatch: topk_weights given without topk_idx")
            if topk_idx is not None and topk_idx.dim() != 2:
                _check_dim(topk_idx, "topk_idx", 2)
            streams = _OpStreams(buf, previous_event, async_finish, allocate_on_comm_stream)
    except (TypeError, ValueError):
        runtime.abstain()
        raise
    if handle is not None:
        return _cached_dispatch(buf, x, x_scales, hidden, parts, handle, config, previous_event, async_finish,
                                allocate_on_comm_stream)

    num_experts = num_tokens_per_expert.numel()
    if not buf.num_arena_bytes and not streams.allocate_on_comm_stream:
        # Notify, the handle's tensors, the host wait, the outputs (torch.empty, called by the
        # extension) and the dispatch kernel in one call: up to the kernel's launch this is host
        # time the GPU waits for.
        event, num_recv_tokens_per_expert_list, recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, \
            rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, info, refs = \
            runtime.intranode_dispatch_uncached(x, x_scales, topk_idx, topk_weights, is_token_in_rank,
                                                num_tokens_per_rank, num_tokens_per_expert, num_experts,
                                                expert_alignment, num_worst_tokens, config, streams.order)
    else:
        refs = None
        event, num_recv_tokens_per_expert_list, recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, \
            rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, info = \
            _dispatch_uncached_python(buf, runtime, streams, x, x_scales, hidden, topk_idx, topk_weights,
                                      is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, num_experts,
                                      expert_alignment, num_worst_tokens, config)

    handle = DispatchHandle((rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
                             is_token_in_rank, info), hidden)
    handle._from_dispatch = True
    handle._refs = refs  # the extension's reading of its tensors, for a cached dispatch and combine
    if streams.keeps_tensors():
        inputs = (x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert)
        outputs = (rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, info, recv_x,
                   recv_x_scales, recv_topk_idx, recv_topk_weights)
        event_overlap = streams.finish(event, inputs, outputs)
    else:
        event_overlap = streams.finish_joined(event)
    return ((recv_x, recv_x_scales) if x_scales is not None else recv_x, recv_topk_idx, recv_topk_weights,
            num_recv_tokens_per_expert_list, handle, event_overlap)


def _dispatch_uncached_python(buf: "Buffer", runtime: Any, streams: _OpStreams, x: torch.Tensor,
                              x_scales: Optional[torch.Tensor], hidden: int, topk_idx: Optional[torch.Tensor],
                              topk_weights: Optional[torch.Tensor], is_token_in_rank: torch.Tensor,
                              num_tokens_per_rank: torch.Tensor, num_tokens_per_expert: torch.Tensor,
                              num_experts: int, expert_alignment: int, num_worst_tokens: int, config: Config
                              ) -> tuple:
    """intranode_dispatch_uncached's steps in Python, for outputs in the receive arena or on the comm
    stream (the extension allocates only with torch.empty on the current stream); the same tuple."""
    runtime.intranode_notify_launch(x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_rank,
                                    num_tokens_per_expert, num_experts, expert_alignment, num_worst_tokens, config,
                                    streams.order)
    # What needs no counts is done while the notify runs and waits for the slowest peer. The
    # dispatch kernel fills the handle's tensors from the notify's results.
    num_channels = config.num_sms // 2
    num_ranks, device = buf.group_size, buf._device
    allocating = streams.allocating()  # entered twice: here, and for the outputs after the wait
    with allocating:
        rank_prefix_matrix = torch.empty((num_ranks, num_ranks), dtype=torch.int32, device=device)
        channel_prefix_matrix = torch.empty((num_ranks, num_channels), dtype=torch.int32, device=device)
        recv_channel_prefix_matrix = torch.empty((num_ranks, num_channels), dtype=torch.int32, device=device)
        info = torch.empty((2,), dtype=torch.int64, device=device)
    num_topk = topk_idx.size(1) if topk_idx is not None else 0
    num_recv_tokens, num_recv_tokens_per_expert_list = runtime.intranode_notify_wait()
    with allocating:
        recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx = alloc_dispatch_outputs(
            buf, x, x_scales, hidden, num_recv_tokens, num_topk, topk_weights is not None, with_src_idx=True,
            stream=streams.allocation_stream())
    event = runtime.intranode_dispatch(
        x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_experts, expert_alignment, num_worst_tokens,
        rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, info, recv_x,
        recv_x_scales, recv_topk_idx, recv_topk_weights, config, streams.order, False)
    return (event, num_recv_tokens_per_expert_list, recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights,
            rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, info)


_ROUTING_ARGS = ("num_tokens_per_rank", "num_tokens_per_rdma_rank", "is_token_in_rank", "num_tokens_per_expert",
                 "topk_idx", "topk_weights")


def _cached_dispatch(buf: "Buffer", x: torch.Tensor, x_scales: Optional[torch.Tensor], hidden: int,
                     parts: Tuple[Any, ...], handle: Any, config: Config, previous_event: Any, async_finish: Any,
                     allocate_on_comm_stream: Any) -> tuple:
    rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, info, _ = \
        parts
    try:
        streams = _OpStreams(buf, previous_event, async_finish, allocate_on_comm_stream)
    except (TypeError, ValueError):
        buf.runtime.abstain()
        raise
    num_recv_tokens = recv_src_idx.numel()
    with streams.allocating():
        recv_x, recv_x_scales = alloc_dispatch_outputs(buf, x, x_scales, hidden, num_recv_tokens,
                                                       stream=streams.allocation_stream())[:2]
    event = buf.runtime.intranode_dispatch(
        x, x_scales, None, None, is_token_in_rank, 0, 1, 0, rank_prefix_matrix, channel_prefix_matrix,
        recv_channel_prefix_matrix, recv_src_idx, info, recv_x, recv_x_scales, None, None, config, streams.order,
        True, handle_refs=_refs_of(buf, handle))
    if streams.keeps_tensors():
        inputs = (x, x_scales, rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
                  is_token_in_rank, info)
        event_overlap = streams.finish(event, inputs, (recv_x, recv_x_scales))
    else:
        event_overlap = streams.finish_joined(event)
    return ((recv_x, recv_x_scales) if x_scales is not None else recv_x, None, None, None, handle, event_overlap)


def combine(buf: "Buffer", x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor],
            bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None], config: Optional[Config],
            previous_event: Optional[EventOverlap], async_finish: bool, allocate_on_comm_stream: bool
            ) -> Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
    if (buf._express and bias is None and (config is None or type(config) is Config) and previous_event is None
            and async_finish is False
            and allocate_on_comm_stream is False and type(handle) is DispatchHandle and handle._refs is not None
            and not buf._destroyed and not buf.num_arena_bytes and buf._topology.num_rdma_ranks == 1):
        # The default combine in one extension call, as dispatch's express call.
        result = buf.runtime.intranode_combine_express(x, topk_weights, handle._refs, handle.hidden,
                                                       default_config(buf, "combine") if config is None else config,
                                                       _current_raw_stream(buf._device))
        if result is not None:
            event, combined_x, combined_topk_weights, errors = result
            if errors:
                warn_local_errors(buf, errors)
            return combined_x, combined_topk_weights, EventOverlap(event)
    buf._check_usable("combine")
    if buf._topology.num_rdma_ranks > 1:
        return buf.internode_combine(x, handle, topk_weights, bias, config, previous_event, async_finish,
                                     allocate_on_comm_stream)
    runtime = buf.runtime
    runtime.check_faults()  # as in dispatch: pending data errors are raised at the call's end
    try:  # inline, as in dispatch: the host path is part of every timed combine
        if not isinstance(x, torch.Tensor):
            _check_tensor(x, "x")
        if topk_weights is not None and not isinstance(topk_weights, torch.Tensor):
            _check_tensor(topk_weights, "topk_weights", optional=True)
        bias_0, bias_1 = _split_bias(bias)
        config = default_config(buf, "combine") if config is None else _check_config(config)
        rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, info, \
            handle_hidden = _unpack_handle(handle, config, "combine")
        if x.dim() != 2:
            _check_dim(x, "x", 2)
        hidden = x.size(1)
        num_tokens = is_token_in_rank.size(0)
        if topk_weights is not None and topk_weights.dim() != 2:
            _check_dim(topk_weights, "topk_weights", 2)
        streams = _OpStreams(buf, previous_event, async_finish, allocate_on_comm_stream)
    except (TypeError, ValueError):
        runtime.abstain()
        raise
    device = buf._device
    with streams.allocating():
        combined_x = torch.empty((num_tokens, hidden), dtype=x.dtype, device=device)
        combined_topk_weights = (torch.empty((num_tokens, topk_weights.size(1)), dtype=torch.float32,
                                             device=device) if topk_weights is not None else None)
    event = runtime.intranode_combine(
        x, topk_weights, bias_0, bias_1, rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix,
        recv_src_idx, is_token_in_rank, info, handle_hidden, combined_x, combined_topk_weights, config,
        streams.order, handle_refs=_refs_of(buf, handle))
    if not streams.keeps_tensors():
        return combined_x, combined_topk_weights, streams.finish_joined(event)
    inputs = (x, topk_weights, bias_0, bias_1, rank_prefix_matrix, channel_prefix_matrix,
              recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, info)
    return combined_x, combined_topk_weights, streams.finish(event, inputs, (combined_x, combined_topk_weights))


def _refs_of(buf: "Buffer", handle: Any) -> Any:
    """The handle's HandleRefs when a dispatch made it (its tensors are then the ones the refs
    describe), else None (the extension reads the tensors)."""
    if type(handle) is DispatchHandle and handle._from_dispatch:
        return handle._refs
    return None


def _unpack_handle(handle: Any, config: Config, op: str) -> Tuple[Any, ...]:
    """The handle's five matrices, its info tensor and the dispatch's hidden size (0 if unknown)."""
    if type(handle) is DispatchHandle and handle._from_dispatch:
        # Made by dispatch, and a tuple: its entries are the tensors checked below, of those ranks.
        num_channels = config.num_sms // 2
        if handle[1].size(1) == num_channels and handle[2].size(1) == num_channels:
            return (*handle, handle.hidden)
    if not isinstance(handle, (tuple, list)):
        raise ValueError(f"handle must be the 6-tuple returned by dispatch, got {type(handle).__name__}")
    if len(handle) != 6:
        raise ValueError(f"handle must be the 6-tuple returned by dispatch, got {len(handle)} entries")
    names = ("rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix", "recv_src_idx",
             "is_token_in_rank", "info")
    for i, name in enumerate(names):
        _check_tensor(handle[i], f"handle[{i}] ({name})")
    rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, info = \
        handle
    _check_dim(channel_prefix_matrix, "handle[1] (channel_prefix_matrix)", 2)
    _check_dim(recv_channel_prefix_matrix, "handle[2] (recv_channel_prefix_matrix)", 2)
    _check_dim(is_token_in_rank, "handle[4] (is_token_in_rank)", 2)
    num_channels = config.num_sms // 2
    handle_channels = channel_prefix_matrix.size(1)
    if handle_channels != num_channels or recv_channel_prefix_matrix.size(1) != num_channels:
        raise ValueError(f"{op}: the handle was made by a dispatch whose config had num_sms = "
                         f"{2 * handle_channels}, but this config has num_sms = {config.num_sms}; a cached "
                         f"dispatch and combine must use a config with the same num_sms as the dispatch that "
                         f"made the handle")
    return (rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank,
            info, getattr(handle, "hidden", 0))
