"""Internode normal mode (python/moelink/_internode.py) on nodes emulated on one host: 2 nodes x 2 GPUs,
2 x 4 and 4 x 2, ranks as processes (on one GPU under MPS), MOELINK_NVL_RANKS setting the GPUs per
node. The same cases as intranode (checks.run_case: layout incl. num_tokens_per_rdma_rank, uncached
and cached dispatch, combine with biases, fp8 with row- and column-major scales, alignment,
num_worst_tokens, async with previous_event, silent and deaf ranks), against the same reference,
with tiny rings so that every leg wraps around; then 200 back-to-back rounds (50 until 2026-12-04).
The composition itself is also checked on the CPU (tests/cpu/test_internode_composition.py).

Every case also runs with the lane on the put path's protocol over IPC (MOELINK_DEBUG_LANE_FORCE_PUT=
fake: mirrors, one ranged copy per batch, counted tail signals; docs/internal/INTERNODE_LANE.md step
1), with two tiny-ring configs whose lane rings hold two of its chunks, so that they wrap and every
sender waits for credit; and the fake-puts lane's outputs are compared bit for bit with the stores
lane's on the same inputs. On step 1's code (the ring senders on the put path) the 2 x 2 fake-puts
cases, the back-to-back rounds and the bit-equality passed on one H200 (2026-12-03), and with steps 2
and 3 (the lane's notify, openings and barriers on the put path; 64-bit ring tails, the receivers'
credit over the window) the 2 x 2 group and the 8-rank ones passed too (2026-12-03, thirteenth session).

test_nvshmem_lane_is_bit_equal_to_stores runs the bit-equality with the lane on NVSHMEM's puts
(MOELINK_DEBUG_LANE_FORCE_PUT=nvshmem, NVSHMEM_REMOTE_TRANSPORT=none, the PEs on one GPU; until
2026-12-04 each lane its own NVSHMEM job, its header and rings one symmetric allocation:
INTERNODE_LANE.md step 3); 2 x 2
and 4 x 2 passed on one H200 (2026-12-03, thirteenth session), 2 x 4 too (2026-12-04). Since then
the NVSHMEM lane is also one of LANE_WINDOWS (when the build has NVSHMEM): the whole case matrix at
2 x 2, 2 x 4 and 4 x 2 with every ring config, the back-to-back rounds and the peer loss run over it
as over the other two. On one H200 (2026-12-04) the 2 x 2 matrix, its 200 rounds and the default
rings at 2 x 4 and 4 x 2 passed; six 8-rank runs failed, by what shows elsewhere as NVSHMEM's init
exiting when two lanes' jobs ask the MPS control daemon at once. Since then the lanes are teams of
one NVSHMEM world over the whole group (PE = global rank), which a low-latency Buffer over the same
ranks shares (test_nvshmem_world_is_shared_with_low_latency).

A lost peer (test_internode_peer_loss, over every lane; the NVSHMEM one not run yet): at 2 x 2 global rank 3 (node 1, GPU 1) dies
before a dispatch; its lane's survivor raises TimeoutError naming lane rank 1 and node 1 (its lane
notify waits for it), its node's survivor TimeoutError naming in-node rank 1 and global rank 3 (its
node legs do), both within timeout + 5 s; the fourth rank, which shares no Buffer with it, hears at
most of a peer's failure (bounded); every survivor's destroy() comes back. The mid-kernel losses of
a fake-puts lane are tests/gpu/test_peer_loss.py's test_lane_peer_loss. Both passed on one H200
(2026-12-03, thirteenth session).

Passed on one H200 with the ranks under MPS (2026-12-01), before the cases routed by
is_token_in_rank alone were added. Needs MOELINK_EXPERIMENTAL_INTERNODE=1, which the launcher sets
here.
"""

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import moelink  # noqa: E402

import torch.distributed as dist  # noqa: E402

import checks  # noqa: E402
import common  # noqa: E402
import faults  # noqa: E402
import launcher  # noqa: E402
from checks import Case  # noqa: E402

LAYOUTS = [(2, 2), (2, 4), (4, 2)]  # (nodes, GPUs per node)

