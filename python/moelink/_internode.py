"""Internode normal mode (experimental): dispatch and combine across nodes, as two exchanges that the
intranode mode already does right.

A group of N nodes x L GPUs (global rank n * L + l) gets two inner Buffers on every rank:

- the *lane* Buffer over the N ranks of lane l (rank l of every node): the node-to-node leg. A token
  crosses it once per destination node, to the rank of its own lane there (the forwarder), with its
  top-k ids and weights. In this version the leg runs over CUDA IPC, so every rank must be on one
  host (nodes emulated on one machine, the way the test suite runs them); the NVSHMEM leg between
  real nodes is not implemented yet and Buffer construction says so. The lane takes the rings only
  (no direct writes, pull combine or peer segments: none of them reaches another node), and with
  MOELINK_DEBUG_LANE_FORCE_PUT=fake its kernels (ring senders, notify, openings, barriers) run the
  put path's protocol over IPC; with =nvshmem the lane's ranks join an NVSHMEM job of their own and
  its kernels put over a symmetric region (docs/internal/INTERNODE_LANE.md; not run on a GPU yet).
  Its rank n is node n: errors name a lost lane peer by its node.
- the *node* Buffer over the L ranks of node n: the forwarder sends each token it received on to the
  ranks of its node that hold one of its experts, and combine sums a node's rows at the forwarder,
  so one partial row per (token, node) crosses back.

dispatch: lane exchange of x with its top-k (by the node mask of is_token_in_rank; over the lane
the experts split by node, so a forwarder receives its node's experts renumbered from 0), the
node's layout of the forwarded tokens, the node exchange with top-k, and one cached node exchange
of each row's source (global rank, token). Received rows are then sorted by source global rank, then source
token, as intranode orders them. combine undoes the sort, sums each node's rows at its forwarders
(node combine), and sums the nodes' partial rows at the token's rank (lane combine, which adds the
bias). Everything runs on a stream of this module, after the caller's stream or previous_event; the
caller's stream waits unless async_finish. The handle is a 6-tuple like intranode's, with the
received rows' source tokens at [3] and is_token_in_rank at [4]; the rest is opaque.

Rows cross HBM one more time than a fused pipeline would (the forwarder's received rows, and the
sort); the point of this version is the semantics, checked against the reference on the CPU with
the inner Buffers modelled (tests/cpu/test_internode_composition.py) and on one GPU
(tests/gpu/test_internode.py). The lane leg waits on the host for its counts even with
num_worst_tokens (see dispatch). is_token_in_rank must be the one get_dispatch_layout returned for
topk_idx: between nodes rows follow it, within a node they follow topk_idx. A rank whose
own checks fail, or whose inner exchange fails, abstains from the exchanges still to come (_Steps),
so the error reaches every rank instead of leaving them waiting.
"""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Tuple, Union

import torch

from . import _arena, _bootstrap, _knobs, _moelink
from ._checks import _check_config, _check_int, _check_tensor, _split_bias, _split_x, _tensors
from ._streams import check_order
from ._moelink import Config
from .event import EventOverlap

if TYPE_CHECKING:
    from .buffer import Buffer

_NOT_ENABLED = ("internode normal mode is experimental in moelink (nodes emulated on one host): set "
                "MOELINK_EXPERIMENTAL_INTERNODE=1 before building the Buffer to use it")
_NOT_WITH_LOW_LATENCY = ("normal-mode dispatch and combine across nodes on a low_latency_mode Buffer are not "
                         "implemented: build a Buffer without low_latency_mode for them")
_META_WIDTH = 16  # bytes of the (source rank, source token) row of the last node exchange
# The lane exchange holds a node's experts per rank: the runtime's limit on one rank's experts.
_MAX_EXPERTS_PER_NODE: int = _moelink.MAX_LOCAL_EXPERTS


class InternodeHandle(tuple):
    """(per-source-rank row prefix [R] int32, lane handle, node handle, recv_src_idx [N] int32,
    is_token_in_rank [T, R] bool, sort [N] int64); a plain tuple to anyone who unpacks it."""


def _members(topology: Any) -> Tuple[List[int], List[int]]:
    """The global ranks of this rank's node and of its lane (rank n * L + l is GPU l of node n)."""
    per_node, num_nodes = topology.num_nvl_ranks, topology.num_rdma_ranks
    node = [topology.rdma_rank * per_node + j for j in range(per_node)]
    lane = [m * per_node + topology.nvl_rank for m in range(num_nodes)]
    return node, lane


