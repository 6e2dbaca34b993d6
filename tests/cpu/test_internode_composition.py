"""Internode mode's composition (python/moelink/_internode.py) on the CPU: every rank a thread, and
its two inner Buffers replaced by a model of intranode dispatch / combine written from the reference
(tests/reference/moe_reference.py). What runs is _internode's own code: the lane exchange by node
mask, the top-k rows packed as bytes, experts renumbered per node, each row's source worked out from
the lane handle, the sort into global order and its undoing in combine, the two-stage sum.

The GPU suite (tests/gpu/test_internode.py) runs the same composition on the real kernels; this one
needs no GPU, so CI checks the composition's semantics against the reference on every change. The
model is adversarial where intranode leaves things unspecified: padding rows (num_worst_tokens) hold
NaN and -1 sources, and is_token_in_rank is the only routing it trusts.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
moelink = pytest.importorskip("moelink")

from moelink import _internode  # noqa: E402
from reference import moe_reference as ref  # noqa: E402

TIMEOUT_S = 20  # a board barrier that waits this long means a rank did not come: the test fails


class Board:
    """An all-gather among the threads of one inner group (a barrier on each side of the exchange)."""

    def __init__(self, size: int) -> None:
        self.slots = [None] * size
        self.barrier = threading.Barrier(size, timeout=TIMEOUT_S)

    def all_gather(self, index: int, obj):
        self.slots[index] = obj
        self.barrier.wait()
        everything = list(self.slots)
        self.barrier.wait()
        return everything


def _prefix_matrix(counts: np.ndarray) -> torch.Tensor:
    """rank_prefix_matrix[s][d]: rows ranks 0..s send to d, as intranode's handle[0]."""
    return torch.from_numpy(np.cumsum(counts, axis=0).astype(np.int32))