# The intranode suite's covering cases, those routed by is_token_in_rank alone (no topk_idx)
# included; with tiny rings, the ones up to 512 tokens.
CASES = list(checks.COVERING_CASES)

# Small rings: the node-to-node leg 2 x its chunk, the node leg 2 x its chunk, so every ring wraps.
TINY = dict(num_sms=8, num_max_nvl_chunked_send_tokens=4, num_max_nvl_chunked_recv_tokens=8,
            num_max_rdma_chunked_send_tokens=4, num_max_rdma_chunked_recv_tokens=8)
# The lane's rings as small against its chunk under a roomier node leg, with an odd lane chunk: a
# dispatch batch (min(24 warps, slots) tokens) then straddles the wrap at varying slots, and a
# combine chunk of 3 in 6 slots lands across it every other time.
TINY_LANE = dict(num_sms=8, num_max_nvl_chunked_send_tokens=8, num_max_nvl_chunked_recv_tokens=16,
                 num_max_rdma_chunked_send_tokens=3, num_max_rdma_chunked_recv_tokens=6)
RING_CONFIGS = {"rings": None, "tiny-rings": TINY, "tiny-lane": TINY_LANE}

# How the lane's senders fill its rings: stores (the default), the put path's protocol over IPC, or
# NVSHMEM's puts (when the build has NVSHMEM; its PEs share this GPU, NVSHMEM_REMOTE_TRANSPORT=none).
LANE_WINDOWS = ["stores", "fake"] + (["nvshmem"] if moelink._moelink.nvshmem_compiled() else [])


def env(nodes, per_node, lane="stores"):
    values = {"MOELINK_EXPERIMENTAL_INTERNODE": "1", "MOELINK_NVL_RANKS": str(per_node)}
    if lane != "stores":
        values["MOELINK_DEBUG_LANE_FORCE_PUT"] = lane
    if lane == "nvshmem":
        values.update(common.NVSHMEM_ONE_GPU_ENV)
    return values


def check_lane_window(buf, lane):
    got = buf._internode.lane.runtime.lane_window
    assert got == lane, f"the lane Buffer runs its rings by {got!r}, expected {lane!r}"


def make_buffer(num_ranks, config, hidden_sizes):
    """An internode Buffer for a config (or every config of a list) and these hidden sizes. The RDMA
    hint holds the lane's mirrors when MOELINK_DEBUG_LANE_FORCE_PUT asks for the put path."""
    configs = config if isinstance(config, list) else [config]
    nvl = max(c.get_nvl_buffer_size_hint(2 * h, num_ranks) for c in configs for h in hidden_sizes)
    rdma = max(c.get_rdma_buffer_size_hint(2 * h, num_ranks) for c in configs for h in hidden_sizes)
    return moelink.Buffer(common.world_group(), num_nvl_bytes=nvl, num_rdma_bytes=rdma, explicitly_destroy=True)


def _cases(rank, num_ranks, seed, rings, lane):
    tiny = RING_CONFIGS[rings]
    config = moelink.Config(**tiny) if tiny else moelink.Config(8, 8, 128, 8, 128)
    buf = make_buffer(num_ranks, config, {c.hidden for c in CASES})
    assert buf._topology.num_rdma_ranks > 1, "the layout must span nodes"
    check_lane_window(buf, lane)
    for i, case in enumerate(CASES):
        resolved = case.resolved(num_ranks)
        if resolved is None or (tiny and case.num_tokens > 512):
            continue
        common.log(rank, f"[R={num_ranks}] " + checks.run_case(buf, rank, num_ranks, resolved, seed + i, config,
                                                                 config))
    buf.destroy()


# (ring config, lane window): tiny-lane is there for the put paths' (fake, nvshmem) wrap-around and stalls.
RUNS = [(rings, lane) for rings in RING_CONFIGS for lane in LANE_WINDOWS if (rings, lane) != ("tiny-lane", "stores")]


@pytest.mark.parametrize("nodes, per_node", LAYOUTS)
@pytest.mark.parametrize("rings, lane", RUNS, ids=[f"{rings}-{lane}" for rings, lane in RUNS])
def test_internode_cases(nodes, per_node, rings, lane):
    num_ranks = nodes * per_node
    seed = 81000 + 10 * num_ranks + list(RING_CONFIGS).index(rings)
    launcher.run_ranks(num_ranks, _cases, seed, rings, lane, timeout_s=600, env=env(nodes, per_node, lane))