class Stages:
    """The two inner Buffers of an internode Buffer and what routing between them needs."""

    def __init__(self, buf: "Buffer", node: "Buffer", lane: "Buffer", ranks_per_gpu: int) -> None:
        topology = buf._topology
        self.ranks_per_gpu = ranks_per_gpu
        self.num_nodes, self.per_node = topology.num_rdma_ranks, topology.num_nvl_ranks
        self.node_index, self.lane_index = topology.rdma_rank, topology.nvl_rank
        self.node, self.lane = node, lane
        self.node_members, self.lane_members = _members(topology)
        self.stream = torch.cuda.Stream(device=buf._device)
        # Data errors of the legs are raised at the end of the internode operation (_raise_pending).
        for inner in (node, lane):
            inner.runtime.defer_data_errors(True)

    def destroy(self) -> None:
        first = None
        for inner in (self.lane, self.node):
            try:
                inner.destroy()
            except Exception as error:  # noqa: BLE001 - the others are still destroyed, then it is raised
                first = first or error
        if first is not None:
            raise first


def build_stages(buf: "Buffer", group: Any, comm: Any, num_nvl_bytes: int, num_rdma_bytes: int) -> Optional[Stages]:
    """The inner Buffers of an internode Buffer (collective over its group), or None without
    MOELINK_EXPERIMENTAL_INTERNODE=1 (then dispatch and combine say how to enable them)."""
    from .buffer import Buffer  # noqa: PLC0415 - buffer imports this module

    if not _knobs.experimental_internode():
        return None
    rank, num_ranks, all_gather = _bootstrap.rank_and_all_gather(group, comm)
    topology = buf._topology
    num_nodes = topology.num_rdma_ranks
    # Every rank decides the same from the same gathered facts, so all raise together or none.
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    try:
        lane_put = _moelink.debug_lane_force_put()
    except ValueError:
        lane_put = None  # serve_as_internode_lane raises it below, on every rank together
    facts = all_gather((socket.gethostname(), str(props.uuid), num_rdma_bytes, lane_put, _moelink.nvshmem_world()))
    hosts = [host for host, _, _, _, _ in facts]
    ranks_per_gpu = sum(1 for _, uuid, _, _, _ in facts if uuid == str(props.uuid))
    if len(set(hosts)) > 1:
        raise NotImplementedError("moelink internode mode runs its node-to-node leg over CUDA IPC for now, so every "
                                  "rank must be on one host (emulated nodes); the NVSHMEM leg between hosts is not "
                                  f"implemented yet (ranks are on {len(set(hosts))} hosts)")
    if num_nodes > 8:
        raise NotImplementedError(f"moelink internode mode reaches at most 8 nodes, got {num_nodes}")
    short = [r for r, (_, _, nbytes, _, _) in enumerate(facts) if not isinstance(nbytes, int) or nbytes <= 0]
    if short:
        raise ValueError(f"num_rdma_bytes: internode mode needs a node-to-node buffer (rank {short[0]} passed "
                         f"{facts[short[0]][2]}); size it with Config.get_rdma_buffer_size_hint")
    _check_lane_puts([put for _, _, _, put, _ in facts])
    shared_world = None
    if lane_put == "nvshmem":
        # The lanes are PEs of one NVSHMEM world over the whole group (PE = global rank), so their
        # regions are one symmetric allocation: the same size on every rank.
        sizes = sorted({nbytes for _, _, nbytes, _, _ in facts})
        if len(sizes) > 1:
            other = next(r for r, fact in enumerate(facts) if fact[2] != facts[0][2])
            raise ValueError(f"num_rdma_bytes: every rank must pass the same size for the NVSHMEM lanes' symmetric "
                             f"region; rank 0 passed {facts[0][2]}, rank {other} {facts[other][2]}")
        shared_world = _bootstrap.shared_world([world for _, _, _, _, world in facts], num_ranks)
    node_members, lane_members = _members(topology)
    common = dict(num_rdma_bytes=0, explicitly_destroy=buf.explicitly_destroy, num_arena_bytes=0)
    built: List["Buffer"] = []
    try:
        for name, members, nbytes in (("node", node_members, num_nvl_bytes), ("lane", lane_members, num_rdma_bytes)):
            built.append(_together(all_gather, name, lambda m=members, b=nbytes: Buffer(
                _bootstrap.SubGroup(all_gather, m, rank), b, **common)))
        lane = built[1]
        root_unique_id = None
        if lane_put == "nvshmem":
            # Every lane is a team of the group's one NVSHMEM world (PE = global rank, rooted at rank
            # 0, or the world the processes share already with a low-latency Buffer): one job, so one
            # first PE asks the MPS control daemon at init. One job per lane had 2 to 4 first PEs ask
            # at once, and NVSHMEM exits the process when the daemon refuses one (bench/NOTES.md,
            # fourteenth session). Every rank loads the plugin first, so that none joins while a peer
            # cannot.
            ids = _gathered(all_gather, "lane", lambda: lane.runtime.prepare_nvshmem_lane(rank == 0))
            root_unique_id = shared_world if shared_world is not None else ids[0]

        def as_lane() -> "Buffer":
            # Before its first operation: the lane takes the rings only, and the window the knob names
            # (MOELINK_DEBUG_LANE_FORCE_PUT); with nvshmem it joins and moves into a symmetric region.
            if lane_put == "nvshmem":
                lane.runtime.serve_as_internode_lane(root_unique_id, rank, num_ranks, lane_members)
            else:
                lane.runtime.serve_as_internode_lane(root_unique_id)
            return lane

        _together(all_gather, "lane", as_lane)
    except BaseException:
        # Every rank is here together (_together): each frees what its groups built.
        for inner in reversed(built):
            try:
                inner.destroy()
            except Exception:  # noqa: BLE001 - the construction error is the one to report
                pass
        raise
    return Stages(buf, built[0], built[1], ranks_per_gpu)