class ModelBuffer:
    """One rank of an intranode group, as far as _internode uses it, from the reference semantics.
    Its exchanges open as the runtime's do: every member states its verdict, and when one abstained
    (its own checks failed) the others raise naming it instead of running the exchange; and like the
    runtime's, its dispatch and combine raise a data error recorded here at their end unless it is
    deferred."""

    _destroyed = False

    def __init__(self, board: Board, index: int, size: int) -> None:
        self.board, self.index, self.size = board, index, size
        # A data error an earlier operation left recorded here (the runtime raises it at the end of
        # a call unless deferred, as internode mode defers it through its legs), and what happened.
        self.pending, self.deferred, self.log = None, False, []
        # abstain takes no argument: the rank that abstains records nothing (Buffer::abstain).
        self.runtime = SimpleNamespace(abstain=lambda: self._open(None, ok=False),
                                       check_faults=lambda: None, raise_pending_errors=self._raise_pending,
                                       defer_data_errors=self._defer)

    def _defer(self, defer: bool) -> None:
        self.deferred = defer

    def _raise_pending(self) -> None:
        self.log.append("raise")
        if self.pending is not None and not self.deferred:
            message, self.pending = self.pending, None
            raise ValueError(message)

    def _end_of_call(self, outputs):
        # What the runtime's raise_at_end does at the end of a leg: without the deferral a rank whose
        # host saw the record would go no further in the operation, and its peers' next leg would
        # break the boards' barriers.
        if self.pending is not None and not self.deferred:
            message, self.pending = self.pending, None
            raise ValueError(message)
        return outputs

    def _open(self, payload, ok=True):
        self.log.append("open")
        everything = self.board.all_gather(self.index, (ok, payload))
        rejected = [i for i, (fine, _) in enumerate(everything) if not fine]
        if ok and rejected:
            raise ValueError(f"moelink: rank {rejected[0]} rejected its own arguments for this operation")
        return [payload for _, payload in everything]

    def get_dispatch_layout(self, topk_idx, num_experts):
        per_rank, _, per_expert, in_rank = ref.reference_layout(topk_idx, num_experts, self.size)
        return per_rank, None, per_expert, in_rank, None

    def dispatch(self, *args, **kwargs):
        return self._end_of_call(self._dispatch(*args, **kwargs))

    def _dispatch(self, x, handle=None, num_tokens_per_rank=None, is_token_in_rank=None, num_tokens_per_expert=None,
                  topk_idx=None, topk_weights=None, expert_alignment=1, num_worst_tokens=0, config=None):
        assert isinstance(config, moelink.Config)
        if handle is not None:
            assert is_token_in_rank is None and topk_idx is None
            is_token_in_rank = handle[4]
        data, scales = (x if isinstance(x, tuple) else (x, None))
        # What intranode's host checks refuse (src/modes/intranode/host.cpp validate_dispatch).
        assert data.dim() == 2 and data.is_contiguous(), "x must be a contiguous 2-D tensor"
        assert data.size(1) * data.element_size() % 16 == 0, "x rows must be a multiple of 16 bytes"
        assert data.dtype in (torch.bfloat16, torch.float8_e4m3fn), data.dtype
        assert (scales is not None) == (data.dtype == torch.float8_e4m3fn)
        assert is_token_in_rank.dtype == torch.bool and tuple(is_token_in_rank.shape) == (data.size(0), self.size)
        sent = self._open((data, scales, is_token_in_rank, topk_idx, topk_weights, num_tokens_per_expert))
        me = self.index
        if handle is None and topk_idx is not None:  # notify's check of every rank's ids
            for s, (_, _, _, ids, _, per_expert) in enumerate(sent):
                bad = torch.nonzero((ids < -1) | (ids >= per_expert.numel()))
                if bad.numel():
                    raise ValueError(f"moelink: topk_idx: rank {s} token {int(bad[0][0])} slot {int(bad[0][1])} holds "
                                     "an expert id outside [-1, num_experts)")
        counts = np.array([[int(s[2][:, d].sum()) for d in range(self.size)] for s in sent], dtype=np.int64)
        rows = [torch.nonzero(s[2][:, me]).flatten() for s in sent]
        n = int(sum(r.numel() for r in rows))
        # A cached dispatch returns as many rows as the dispatch that made the handle.
        num_rows = handle[3].numel() if handle is not None else num_worst_tokens or n
        assert num_rows >= n, "num_worst_tokens overflow"

        def gather(column, fill):
            parts = [sent[s][column][rows[s]] for s in range(self.size)]
            like = sent[0][column]
            as_bytes = like.dtype == torch.float8_e4m3fn
            got = torch.cat([p.view(torch.uint8) if as_bytes else p for p in parts])
            pad = torch.full((num_rows - n, *got.shape[1:]), fill, dtype=got.dtype)
            out = torch.cat([got, pad])
            return out.view(torch.float8_e4m3fn) if as_bytes else out

        recv_data = gather(0, 0xFF if data.dtype == torch.float8_e4m3fn else float("nan"))
        recv_x = recv_data
        if scales is not None:
            recv_scales = gather(1, -1 if scales.dtype == torch.int32 else float("nan"))
            if scales.stride(0) == 1 and scales.size(1) > 1:  # intranode keeps column-major scales so
                recv_scales = recv_scales.t().contiguous().t()
            recv_x = (recv_data, recv_scales)
        src_idx = torch.cat([r.to(torch.int32) for r in rows]
                            + [torch.full((num_rows - n,), -1, dtype=torch.int32)])
        if handle is not None:
            assert src_idx.equal(handle[3])
            return recv_x, None, None, None, handle, None
        recv_topk = recv_weights = None
        per_expert_list = []
        if topk_idx is None and not num_worst_tokens:
            # Routed by is_token_in_rank alone: the counts list is every source's num_tokens_per_expert
            # for this rank's experts, summed (intranode's notify).
            per = sent[0][5].numel() // self.size
            totals = sum(s[5][me * per:(me + 1) * per].to(torch.int64) for s in sent)
            per_expert_list = [ref.align_up(int(c), expert_alignment) for c in totals]
        if topk_idx is not None:
            num_experts = sent[0][5].numel()
            per = num_experts // self.size
            first = me * per
            ids = gather(3, -1)
            mine = (ids >= first) & (ids < first + per)
            recv_topk = torch.where(mine, ids - first, torch.full_like(ids, -1))
            if topk_weights is not None:
                recv_weights = torch.where(mine, gather(4, float("nan")).float(), torch.zeros(ids.shape))
            counts_per_expert = torch.bincount(recv_topk[recv_topk >= 0], minlength=per)
            if not num_worst_tokens:
                per_expert_list = [ref.align_up(int(c), expert_alignment) for c in counts_per_expert]
        out_handle = (_prefix_matrix(counts), None, None, src_idx, is_token_in_rank, None)
        return recv_x, recv_topk, recv_weights, per_expert_list, out_handle, None

    def combine(self, *args, **kwargs):
        return self._end_of_call(self._combine(*args, **kwargs))

    def _combine(self, x, handle, topk_weights=None, bias=None, config=None):
        assert isinstance(config, moelink.Config) and x.dtype == torch.bfloat16
        assert x.size(0) == handle[3].size(0), "combine x rows != the dispatch's received rows"
        sent = self._open((x, handle[0], handle[3], topk_weights))
        in_rank = handle[4]
        me = self.index
        acc = torch.zeros(in_rank.size(0), x.size(1), dtype=torch.float32)
        weights = None if topk_weights is None else torch.zeros(in_rank.size(0), topk_weights.size(1))
        for d, (rows_d, prefix_d, src_d, weights_d) in enumerate(sent):
            begin = 0 if me == 0 else int(prefix_d[me - 1][d])
            end = int(prefix_d[me][d])
            tokens = src_d[begin:end].long()
            assert bool(in_rank[tokens, d].all())
            acc.index_add_(0, tokens, rows_d[begin:end].float())
            if weights is not None:
                weights.index_add_(0, tokens, weights_d[begin:end].float())
        for b in (() if bias is None else bias if isinstance(bias, tuple) else (bias,)):
            acc += b.float()
        return acc.to(torch.bfloat16), weights, None