BACK_TO_BACK_ROUNDS = 200


def _back_to_back(rank, num_ranks, seed, lane):
    config = moelink.Config(8, 8, 128, 8, 128)
    buf = make_buffer(num_ranks, config, (2048,))
    check_lane_window(buf, lane)
    for i in range(BACK_TO_BACK_ROUNDS):
        case = Case(f"round {i}", 256, 2048, 8, 64, fp8=i % 3 == 1, drop_prob=0.05 * (i % 4)).resolved(num_ranks)
        checks.run_case(buf, rank, num_ranks, case, seed + i, config, config)
    common.log(rank, f"[R={num_ranks}] {BACK_TO_BACK_ROUNDS} internode rounds exact")
    buf.destroy()


@pytest.mark.parametrize("lane", LANE_WINDOWS)
def test_internode_back_to_back(lane):
    launcher.run_ranks(4, _back_to_back, 82000, lane, timeout_s=600, env=env(2, 2, lane))


# The bit-equality rounds: every path of the lane (with and without top-k, fp8 with column-major
# scales, biases), each on a tiny-ring config, so that the fake-puts lane wraps and stalls.
EQUAL_ROUNDS = [
    (Case("equal-bf16", 300, 2048, 8, 64, num_bias=1), TINY),
    (Case("equal-fp8-col", 200, 4096, 4, 64, fp8=True, scales_col_major=True), TINY_LANE),
    (Case("equal-no-topk", 200, 2048, 8, 64, with_topk=False, with_weights=False), TINY_LANE),
    (Case("equal-big", 1024, 7168, 8, 256, num_bias=2), TINY),
]


def _bits(t):
    """A tensor's bytes on the host, for comparing bit for bit (NaN and -0.0 included)."""
    if t is None:
        return None
    if isinstance(t, (tuple, list)):
        return tuple(_bits(part) for part in t)
    t = t.detach().contiguous()
    return t.view(torch.uint8).cpu() if t.numel() else t.cpu()


def _lane_round(buf, rank, num_ranks, case, seed, config):
    """Uncached dispatch, cached dispatch of fresh data and combine (with the case's biases) of one
    case; every output as host bytes."""
    routing = checks.make_routing_all(case, seed, num_ranks)
    inputs = checks.make_inputs_all(case, seed, num_ranks)
    topk_idx = torch.from_numpy(routing[rank]).cuda()
    weights = inputs[rank].topk_weights if case.with_weights else None
    num_per_rank, num_per_rdma, num_per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, case.num_experts)
    recv_x, recv_topk, recv_weights, per_expert, handle, _ = buf.dispatch(
        inputs[rank].dispatch_x(case.fp8), num_tokens_per_rank=num_per_rank, num_tokens_per_rdma_rank=num_per_rdma,
        is_token_in_rank=in_rank, num_tokens_per_expert=num_per_expert,
        topk_idx=topk_idx if case.with_topk else None, topk_weights=weights, config=config)
    fresh = checks.make_inputs_all(case, seed, num_ranks, salt=1)
    cached_x = buf.dispatch(fresh[rank].dispatch_x(case.fp8), handle=handle, config=config)[0]
    rows = (recv_x[0] if case.fp8 else recv_x).size(0)
    y = torch.randn((rows, case.hidden), generator=torch.Generator().manual_seed(seed + rank)).to(
        torch.bfloat16).cuda()
    bias = checks.ref.make_bias(seed, rank, case.tokens_of(rank, num_ranks), case.hidden, case.num_bias, device="cuda")
    combined_x, combined_weights, _ = buf.combine(y, handle, topk_weights=recv_weights, bias=bias, config=config)
    torch.cuda.synchronize()
    return {"recv_x": _bits(recv_x), "recv_topk_idx": _bits(recv_topk), "recv_topk_weights": _bits(recv_weights),
            "num_recv_tokens_per_expert": list(per_expert), "recv_src_idx": _bits(handle[3]),
            "rank_prefix": _bits(handle[0]), "cached_x": _bits(cached_x), "combined_x": _bits(combined_x),
            "combined_topk_weights": _bits(combined_weights)}