def _together(all_gather: Any, name: str, build: Any) -> Any:
    """build() on every rank, then one parent all-gather of how it went, so that a failure in one
    inner group raises on every rank (the other groups' ranks would otherwise go on to the next
    inner Buffer's all-gather and wait there for ranks that are raising)."""
    try:
        result, error = build(), None
    except Exception as caught:  # noqa: BLE001 - reported to every rank, then re-raised here
        result, error = None, caught
    verdicts = all_gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, v) for r, v in enumerate(verdicts) if v is not None]
    if failed:
        result.destroy()
        r, message = failed[0]
        raise RuntimeError(f"moelink internode Buffer: rank {r} could not build its {name} Buffer ({message})")
    return result


def _check_lane_puts(puts: List[Optional[str]]) -> None:
    """Every rank's MOELINK_DEBUG_LANE_FORCE_PUT (None: malformed there). An NVSHMEM lane joins with
    its peers, so a rank that took another window would leave them waiting in the join."""
    if "nvshmem" in puts and any(put != "nvshmem" for put in puts):
        other = next(r for r, put in enumerate(puts) if put != "nvshmem")
        raise ValueError(f"MOELINK_DEBUG_LANE_FORCE_PUT: every rank must set it alike; rank {puts.index('nvshmem')} "
                         f"has nvshmem, rank {other} {puts[other] or 'a malformed value'}")


def _gathered(all_gather: Any, name: str, make: Any) -> List[Any]:
    """make() on every rank, then every rank's result: a failure on one rank raises on every rank
    (as _together does), before any of them uses the results."""
    try:
        result, error = make(), None
    except Exception as caught:  # noqa: BLE001 - reported to every rank, then re-raised here
        result, error = None, caught
    gathered = all_gather((None if error is None else f"{type(error).__name__}: {error}", result))
    if error is not None:
        raise error
    failed = [(r, verdict) for r, (verdict, _) in enumerate(gathered) if verdict is not None]
    if failed:
        r, message = failed[0]
        raise RuntimeError(f"moelink internode Buffer: rank {r} could not prepare its {name} Buffer ({message})")
    return [value for _, value in gathered]


def _stages(buf: "Buffer", op: str, collective: bool = True) -> Stages:
    buf._check_usable(op)
    if buf._internode is None:
        raise NotImplementedError(_NOT_WITH_LOW_LATENCY if buf.low_latency_mode else _NOT_ENABLED)
    stages = buf._internode
    if not collective:  # a local getter
        return stages
    # A lost peer on either inner Buffer raises before any exchange. Data errors do not: the inner
    # Buffers hold them back through every leg, and the operation raises them at its end
    # (_raise_pending). A rank that raised one on entry, or at a leg's end, would open no further
    # leg while its peers, whose hosts had not seen the record yet, open the next one and wait for
    # it (runtime/context.hpp says more).
    for leg in ("lane", "node"):
        try:
            getattr(stages, leg).runtime.check_faults()
        except Exception as error:  # noqa: BLE001 - re-raised, saying which leg and whose ranks
            name = op[len("internode_"):] if op.startswith("internode_") else op  # as _Steps names it
            raise _in_leg(error, name, leg, getattr(stages, f"{leg}_members")) from error
    return stages