class NoStream:
    def __init__(self, *args) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def finish(self, inputs, outputs):
        return None


class Outer:
    """The outer Buffer of a rank, as far as _internode uses it."""

    num_sms = 20  # a class attribute, as Buffer.num_sms

    def __init__(self, topology, group_size: int, stages) -> None:
        self._topology, self.group_size, self._internode = topology, group_size, stages
        self.runtime = SimpleNamespace(max_num_sms=lambda ranks_per_gpu: 132)

    def _check_usable(self, op: str) -> None:
        pass


class Group:
    """The threads of one emulated cluster and their inner groups' boards."""

    def __init__(self, num_nodes: int, per_node: int) -> None:
        self.num_nodes, self.per_node = num_nodes, per_node
        self.node_boards = [Board(per_node) for _ in range(num_nodes)]
        self.lane_boards = [Board(num_nodes) for _ in range(per_node)]

    def outer(self, rank: int):
        n, l = divmod(rank, self.per_node)
        topology = SimpleNamespace(num_rdma_ranks=self.num_nodes, num_nvl_ranks=self.per_node, rdma_rank=n,
                                   nvl_rank=l)
        # Through Stages' own constructor, so that what it sets up on the inner Buffers (the
        # deferral of their data errors) is what the tests run with.
        stages = _internode.Stages(SimpleNamespace(_topology=topology, _device=None),
                                   ModelBuffer(self.node_boards[n], l, self.per_node),
                                   ModelBuffer(self.lane_boards[l], n, self.num_nodes), ranks_per_gpu=1)
        return Outer(topology, self.num_nodes * self.per_node, stages)


@pytest.fixture(autouse=True)
def _no_streams(monkeypatch):
    monkeypatch.setattr(_internode, "_OnStream", NoStream)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: None)  # Stages makes one; NoStream ignores it


def run_ranks(num_nodes, per_node, body):
    group = Group(num_nodes, per_node)
    errors = {}

    def run(rank):
        try:
            body(rank, group.outer(rank))
        except BaseException as error:  # noqa: BLE001 - reported below; peers are released
            errors[rank] = error
            for board in group.node_boards + group.lane_boards:
                board.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(num_nodes * per_node)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S * 4)
    real = {r: e for r, e in errors.items() if not isinstance(e, threading.BrokenBarrierError)}
    if real:
        rank = min(real)
        raise AssertionError(f"rank {rank}: {real[rank]!r}") from real[rank]
    assert not errors, errors