def _equal(got, want):
    if isinstance(want, tuple):
        return isinstance(got, tuple) and len(got) == len(want) and all(_equal(g, w) for g, w in zip(got, want))
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.shape == want.shape and bool(torch.equal(got, want))
    return got == want


def _bit_equal(rank, num_ranks, seed, other="fake"):
    """The same rounds on a stores lane and on an `other` lane (fake or nvshmem), outputs bit-equal."""
    import os

    results = {}
    for lane in ("stores", other):
        # Read when the lane Buffer is built (and by the RDMA size hint, which adds the mirrors).
        if lane == "stores":
            os.environ.pop("MOELINK_DEBUG_LANE_FORCE_PUT", None)
        else:
            os.environ["MOELINK_DEBUG_LANE_FORCE_PUT"] = lane
        configs = [moelink.Config(**tiny) for _, tiny in EQUAL_ROUNDS]
        buf = make_buffer(num_ranks, configs, {case.hidden for case, _ in EQUAL_ROUNDS})
        check_lane_window(buf, lane)
        results[lane] = [_lane_round(buf, rank, num_ranks, case.resolved(num_ranks), seed + i, config)
                         for i, ((case, _), config) in enumerate(zip(EQUAL_ROUNDS, configs))]
        buf.destroy()
    os.environ.pop("MOELINK_DEBUG_LANE_FORCE_PUT", None)
    for (case, _), stores, got in zip(EQUAL_ROUNDS, results["stores"], results[other]):
        for name, want in stores.items():
            assert _equal(got[name], want), f"rank {rank} {case.name}: {name} of the {other} lane differs from the stores lane's"
    common.log(rank, f"[R={num_ranks}] {other} lane bit-equal to the stores lane in {len(EQUAL_ROUNDS)} rounds")


@pytest.mark.parametrize("nodes, per_node", [(2, 2), (4, 2)])
def test_fake_puts_lane_is_bit_equal_to_stores(nodes, per_node):
    launcher.run_ranks(nodes * per_node, _bit_equal, 86000 + nodes, timeout_s=600, env=env(nodes, per_node))


# The lane over NVSHMEM (MOELINK_DEBUG_LANE_FORCE_PUT=nvshmem, docs/internal/INTERNODE_LANE.md step
# 3): several PEs share one GPU under MPS and there is no NIC, as test_low_latency_nvshmem.py runs them.
NVSHMEM_ENV = common.NVSHMEM_ONE_GPU_ENV


@pytest.mark.skipif(not moelink._moelink.nvshmem_compiled(), reason="built without NVSHMEM")
@pytest.mark.parametrize("nodes, per_node", [(2, 2), (4, 2), (2, 4)])
def test_nvshmem_lane_is_bit_equal_to_stores(nodes, per_node):
    """The fake-puts comparison with the lane on NVSHMEM's puts (the plugin's build of the same
    kernels): the same rounds over the IPC stores lane and the NVSHMEM lane, every output bit-equal.
    The NVSHMEM lane's Buffer must say so (lane_window "nvshmem"). 2 x 2 and 4 x 2 passed on one
    H200 (2026-12-03); 2 x 4 (four lanes of two PEs each) not run yet."""
    launcher.run_ranks(nodes * per_node, _bit_equal, 87000 + nodes, "nvshmem", timeout_s=600,
                       env={**env(nodes, per_node), **NVSHMEM_ENV})


