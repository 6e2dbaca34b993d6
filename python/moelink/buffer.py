"""Buffer: the deep_ep V1-compatible front of the moelink runtime.

The runtime (``_moelink.Buffer``) owns the NVLink/RDMA buffers and the communication stream and
validates every argument; this layer bootstraps it over torch.distributed or mpi4py, allocates the
output tensors with the caching allocator, and keeps the allocator's view of which stream uses which
tensor correct.

This module is the API, signatures and documentation; the work is done in the private modules, so
each can be read (and changed) alone: _bootstrap (construction), _intranode (layout, dispatch,
combine), _arena (the receive arena), _streams (stream ordering), _checks (argument checks),
_low_latency (low-latency mode, experimental) and _internode (internode mode, experimental).
"""

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from . import _arena, _bootstrap, _internode, _intranode, _knobs, _low_latency, _moelink
from ._checks import _check_bool, _check_int, _ref  # noqa: F401 - _ref: tests import it from here
from ._intranode import DispatchHandle
from ._moelink import Config
from .event import EventOverlap


class Buffer:
    """The communication buffer of one rank for MoE dispatch and combine (deep_ep V1 API).

    Intranode normal mode and intranode low-latency mode (all ranks in one NVLink domain) are
    implemented; internode normal mode over emulated nodes on one host
    (MOELINK_EXPERIMENTAL_INTERNODE=1) is experimental (see docs/COMPATIBILITY.md).

    Attributes:
        num_sms: SMs the normal-mode kernels use (class attribute, default 20; see set_num_sms).
        rank, group_size: this rank and the number of ranks.
        group, comm: the torch.distributed group or mpi4py communicator used for bootstrap.
        num_nvl_bytes, num_rdma_bytes, low_latency_mode, explicitly_destroy: as constructed.
        runtime: the ``_moelink.Buffer`` underneath.
    """

    num_sms: int = 20

    # Whether dispatch and combine called with their defaults take the express call (one extension
    # call, _intranode.py): per call, so bench/interleaved.py can time it against the full path
    # (`--switch full:_express=False`), and tests compare the two.
    _express = True

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
            num_rdma_bytes: int, bytes of the node-to-node buffer when the ranks span nodes (size it
                with ``Config.get_rdma_buffer_size_hint``), or of the low-latency region; 0 for
                intranode use.
            low_latency_mode: bool; the low-latency operations need it. Within one NVLink domain the
                RDMA buffer is IPC-shared memory and NVSHMEM is not used
                (MOELINK_EXPERIMENTAL_LOW_LATENCY=0 switches the operations off).
            num_qps_per_rank: int >= 1, RDMA queue pairs per peer.
            allow_nvlink_for_low_latency_mode: bool, accepted for compatibility.
            allow_mnnvl: bool, accepted; no effect while every peer is in one NVLink domain.
            enable_shrink: bool (low-latency mode): a peer that stops answering is masked, so the calls
                go on over the live ranks, instead of failing with TimeoutError.
            use_fabric: must be False (NotImplementedError otherwise).
            explicitly_destroy: bool; when True, call ``destroy()`` before the Buffer is dropped.
            comm: an mpi4py communicator, used instead of ``group``.
            num_arena_bytes: int or None (moelink only): bytes of receive arena, shared with the
                peers like the NVLink buffer. Dispatch outputs are allocated there while it has
                room, and peers then write rows straight into them: about half the memory traffic of
                staging them in the rings. When it is full, outputs come from the caching allocator,
                whose segments peers map after seeing them twice and then write into the same way
                (MOELINK_PEER_SEGMENTS; until then rows go through the rings). None reads
                ``MOELINK_ARENA_BYTES`` (default 0: no arena). Size it for the dispatch outputs
                alive at once, e.g. a few times ``num_recv_tokens * hidden * 2`` bytes.

        GPUs per node: the environment variable ``MOELINK_NVL_RANKS`` when set, else
        ``min(num_ranks, 8)``. The Buffer uses the current CUDA device.
        """
        num_nvl_bytes = _check_int(num_nvl_bytes, "num_nvl_bytes", 0)
        num_rdma_bytes = _check_int(num_rdma_bytes, "num_rdma_bytes", 0)
        low_latency_mode = _check_bool(low_latency_mode, "low_latency_mode")
        num_qps_per_rank = _check_int(num_qps_per_rank, "num_qps_per_rank", 1)
        num_arena_bytes = _bootstrap.arena_bytes(num_arena_bytes)
        _check_bool(allow_nvlink_for_low_latency_mode, "allow_nvlink_for_low_latency_mode")
        explicitly_destroy = _check_bool(explicitly_destroy, "explicitly_destroy")
        _check_bool(allow_mnnvl, "allow_mnnvl")
        if _check_bool(use_fabric, "use_fabric"):
            raise NotImplementedError("use_fabric=True is not implemented yet in moelink")
        enable_shrink = _check_bool(enable_shrink, "enable_shrink")
        if enable_shrink and not low_latency_mode:
            raise ValueError("enable_shrink: masking lost ranks is a low-latency feature; it needs low_latency_mode=True")
        _, group_size, _ = _bootstrap.rank_and_all_gather(group, comm)
        _moelink.use_torch_shim(_knobs.torch_shim())
        # An inner Buffer of internode mode is one NVLink domain, whatever MOELINK_NVL_RANKS says.
        nvl_ranks = group_size if isinstance(group, _bootstrap.SubGroup) else _knobs.nvl_ranks(group_size)
        # Internode normal mode runs on Buffers of its own (_internode.py), which take the buffer
        # sizes: this one does layout only and needs neither buffer.
        internode = group_size > nvl_ranks and not low_latency_mode
        runtime, topology, rank, num_ranks = _bootstrap.bootstrap(
            group, comm, 0 if internode else num_nvl_bytes, 0 if internode else num_rdma_bytes, low_latency_mode,
            explicitly_destroy, num_qps_per_rank, num_arena_bytes, enable_shrink, nvl_ranks)
        self.enable_shrink = enable_shrink

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
        self._low_latency_combines = 0  # alternates get_next_low_latency_combine_buffer's areas
        # The runtime was built on the current device and reports it back; asking torch again
        # could differ if the bootstrap collective had switched devices.
        self._device = runtime.device_id
        self.runtime = runtime
        self._topology = topology
        self._comm_stream = torch.cuda.ExternalStream(runtime.comm_stream(),
                                                      device=torch.device("cuda", runtime.device_id))
        self._internode = None
        if internode:
            try:
                self._internode = _internode.build_stages(self, group, comm, num_nvl_bytes, num_rdma_bytes)
            except BaseException:
                # build_stages raises on every rank together, so every rank frees the outer runtime.
                self._destroyed = True
                try:
                    runtime.destroy()
                except Exception:  # noqa: BLE001 - the construction error is the one to report
                    pass
                raise

    # ---- lifecycle ---------------------------------------------------------------------------------

    def destroy(self) -> None:
        """Waits until no peer still uses the buffers (collective), then frees them. Any later use of
        this Buffer raises RuntimeError. Idempotent."""
        try:
            try:
                if self._internode is not None:
                    self._internode.destroy()
            finally:
                # Every rank joins the outer destroy barrier, whatever the inner ones did.
                self.runtime.destroy()
        finally:
            # The runtime frees everything even when its closing barrier fails.
            self._destroyed = True

    def _check_usable(self, op: str) -> None:
        # The runtime raises too, but Python must not first allocate on, or record on, a freed stream.
        if self._destroyed:
            raise RuntimeError(f"moelink.Buffer.{op}: the Buffer was destroyed")

    @property
    def _torch_shim(self) -> bool:
        """Whether the extension makes output tensors through torch's C shim (MOELINK_TORCH_SHIM,
        read at construction). Process-wide; settable for side-by-side timing
        (``bench/interleaved.py --switch python:_torch_shim=False``)."""
        return _moelink.torch_shim_in_use()

    @_torch_shim.setter
    def _torch_shim(self, use: bool) -> None:
        _moelink.use_torch_shim(bool(use))

    @property
    def _pack_outputs(self) -> bool:
        """Whether a call's small outputs share one allocation, as views (through the shim, where
        it has them). Process-wide; settable for side-by-side timing
        (``bench/interleaved.py --switch single:_pack_outputs=False``)."""
        return _moelink.torch_shim_packs()

    @_pack_outputs.setter
    def _pack_outputs(self, use: bool) -> None:
        _moelink.use_packing(bool(use))

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
        """Bytes of ``num_rdma_bytes`` a low-latency Buffer needs for these arguments: never below
        deep_ep V1's hint for the same arguments, so a buffer sized for deep_ep fits."""
        return _low_latency.rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

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
        if self._internode is not None:
            return self._internode.stream  # internode operations run on a stream of their own
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
        if self._topology.num_rdma_ranks > 1 and not self.low_latency_mode:
            # Internode: the buffers are the inner Buffers' (the lane's is the node-to-node one).
            stages = _internode._stages(self, "get_local_buffer_tensor", collective=False)
            inner = stages.lane if use_rdma_buffer else stages.node
            return inner.get_local_buffer_tensor(dtype, size, offset, False)
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
        allocated there already. The range returns to the arena when the tensor is freed. An
        ordinary torch input is read in place too once the token owners have mapped its segment
        (named twice within a few operations, by a combine or a dispatch whose output shares it;
        MOELINK_PEER_SEGMENTS); until then its rows go through the rings.
        """
        self._check_usable("arena_empty")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        shape = tuple(_check_int(v, "size", 0) for v in ([size] if isinstance(size, int) else size))
        tensors = _arena.arena_tensors(self, [(shape, dtype)])
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
        return _intranode.get_dispatch_layout(self, topk_idx, num_experts, previous_event, async_finish,
                                              allocate_on_comm_stream)

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
            x: bf16 [num_tokens, hidden], or a tuple (float8_e4m3fn [num_tokens, hidden], scales): float32
                [num_tokens, hidden / 128], or UE8M0 exponents packed four to an int32 [num_tokens,
                ceil(hidden / 512)]; row- or column-major. recv_x's scales keep the dtype and layout.
            handle: the handle of an earlier dispatch to repeat its routing (cached mode); then the
                layout arguments, topk_idx and topk_weights must be None.
            num_tokens_per_rank: int32 [num_ranks], from get_dispatch_layout.
            num_tokens_per_rdma_rank: int32 [num_nodes] or None; unused within one node.
            is_token_in_rank: bool [num_tokens, num_ranks], from get_dispatch_layout.
            num_tokens_per_expert: int32 [num_experts], from get_dispatch_layout.
            topk_idx: int64 [num_tokens, num_topk], expert ids, -1 for an unused slot; or None, to route
                rows by is_token_in_rank alone (recv_topk_idx and recv_topk_weights are then None).
            topk_weights: float32 [num_tokens, num_topk] or None.
            expert_alignment: int >= 1; each num_recv_tokens_per_expert_list entry is rounded up to it.
            num_worst_tokens: int >= 0; when > 0 the receive tensors have exactly this many rows and the
                host does not wait for the counts (num_recv_tokens_per_expert_list is then []).
            config: Config, default ``get_dispatch_config(num_ranks)`` (with num_sms lowered to what
                lets every rank sharing this GPU run at once).
            previous_event, async_finish, allocate_on_comm_stream: as in get_dispatch_layout.

        Every rank must make the same call: ranks that disagree on the operation, config, hidden
        size, dtype, top-k, num_experts or handle, and bad input on any one rank (an expert id outside
        [-1, num_experts), more rows than num_worst_tokens), make every rank raise ValueError. A call
        that does not wait on the host (num_worst_tokens > 0) returns outputs that are poisoned
        (NaN, -1), and the error comes out at the end of the first call whose host has seen it
        then (a collective raises it after its launches, so every rank still ran that call): this
        call or a later one. A lost peer raises TimeoutError at the next call. Ranks may raise at
        different calls, so after a ValueError a rank must keep making the same collective calls
        as its peers (or every rank tears down together): one that skips a call leaves its peers
        waiting for it (docs/COMPATIBILITY.md).

        Returns:
            recv_x: like x, with num_recv_tokens rows: the rows from all ranks, ordered by source rank,
                then source token index.
            recv_topk_idx: int64 [num_recv_tokens, num_topk], local expert ids (id - rank *
                num_local_experts), -1 for experts on other ranks; None in cached mode or without topk_idx.
            recv_topk_weights: float32 [num_recv_tokens, num_topk] or None (no topk_weights, or cached).
            num_recv_tokens_per_expert_list: list[int] of num_local_experts aligned counts; None in
                cached mode.
            handle: (rank_prefix_matrix int32 [R, R], channel_prefix_matrix int32 [R, C],
                recv_channel_prefix_matrix int32 [R, C], recv_src_idx int32 [num_recv_tokens],
                is_token_in_rank bool [num_tokens, R], info int64 [2]) with C = config.num_sms // 2; pass
                it to combine or to a cached dispatch. info (the dispatch's id, and whether it failed) is
                written on the device.
            event: EventOverlap.
        """
        return _intranode.dispatch(self, x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                                   num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens,
                                   config, previous_event, async_finish, allocate_on_comm_stream)

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
        return _intranode.combine(self, x, handle, topk_weights, bias, config, previous_event, async_finish,
                                  allocate_on_comm_stream)

    # ---- internode normal mode (experimental: MOELINK_EXPERIMENTAL_INTERNODE=1) -------------------

    def internode_dispatch(self, x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
                           handle: Optional[tuple] = None, num_tokens_per_rank: Optional[torch.Tensor] = None,
                           num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                           is_token_in_rank: Optional[torch.Tensor] = None,
                           num_tokens_per_expert: Optional[torch.Tensor] = None,
                           topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                           expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                           previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                           allocate_on_comm_stream: bool = False) -> tuple:
        """Dispatch across nodes (python/moelink/_internode.py); same arguments and results as dispatch."""
        return _internode.dispatch(self, x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                                   num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens,
                                   config, previous_event, async_finish, allocate_on_comm_stream)

    def internode_combine(self, x: torch.Tensor, handle: tuple, topk_weights: Optional[torch.Tensor] = None,
                          bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None] = None,
                          config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                          async_finish: bool = False, allocate_on_comm_stream: bool = False) -> tuple:
        """Combine across nodes; same arguments as combine."""
        return _internode.combine(self, x, handle, topk_weights, bias, config, previous_event, async_finish,
                                  allocate_on_comm_stream)

    # ---- low-latency mode ---------------------------------------------------------------------------

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Prepares the low-latency buffers for these arguments (collective): zeroes this rank's signal
        words between two barriers. Call it before low-latency calls with another expert count than
        the last ones (calls of one layout never need it: signals carry their call's number)."""
        _low_latency.clean_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False) -> Tuple[Any, torch.Tensor, tuple, EventOverlap, Callable]:
        """Sends each (token, top-k slot) to its expert's rank, into an expert-major layout.

        Arguments:
            x: bf16 [num_tokens, hidden], num_tokens <= num_max_dispatch_tokens_per_rank.
            topk_idx: int64 [num_tokens, num_topk], -1 for an unused slot.
            num_max_dispatch_tokens_per_rank (M), num_experts: as the Buffer was sized for.
            cumulative_local_expert_recv_stats: int32 [E_local] or None; += each expert's rows.
            dispatch_wait_recv_cost_stats: int64 [R] or None; += ns waited for each source.
            use_fp8, round_scale, use_ue8m0: cast to fp8 with per-128 scales (amax / 448), rounded to
                powers of two, packed as UE8M0 exponent bytes (needs round_scale).
            async_finish / return_recv_hook (exclusive): return without waiting / send only and return
                a hook that receives.

        Returns:
            recv_x: [E_local, R * M, H] bf16, or (fp8 [E_local, R * M, H], scales float32
                [E_local, R * M, H / 128] or int32 [.., H / 512]), scales column-major in the last two
                dims; expert le's first recv_count[le] rows are valid, each source's rows one block.
            recv_count: int32 [E_local].
            handle: (src_info int32 [E_local, R * M], layout_range int64 [E_local, R] = begin << 32 |
                count, M, hidden, num_experts).
            event: EventOverlap. hook: call it to receive when return_recv_hook.
        """
        return _low_latency.dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                     cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8,
                                     round_scale, use_ue8m0, async_finish, return_recv_hook)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: tuple,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, EventOverlap, Callable]:
        """Sends each expert's output row back to its token's rank and returns, per token, the sum
        over its top-k slots of topk_weights * that expert's row (float32, rounded once to bf16).

        Arguments:
            x: bf16 [E_local, R * M, H]: the experts' outputs, in the dispatch's layout.
            topk_idx, topk_weights: the dispatch's [num_tokens, num_topk] (int64, float32).
            handle: the dispatch's handle.
            use_logfmt: bool; rows travel in moelink's LogFMT (10-bit log codes per 128 values, bf16 for
                groups with a NaN or an infinity): per value within 0.83% + 2**-12 x its group's
                largest magnitude, 168 of 256 bytes per group (tests/reference/logfmt_reference.py).
            zero_copy: x was written into get_next_low_latency_combine_buffer(handle) (it is read in
                place either way).
            async_finish / return_recv_hook: as in low_latency_dispatch.
            out: bf16 [num_tokens, H] to write into, or None.
            combine_wait_recv_cost_stats: int64 [R] or None; += ns waited for each source.

        Returns: (combined_x [num_tokens, H] bf16, EventOverlap, hook).
        """
        return _low_latency.combine(self, x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish,
                                    return_recv_hook, out, combine_wait_recv_cost_stats)

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """[E_local, R * M, H] bf16 in this rank's low-latency region, to write the next combine's
        input into (two such areas alternate)."""
        return _low_latency.next_combine_buffer(self, handle)

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Masks (mask=True) or unmasks rank_to_mask in this rank's view (enable_shrink): low-latency
        calls skip a masked rank, do not wait for it, and drop its experts' top-k slots from combine.
        Ordered with the calls on the current stream."""
        _low_latency.update_mask_buffer(self, rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Writes this rank's mask into ``mask_status`` (int32 [num_ranks] CUDA, 1 = masked), on the
        current stream: ranks masked by hand or because they stopped answering (enable_shrink)."""
        _low_latency.query_mask_buffer(self, mask_status)

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmasks every rank in this rank's view (enable_shrink), on the current stream."""
        _low_latency.clean_mask_buffer(self)