CASES = [  # (name, T, H, K, E, fp8, col_major, drop, nowhere, worst, alignment, num_bias, silent, deaf)
    ("empty", 0, 256, 8, 64, False, False, 0.1, 0.0, False, 1, 0, False, False),
    ("one-token", 1, 256, 1, 0, False, False, 0.0, 0.0, False, 1, 1, False, False),
    ("bf16", 97, 256, 8, 64, False, False, 0.2, 0.0, False, 1, 0, False, False),
    ("fp8-align", 97, 256, 8, 192, True, False, 0.1, 0.0, False, 128, 0, False, False),
    ("fp8-colmajor", 97, 512, 4, 64, True, True, 0.1, 0.0, False, 1, 2, False, False),
    ("silent-deaf", 64, 256, 4, 64, False, False, 0.1, 0.1, False, 1, 1, True, True),
    ("worst", 64, 256, 8, 96, False, False, 0.1, 0.1, True, 1, 0, False, False),
    ("worst-fp8", 64, 256, 8, 64, True, True, 0.1, 0.0, True, 1, 1, False, False),
    ("no-weights", 64, 256, 4, 64, False, False, 0.1, 0.0, False, 4, 1, False, False),
    ("tight-worst", 64, 256, 2, 0, False, False, 0.0, 0.0, True, 1, 0, False, False),
]


def _funnel(buf, T, E):
    """Routing that funnels through lane 0: only lane-0 ranks have tokens, each routed (K=1, and the
    second slot -1) to one rank of the next node, round robin. Every rank then receives about T / L
    rows while a forwarder receives T: a num_worst_tokens that is exact for the ranks is too small
    for the node-to-node leg, which sizes its own receive (it waits on the host for its counts)."""
    N, L, R = buf._internode.num_nodes, buf._internode.per_node, buf.group_size
    per = E // R
    routing = []
    for s in range(R):
        node, lane = divmod(s, L)
        if lane != 0:
            routing.append(np.full((T, 2), -1, dtype=np.int64))
            continue
        dest = ((node + 1) % N) * L + np.arange(T) % L
        routing.append(np.stack([dest * per + np.arange(T) % per, np.full(T, -1)], axis=1).astype(np.int64))
    return routing