def _world_shared_with_low_latency(rank, num_ranks, seed):
    """A low-latency Buffer and an internode Buffer with NVSHMEM lanes over one group, in either
    order of construction and destruction: one NVSHMEM world (PE = global rank) that both use, that
    outlives the first Buffer destroyed (the other still runs right after), and that is gone when
    the last one is. Each call is checked against its reference."""
    import test_low_latency as ll  # noqa: PLC0415 - the low-latency suite's cases and checks

    ll_case = ll.LLCase("bf16", 64, 17, 2048, 8, 32).resolved(num_ranks)
    case = Case("shared-world", 127, 2048, 8, 64, drop_prob=0.2).resolved(num_ranks)
    config = moelink.Config(8, 8, 128, 8, 128)
    step = [0]

    def both(ll_buf, buf, what):
        step[0] += 1
        if ll_buf is not None:
            ll.one_round(ll_buf, ll_case, seed + step[0], rank, num_ranks, what=f"rank {rank} {what}")
        if buf is not None:
            common.log(rank, f"{what}: " + checks.run_case(buf, rank, num_ranks, case, seed + step[0], config, config))

    for ll_first in (True, False):
        order = "low-latency first" if ll_first else "internode first"
        make_ll = lambda: ll.make_ll_buffer(num_ranks, [ll_case])  # noqa: E731
        make_internode = lambda: make_buffer(num_ranks, config, (case.hidden,))  # noqa: E731
        first = make_ll() if ll_first else make_internode()
        second = make_internode() if ll_first else make_ll()
        ll_buf, buf = (first, second) if ll_first else (second, first)
        assert ll_buf.runtime.uses_nvshmem, "the low-latency Buffer across nodes must be on NVSHMEM"
        check_lane_window(buf, "nvshmem")
        world = moelink._moelink.nvshmem_world()
        assert world is not None and world[1:] == (rank, num_ranks), f"{order}: the world is {world}"
        both(ll_buf, buf, order)
        both(ll_buf, buf, order + ", again")
        # The first built goes first: the world stays for the other.
        first.destroy()
        assert moelink._moelink.nvshmem_world() == world, f"{order}: the world went with the first Buffer"
        both(None if ll_first else ll_buf, buf if ll_first else None, order + ", the other destroyed")
        second.destroy()
        assert moelink._moelink.nvshmem_world() is None, f"{order}: the world outlived both Buffers"
    common.log(rank, f"[R={num_ranks}] one NVSHMEM world shared by a low-latency and an internode Buffer")


@pytest.mark.skipif(not moelink._moelink.nvshmem_compiled(), reason="built without NVSHMEM")
@pytest.mark.parametrize("nodes, per_node", [(2, 2), (2, 4)])
def test_nvshmem_world_is_shared_with_low_latency(nodes, per_node):
    import test_low_latency as ll  # noqa: PLC0415

    launcher.run_ranks(nodes * per_node, _world_shared_with_low_latency, 88000 + nodes * per_node, timeout_s=600,
                       env={**env(nodes, per_node, "nvshmem"), **ll.ENV})


def test_default_configs_fit_every_rank_of_the_gpu():
    """Both legs run on all ranks at once: the default num_sms fits all of them (8 ranks here)."""
    launcher.run_ranks(8, _defaults, 83000, timeout_s=300, env=env(2, 4))


def _defaults(rank, num_ranks, seed):
    case = Case("defaults", 128, 2048, 8, 64).resolved(num_ranks)
    config = moelink.Buffer.get_dispatch_config(num_ranks)
    buf = make_buffer(num_ranks, config, (2048,))
    # config=None: each leg's default, checked against the reference like any case.
    common.log(rank, checks.run_case(buf, rank, num_ranks, case, seed, None, None))
    routing = checks.make_routing_all(case, seed, num_ranks)
    inputs = checks.make_inputs_all(case, seed, num_ranks)
    topk_idx = torch.from_numpy(routing[rank]).cuda()
    *layout, _ = buf.get_dispatch_layout(topk_idx, case.num_experts)
    out = buf.dispatch(inputs[rank].x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1],
                       is_token_in_rank=layout[3], num_tokens_per_expert=layout[2], topk_idx=topk_idx,
                       topk_weights=inputs[rank].topk_weights)
    torch.cuda.synchronize()
    # Every rank refuses the same too-large num_sms, so none waits for the others.
    with pytest.raises(ValueError, match="num_sms"):
        buf.dispatch(inputs[rank].x, handle=out[4], config=moelink.Config(64, 8, 128))
    buf.combine(out[0], out[4])
    torch.cuda.synchronize()
    buf.destroy()