def _raise_pending(stages: Stages, op: str) -> None:
    """The end of an internode operation, after its last leg: the data error either inner Buffer
    held back (this operation's or an earlier one's) is raised, once that Buffer's comm stream has
    drained. Both are cleared before the first is raised."""
    first = None
    for leg in ("lane", "node"):
        inner = getattr(stages, leg)
        try:
            inner.runtime.defer_data_errors(False)
            inner.runtime.raise_pending_errors()
        except Exception as error:  # noqa: BLE001 - the first is raised once both are cleared
            first = first or (_in_leg(error, op, leg, getattr(stages, f"{leg}_members")), error)
        finally:
            inner.runtime.defer_data_errors(True)
    if first is not None:
        raise first[0] from first[1]


def _configs(buf: "Buffer", config: Optional[Config], which: str) -> Tuple[Config, Config]:
    """(node config, lane config): the node exchange uses the NVLink fields, the lane exchange the
    RDMA fields, both with one num_sms that every rank of the GPU can hold at once: both exchanges
    run on all ranks together, so every rank sharing the GPU counts, not only an inner Buffer's."""
    fit = buf.runtime.max_num_sms(buf._internode.ranks_per_gpu)
    if config is not None:
        config = _check_config(config)
    if config is None:
        make = _moelink.default_dispatch_config if which == "dispatch" else _moelink.default_combine_config
        config = make(buf.group_size, min(type(buf).num_sms, fit))
    elif config.num_sms > fit:
        raise ValueError(f"num_sms: num_sms = {config.num_sms} is too many: {buf._internode.ranks_per_gpu} ranks share "
                         f"this GPU and every rank's blocks must be resident at once; use num_sms <= {fit}")
    node = Config(config.num_sms, config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens)
    lane = Config(config.num_sms, config.num_max_rdma_chunked_send_tokens, config.num_max_rdma_chunked_recv_tokens)
    return node, lane


class _OnStream:
    """Runs an internode operation on the module's stream, ordered after previous_event or the caller's
    stream; the caller's stream waits at the end unless async_finish."""

    def __init__(self, stages: Stages, previous_event: Optional[EventOverlap], async_finish: bool) -> None:
        # previous_event and async_finish were checked with the operation's arguments (check_order).
        self.stream = stages.stream
        self.caller = torch.cuda.current_stream()
        self.previous_event, self.async_finish = previous_event, async_finish

    def __enter__(self) -> "_OnStream":
        if self.previous_event is not None and self.previous_event.event is not None:
            self.previous_event.event.stream_wait(self.stream.cuda_stream)
        else:
            self.stream.wait_stream(self.caller)
        self._context = torch.cuda.stream(self.stream)
        self._context.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)

    def finish(self, inputs: List[Any], outputs: List[Any]) -> EventOverlap:
        """Tensors cross streams: inputs were made on the caller's (which, unless async_finish,
        waits for this one before it can reuse them), outputs on this one."""
        inputs, outputs = _tensors(*inputs), _tensors(*outputs)
        if self.async_finish:
            for t in inputs:
                t.record_stream(self.stream)
        for t in outputs:
            t.record_stream(self.caller)
        event = _moelink.EventHandle(self.stream.cuda_stream)
        if not self.async_finish:
            event.stream_wait(self.caller.cuda_stream)
        return EventOverlap(event, extra_tensors=tuple(inputs + outputs))