def _case(rank, buf, case, seed, by_topk=True):
    name, T, H, K, E, fp8, col_major, drop, nowhere, worst, alignment, num_bias, silent, deaf = case
    R = buf.group_size
    E = E or R
    deaf_rank = R - 1 if deaf else None
    K = min(K, E - (E // R if deaf else 0))
    tokens = [0 if silent and s == R // 2 else T for s in range(R)]
    routing = [ref.make_routing(seed, s, tokens[s], K, E, R, drop, nowhere, deaf_rank) for s in range(R)]
    if name == "tight-worst":
        routing = _funnel(buf, T, E)
    inputs = [ref.make_inputs(seed, s, tokens[s], H, K, fp8=fp8, scales_col_major=col_major) for s in range(R)]
    mine = inputs[rank]
    topk_idx = torch.from_numpy(routing[rank])
    per_rank, _, per_expert, in_rank = ref.reference_layout(topk_idx, E, R)
    num_worst = R * T if worst else 0
    if name == "tight-worst":
        num_worst = max(ref.dispatch_plan_np(routing, d, E, R).num_recv_tokens for d in range(R))
    with_weights = name != "no-weights" and by_topk
    weights = mine.topk_weights if with_weights else None
    out = _internode.dispatch(buf, mine.dispatch_x(fp8), None, per_rank, None, in_rank, per_expert,
                              topk_idx if by_topk else None, weights, alignment, num_worst, None, None, False, False)
    recv_x, recv_topk, recv_weights, per_expert_list, handle, _ = out
    want = ref.reference_dispatch(routing, [inp.dispatch_x(fp8) for inp in inputs],
                                  [inp.topk_weights for inp in inputs] if with_weights else None, rank, E, R,
                                  alignment)
    n = want.num_recv_tokens
    rows = num_worst or n
    what = f"{name} rank {rank}/{R}"
    if fp8:
        assert recv_x[0].shape == (rows, H) and recv_x[0][:n].view(torch.uint8).equal(want.recv_x[0].view(torch.uint8)), what
        assert recv_x[1][:n].equal(want.recv_x[1]), what
        if col_major:
            assert recv_x[1].t().is_contiguous(), f"{what}: column-major scales came back {recv_x[1].stride()}"
    else:
        assert recv_x.shape == (rows, H) and recv_x[:n].view(torch.int16).equal(want.recv_x.view(torch.int16)), what
    if by_topk:
        assert recv_topk.shape == (rows, K) and recv_topk[:n].equal(want.recv_topk_idx), what
        assert bool((recv_topk[n:] == -1).all()), what
    else:
        assert recv_topk is None, what
    if with_weights:
        assert recv_weights[:n].equal(want.recv_topk_weights), what
    else:
        assert recv_weights is None, what
    assert list(per_expert_list) == ([] if worst else want.num_recv_tokens_per_expert_list), what
    assert handle[3].shape == (rows,) and handle[3][:n].equal(want.recv_src_idx), what
    assert bool((handle[3][n:] == -1).all()), what
    assert handle[4] is in_rank
    assert int(handle[0][-1]) == n and handle[0].shape == (R,), what

    fresh = [ref.make_inputs(seed, s, tokens[s], H, K, fp8=fp8, scales_col_major=col_major, salt=1) for s in range(R)]
    cached = _internode.dispatch(buf, fresh[rank].dispatch_x(fp8), handle, None, None, None, None, None, None, 1, 0,
                                 None, None, False, False)
    want_cached = ref.reference_dispatch(routing, [inp.dispatch_x(fp8) for inp in fresh], None, rank, E, R, alignment)
    got = cached[0][0] if fp8 else cached[0]
    want_rows = want_cached.recv_x[0] if fp8 else want_cached.recv_x
    assert got[:n].view(torch.uint8).equal(want_rows.view(torch.uint8)), f"{what} (cached)"
    assert cached[1] is None and cached[2] is None and cached[3] is None

    scale = 0.5 + 0.125 * rank
    y = torch.randn(rows, H).to(torch.bfloat16)  # padding rows: values combine must ignore
    y[:n] = (ref.gather_rows([inp.x for inp in inputs], want.plan).float() * scale).to(torch.bfloat16)
    bias = ref.make_bias(seed, rank, tokens[rank], H, num_bias)
    combined_x, combined_weights, _ = _internode.combine(buf, y, handle, recv_weights, bias, None, None, False, False)
    want_x, want_weights = ref.reference_combine(
        in_rank, lambda d, t: (mine.x[t].float() * (0.5 + 0.125 * d)).to(torch.bfloat16), H, topk_idx,
        weights, E, bias)
    # Two bf16 roundings (at the forwarder, then at the token's rank), as deep_ep's internode combine.
    if want_x.numel():
        torch.testing.assert_close(combined_x.float(), want_x.float(), rtol=2e-2,
                                   atol=2e-2 * want_x.float().abs().max().item())
    if with_weights:
        torch.testing.assert_close(combined_weights, want_weights, rtol=0, atol=0)
    else:
        assert combined_weights is None, what


def _small_round(seed, rank, R, tokens=16, topk=2, drop=0.0):
    """One rank's routing over 2 experts per rank, its reference layout and its inputs (H 256), for
    the error-path tests: (topk_idx, num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank,
    inputs)."""
    topk_idx = torch.from_numpy(ref.make_routing(seed, rank, tokens, topk, 2 * R, R, drop))
    per_rank, _, per_expert, in_rank = ref.reference_layout(topk_idx, 2 * R, R)
    return topk_idx, per_rank, per_expert, in_rank, ref.make_inputs(seed, rank, tokens, 256, topk)


@pytest.mark.parametrize("num_nodes, per_node", [(2, 2), (2, 4), (4, 2), (3, 2)])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_composition_matches_the_reference(num_nodes, per_node, case):
    num_experts = case[4] or num_nodes * per_node
    if num_experts % (num_nodes * per_node):
        pytest.skip(f"{num_experts} experts do not split over {num_nodes * per_node} ranks")
    seed = 9100 + 10 * num_nodes + per_node + CASES.index(case)
    run_ranks(num_nodes, per_node, lambda rank, buf: _case(rank, buf, case, seed))


@pytest.mark.parametrize("num_nodes, per_node", [(2, 2), (2, 4), (3, 2)])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("empty", "bf16", "fp8-align", "fp8-colmajor",
                                                               "silent-deaf", "worst")], ids=lambda c: c[0])
def test_routing_by_is_token_in_rank_alone_matches_the_reference(num_nodes, per_node, case):
    """deep_ep's dispatch without topk_idx: the same rows as with it (is_token_in_rank made from the
    same routing), no ids or weights back, the counts list from num_tokens_per_expert; cached
    dispatch and combine through its handle."""
    num_experts = case[4] or num_nodes * per_node
    if num_experts % (num_nodes * per_node):
        pytest.skip(f"{num_experts} experts do not split over {num_nodes * per_node} ranks")
    seed = 9300 + 10 * num_nodes + per_node + CASES.index(case)
    run_ranks(num_nodes, per_node, lambda rank, buf: _case(rank, buf, case, seed, by_topk=False))


def test_topk_weights_without_topk_idx_are_refused():
    seen = {}

    def body(rank, buf):
        R = buf.group_size
        _, per_rank, per_expert, in_rank, inputs = _small_round(8, rank, R)
        try:
            _internode.dispatch(buf, inputs.x, None, per_rank, None, in_rank, per_expert, None,
                                inputs.topk_weights if rank == 1 else None, 1, 0, None, None, False, False)
        except ValueError as error:
            seen[rank] = str(error)

    run_ranks(2, 2, body)
    assert sorted(seen) == [0, 1, 2, 3], seen
    assert "topk_weights" in seen[1], seen[1]


def test_a_wrong_handle_is_refused():
    def body(rank, buf):
        with pytest.raises(ValueError, match="handle"):
            _internode.combine(buf, torch.zeros(1, 256, dtype=torch.bfloat16), (None,) * 6, None, None, None, None,
                               False, False)

    run_ranks(2, 2, body)



@pytest.mark.parametrize("num_nodes, per_node", [(2, 2), (2, 4), (4, 2)])
@pytest.mark.parametrize("op", ["dispatch", "cached", "combine"])
def test_one_ranks_bad_argument_stops_every_rank(num_nodes, per_node, op):
    """One rank's own checks refuse its arguments: it raises that error, every other rank raises a
    ValueError that says which global ranks its message names, and none waits (a wait would break
    the boards' barriers and fail the test). Then every rank's next operation returns, the bad
    rank's included: it raised its own error and has nothing more to raise."""
    bad = num_nodes * per_node - 2  # neither lane 0 nor node 0: the error must cross both kinds of group
    seen = {}

    def body(rank, buf):
        R = buf.group_size
        topk_idx, per_rank, per_expert, in_rank, inputs = _small_round(5, rank, R, tokens=32, topk=4, drop=0.1)
        mine = rank == bad
        try:
            weights = inputs.topk_weights[:, :2] if mine and op == "dispatch" else inputs.topk_weights
            out = _internode.dispatch(buf, inputs.x, None, per_rank, None, in_rank, per_expert, topk_idx, weights, 1,
                                      0, None, None, False, False)
            if op == "cached":  # the bad rank repeats routing that a cached dispatch must not get
                _internode.dispatch(buf, inputs.x, out[4], None, None, in_rank if mine else None, None, None, None,
                                    1, 0, None, None, False, False)
            elif op == "combine":  # the bad rank's input has a row too many
                y = torch.zeros(out[0].size(0) + int(mine), 256, dtype=torch.bfloat16)
                _internode.combine(buf, y, out[4], out[2], None, None, None, False, False)
        except ValueError as error:
            seen[rank] = str(error)
        else:
            seen[rank] = None
        _internode.dispatch(buf, inputs.x, None, per_rank, None, in_rank, per_expert, topk_idx, inputs.topk_weights,
                            1, 0, None, None, False, False)
        returned.add(rank)

    returned = set()
    run_ranks(num_nodes, per_node, body)
    assert sorted(seen) == list(range(num_nodes * per_node)), seen
    assert returned == set(seen), returned
    assert all(message is not None for message in seen.values()), seen
    assert "global ranks" not in seen[bad], seen[bad]  # its own error, as its checks raised it
    assert all("global ranks" in message for rank, message in seen.items() if rank != bad), seen


@pytest.mark.parametrize("num_nodes, per_node", [(2, 2), (4, 2)])
def test_a_bad_expert_id_raises_on_every_rank(num_nodes, per_node):
    """An id outside [-1, E) on one rank: the lane's notify names it on that rank's lane, and the
    other ranks raise through the exchanges they share (intranode raises on every rank too)."""
    bad = num_nodes * per_node - 1
    seen = {}

    def body(rank, buf):
        R = buf.group_size
        E = 2 * R
        topk_idx, per_rank, per_expert, in_rank, inputs = _small_round(6, rank, R)
        if rank == bad:
            topk_idx = topk_idx.clone()
            topk_idx[3, 1] = E
        try:
            _internode.dispatch(buf, inputs.x, None, per_rank, None, in_rank, per_expert, topk_idx,
                                inputs.topk_weights, 1, 0, None, None, False, False)
        except ValueError as error:
            seen[rank] = str(error)
        else:
            seen[rank] = None

    run_ranks(num_nodes, per_node, body)
    assert all(seen.get(r) for r in range(num_nodes * per_node)), seen
    lane = [r for r in seen if r % per_node == bad % per_node]
    assert all("topk_idx" in seen[r] and "token 3 slot 1" in seen[r] for r in lane), seen


def test_a_broken_lane_raises_at_entry_naming_its_nodes():
    """A fault an inner Buffer already holds (a lost peer: its runtime's check_faults raises it) is
    raised at the internode operation's entry, before any exchange, with the leg's note: the lane's
    says its ranks are the nodes, and their global ranks."""
    message = ("moelink: rank 0 timed out after 5 s in the barrier that opens an operation: rank 1 (node 1) never "
               "arrived")
    seen = {}

    def lost():
        raise TimeoutError(message)

    def body(rank, buf):
        if rank != 1:  # node 0, GPU 1: its lane is global ranks 1 and 3
            return
        topk_idx, per_rank, per_expert, in_rank, inputs = _small_round(8, rank, buf.group_size)
        buf._internode.lane.runtime.check_faults = lost
        with pytest.raises(TimeoutError) as raised:
            _internode.dispatch(buf, inputs.x, None, per_rank, None, in_rank, per_expert, topk_idx,
                                inputs.topk_weights, 1, 0, None, None, False, False)
        seen[rank] = str(raised.value)

    run_ranks(2, 2, body)
    got = seen[1]
    assert got.startswith(message), got
    assert "[internode dispatch, node-to-node exchange (lane): its ranks 0..1 are nodes 0..1, global ranks [1, 3]]" \
        in got, got


@pytest.mark.parametrize("num_nodes, per_node", [(2, 2), (2, 4)])
@pytest.mark.parametrize("op", ["dispatch", "cached", "combine"])
def test_a_pending_error_is_raised_at_the_end_of_the_operation(num_nodes, per_node, op):
    """A data error an earlier operation left recorded on one rank's node Buffer (its host saw the
    record, its peers' hosts may not have): that rank still opens every leg its peers open (a leg
    it skipped would break the boards' barriers and fail the test), and raises the error at the end
    of the operation, once, naming the global ranks; its peers return."""
    holder = num_nodes * per_node - 2
    node_legs = {"dispatch": 2, "cached": 1, "combine": 1}[op]
    seen = {}

    def body(rank, buf):
        R = buf.group_size
        topk_idx, per_rank, per_expert, in_rank, inputs = _small_round(7, rank, R)

        def dispatch():
            return _internode.dispatch(buf, inputs.x, None, per_rank, None, in_rank, per_expert, topk_idx,
                                       inputs.topk_weights, 1, 0, None, None, False, False)

        out = dispatch() if op != "dispatch" else None
        node = buf._internode.node
        if rank == holder:
            node.pending = "moelink: rank 0 rejected its own arguments for this operation"
        node.log.clear()
        calls = {
            "dispatch": dispatch,
            "cached": lambda: _internode.dispatch(buf, inputs.x, out and out[4], None, None, None, None, None, None, 1,
                                                  0, None, None, False, False),
            "combine": lambda: _internode.combine(buf, torch.zeros(out[0].size(0), 256, dtype=torch.bfloat16), out[4],
                                                  out[2], None, None, None, False, False),
        }
        try:
            calls[op]()
        except ValueError as error:
            seen[rank] = (str(error), list(node.log))
        else:
            seen[rank] = (None, list(node.log))
        calls[op]()  # raised once: the next operation returns on every rank

    run_ranks(num_nodes, per_node, body)
    message, log = seen[holder]
    assert message is not None and "rejected" in message and "global ranks" in message, seen[holder]
    assert log == ["open"] * node_legs + ["raise"], log  # after every leg, not before
    assert all(seen[r][0] is None for r in seen if r != holder), seen


def test_an_nvshmem_lane_needs_every_rank_to_take_it():
    """MOELINK_DEBUG_LANE_FORCE_PUT as every rank read it at construction: a lane joins NVSHMEM with
    its peers, so nvshmem on some ranks only is refused (naming one of each); stores and fake mixes
    are left to the lane as before."""
    _internode._check_lane_puts(["nvshmem"] * 4)
    _internode._check_lane_puts(["stores", "fake", "stores"])
    _internode._check_lane_puts([None, "stores"])
    with pytest.raises(ValueError, match="rank 1 has nvshmem, rank 0 stores"):
        _internode._check_lane_puts(["stores", "nvshmem"])
    with pytest.raises(ValueError, match="rank 0 has nvshmem, rank 2 a malformed value"):
        _internode._check_lane_puts(["nvshmem", "nvshmem", None])


def test_the_lane_root_id_is_gathered_or_every_rank_raises():
    """prepare_nvshmem_lane on every rank, then every rank's result (the root's unique id among
    them); a rank that failed raises its own error, every other rank a RuntimeError naming it."""
    board = Board(3)
    got, errors = {}, {}

    def rank(index):
        def make():
            if index == 2:
                raise RuntimeError("no plugin here")
            return b"id" if index == 0 else b""

        try:
            got[index] = _internode._gathered(lambda obj: board.all_gather(index, obj), "lane", make)
        except Exception as error:  # noqa: BLE001 - checked below
            errors[index] = error

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not got
    assert str(errors[2]) == "no plugin here"
    for index in (0, 1):
        assert "rank 2 could not prepare its lane Buffer (RuntimeError: no plugin here)" in str(errors[index])
    board = Board(2)
    ok = {}

    def fine(index):
        ok[index] = _internode._gathered(lambda obj: board.all_gather(index, obj), "lane",
                                         lambda: b"id" if index == 0 else b"")

    threads = [threading.Thread(target=fine, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ok == {0: [b"id", b""], 1: [b"id", b""]}


def test_a_buffer_shares_the_nvshmem_world_its_ranks_are_in_or_every_rank_raises():
    """NVSHMEM is one world per process: a Buffer whose ranks are all in one world as pe == rank
    (a low-latency Buffer beside an internode Buffer's lanes, over one group) shares its id; no
    world at all makes a new one; any mix raises on every rank alike, since each rank decides from
    the same gathered list (a rank that inits a world while its peers join another waits forever)."""
    from moelink import _bootstrap  # noqa: PLC0415 - needs torch, as this module does

    world = b"w" * 128
    assert _bootstrap.shared_world([None] * 4, 4) is None
    assert _bootstrap.shared_world([(world, r, 4) for r in range(4)], 4) == world
    with pytest.raises(ValueError, match="rank 0 is pe 0 of 2 in one, rank 1 in none"):
        _bootstrap.shared_world([(world, 0, 2), None], 2)
    with pytest.raises(ValueError, match="rank 0 is in none, rank 2 pe 2 of 3 in one"):
        _bootstrap.shared_world([None, None, (world, 2, 3)], 3)
    with pytest.raises(ValueError, match="rank 1 pe 1 of 2 in one"):
        _bootstrap.shared_world([(world, 0, 2), (b"v" * 128, 1, 2)], 2)
    # The processes' world spans other ranks: a Buffer over a subset, or in another order, cannot use it.
    with pytest.raises(ValueError, match="rank 0 is pe 1 of 2 in the NVSHMEM world"):
        _bootstrap.shared_world([(world, 1, 2), (world, 0, 2)], 2)
    with pytest.raises(ValueError, match="rank 0 is pe 0 of 8 in the NVSHMEM world"):
        _bootstrap.shared_world([(world, 0, 8), (world, 1, 8)], 2)