def test_without_the_knob_internode_says_how_to_enable_it():
    launcher.run_ranks(4, _not_enabled, 84000, timeout_s=120,
                       env={"MOELINK_NVL_RANKS": "2", "MOELINK_EXPERIMENTAL_INTERNODE": "0"})


def _not_enabled(rank, num_ranks, seed):
    buf = moelink.Buffer(common.world_group(), num_nvl_bytes=1 << 24, num_rdma_bytes=1 << 24, explicitly_destroy=True)
    x = torch.zeros((4, 2048), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(NotImplementedError, match="MOELINK_EXPERIMENTAL_INTERNODE"):
        buf.dispatch(x, handle=None, num_tokens_per_rank=torch.zeros(num_ranks, dtype=torch.int32, device="cuda"),
                     is_token_in_rank=torch.zeros((4, num_ranks), dtype=torch.bool, device="cuda"),
                     num_tokens_per_expert=torch.zeros(num_ranks, dtype=torch.int32, device="cuda"))
    buf.destroy()


def test_a_bad_expert_id_raises_on_every_rank():
    """An id outside [-1, E) on one rank: every rank's dispatch raises ValueError at the call (the
    lane's notify names it on that rank's lane; the others hear through the node exchange), within
    seconds, and the Buffer stays usable: a full round after it is exact."""
    launcher.run_ranks(4, _bad_expert_id, 85000, timeout_s=180, env={**env(2, 2), "MOELINK_TIMEOUT_S": "20"})


def _bad_expert_id(rank, num_ranks, seed):
    import time

    config = moelink.Config(8, 8, 128, 8, 128)
    buf = make_buffer(num_ranks, config, (2048,))
    case = Case("bad-id", 64, 2048, 4, 64).resolved(num_ranks)
    routing = checks.make_routing_all(case, seed, num_ranks)
    inputs = checks.make_inputs_all(case, seed, num_ranks)
    topk_idx = torch.from_numpy(routing[rank]).cuda()
    *layout, _ = buf.get_dispatch_layout(topk_idx, case.num_experts)
    if rank == num_ranks - 1:
        topk_idx = topk_idx.clone()
        topk_idx[3, 1] = case.num_experts
    start = time.perf_counter()
    with pytest.raises(ValueError) as raised:
        buf.dispatch(inputs[rank].x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                     num_tokens_per_expert=layout[2], topk_idx=topk_idx, topk_weights=inputs[rank].topk_weights,
                     config=config)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"rank {rank}: the bad id took {elapsed:.1f} s to raise"
    if rank % 2 == 1:  # the bad rank's lane
        assert "topk_idx" in str(raised.value), str(raised.value)
    common.log(rank, f"bad id: {raised.value}")
    common.log(rank, checks.run_case(buf, rank, num_ranks, case, seed + 1, config, config))

    # With num_worst_tokens: the lane leg still waits on the host, so the bad rank's lane raises at
    # the call; the other ranks' node legs do not wait, so they raise at the end of that call or of
    # the next, which every rank makes: each opens every leg whatever its host has seen, so nobody
    # waits. The bad lane's next call returns: its ranks abstained from the node legs, which records
    # nothing on them.
    kwargs = dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                  topk_weights=inputs[rank].topk_weights, num_worst_tokens=num_ranks * case.num_tokens, config=config)
    raised = []
    for ids in (topk_idx, torch.from_numpy(routing[rank]).cuda()):
        try:
            buf.dispatch(inputs[rank].x, topk_idx=ids, **kwargs)
            raised.append(False)
        except ValueError as error:
            raised.append(True)
            common.log(rank, f"bad id with num_worst_tokens, call {len(raised)}: {error}")
        torch.cuda.synchronize()
    if rank % 2 == 1:  # the bad rank's lane
        assert raised == [True, False], f"rank {rank}: the lane error at the call, then nothing, got {raised}"
    else:
        assert raised in ([True, False], [False, True]), f"rank {rank}: the error must be raised once, got {raised}"
    common.log(rank, checks.run_case(buf, rank, num_ranks, case, seed + 2, config, config))
    buf.destroy()


PEER_TIMEOUT_S = 5.0  # MOELINK_TIMEOUT_S of the peer-loss runs
SLACK_S = 5.0         # the contract's allowance on top of it


