"""Buffer: the deep_ep V1-compatible front of the moelink runtime.

The runtime (``_moelink.Buffer``) owns the NVLink/RDMA buffers and the communication stream and
validates every argument; this layer bootstraps it over torch.distributed or mpi4py, allocates the
output tensors with the caching allocator, and keeps the allocator's view of which stream uses which
tensor correct.
"""

import contextlib
import math
import os
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from . import _moelink
from ._moelink import Config
from .event import EventOverlap

_LOW_LATENCY_NOT_IMPLEMENTED = "low-latency mode is not implemented yet in moelink"
_INTERNODE_NOT_IMPLEMENTED = "internode normal mode is not implemented yet in moelink"

# (rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
#  is_token_in_rank, None)
DispatchHandle = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, None]


# ---- argument checks ------------------------------------------------------------------------------
# Python checks only what it needs before it can allocate outputs or call the runtime (types, and
# the ranks of tensors whose sizes it reads); the runtime checks dtypes, shapes and devices.

def _check_int(value: Any, name: str, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = value.__index__()
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, int)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_tensor(value: Any, name: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")


def _check_dim(tensor: torch.Tensor, name: str, ndim: int) -> None:
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")


def _check_config(config: Any) -> Config:
    if not isinstance(config, Config):
        raise TypeError(f"config must be a moelink.Config or None, got {type(config).__name__}")
    return config


def _ref(tensor: Optional[torch.Tensor], name: str = "tensor") -> Optional[tuple]:
    """The TRef tuple the extension takes: (data_ptr, dtype name, shape, strides, device ordinal)."""
    if tensor is None:
        return None
    _check_tensor(tensor, name)
    return (tensor.data_ptr(), str(tensor.dtype)[len("torch."):], tuple(tensor.shape), tuple(tensor.stride()),
            tensor.device.index if tensor.is_cuda else -1)


def _split_x(x: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(x, torch.Tensor):
        return x, None
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(t, torch.Tensor) for t in x):
        return x[0], x[1]
    raise TypeError("x must be a bf16 torch.Tensor [num_tokens, hidden] or a tuple (fp8 torch.Tensor "
                    f"[num_tokens, hidden], float32 scales [num_tokens, num_scales]), got {type(x).__name__}")


def _split_bias(bias: Any) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    if bias is None:
        return None, None
    if isinstance(bias, torch.Tensor):
        return bias, None
    if isinstance(bias, (tuple, list)):
        if len(bias) > 2:
            raise ValueError(f"bias takes at most two tensors, got {len(bias)}")
        pair = list(bias) + [None] * (2 - len(bias))
        for i, t in enumerate(pair):
            _check_tensor(t, f"bias[{i}]", optional=True)
        return pair[0], pair[1]
    raise TypeError(f"bias must be a torch.Tensor, a tuple of at most two tensors, or None, got "
                    f"{type(bias).__name__}")


def _tensors(*values: Any) -> List[torch.Tensor]:
    return [t for t in values if isinstance(t, torch.Tensor)]


class _OpStreams:
    """How one operation orders itself against the caller's stream (the same for every operation).

    The runtime runs the operation on the comm stream after ``previous_event`` (or the current
    stream). With ``async_finish`` the caller's stream does not wait, so the caching allocator must
    learn that the comm stream still uses the tensors, or it would hand their memory out again once
    the caller drops them.
    """

    def __init__(self, buffer: "Buffer", previous_event: Any, async_finish: Any,
                 allocate_on_comm_stream: Any) -> None:
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise TypeError(f"previous_event must be an EventOverlap or None, got {type(previous_event).__name__}")
        self.async_finish = _check_bool(async_finish, "async_finish")
        self.allocate_on_comm_stream = _check_bool(allocate_on_comm_stream, "allocate_on_comm_stream")
        if self.allocate_on_comm_stream and (previous_event is None or not self.async_finish):
            raise ValueError("allocate_on_comm_stream=True requires previous_event (an EventOverlap) and "
                             "async_finish=True: outputs allocated on the comm stream are only safe when the "
                             "comm stream is ordered after previous_event and the caller waits on the result")
        self.compute_stream = torch.cuda.current_stream(buffer._device)
        self.comm_stream = buffer._comm_stream
        self.order = (self.compute_stream.cuda_stream,
                      previous_event.event if previous_event is not None else None,
                      self.async_finish, self.allocate_on_comm_stream)

    def allocating(self) -> Any:
        """The stream context output tensors are allocated under."""
        if self.allocate_on_comm_stream:
            return torch.cuda.stream(self.comm_stream)
        return contextlib.nullcontext()

    def finish(self, event: Any, inputs: Sequence[Any], outputs: Sequence[Any]) -> EventOverlap:
        inputs, outputs = _tensors(*inputs), _tensors(*outputs)
        if self.async_finish:
            for t in inputs:
                t.record_stream(self.comm_stream)
            if not self.allocate_on_comm_stream:
                for t in outputs:
                    t.record_stream(self.comm_stream)
        if self.allocate_on_comm_stream:
            # Allocated on the comm stream but consumed on the caller's: reuse must wait for both.
            for t in outputs:
                t.record_stream(self.compute_stream)
        return EventOverlap(event, extra_tensors=tuple(inputs + outputs))


class Buffer:
    """The communication buffer of one rank for MoE dispatch and combine (deep_ep V1 API).

    Intranode normal mode (all ranks in one NVLink domain) is implemented; internode normal mode and
    low-latency mode raise NotImplementedError (see docs/COMPATIBILITY.md).

    Attributes:
        num_sms: SMs the normal-mode kernels use (class attribute, default 20; see set_num_sms).
        rank, group_size: this rank and the number of ranks.
        group, comm: the torch.distributed group or mpi4py communicator used for bootstrap.
        num_nvl_bytes, num_rdma_bytes, low_latency_mode, explicitly_destroy: as constructed.
        runtime: the ``_moelink.Buffer`` underneath.
    """

    num_sms: int = 20

    def __init__(self, group: Optional["dist.ProcessGroup"], num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm: Optional[Any] = None, *, num_arena_bytes: Optional[int] = None) -> None:
        """Allocates the buffers and connects this rank to its peers (collective over the group).

        Arguments:
            group: a torch.distributed ProcessGroup (gloo or nccl) over all ranks, or None when
                ``comm`` is given.
            num_nvl_bytes: int, bytes of the NVLink buffer shared with the node's peers; size it with
                ``Config.get_nvl_buffer_size_hint`` of the dispatch and combine configs.
            num_rdma_bytes: int, bytes of the NVSHMEM (RDMA) buffer; 0 for intranode use.
            low_latency_mode: bool; accepted (buffers are allocated) but low-latency operations raise
                NotImplementedError for now.
            num_qps_per_rank: int >= 1, RDMA queue pairs per peer.
            allow_nvlink_for_low_latency_mode: bool, accepted for compatibility.
            allow_mnnvl, use_fabric, enable_shrink: must be False (NotImplementedError otherwise).
            explicitly_destroy: bool; when True, call ``destroy()`` before the Buffer is dropped.
            comm: an mpi4py communicator, used instead of ``group``.
            num_arena_bytes: int or None (moelink only): bytes of receive arena, shared with the
                peers like the NVLink buffer. Dispatch outputs are allocated there while it has
                room, and peers then write rows straight into them: about half the memory traffic of
                staging them in the rings. When it is full, outputs come from the caching allocator
                and rows go through the rings (same results, slower). None reads
                ``MOELINK_ARENA_BYTES`` (default 0: no arena). Size it for the dispatch outputs
                alive at once, e.g. a few times ``num_recv_tokens * hidden * 2`` bytes.

        GPUs per node: the environment variable ``MOELINK_NVL_RANKS`` when set, else
        ``min(num_ranks, 8)``. The Buffer uses the current CUDA device.
        """
        num_nvl_bytes = _check_int(num_nvl_bytes, "num_nvl_bytes", 0)
        num_rdma_bytes = _check_int(num_rdma_bytes, "num_rdma_bytes", 0)
        low_latency_mode = _check_bool(low_latency_mode, "low_latency_mode")
        num_qps_per_rank = _check_int(num_qps_per_rank, "num_qps_per_rank", 1)
        if num_arena_bytes is None:
            env_arena = os.environ.get("MOELINK_ARENA_BYTES", "0")
            try:
                num_arena_bytes = int(float(env_arena))
            except ValueError:
                raise ValueError(f"MOELINK_ARENA_BYTES must be a number of bytes, got {env_arena!r}") from None
            if num_arena_bytes < 0:
                raise ValueError(f"MOELINK_ARENA_BYTES must be >= 0, got {env_arena!r}")
        num_arena_bytes = _check_int(num_arena_bytes, "num_arena_bytes", 0)
        _check_bool(allow_nvlink_for_low_latency_mode, "allow_nvlink_for_low_latency_mode")
        explicitly_destroy = _check_bool(explicitly_destroy, "explicitly_destroy")
        for name, value in (("allow_mnnvl", allow_mnnvl), ("use_fabric", use_fabric),
                            ("enable_shrink", enable_shrink)):
            if _check_bool(value, name):
                raise NotImplementedError(f"{name}=True is not implemented yet in moelink")
        if (group is None) == (comm is None):
            raise ValueError("Buffer needs exactly one of group (a torch.distributed ProcessGroup) or comm "
                             "(an mpi4py communicator)")

        if group is not None:
            rank, num_ranks = group.rank(), group.size()

            def all_gather(obj: Any) -> List[Any]:
                gathered = [None] * num_ranks
                dist.all_gather_object(gathered, obj, group=group)
                return gathered
        else:
            rank, num_ranks = comm.Get_rank(), comm.Get_size()
            all_gather = comm.allgather

        num_nvl_ranks = min(num_ranks, 8)
        env_nvl_ranks = os.environ.get("MOELINK_NVL_RANKS")
        if env_nvl_ranks is not None:
            try:
                num_nvl_ranks = int(env_nvl_ranks)
            except ValueError:
                raise ValueError(f"MOELINK_NVL_RANKS must be an int, got {env_nvl_ranks!r}") from None

        self.rank = rank
        self.group_size = num_ranks
        self.group = group
        self.comm = comm
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.num_arena_bytes = num_arena_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self._destroyed = False
        self._device = torch.cuda.current_device()

        # A rank that fails alone must not leave its peers blocked in the next collective, so every
        # rank reports success or its error in one all-gather and all of them raise together.
        runtime, info, error = None, None, None
        try:
            runtime = _moelink.Buffer(rank, num_ranks, num_nvl_bytes, num_rdma_bytes, low_latency_mode,
                                      explicitly_destroy, num_nvl_ranks, num_qps_per_rank, device=self._device,
                                      num_arena_bytes=num_arena_bytes)
            topology = runtime.topology
            # The NVSHMEM root: the lane's rank on node 0 in normal mode, global rank 0 in low-latency mode.
            is_root = rank == 0 if low_latency_mode else topology.rdma_rank == 0
            unique_id = runtime.local_nvshmem_unique_id() if num_rdma_bytes > 0 and is_root else None
            info = (runtime.device_id, runtime.local_ipc_handle(), unique_id)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the peers learned of it
            error = e
        gathered = all_gather((None if error is None else f"{type(error).__name__}: {error}", info))
        if error is not None:
            raise error
        for peer, (peer_error, _) in enumerate(gathered):
            if peer_error is not None:
                raise RuntimeError(f"moelink.Buffer: rank {peer} failed to initialize: {peer_error}")

        device_ids = [peer_info[0] for _, peer_info in gathered]
        ipc_handles = [peer_info[1] for _, peer_info in gathered]
        root_unique_id = None
        if num_rdma_bytes > 0:
            root = 0 if low_latency_mode else topology.nvl_rank
            root_unique_id = gathered[root][1][2]
        runtime.sync(device_ids, ipc_handles, root_unique_id)

        self.runtime = runtime
        self._topology = topology
        self._comm_stream = torch.cuda.ExternalStream(runtime.comm_stream(),
                                                      device=torch.device("cuda", runtime.device_id))

    # ---- lifecycle ---------------------------------------------------------------------------------

    def destroy(self) -> None:
        """Waits until no peer still uses the buffers (collective), then frees them. Any later use of
        this Buffer raises RuntimeError. Idempotent."""
        try:
            self.runtime.destroy()
        finally:
            # The runtime frees everything even when its closing barrier fails.
            self._destroyed = True

    def _check_usable(self, op: str) -> None:
        # The runtime raises too, but Python must not first allocate on, or record on, a freed stream.
        if self._destroyed:
            raise RuntimeError(f"moelink.Buffer.{op}: the Buffer was destroyed")

    # ---- static configuration ----------------------------------------------------------------------

    @staticmethod
    def is_sm90_compiled() -> bool:
        """Whether the library was built with the SM90 (Hopper) features."""
        return _moelink.is_sm90_compiled()

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Sets the SMs (an even int >= 2) the default normal-mode configs use; two SMs per channel."""
        if isinstance(new_num_sms, bool) or not isinstance(new_num_sms, int):
            raise TypeError(f"num_sms must be an int, got {type(new_num_sms).__name__}")
        if new_num_sms < 2 or new_num_sms % 2 != 0:
            raise ValueError(f"num_sms must be an even int >= 2, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An EventOverlap recorded now on the current stream, to pass as ``previous_event``."""
        return EventOverlap(_moelink.EventHandle(torch.cuda.current_stream().cuda_stream))

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """RDMA bytes low-latency mode needs (not implemented yet)."""
        raise NotImplementedError(_LOW_LATENCY_NOT_IMPLEMENTED)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """The tuned dispatch Config for ``num_ranks`` ranks with ``Buffer.num_sms`` SMs."""
        return _moelink.default_dispatch_config(_check_int(num_ranks, "num_ranks"), Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """The tuned combine Config for ``num_ranks`` ranks with ``Buffer.num_sms`` SMs."""
        return _moelink.default_combine_config(_check_int(num_ranks, "num_ranks"), Buffer.num_sms)

    # ---- buffers and streams -----------------------------------------------------------------------

    def get_comm_stream(self) -> torch.Stream:
        """The stream the communication kernels run on (a torch.cuda.ExternalStream)."""
        self._check_usable("get_comm_stream")
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[Union[torch.Size, Sequence[int]]] = None,
                                offset: int = 0, use_rdma_buffer: bool = False) -> torch.Tensor:
        """A tensor aliasing this rank's NVLink (or RDMA) buffer.

        Arguments:
            dtype: the torch dtype to view the bytes as.
            size: the shape of the result; None gives a 1-D tensor over the rest of the buffer.
            offset: int, bytes from the start of the buffer (a multiple of dtype's size).
            use_rdma_buffer: bool, the RDMA buffer instead of the NVLink one.

        Returns: a tensor of ``dtype`` and ``size`` on this rank's device, sharing the buffer's memory
        (it keeps the Buffer's memory alive but becomes invalid after ``destroy()``).
        """
        self._check_usable("get_local_buffer_tensor")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        offset = _check_int(offset, "offset", 0)
        use_rdma_buffer = _check_bool(use_rdma_buffer, "use_rdma_buffer")
        name = "num_rdma_bytes" if use_rdma_buffer else "num_nvl_bytes"
        total = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        if total == 0:
            raise ValueError(f"the local {'RDMA' if use_rdma_buffer else 'NVLink'} buffer is empty ({name} = 0)")
        itemsize = dtype.itemsize
        if offset > total:
            raise ValueError(f"offset {offset} is beyond the local buffer ({name} = {total})")
        if offset % itemsize != 0:
            raise ValueError(f"offset {offset} is not a multiple of {dtype}'s size ({itemsize} bytes)")
        count = (total - offset) // itemsize
        shape = None
        if size is not None:
            shape = torch.Size([size] if isinstance(size, int) else size)
            numel = math.prod(shape)
            if numel > count:
                raise ValueError(f"size {tuple(shape)} ({numel * itemsize} bytes at offset {offset}) does not fit "
                                 f"in the local buffer ({name} = {total})")
        raw = torch.from_dlpack(self.runtime.local_buffer_dlpack(use_rdma_buffer))
        tensor = raw[offset:offset + count * itemsize].view(dtype)
        if shape is None:
            return tensor
        return tensor[:numel].view(shape)

    def arena_empty(self, size: Union[torch.Size, Sequence[int]], dtype: torch.dtype = torch.bfloat16
                    ) -> Optional[torch.Tensor]:
        """An uninitialized tensor in this rank's receive arena (moelink only), or None when the
        arena has no room (or there is none, ``num_arena_bytes=0``).

        Write the expert outputs into one and pass it to ``combine``: the token owners then read
        its rows in place instead of this rank pushing them through the rings. Dispatch outputs are
        allocated there already. The range returns to the arena when the tensor is freed.
        """
        self._check_usable("arena_empty")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        shape = tuple(_check_int(v, "size", 0) for v in ([size] if isinstance(size, int) else size))
        tensors = self._arena_tensors([(shape, dtype)])
        return tensors[0] if tensors else None

    # ---- intranode normal mode ---------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False
                            ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """Counts where each token goes.

        Arguments:
            topk_idx: int64 (``topk_idx_t``) [num_tokens, num_topk] on this rank's GPU, contiguous;
                expert ids in [0, num_experts), -1 for an unused slot.
            num_experts: int > 0, a multiple of the number of ranks (experts are split evenly).
            previous_event: EventOverlap the comm stream waits for instead of the current stream.
            async_finish: bool; when True the current stream does not wait for the result (use the
                returned EventOverlap).
            allocate_on_comm_stream: bool, allocate the outputs on the comm stream (needs
                previous_event and async_finish).

        Returns:
            num_tokens_per_rank: int32 [num_ranks], tokens this rank sends to each rank.
            num_tokens_per_rdma_rank: int32 [num_nodes], or None within one node.
            num_tokens_per_expert: int32 [num_experts], tokens this rank sends to each expert.
            is_token_in_rank: bool [num_tokens, num_ranks], whether a token goes to a rank.
            event: EventOverlap.
        """
        self._check_usable("get_dispatch_layout")
        _check_tensor(topk_idx, "topk_idx")
        num_experts = _check_int(num_experts, "num_experts")
        if num_experts <= 0 or num_experts % self.group_size != 0:
            raise ValueError(f"num_experts must be > 0 and a multiple of the number of ranks ({self.group_size}), "
                             f"got {num_experts}")
        streams = _OpStreams(self, previous_event, async_finish, allocate_on_comm_stream)
        num_tokens = topk_idx.size(0) if topk_idx.dim() >= 1 else 0
        num_rdma_ranks = self._topology.num_rdma_ranks
        with streams.allocating():
            num_tokens_per_rank = torch.empty((self.group_size,), dtype=torch.int32, device=self._device)
            num_tokens_per_rdma_rank = (torch.empty((num_rdma_ranks,), dtype=torch.int32, device=self._device)
                                        if num_rdma_ranks > 1 else None)
            num_tokens_per_expert = torch.empty((num_experts,), dtype=torch.int32, device=self._device)
            is_token_in_rank = torch.empty((num_tokens, self.group_size), dtype=torch.bool, device=self._device)
        event = self.runtime.get_dispatch_layout(_ref(topk_idx, "topk_idx"), num_experts,
                                                 _ref(num_tokens_per_rank), _ref(num_tokens_per_rdma_rank),
                                                 _ref(num_tokens_per_expert), _ref(is_token_in_rank), streams.order)
        outputs = (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank)
        return (*outputs, streams.finish(event, [topk_idx], outputs))

    def dispatch(self, x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
                 handle: Optional[DispatchHandle] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False
                 ) -> Tuple[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], Optional[torch.Tensor],
                            Optional[torch.Tensor], Optional[List[int]], DispatchHandle, EventOverlap]:
        """Sends each token to every rank that holds one of its top-k experts.

        Arguments:
            x: bf16 [num_tokens, hidden], or a tuple (float8_e4m3fn [num_tokens, hidden], float32 scales
                [num_tokens, num_scales], row- or column-major).
            handle: the handle of an earlier dispatch to repeat its routing (cached mode); then the
                layout arguments, topk_idx and topk_weights must be None.
            num_tokens_per_rank: int32 [num_ranks], from get_dispatch_layout.
            num_tokens_per_rdma_rank: int32 [num_nodes] or None; unused within one node.
            is_token_in_rank: bool [num_tokens, num_ranks], from get_dispatch_layout.
            num_tokens_per_expert: int32 [num_experts], from get_dispatch_layout.
            topk_idx: int64 [num_tokens, num_topk], expert ids, -1 for an unused slot.
            topk_weights: float32 [num_tokens, num_topk] or None.
            expert_alignment: int >= 1; each num_recv_tokens_per_expert_list entry is rounded up to it.
            num_worst_tokens: int >= 0; when > 0 the receive tensors have exactly this many rows and the
                host does not wait for the counts (num_recv_tokens_per_expert_list is then []).
            config: Config, default ``get_dispatch_config(num_ranks)``.
            previous_event, async_finish, allocate_on_comm_stream: as in get_dispatch_layout.

        Returns:
            recv_x: like x, with num_recv_tokens rows: the rows from all ranks, ordered by source rank,
                then source token index.
            recv_topk_idx: int64 [num_recv_tokens, num_topk], local expert ids (id - rank *
                num_local_experts), -1 for experts on other ranks; None in cached mode.
            recv_topk_weights: float32 [num_recv_tokens, num_topk] or None (no topk_weights, or cached).
            num_recv_tokens_per_expert_list: list[int] of num_local_experts aligned counts; None in
                cached mode.
            handle: (rank_prefix_matrix int32 [R, R], channel_prefix_matrix int32 [R, C],
                recv_channel_prefix_matrix int32 [R, C], recv_src_idx int32 [num_recv_tokens],
                is_token_in_rank bool [num_tokens, R], None) with C = config.num_sms // 2; pass it to
                combine or to a cached dispatch.
            event: EventOverlap.
        """
        self._check_usable("dispatch")
        x, x_scales = _split_x(x)
        config = self.get_dispatch_config(self.group_size) if config is None else _check_config(config)
        if self._topology.num_rdma_ranks > 1:
            return self.internode_dispatch(x if x_scales is None else (x, x_scales), handle, num_tokens_per_rank,
                                           num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert,
                                           topk_idx, topk_weights, expert_alignment, num_worst_tokens, config,
                                           previous_event, async_finish, allocate_on_comm_stream)
        expert_alignment = _check_int(expert_alignment, "expert_alignment", 1)
        num_worst_tokens = _check_int(num_worst_tokens, "num_worst_tokens", 0)
        for name, value in (("num_tokens_per_rank", num_tokens_per_rank),
                            ("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank),
                            ("is_token_in_rank", is_token_in_rank),
                            ("num_tokens_per_expert", num_tokens_per_expert),
                            ("topk_idx", topk_idx), ("topk_weights", topk_weights)):
            _check_tensor(value, name, optional=True)
        hidden = self._hidden(x, "x")
        if x_scales is not None:
            _check_dim(x_scales, "x_scales", 2)

        if handle is not None:
            for name, value in (("num_tokens_per_rank", num_tokens_per_rank),
                                ("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank),
                                ("is_token_in_rank", is_token_in_rank),
                                ("num_tokens_per_expert", num_tokens_per_expert),
                                ("topk_idx", topk_idx), ("topk_weights", topk_weights)):
                if value is not None:
                    raise ValueError(f"dispatch with a handle (cached mode) repeats the handle's routing; "
                                     f"{name} must be None")
            return self._cached_dispatch(x, x_scales, hidden, handle, config, previous_event, async_finish,
                                         allocate_on_comm_stream)

        for name, value in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                            ("num_tokens_per_expert", num_tokens_per_expert), ("topk_idx", topk_idx)):
            if value is None:
                raise ValueError(f"dispatch without a handle needs {name} (see get_dispatch_layout)")
        num_experts = num_tokens_per_expert.numel()
        num_channels = config.num_sms // 2
        streams = _OpStreams(self, previous_event, async_finish, allocate_on_comm_stream)
        num_ranks, device = self.group_size, self._device
        with streams.allocating():
            rank_prefix_matrix = torch.empty((num_ranks, num_ranks), dtype=torch.int32, device=device)
            channel_prefix_matrix = torch.empty((num_ranks, num_channels), dtype=torch.int32, device=device)
            recv_channel_prefix_matrix = torch.empty((num_ranks, num_channels), dtype=torch.int32, device=device)
        num_recv_tokens, num_recv_tokens_per_expert_list = self.runtime.intranode_notify(
            _ref(x, "x"), _ref(x_scales, "x_scales"), _ref(topk_idx, "topk_idx"), _ref(topk_weights, "topk_weights"),
            _ref(is_token_in_rank, "is_token_in_rank"), _ref(num_tokens_per_rank, "num_tokens_per_rank"),
            _ref(num_tokens_per_expert, "num_tokens_per_expert"), num_experts, expert_alignment, num_worst_tokens,
            _ref(rank_prefix_matrix), _ref(channel_prefix_matrix), _ref(recv_channel_prefix_matrix), config,
            streams.order)

        num_topk = topk_idx.size(1)
        with streams.allocating():
            recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx = self._alloc_dispatch_outputs(
                x, x_scales, hidden, num_recv_tokens, num_topk, topk_weights is not None)
        event = self.runtime.intranode_dispatch(
            _ref(x), _ref(x_scales), _ref(topk_idx), _ref(topk_weights), _ref(is_token_in_rank), num_experts,
            expert_alignment, num_worst_tokens, _ref(rank_prefix_matrix), _ref(channel_prefix_matrix),
            _ref(recv_channel_prefix_matrix), _ref(recv_src_idx), _ref(recv_x), _ref(recv_x_scales),
            _ref(recv_topk_idx), _ref(recv_topk_weights), config, streams.order, False)

        handle = (rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
                  is_token_in_rank, None)
        inputs = (x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert)
        outputs = (rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, recv_x,
                   recv_x_scales, recv_topk_idx, recv_topk_weights)
        event_overlap = streams.finish(event, inputs, outputs)
        return ((recv_x, recv_x_scales) if x_scales is not None else recv_x, recv_topk_idx, recv_topk_weights,
                list(num_recv_tokens_per_expert_list), handle, event_overlap)

    def _cached_dispatch(self, x: torch.Tensor, x_scales: Optional[torch.Tensor], hidden: int, handle: Any,
                         config: Config, previous_event: Any, async_finish: Any, allocate_on_comm_stream: Any) -> tuple:
        rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank = \
            self._unpack_handle(handle, config, "dispatch")
        streams = _OpStreams(self, previous_event, async_finish, allocate_on_comm_stream)
        num_recv_tokens = recv_src_idx.numel()
        with streams.allocating():
            recv_x, recv_x_scales = self._alloc_dispatch_outputs(x, x_scales, hidden, num_recv_tokens)[:2]
        event = self.runtime.intranode_dispatch(
            _ref(x), _ref(x_scales), None, None, _ref(is_token_in_rank), 0, 1, 0, _ref(rank_prefix_matrix),
            _ref(channel_prefix_matrix), _ref(recv_channel_prefix_matrix), _ref(recv_src_idx), _ref(recv_x),
            _ref(recv_x_scales), None, None, config, streams.order, True)
        inputs = (x, x_scales, rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
                  is_token_in_rank)
        event_overlap = streams.finish(event, inputs, (recv_x, recv_x_scales))
        return ((recv_x, recv_x_scales) if x_scales is not None else recv_x, None, None, None, handle, event_overlap)

    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Sends the expert outputs back to the tokens' ranks and sums each token's rows (the reverse
        of the dispatch that made ``handle``).

        Arguments:
            x: bf16 [num_recv_tokens, hidden], one row per row recv_x had.
            handle: the handle returned by that dispatch.
            topk_weights: float32 [num_recv_tokens, num_topk] or None; combined the same way.
            bias: None, a bf16 [num_tokens, hidden] tensor, or a tuple of at most two of them; added
                once per token.
            config: Config, default ``get_combine_config(num_ranks)``; its num_sms must equal the
                dispatch config's.
            previous_event, async_finish, allocate_on_comm_stream: as in get_dispatch_layout.

        Returns:
            combined_x: bf16 [num_tokens, hidden], in the original token order of this rank.
            combined_topk_weights: float32 [num_tokens, num_topk] or None.
            event: EventOverlap.
        """
        self._check_usable("combine")
        _check_tensor(x, "x")
        _check_tensor(topk_weights, "topk_weights", optional=True)
        bias_0, bias_1 = _split_bias(bias)
        config = self.get_combine_config(self.group_size) if config is None else _check_config(config)
        if self._topology.num_rdma_ranks > 1:
            return self.internode_combine(x, handle, topk_weights, bias, config, previous_event, async_finish,
                                          allocate_on_comm_stream)
        rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank = \
            self._unpack_handle(handle, config, "combine")
        hidden = self._hidden(x, "x")
        num_tokens = is_token_in_rank.size(0)
        if topk_weights is not None:
            _check_dim(topk_weights, "topk_weights", 2)
        streams = _OpStreams(self, previous_event, async_finish, allocate_on_comm_stream)
        with streams.allocating():
            combined_x = torch.empty((num_tokens, hidden), dtype=x.dtype, device=self._device)
            combined_topk_weights = (torch.empty((num_tokens, topk_weights.size(1)), dtype=torch.float32,
                                                 device=self._device) if topk_weights is not None else None)
        event = self.runtime.intranode_combine(
            _ref(x, "x"), _ref(topk_weights, "topk_weights"), _ref(bias_0, "bias"), _ref(bias_1, "bias"),
            _ref(rank_prefix_matrix), _ref(channel_prefix_matrix), _ref(recv_channel_prefix_matrix),
            _ref(recv_src_idx), _ref(is_token_in_rank), _ref(combined_x), _ref(combined_topk_weights), config,
            streams.order)
        inputs = (x, topk_weights, bias_0, bias_1, rank_prefix_matrix, channel_prefix_matrix,
                  recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank)
        return combined_x, combined_topk_weights, streams.finish(event, inputs, (combined_x, combined_topk_weights))

    # ---- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _hidden(x: torch.Tensor, name: str) -> int:
        _check_dim(x, name, 2)
        return x.size(1)

    def _alloc_dispatch_outputs(self, x: torch.Tensor, x_scales: Optional[torch.Tensor], hidden: int,
                                num_recv_tokens: int, num_topk: int = 0, with_weights: bool = False
                                ) -> Tuple[Optional[torch.Tensor], ...]:
        """(recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx); num_topk == 0 (a
        cached dispatch) leaves the last three None.

        They come from the receive arena when it has room, so peers write rows straight into them;
        else from the caching allocator, and the rows come through the rings."""
        n, device = num_recv_tokens, self._device
        num_scales = x_scales.size(1) if x_scales is not None else 0
        # Keep the caller's scale layout (column-major is what fp8 GEMMs read).
        scales_col_major = x_scales is not None and x_scales.stride(1) != 1
        parts = [((n, hidden), x.dtype)]
        if x_scales is not None:
            parts.append(((num_scales, n) if scales_col_major else (n, num_scales), torch.float32))
        if num_topk:
            parts.append(((n, num_topk), torch.int64))
            if with_weights:
                parts.append(((n, num_topk), torch.float32))
        tensors = self._arena_tensors(parts, separate=[((n,), torch.int32)] if num_topk else [])
        if tensors is None:
            tensors = [torch.empty(shape, dtype=dtype, device=device)
                       for shape, dtype in parts + ([((n,), torch.int32)] if num_topk else [])]
        recv_x = tensors.pop(0)
        recv_x_scales = None
        if x_scales is not None:
            recv_x_scales = tensors.pop(0)
            if scales_col_major:
                recv_x_scales = recv_x_scales.t()
        if not num_topk:
            return recv_x, recv_x_scales, None, None, None
        recv_topk_idx = tensors.pop(0)
        recv_topk_weights = tensors.pop(0) if with_weights else None
        return recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, tensors.pop(0)

    def _arena_tensors(self, parts: Sequence[Tuple[tuple, torch.dtype]],
                       separate: Sequence[Tuple[tuple, torch.dtype]] = ()) -> Optional[List[torch.Tensor]]:
        """Tensors of the given (shape, dtype) in the receive arena, or None when it lacks room.

        ``parts`` share one block (they are dropped together); each of ``separate`` gets its own,
        so a handle keeping recv_src_idx does not pin recv_x's memory."""
        if self.runtime.num_arena_bytes == 0 or any(math.prod(shape) == 0 for shape, _ in parts):
            return None
        groups = [list(parts)] + [[part] for part in separate]
        out: List[torch.Tensor] = []
        for group in groups:
            offsets, total = [], 0
            for shape, dtype in group:
                total = (total + 511) // 512 * 512
                offsets.append(total)
                total += math.prod(shape) * dtype.itemsize
            block = self.runtime.arena_dlpack(total)
            if block is None:
                return None  # the blocks taken so far go back to the arena with `out`
            raw = torch.from_dlpack(block)
            for (shape, dtype), offset in zip(group, offsets):
                size = math.prod(shape) * dtype.itemsize
                out.append(raw[offset:offset + size].view(dtype).view(shape))
        return out

    @staticmethod
    def _unpack_handle(handle: Any, config: Config, op: str) -> Tuple[torch.Tensor, ...]:
        if not isinstance(handle, (tuple, list)):
            raise ValueError(f"handle must be the 6-tuple returned by dispatch, got {type(handle).__name__}")
        if len(handle) != 6:
            raise ValueError(f"handle must be the 6-tuple returned by dispatch, got {len(handle)} entries")
        names = ("rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix", "recv_src_idx",
                 "is_token_in_rank")
        for i, name in enumerate(names):
            _check_tensor(handle[i], f"handle[{i}] ({name})")
        rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank = \
            handle[:5]
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
        return rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank

    # ---- internode normal mode (not implemented yet) -----------------------------------------------

    def internode_dispatch(self, x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
                           handle: Optional[tuple] = None, num_tokens_per_rank: Optional[torch.Tensor] = None,
                           num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                           is_token_in_rank: Optional[torch.Tensor] = None,
                           num_tokens_per_expert: Optional[torch.Tensor] = None,
                           topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                           expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                           previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                           allocate_on_comm_stream: bool = False) -> tuple:
        """Dispatch across nodes (NVLink within a node, RDMA between nodes); same arguments as dispatch."""
        raise NotImplementedError(_INTERNODE_NOT_IMPLEMENTED)

    def internode_combine(self, x: torch.Tensor, handle: tuple, topk_weights: Optional[torch.Tensor] = None,
                          bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None] = None,
                          config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                          async_finish: bool = False, allocate_on_comm_stream: bool = False) -> tuple:
        """Combine across nodes; same arguments as combine."""
        raise NotImplementedError(_INTERNODE_NOT_IMPLEMENTED)

    # ---- low-latency mode (not implemented yet) ----------------------------------------------------

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Zeroes the low-latency buffers (not implemented yet)."""
        raise NotImplementedError(_LOW_LATENCY_NOT_IMPLEMENTED)

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False) -> Tuple[Any, torch.Tensor, tuple, EventOverlap, Callable]:
        """Low-latency dispatch (not implemented yet)."""
        raise NotImplementedError(_LOW_LATENCY_NOT_IMPLEMENTED)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: tuple,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, EventOverlap, Callable]:
        """Low-latency combine (not implemented yet)."""
        raise NotImplementedError(_LOW_LATENCY_NOT_IMPLEMENTED)

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """The zero-copy input buffer of the next low-latency combine (not implemented yet)."""
        raise NotImplementedError(_LOW_LATENCY_NOT_IMPLEMENTED)

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Masks or unmasks a failed rank (not implemented yet)."""
        raise NotImplementedError(_LOW_LATENCY_NOT_IMPLEMENTED)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Copies the rank mask into ``mask_status`` (not implemented yet)."""
        raise NotImplementedError(_LOW_LATENCY_NOT_IMPLEMENTED)

    def low_latency_clean_mask_buffer(self) -> None:
        """Clears the rank mask (not implemented yet)."""
        raise NotImplementedError(_LOW_LATENCY_NOT_IMPLEMENTED)