def _row_bytes(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor's rows as uint8 [rows, columns * element size] (also for zero rows)."""
    width = t.size(1) * t.element_size()
    if t.numel() == 0:  # an empty tensor counts as contiguous with any strides, and view() refuses those
        return torch.empty((t.size(0), width), dtype=torch.uint8, device=t.device)
    return t.contiguous().view(torch.uint8).view(t.size(0), width)


def _as_rows(t: torch.Tensor, width_bytes: int) -> torch.Tensor:
    """t's bytes per row, padded to width_bytes, as a bf16 [rows, width_bytes / 2] tensor (the exchanges
    move rows of 16-byte multiples bit for bit)."""
    flat = _row_bytes(t)
    raw = torch.zeros((t.size(0), width_bytes), dtype=torch.uint8, device=t.device)
    raw[:, :flat.size(1)] = flat
    return raw.view(torch.bfloat16)


def _from_rows(rows: torch.Tensor, dtype: torch.dtype, columns: int, offset_bytes: int = 0) -> torch.Tensor:
    """The `columns` values of `dtype` at byte offset_bytes of every row of a bf16 rows tensor."""
    raw = _row_bytes(rows)
    size = torch.empty((), dtype=dtype).element_size() * columns
    return raw[:, offset_bytes:offset_bytes + size].contiguous().view(dtype).view(rows.size(0), columns)


def _gather_rows(t: Any, order: torch.Tensor) -> Any:
    """t's rows in `order`, keeping a column-major layout column-major (fp8 scales)."""
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(_gather_rows(part, order) for part in t)
    if t.dtype == torch.float8_e4m3fn:  # moved as bytes: index kernels need not support fp8
        return _gather_rows(t.view(torch.uint8), order).view(torch.float8_e4m3fn)
    if t.dim() == 2 and _arena.scales_column_major(t):
        return t.t().index_select(1, order).t()
    return t.index_select(0, order)


class _Steps:
    """The inner exchanges of one internode operation, in their order. When one of them fails on
    this rank, or this rank's own checks fail before the first, the rank abstains from the rest: each
    inner group then skips its exchange with an error on every member instead of waiting for this
    rank. Where the exchanges wait on the host, the members that learn of it at the call abstain in
    turn, so the error reaches every rank of the Buffer and none waits out a timeout; where they do
    not, the members raise it at the end of this operation or of a later one (_raise_pending) and
    ranks further away not at all (docs/COMPATIBILITY.md). Errors raised here name the inner
    group's ranks; the message says which global ranks those are. legs: the inner Buffer of each
    exchange ("lane" or "node"), in order."""

    def __init__(self, stages: Stages, op: str, legs: Tuple[str, ...]) -> None:
        self.stages, self.op, self.legs, self.done = stages, op, legs, 0

    def run(self, call: Any) -> Any:
        leg = self.legs[self.done]
        try:
            result = call()
        except Exception as error:  # noqa: BLE001 - re-raised, after abstaining from the rest
            self.done += 1
            self.abandon()
            raise _in_leg(error, self.op, leg, getattr(self.stages, f"{leg}_members")) from error
        self.done += 1
        return result

    def abandon(self) -> None:
        for leg in self.legs[self.done:]:
            inner = getattr(self.stages, leg)
            if not inner._destroyed:
                inner.runtime.abstain()
        self.done = len(self.legs)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Code of this rank between the exchanges (its own argument checks, its local work): if it
        fails, the rank abstains from the exchanges still to come."""
        try:
            yield
        except BaseException:
            self.abandon()
            raise


def _in_leg(error: BaseException, op: str, leg: str, members: List[int]) -> BaseException:
    # The lane's rank n is node n (its runtime names it "rank n (node n)"); a node's rank j is GPU j.
    if leg == "lane":
        note = (f" [internode {op}, node-to-node exchange (lane): its ranks 0..{len(members) - 1} are nodes "
                f"0..{len(members) - 1}, global ranks {members}]")
    else:
        note = f" [internode {op}, in-node exchange: its ranks 0..{len(members) - 1} are global ranks {members}]"
    try:
        return type(error)(f"{error}{note}")
    except Exception:  # noqa: BLE001 - an exception type that takes other arguments keeps its own message
        return error


def dispatch(buf: "Buffer", x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], handle: Optional[tuple],
             num_tokens_per_rank: Optional[torch.Tensor], num_tokens_per_rdma_rank: Optional[torch.Tensor],
             is_token_in_rank: Optional[torch.Tensor], num_tokens_per_expert: Optional[torch.Tensor],
             topk_idx: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor], expert_alignment: int,
             num_worst_tokens: int, config: Optional[Config], previous_event: Optional[EventOverlap],
             async_finish: bool, allocate_on_comm_stream: bool) -> tuple:
    stages = _stages(buf, "internode_dispatch")
    if handle is not None:
        return _cached_dispatch(buf, stages, x, handle, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                                topk_idx, topk_weights, config, previous_event, async_finish, allocate_on_comm_stream)
    by_topk = topk_idx is not None
    # Without top-k a second lane leg carries each token's is_token_in_rank row, from which the
    # forwarder routes it within its node.
    legs = ("lane", "node", "node") if by_topk else ("lane", "lane", "node", "node")
    steps = _Steps(stages, "dispatch", legs)
    with steps.guard():
        node_config, lane_config = _configs(buf, config, "dispatch")
        async_finish = check_order(previous_event, async_finish, allocate_on_comm_stream)[0]
        x_data, x_scales = _split_x(x)
        for name, t in (("is_token_in_rank", is_token_in_rank), ("num_tokens_per_expert", num_tokens_per_expert)):
            _check_tensor(t, name)
        _check_tensor(topk_idx, "topk_idx", optional=True)
        _check_tensor(topk_weights, "topk_weights", optional=True)
        expert_alignment = _check_int(expert_alignment, "expert_alignment", 1)
        num_worst_tokens = _check_int(num_worst_tokens, "num_worst_tokens", 0)
        if by_topk:
            if topk_idx.dim() != 2:
                raise ValueError(f"topk_idx: expected [num_tokens, num_topk], got {list(topk_idx.shape)}")
            T, num_topk = topk_idx.shape
        else:
            if topk_weights is not None:
                raise ValueError("topk_weights: given without topk_idx (a dispatch routed by is_token_in_rank alone "
                                 "carries no weights)")
            if x_data.dim() != 2:
                raise ValueError(f"x: expected [num_tokens, hidden], got {list(x_data.shape)}")
            T = x_data.size(0)
        num_experts = num_tokens_per_expert.numel()
        if num_experts % buf.group_size:
            raise ValueError(f"num_tokens_per_expert: {num_experts} experts do not split over {buf.group_size} ranks")
        if num_experts // stages.num_nodes > _MAX_EXPERTS_PER_NODE:
            raise ValueError(f"num_tokens_per_expert: {num_experts} experts over {stages.num_nodes} nodes is more than "
                             f"{_MAX_EXPERTS_PER_NODE} per node, the most internode mode routes")
        if tuple(is_token_in_rank.shape) != (T, buf.group_size) or is_token_in_rank.dtype != torch.bool:
            raise ValueError(f"is_token_in_rank: expected bool [{T}, {buf.group_size}], got "
                             f"{is_token_in_rank.dtype} {list(is_token_in_rank.shape)}")
        if by_topk and topk_weights is not None and tuple(topk_weights.shape) != (T, num_topk):
            raise ValueError(f"topk_weights: expected [{T}, {num_topk}] like topk_idx, got {list(topk_weights.shape)}")
    N, L = stages.num_nodes, stages.per_node
    experts_per_node = num_experts // N
    with_weights = topk_weights is not None
    with steps.guard(), _OnStream(stages, previous_event, async_finish) as on:
        # The lane exchange: each token once to every node that needs it. Over the lane the E
        # experts split by node (lane rank n holds node n's), so with top-k the forwarder receives
        # its node's experts renumbered from 0 (-1 for the others) and their weights, and the lane's
        # notify checks every id as intranode does (one outside [-1, E) raises on every rank);
        # without, the lane's count list is each node expert's total over the lane's sources.
        # The lane leg waits on the host for its counts even with num_worst_tokens: an error it finds
        # then raises on its ranks at the call, and they abstain from the node legs, so every rank
        # hears of it (without the wait the other lanes' ranks would get rows silently missing and
        # never hear why); and the forwarder's receive is exact, where its worst case is
        # GPUs-per-node x num_worst_tokens rows. The cost: one host wait, so not graph-safe yet.
        in_node = is_token_in_rank.reshape(T, N, L).any(dim=2)
        per_node = in_node.sum(dim=0, dtype=torch.int32)
        a_x, a_topk, a_weights, a_list, a_handle, _ = steps.run(lambda: stages.lane.dispatch(
            x, num_tokens_per_rank=per_node, is_token_in_rank=in_node, num_tokens_per_expert=num_tokens_per_expert,
            topk_idx=topk_idx, topk_weights=topk_weights, num_worst_tokens=0, config=lane_config))
        a_valid = a_handle[3] >= 0  # rows past the real ones (num_worst_tokens) hold nothing
        here = slice(stages.node_index * L, (stages.node_index + 1) * L)
        if by_topk:
            # The node exchange: the ranks of the node holding one of the row's experts.
            here_k = (a_topk >= 0) & a_valid.unsqueeze(1)
            b_topk = torch.where(here_k, a_topk, torch.full_like(a_topk, -1))
            b_weights = torch.where(here_k, a_weights, torch.zeros_like(a_weights)) if with_weights else None
            b_per_rank, _, b_per_expert, b_in_rank, _ = stages.node.get_dispatch_layout(b_topk, experts_per_node)
        else:
            # The node exchange: the ranks of this node the token's is_token_in_rank row names, and the
            # node's experts' totals (each rank's count list then sums every source's counts).
            # Built before the leg opens: a failure here must abstain from it, not count as having run it.
            mask_rows = _as_rows(is_token_in_rank, -(-buf.group_size // 16) * 16)
            a_mask = _from_rows(steps.run(lambda: stages.lane.dispatch(mask_rows, handle=a_handle,
                                                                       config=lane_config))[0],
                                torch.bool, buf.group_size)
            b_in_rank = (a_mask[:, here] & a_valid.unsqueeze(1)).contiguous()
            b_per_rank = b_in_rank.sum(dim=0, dtype=torch.int32)
            b_per_expert = torch.tensor(a_list, dtype=torch.int32, device=b_in_rank.device)
            b_topk = b_weights = None
        b_x, b_topk_out, b_weights_out, per_expert_list, b_handle, _ = steps.run(lambda: stages.node.dispatch(
            a_x, num_tokens_per_rank=b_per_rank, is_token_in_rank=b_in_rank, num_tokens_per_expert=b_per_expert,
            topk_idx=b_topk, topk_weights=b_weights, expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens, config=node_config))
        # Each row's source, to put the rows in global order: (global rank, token) of the lane rows.
        prefix = a_handle[0][:, stages.node_index].to(torch.int64)  # rows from lane sources 0..s
        rows = torch.arange(a_valid.size(0), device=prefix.device)
        source_node = torch.searchsorted(prefix, rows, right=True)
        source = torch.stack([(source_node * L + stages.lane_index).to(torch.int32), a_handle[3].to(torch.int32)], 1)
        source_rows = _as_rows(source, _META_WIDTH)
        b_source = _from_rows(steps.run(lambda: stages.node.dispatch(source_rows, handle=b_handle,
                                                                     config=node_config))[0], torch.int32, 2)
        b_valid = b_handle[3] >= 0
        last = torch.full(b_valid.shape, torch.iinfo(torch.int64).max, dtype=torch.int64, device=b_valid.device)
        source_rank = b_source[:, 0].to(torch.int64)
        key = torch.where(b_valid, source_rank * (1 << 32) + b_source[:, 1].to(torch.int64), last)
        order = torch.sort(key, stable=True).indices
        recv_x = _scales_like(_gather_rows(b_x, order), x_scales)
        recv_topk_idx = b_topk_out.index_select(0, order) if by_topk else None
        recv_topk_weights = b_weights_out.index_select(0, order) if by_topk and with_weights else None
        recv_src_idx = torch.where(b_valid, b_source[:, 1], torch.full_like(b_source[:, 1], -1)).index_select(0, order)
        source_rank = torch.where(b_valid, source_rank, torch.zeros_like(key))
        counts = torch.zeros(buf.group_size, dtype=torch.int64, device=key.device)
        counts.scatter_add_(0, source_rank, b_valid.to(torch.int64))
        rank_prefix = counts.cumsum(0).to(torch.int32)
        out_handle = InternodeHandle((rank_prefix, a_handle, b_handle, recv_src_idx, is_token_in_rank,
                                      order))
        outputs = [*(recv_x if isinstance(recv_x, tuple) else (recv_x,)), recv_topk_idx, recv_topk_weights,
                   rank_prefix, recv_src_idx, order]
        event = on.finish([x_data, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert], outputs)
        _raise_pending(stages, "dispatch")
    return recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, out_handle, event


def _unpack(handle: Any) -> InternodeHandle:
    """The handle an internode dispatch returned, also when rebuilt as a plain tuple."""
    if isinstance(handle, InternodeHandle):
        return handle
    if isinstance(handle, (tuple, list)) and len(handle) == 6 and isinstance(handle[1], tuple) \
            and isinstance(handle[2], tuple) and isinstance(handle[5], torch.Tensor):
        return InternodeHandle(tuple(handle))
    raise ValueError("handle must be the handle an internode dispatch returned, got "
                     f"{type(handle).__name__}")


def _scales_like(recv_x: Any, x_scales: Optional[torch.Tensor]) -> Any:
    """recv_x with its scales in the caller's layout: column-major in, column-major out (as
    intranode decides it: _arena.scales_column_major). The inner legs decide it from
    their own inputs, which a forwarder that received 0 or 1 rows cannot tell apart."""
    if x_scales is None or not isinstance(recv_x, tuple):
        return recv_x
    data, scales = recv_x
    col_major = x_scales.dim() == 2 and _arena.scales_column_major(x_scales)
    if col_major and scales.size(0) > 1 and scales.stride(1) == 1:
        scales = scales.t().contiguous().t()
    return data, scales


def _cached_dispatch(buf: "Buffer", stages: Stages, x: Any, handle: Any, num_tokens_per_rank: Any,
                     is_token_in_rank: Any, num_tokens_per_expert: Any, topk_idx: Any, topk_weights: Any,
                     config: Optional[Config], previous_event: Optional[EventOverlap], async_finish: bool,
                     allocate_on_comm_stream: bool) -> tuple:
    steps = _Steps(stages, "cached dispatch", ("lane", "node"))
    with steps.guard():
        node_config, lane_config = _configs(buf, config, "dispatch")
        async_finish = check_order(previous_event, async_finish, allocate_on_comm_stream)[0]
        for name, value in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                            ("num_tokens_per_expert", num_tokens_per_expert), ("topk_idx", topk_idx),
                            ("topk_weights", topk_weights)):
            if value is not None:
                raise ValueError(f"dispatch with a handle (cached mode) repeats the handle's routing; {name} must be "
                                 "None")
        handle = _unpack(handle)
        _, a_handle, b_handle, _, _, order = handle
        x_data, x_scales = _split_x(x)
    with steps.guard(), _OnStream(stages, previous_event, async_finish) as on:
        a_x = steps.run(lambda: stages.lane.dispatch(x, handle=a_handle, config=lane_config))[0]
        b_x = steps.run(lambda: stages.node.dispatch(a_x, handle=b_handle, config=node_config))[0]
        recv_x = _scales_like(_gather_rows(b_x, order), x_scales)
        event = on.finish([x_data, x_scales], list(recv_x) if isinstance(recv_x, tuple) else [recv_x])
        _raise_pending(stages, "cached dispatch")
    return recv_x, None, None, None, handle, event


def combine(buf: "Buffer", x: torch.Tensor, handle: tuple, topk_weights: Optional[torch.Tensor],
            bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None], config: Optional[Config],
            previous_event: Optional[EventOverlap], async_finish: bool, allocate_on_comm_stream: bool) -> tuple:
    stages = _stages(buf, "internode_combine")
    steps = _Steps(stages, "combine", ("node", "lane"))
    with steps.guard():
        node_config, lane_config = _configs(buf, config, "combine")
        async_finish = check_order(previous_event, async_finish, allocate_on_comm_stream)[0]
        handle = _unpack(handle)
        _, a_handle, b_handle, _, _, order = handle
        _check_tensor(x, "x")
        if x.dim() != 2 or x.size(0) != order.size(0):
            raise ValueError(f"x: expected [{order.size(0)}, hidden] (the rows the dispatch returned), got "
                             f"{list(x.shape)}")
        _check_tensor(topk_weights, "topk_weights", optional=True)
        if topk_weights is not None and (topk_weights.dim() != 2 or topk_weights.size(0) != order.size(0)):
            raise ValueError(f"topk_weights: expected [{order.size(0)}, num_topk] (the dispatch's recv_topk_weights), "
                             f"got {list(topk_weights.shape)}")
        biases = [b for b in _split_bias(bias) if b is not None]
    with steps.guard(), _OnStream(stages, previous_event, async_finish) as on:
        # Back to the node exchange's row order, then each node's rows summed at its forwarders, then
        # the nodes' partial rows summed at the token's rank.
        b_x = torch.empty_like(x).index_copy_(0, order, x)
        b_weights = None
        if topk_weights is not None:
            b_weights = torch.empty_like(topk_weights, dtype=torch.float32).index_copy_(0, order, topk_weights.float())
        a_x, a_weights, _ = steps.run(lambda: stages.node.combine(b_x, b_handle, topk_weights=b_weights,
                                                                  config=node_config))
        combined_x, combined_weights, _ = steps.run(lambda: stages.lane.combine(
            a_x, a_handle, topk_weights=a_weights, bias=bias, config=lane_config))
        event = on.finish([x, topk_weights, *biases], [combined_x, combined_weights])
        _raise_pending(stages, "combine")
    return combined_x, combined_weights, event