def _peer_loss_before_dispatch(rank, num_ranks, seed, lane):
    import faulthandler
    import time

    # A survivor stuck past every bound shows where (its stack on stderr) before the launcher kills it.
    faulthandler.dump_traceback_later(3 * (PEER_TIMEOUT_S + SLACK_S), exit=False)

    config = moelink.Config(8, 8, 128, 8, 128)
    buf = make_buffer(num_ranks, config, (2048,))
    check_lane_window(buf, lane)
    case = Case("peer-loss", 128, 2048, 8, 64).resolved(num_ranks)
    checks.run_case(buf, rank, num_ranks, case, seed, config, config)  # every kernel has run once
    per_node = buf._internode.per_node
    victim = num_ranks - 1
    victim_node, victim_gpu = divmod(victim, per_node)
    node, gpu = divmod(rank, per_node)
    routing = checks.make_routing_all(case, seed + 1, num_ranks)
    inputs = checks.make_inputs_all(case, seed + 1, num_ranks)
    topk_idx = torch.from_numpy(routing[rank]).cuda()
    *layout, _ = buf.get_dispatch_layout(topk_idx, case.num_experts)
    torch.cuda.synchronize()
    dist.barrier()  # the last collective: after it the victim is gone
    if rank == victim:
        faults.die()
    what = f"rank {rank} (node {node}, GPU {gpu}), {lane} lane, rank {victim} lost"
    start = time.perf_counter()
    error = None
    try:
        buf.dispatch(inputs[rank].x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                     num_tokens_per_expert=layout[2], topk_idx=topk_idx, topk_weights=inputs[rank].topk_weights,
                     config=config)
        torch.cuda.synchronize()
    except Exception as caught:  # noqa: BLE001 - checked below, by where this rank sits
        error = caught
    elapsed = time.perf_counter() - start
    if gpu == victim_gpu:
        # Its lane notify's opening waits for the victim, the lane's rank victim_node.
        assert isinstance(error, TimeoutError), f"{what}: expected TimeoutError from the lane, got {error!r}"
        faults.check_message(error, [f"rank {victim_node}", f"node {victim_node}", "node-to-node", str(victim)], what)
        limit = PEER_TIMEOUT_S + SLACK_S
    elif node == victim_node:
        # Its lane leg is with a survivor; its node legs wait for the victim, the node's rank victim_gpu.
        assert isinstance(error, TimeoutError), f"{what}: expected TimeoutError from the node, got {error!r}"
        faults.check_message(error, [f"rank {victim_gpu}", "in-node", str(victim)], what)
        limit = PEER_TIMEOUT_S + SLACK_S
    else:
        # It shares no Buffer with the victim: its node leg may see its peer abstain (the lane's
        # survivor gave up) or time out on it, depending on which comes first; either is bounded.
        assert error is None or isinstance(error, (TimeoutError, RuntimeError, ValueError)), f"{what}: {error!r}"
        limit = 2 * (PEER_TIMEOUT_S + SLACK_S)
    assert elapsed <= limit, f"{what}: the dispatch took {elapsed:.1f} s, limit {limit:.0f} s"
    print(f"{what}: dispatch after {elapsed:.1f} s: {error!r}; destroying", flush=True)
    start = time.perf_counter()
    try:
        buf.destroy()
        destroyed = "returned"
    except Exception as again:  # noqa: BLE001 - a broken leg's, or the outer barrier's lost node mate: bounded
        destroyed = f"raised {type(again).__name__} ({again})"
    took = time.perf_counter() - start
    assert took <= 2 * (PEER_TIMEOUT_S + SLACK_S), f"{what}: destroy() took {took:.1f} s"
    print(f"{what}: dispatch after {elapsed:.1f} s: {error!r}; destroy() {destroyed} after {took:.1f} s", flush=True)


@pytest.mark.parametrize("lane", LANE_WINDOWS)
def test_internode_peer_loss(lane):
    launcher.run_ranks(4, _peer_loss_before_dispatch, 87000, lane, timeout_s=180,
                       env={**env(2, 2, lane), "MOELINK_TIMEOUT_S": f"{PEER_TIMEOUT_S:g}"}, expect_killed={3})
