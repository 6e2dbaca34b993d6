"""Intranode dispatch + combine against tests/reference, one launch of R processes per rank count."""

import os

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import common  # noqa: E402
import launcher  # noqa: E402
import moelink  # noqa: E402
from checks import (ARENA_POISON, COVERING_CASES, Case, check_dispatch, check_recv_x, make_inputs_all,  # noqa: E402
                    make_routing_all, poison_arena, run_case)

from reference import moe_reference as ref  # noqa: E402

HIDDEN_SIZES = (2048, 2056, 4096, 7168)

CASES = COVERING_CASES

# MOELINK_TEST_CASES=small: the cases without the big shapes, plus a small async one, for runs where
# every kernel is much slower (scripts/sanitize.sh). Every option still appears.
SMALL_CASES = [case for case in CASES if case.num_tokens <= 512 and case.hidden <= 4096] + [
    Case("async-small", 64, 2048, 8, 64, use_async=True, num_bias=1),
]


def selected_cases() -> list:
    choice = os.environ.get("MOELINK_TEST_CASES", "all")
    if choice not in ("all", "small"):
        raise ValueError(f"MOELINK_TEST_CASES must be 'all' or 'small', got {choice!r}")
    return CASES if choice == "all" else SMALL_CASES


def arena_bytes(mode: str, rank: int, num_ranks: int) -> int:
    """"rings": no arena anywhere. "arena": the last rank has none (its rows come through the
    rings, next to peers that take theirs directly), rank 0's holds the small cases' outputs but not
    the big ones' (they fall back to the rings), the others' hold everything."""
    if mode == "rings" or rank == num_ranks - 1:
        return 0
    return 8 * common.MIB if rank == 0 else 512 * common.MIB


def _intranode(rank, num_ranks, seed, mode):
    # "rings": no arena and no peer segments, so every row takes the rings.
    os.environ["MOELINK_PEER_SEGMENTS"] = "0" if mode == "rings" else "1"
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    buf = common.make_buffer(num_ranks, (config, combine_config), HIDDEN_SIZES,
                             num_arena_bytes=arena_bytes(mode, rank, num_ranks))
    cases = selected_cases()
    for i, case in enumerate(cases):
        case = case.resolved(num_ranks)
        if case is not None:
            # Calls without previous_event / async_finish take the express path unless it is switched
            # off: every other case runs them through the full Python path instead.
            buf._express = i % 2 == 0
            summary = run_case(buf, rank, num_ranks, case, seed + i, config, combine_config)
            common.log(rank, f"[R={num_ranks}] {summary}")
    buf.destroy()
    _worst_tokens_too_small(rank, num_ranks, seed + len(cases), config)


def _worst_tokens_too_small(rank, num_ranks, seed, config):
    """num_worst_tokens below the rows a rank really receives must raise ValueError naming it, at
    that dispatch or at the next call (it may only be known on the device). Every rank overflows,
    so no rank is left waiting for a peer that bailed out. Runs last, on its own buffer, since
    after it the buffer's state is not part of the contract."""
    # If the overflow turns into a hang, fail fast (scaled where a tool slows every kernel down).
    os.environ["MOELINK_TIMEOUT_S"] = str(5 * launcher.timeout_scale())
    num_tokens, hidden, num_topk, num_experts = 256, 2048, 8, 64
    buf = common.make_buffer(num_ranks, (config,), (hidden,))
    routing = [ref.make_routing(seed, s, num_tokens, num_topk, num_experts, num_ranks) for s in range(num_ranks)]
    recv_counts = [ref.dispatch_plan_np(routing, d, num_experts, num_ranks).num_recv_tokens for d in range(num_ranks)]
    num_worst = min(recv_counts) - 1
    inputs = ref.make_inputs(seed, rank, num_tokens, hidden, num_topk, device="cuda")
    topk_idx = torch.from_numpy(routing[rank]).cuda()
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    error = None
    try:
        buf.dispatch(inputs.x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                     num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
                     topk_weights=inputs.topk_weights, num_worst_tokens=num_worst, config=config)
        torch.cuda.synchronize()
        buf.get_dispatch_layout(topk_idx, num_experts)
    except ValueError as e:
        error = e
    assert error is not None, (f"rank {rank}: num_worst_tokens={num_worst} below the {recv_counts[rank]} rows it "
                               f"receives raised nothing at the dispatch or the next call")
    assert "num_worst_tokens" in str(error), f"rank {rank}: the error does not name num_worst_tokens: {error}"
    common.log(rank, f"[R={num_ranks}] num_worst_tokens={num_worst} < {min(recv_counts)} rows: ValueError ok")
    common.quiet_destroy(buf)


def _back_to_back(rank, num_ranks, seed, rounds):
    """Rounds with no host barrier between them, routing and options changing every round, so
    leftovers of one round (counters, ring positions, flags) would corrupt the next. Even ranks
    take rows directly into arena outputs, odd ranks through the rings (no peer segments)."""
    os.environ["MOELINK_PEER_SEGMENTS"] = "1" if rank % 2 == 0 else "0"
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    buf = common.make_buffer(num_ranks, (config, combine_config), (2048,),
                             num_arena_bytes=64 * common.MIB if rank % 2 == 0 else 0)
    for i in range(rounds):
        case = Case(f"round {i}", 256, 2048, 8, 64, fp8=i % 3 == 1, drop_prob=0.05 * (i % 4),
                    alignment=(1, 128)[i % 2], worst=i % 5 == 4, num_bias=i % 3).resolved(num_ranks)
        buf._express = i % 7 < 4  # both paths, in a pattern the options' periods do not share
        summary = run_case(buf, rank, num_ranks, case, seed + i, config, combine_config)
        if i % 50 == 0 or i == rounds - 1:
            common.log(rank, f"[R={num_ranks}] {summary}")
    buf.destroy()


@pytest.mark.parametrize("mode", ("rings", "arena"))
@pytest.mark.parametrize("num_ranks", common.RANK_COUNTS)
def test_intranode(num_ranks, mode):
    launcher.run_ranks(num_ranks, _intranode, 1000 * num_ranks + (mode == "arena"), mode, timeout_s=300)


def _arena_lifetime(rank, num_ranks, seed):
    """Arena outputs free their range when dropped, and stay valid after destroy()."""
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    buf = common.make_buffer(num_ranks, (config, combine_config), (2048,), num_arena_bytes=64 * common.MIB)
    assert buf.runtime.arena_bytes_in_use() == 0
    case = Case("arena-lifetime", 256, 2048, 8, 64).resolved(num_ranks)
    run_case(buf, rank, num_ranks, case, seed, config, combine_config)
    import gc
    gc.collect()
    assert buf.runtime.arena_bytes_in_use() == 0, f"rank {rank}: {buf.runtime.arena_bytes_in_use()} arena bytes leaked"
    routing = ref.make_routing(seed, rank, 256, 8, 64, num_ranks)
    topk_idx = torch.from_numpy(routing).cuda()
    x = ref.make_inputs(seed, rank, 256, 2048, 8, device="cuda").x
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buf.get_dispatch_layout(topk_idx, 64)
    recv_x = buf.dispatch(x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                          num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, config=config)[0]
    from checks import in_arena
    assert recv_x.numel() == 0 or in_arena(buf, recv_x), f"rank {rank}: recv_x was not allocated in the arena"
    expected = recv_x.clone()
    torch.cuda.synchronize()
    buf.destroy()
    # The arena outlives the Buffer while an output still points into it.
    torch.cuda.synchronize()
    assert torch.equal(recv_x, expected), f"rank {rank}: recv_x changed after destroy()"
    del recv_x
    gc.collect()
    common.log(rank, f"[R={num_ranks}] arena outputs released on drop and valid after destroy: ok")


@pytest.mark.parametrize("num_ranks", common.RANK_COUNTS)
def test_arena_lifetime(num_ranks):
    launcher.run_ranks(num_ranks, _arena_lifetime, 7000 * num_ranks, timeout_s=120)


def _outputs_either_way(rank, num_ranks, seed, rounds):
    """The extension makes the operations' outputs through torch's C shim where the loaded torch has
    one that passes its check (python/bindings/convert.hpp, Outputs), and through Python calls
    otherwise. The GPU machine's torch must take the shim (the default path's host time counts on
    it); rounds alternate between the two ways, on the express and the full path, each checked
    against the reference (dispatch, cached dispatch, combine)."""
    import torch

    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    buf = common.make_buffer(num_ranks, (config, combine_config), (2048,))
    assert buf._torch_shim, f"rank {rank}: torch {torch.__version__}'s C shim was not taken"
    try:
        for i in range(rounds):
            case = Case(f"outputs {i}", (256, 1, 1024)[i % 3], 2048, 8, 64, fp8=i % 2 == 1,
                        scales_col_major=i % 4 == 3, drop_prob=0.05 * (i % 3), alignment=(1, 128)[i % 2],
                        worst=i % 5 == 4, num_bias=i % 3, use_async=i % 6 == 5).resolved(num_ranks)
            if case is None:
                continue
            buf._torch_shim = (i // 2) % 2 == 0
            buf._express = i % 3 != 2
            summary = run_case(buf, rank, num_ranks, case, seed + i, config, combine_config)
            if i % 4 == 0 or i == rounds - 1:
                common.log(rank, f"[R={num_ranks}] shim={buf._torch_shim} {summary}")
    finally:
        buf._torch_shim = True
    buf.destroy()


@pytest.mark.parametrize("num_ranks", common.RANK_COUNTS)
def test_outputs_either_way(num_ranks):
    launcher.run_ranks(num_ranks, _outputs_either_way, 9300 * num_ranks, 12, timeout_s=180)


def _num_sms_changes(rank, num_ranks, seed):
    """Operations alternating between two num_sms on one Buffer, through the rings: each finds its
    ring counters zero at the same words whatever channel count came before (ring_layout.hpp). With
    the counter block sized by the channel count, the wider layout's heads lay in the narrower
    one's first ring, on rows the operation before had left."""
    os.environ["MOELINK_PEER_SEGMENTS"] = "0"  # every row through the rings
    low, high = {1: (8, 24), 2: (8, 24), 4: (8, 24), 8: (8, 16)}[num_ranks]
    pairs = [common.make_configs(num_ranks, n) for n in (low, high)]
    buf = common.make_buffer(num_ranks, [c for pair in pairs for c in pair], (2048,))
    for i in range(6):
        config, combine_config = pairs[i % 2]
        case = Case(f"num_sms {config.num_sms}", 256, 2048, 8, 64, fp8=i % 3 == 2).resolved(num_ranks)
        common.log(rank, f"[R={num_ranks}] " + run_case(buf, rank, num_ranks, case, seed + i, config, combine_config))
    buf.destroy()


@pytest.mark.parametrize("num_ranks", common.RANK_COUNTS)
def test_num_sms_changes_between_operations(num_ranks):
    launcher.run_ranks(num_ranks, _num_sms_changes, 7700 * num_ranks, timeout_s=180)


def _column_major_scales_every_way(rank, num_ranks, seed):
    """Column-major fp8 scales of rows written directly (every rank's outputs in its arena) in each of
    the dispatch's three ways (MOELINK_SCALES_GATHER, read at every dispatch): staged row-major in the
    receiver's rings and written into its output by the receiver (2, the default), gathered per batch
    by the senders (1), strided per warp (0). With rings of 8 slots a channel of 4096 tokens has more
    rows than its ring holds staged, so those senders fall back to the gather while smaller channels
    stage; packed UE8M0 (S words not a multiple of 4) takes the receiver's word-at-a-time reads."""
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    tiny = (moelink.Config(config.num_sms, 4, 8), moelink.Config(combine_config.num_sms, 4, 8))
    buf = common.make_buffer(num_ranks, (config, combine_config) + tiny, (2048, 7168),
                             num_arena_bytes=512 * common.MIB)
    cases = [Case("colmajor", 1024, 7168, 8, 256, fp8=True, scales_col_major=True),
             Case("colmajor-worst-silent", 300, 2048, 8, 64, fp8=True, scales_col_major=True, worst=True,
                  silent="empty"),
             Case("colmajor-ue8m0", 517, 7168, 8, 64, fp8=True, scales_col_major=True, ue8m0=True),
             Case("colmajor-tiny-rings", 4096, 2048, 8, 64, fp8=True, scales_col_major=True, nowhere_prob=0.05),
             Case("rowmajor", 257, 2048, 4, 64, fp8=True)]
    saved = os.environ.get("MOELINK_SCALES_GATHER")
    try:
        i = 0
        for way in ("2", "1", "0"):
            os.environ["MOELINK_SCALES_GATHER"] = way
            for case in cases:
                pair = tiny if "tiny" in case.name else (config, combine_config)
                case = case.resolved(num_ranks)
                summary = run_case(buf, rank, num_ranks, case, seed + i, *pair)
                assert _on_every_rank(buf.runtime.last_dispatch_direct), f"rank {rank}: {case.name} was not direct"
                common.log(rank, f"[R={num_ranks}] MOELINK_SCALES_GATHER={way} {summary}")
                i += 1
    finally:
        if saved is None:
            os.environ.pop("MOELINK_SCALES_GATHER", None)
        else:
            os.environ["MOELINK_SCALES_GATHER"] = saved
    buf.destroy()


@pytest.mark.parametrize("num_ranks", common.RANK_COUNTS)
def test_column_major_scales_every_way(num_ranks):
    launcher.run_ranks(num_ranks, _column_major_scales_every_way, 8100 * num_ranks, timeout_s=240)


@pytest.mark.parametrize("num_ranks", common.RANK_COUNTS)
def test_back_to_back(num_ranks):
    launcher.run_ranks(num_ranks, _back_to_back, 5000 * num_ranks, 200, timeout_s=240)


# The NVLink buffer past the config's size hint, which no ring of these dispatches reaches: the
# staged-bound test fills it and checks nobody wrote there.
CANARY_BYTES = 1 * common.MIB
CANARY = 0x3C


def _rows_among(rows, table) -> "torch.Tensor":
    """[n] bool: whether each of `rows` equals, byte for byte, some row of `table` or a row of arena
    poison. Rows are compared by a 64-bit key of their words (wrapping int64 arithmetic): every pair
    compared in full would take n x m x row bytes of memory."""
    def words(t):
        return t.contiguous().view(torch.uint8).reshape(t.size(0), -1).view(torch.int32).to(torch.int64)

    gen = torch.Generator().manual_seed(0x5EED)
    width = words(table[:1]).size(1)
    weights = (torch.randint(1, 2**62, (width,), generator=gen, dtype=torch.int64) | 1).to(rows.device)
    poison = torch.full((1, width * 4), ARENA_POISON, dtype=torch.uint8, device=rows.device)
    known = torch.cat([(words(table) * weights).sum(dim=1), (words(poison) * weights).sum(dim=1)])
    return torch.isin((words(rows) * weights).sum(dim=1), known)


def _staged_bound(rank, num_ranks, seed):
    """A cached dispatch whose handle is a plain tuple holding another is_token_in_rank than its
    matrices describe: the liar (rank R - 1) flags every token for every rank, its matrices count
    under 200 a (channel, destination). Positions come from the flags, the rows' places and the
    staged rows' count from the matrices, and nothing compares the two (the handle's id and status
    are all the opening checks), so the runtime takes it silently; a ValueError on every rank is
    accepted too. What must hold is that the lie stays in the liar's own rows: the other sources'
    rows exact, the liar's rows rows of its own x and scales (or poison), nothing written past the
    rings, and the next dispatch with the original handle exact.

    Why it fails without the bound (send_channel's `pos >= stage_count[d]`): a staged row goes to
    pos * S floats into the receiver's ring (channel, liar), and its ring holds 266 of them (H 2048 fp8, 8
    slots, no top-k in a cached dispatch: 17024 bytes, 64 a row). Positions from the count to 265 would
    stay in that ring, unread; 266..1023 of the liar's 1024-token channels land past it: channel 0's
    over ring(1, 0) onward, the other sources' staged rows of channel 1, racing their own senders'
    writes (that check fails only when the liar writes last); channel 1's 47 KiB past the last ring,
    onto the canary, whatever the timing. The canary starts at the size hint, whose rings hold 32 top-k
    ids and weights a slot (2 KiB a ring more), so 8, 16 or 32 KiB (2, 4, 8 ranks) after this dispatch's
    last ring: the overflow runs 39, 31 or 15 KiB into it. Every count is under 200 so that every
    (channel, source) stages (266 rows fit; a count past them makes its sender gather instead, and its
    positions never reach the staging). num_worst_tokens = R * T keeps the liar's positions under
    num_rows, the sender's other bound, which comes first: with num_rows the real count, the last
    source's positions past its own rows would be dropped there, bound or not.

    The liar is the last rank because its x rows are bounded by num_rows only: past a channel's
    count they spill onto the rows after it, for the last source its own and the padding. A liar
    before other sources overwrites their x rows, so their rows could not be checked."""
    liar = num_ranks - 1
    config = moelink.Config(4, 4, 8)  # 2 channels of 1024 tokens, rings of 8 slots
    case = Case("staged bound", 2048, 2048, 2, 8 * num_ranks, fp8=True, scales_col_major=True, drop_prob=0.0,
                nowhere_prob=0.85, worst=True).resolved(num_ranks)
    what = f"rank {rank}/{num_ranks} {case.name}"
    num_experts, num_worst = case.num_experts, num_ranks * case.num_tokens
    routing = make_routing_all(case, seed, num_ranks)
    per_channel = case.num_tokens // 2
    for s in range(num_ranks):
        in_rank = ref.layout_np(routing[s], num_experts, num_ranks)[2]
        most = max(int(in_rank[c * per_channel:(c + 1) * per_channel].sum(axis=0).max()) for c in range(2))
        assert most <= 200, f"{what}: rank {s} sends {most} tokens of a channel to one rank, past what stages"
    inputs = make_inputs_all(case, seed, num_ranks)
    mine = inputs[rank]

    hint = config.get_nvl_buffer_size_hint(case.hidden, num_ranks)  # fp8: a row is H bytes
    buf = moelink.Buffer(common.world_group(), num_nvl_bytes=hint + CANARY_BYTES, explicitly_destroy=True,
                         num_arena_bytes=128 * common.MIB)
    topk_idx = torch.from_numpy(routing[rank]).cuda()
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buf.get_dispatch_layout(topk_idx,
                                                                                                 num_experts)
    want = ref.reference_dispatch(routing, [inp.dispatch_x(True) for inp in inputs],
                                  [inp.topk_weights for inp in inputs], rank, num_experts, num_ranks)
    poison_arena(buf)
    out = buf.dispatch(mine.dispatch_x(True), num_tokens_per_rank=num_tokens_per_rank,
                       is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
                       topk_idx=topk_idx, topk_weights=mine.topk_weights, num_worst_tokens=num_worst, config=config)
    check_dispatch(out, want, num_worst, case, what)
    handle = out[4]
    del out
    torch.cuda.synchronize()  # the kernel writes the flag: read it once it ran
    assert _on_every_rank(buf.runtime.last_dispatch_direct), f"{what}: the dispatch was not direct (nothing staged)"

    canary = buf.get_local_buffer_tensor(torch.uint8, offset=hint)
    canary.fill_(CANARY)

    def check_canary(canary, after: str) -> None:
        torch.cuda.synchronize()
        torch.distributed.barrier(group=common.world_group())  # every rank's kernels, the writers, done
        bad = torch.nonzero(canary != CANARY).flatten()
        assert bad.numel() == 0, (f"{what}: after {after}, {bad.numel()} bytes past the rings were written, the "
                                  f"first {bad[0].item()} bytes past the size hint")

    flags = torch.ones_like(is_token_in_rank) if rank == liar else is_token_in_rank
    rebuilt = (handle[0], handle[1], handle[2], handle[3], flags, handle[5])
    poison_arena(buf)
    error, lied = None, None
    try:
        lied = buf.dispatch(mine.dispatch_x(True), handle=rebuilt, config=config)
        torch.cuda.synchronize()
        buf.get_dispatch_layout(topk_idx, num_experts)  # a data error the device recorded is raised by now
    except ValueError as e:
        error, lied = e, None
    raised_everywhere, raised_nowhere = _on_every_rank(error is not None), _on_every_rank(error is None)
    assert raised_everywhere or raised_nowhere, f"{what}: the disagreeing handle raised on some ranks only: {error}"
    if lied is not None:
        n = want.num_recv_tokens
        honest = int((want.plan.src_rank != liar).sum())
        data, scales = lied[0]
        assert scales.t().is_contiguous(), f"{what}: column-major scales came back with strides {scales.stride()}"
        common.assert_bits_equal(data[:honest], want.recv_x[0][:honest], f"{what}: other sources' recv_x")
        common.assert_bits_equal(scales[:honest], want.recv_x[1][:honest], f"{what}: other sources' scales")
        for got, table, name in ((data, inputs[liar].x_fp8, "recv_x"), (scales, inputs[liar].x_scales, "scales")):
            among = _rows_among(got[honest:n], table)
            assert bool(among.all()), (f"{what}: {int((~among).sum())} of rank {liar}'s {n - honest} {name} rows are "
                                       f"neither its own rows nor poison")
        del lied, data, scales
    check_canary(canary, "the disagreeing cached dispatch")
    common.log(rank, f"[R={num_ranks}] disagreeing is_token_in_rank: "
                     + (f"ValueError on every rank ({error})" if raised_everywhere else
                        "taken; other sources' rows exact, nothing past the rings"))

    # The original handle right after, with fresh data: stale rows or a ring left dirty would show.
    fresh = make_inputs_all(case, seed, num_ranks, salt=1)
    want_fresh = ref.reference_dispatch(routing, [inp.dispatch_x(True) for inp in fresh], None, rank, num_experts,
                                        num_ranks)
    poison_arena(buf)
    again = buf.dispatch(fresh[rank].dispatch_x(True), handle=handle, config=config)
    check_recv_x(again[0], want_fresh, num_worst, case, f"{what} (original handle after)")
    torch.cuda.synchronize()
    assert _on_every_rank(buf.runtime.last_dispatch_direct), f"{what}: the cached dispatch after was not direct"
    check_canary(canary, "the cached dispatch with the original handle")
    common.log(rank, f"[R={num_ranks}] cached dispatch with the original handle after it: exact")
    del again, canary
    buf.destroy()


@pytest.mark.parametrize("num_ranks", common.RANK_COUNTS)
def test_staged_scales_disagreeing_handle(num_ranks):
    launcher.run_ranks(num_ranks, _staged_bound, 8300 * num_ranks, timeout_s=120, env={"MOELINK_SCALES_GATHER": "2"})


def _one_rank_out(rank, num_ranks, seed, config, combine_config, flag, what):
    """Peer segments with the last rank out (MOELINK_PEER_SEGMENTS=0 there): it maps nothing, so no
    rank's rows may take the segment path (`runtime.<flag>` stays false), and all stay exact."""
    os.environ["MOELINK_PEER_SEGMENTS"] = "0" if rank == num_ranks - 1 else "1"
    buf = common.make_buffer(num_ranks, (config, combine_config), (4096,))
    for i in range(4):
        case = Case(f"one rank out {i}", 512, 4096, 8, 64).resolved(num_ranks)
        run_case(buf, rank, num_ranks, case, seed + 200 + i, config, combine_config)
        assert not getattr(buf.runtime, flag), f"rank {rank}: {what} although rank {num_ranks - 1} maps no peer segment"
    buf.destroy()
    os.environ["MOELINK_PEER_SEGMENTS"] = "1"


def _peer_segments(rank, num_ranks, seed):
    """Direct dispatch into ordinary torch outputs (window/peer_segments.hpp). The same shapes round
    after round: from the third round on, rows come directly (each sender maps a segment the
    second time it is named), with exact outputs every round. Then segments
    that change under it (junk allocations and empty_cache between rounds), fp8 and cached
    dispatches among them, still exact. Then rounds whose outputs always land in new segments, so
    mappings go stale and are closed, still exact. Then one rank that does not take part
    (MOELINK_PEER_SEGMENTS=0): nobody's rows come directly, and all stay exact. The window is 8
    notes here (stale after 16, about five rounds), so that 26 rounds of new segments age mappings
    out; test_peer_segments_held_step runs the default one."""
    import gc
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    os.environ["MOELINK_PEER_SEGMENTS"] = "1"
    os.environ["MOELINK_SEGMENT_WINDOW"] = "8"
    buf = common.make_buffer(num_ranks, (config, combine_config), (4096,))
    direct_rounds = []
    # Canaries: tensors of this rank's caching allocator beside the outputs (small ones share the
    # outputs' small segments), which no peer may ever write.
    canaries = [torch.full((n,), 0x5A, dtype=torch.uint8, device="cuda") for n in (4096, 65536, 3 * common.MIB)]
    for i in range(8):
        case = Case(f"steady {i}", 512, 4096, 8, 64, fp8=i >= 4).resolved(num_ranks)
        run_case(buf, rank, num_ranks, case, seed + i, config, combine_config)
        direct_rounds.append(buf.runtime.last_dispatch_direct)
        canaries.append(torch.full((8192 * (i + 1),), 0x5A, dtype=torch.uint8, device="cuda"))
    torch.cuda.synchronize()
    for c in canaries:
        assert bool((c == 0x5A).all()), f"rank {rank}: a peer wrote into a tensor that was no dispatch output"
    del canaries
    common.log(rank, f"[R={num_ranks}] steady rounds direct: {direct_rounds}, "
                     f"{buf.runtime.peer_segments_mapped} peer segments mapped")
    assert buf.runtime.peer_segments_mapped > 0, f"rank {rank}: no peer segment was mapped in 8 steady rounds"
    # The caching allocator is free to move an output to another segment now and then; most
    # steady rounds must still be direct.
    assert sum(direct_rounds[2:]) >= 3, f"rank {rank}: rows did not come directly in steady rounds: {direct_rounds}"
    junk = []
    for i in range(12):
        # New segments under the outputs: free what the caching allocator holds, take some of it.
        junk.append(torch.empty(int(1 + (seed + i) % 7) * 3 * common.MIB, dtype=torch.uint8, device="cuda"))
        if i % 3 == 2:
            junk.clear()
        gc.collect()
        torch.cuda.empty_cache()
        case = Case(f"churn {i}", 256 + 64 * (i % 3), 4096, 8, 64, fp8=i % 2 == 1, drop_prob=0.05 * (i % 3),
                    worst=i % 4 == 3).resolved(num_ranks)
        run_case(buf, rank, num_ranks, case, seed + 100 + i, config, combine_config)
    common.log(rank, f"[R={num_ranks}] churn rounds exact, {buf.runtime.peer_segments_mapped} peer segments mapped")
    # Past the stale limit: every round's outputs in new segments (freed and made again), each named
    # twice in the round (dispatch, then the cached dispatch), so each round maps new keys, and keys
    # not named for 16 notes go stale. The dropped mappings must be closed once their kernels
    # finished (never under one), with every round exact.
    closed_before = buf.runtime.peer_segments_closed
    for i in range(26):
        junk.append(torch.empty(int(1 + (seed + i) % 5) * 2 * common.MIB, dtype=torch.uint8, device="cuda"))
        if i % 2 == 1:
            junk.clear()
        gc.collect()
        torch.cuda.empty_cache()
        case = Case(f"stale {i}", 128 + 32 * (i % 4), 4096, 8, 64, fp8=i % 3 == 2).resolved(num_ranks)
        run_case(buf, rank, num_ranks, case, seed + 300 + i, config, combine_config)
    closed = buf.runtime.peer_segments_closed - closed_before
    common.log(rank, f"[R={num_ranks}] stale rounds exact, {closed} peer segment mappings closed, "
                     f"{buf.runtime.peer_segments_mapped} mapped")
    assert closed > 0, f"rank {rank}: 26 rounds of new segments closed no mapping (the table would only grow)"
    assert buf.runtime.peer_segments_mapped <= 128 * (num_ranks - 1), \
        f"rank {rank}: {buf.runtime.peer_segments_mapped} mappings held, more than the table's slots"
    buf.destroy()
    del junk
    del os.environ["MOELINK_SEGMENT_WINDOW"]

    _one_rank_out(rank, num_ranks, seed, config, combine_config, "last_dispatch_direct",
                  "rows came directly")
    common.log(rank, f"[R={num_ranks}] peer segments: steady direct, churn exact, a rank out falls back: ok")


@pytest.mark.parametrize("num_ranks", common.RANK_COUNTS)
def test_peer_segments(num_ranks):
    launcher.run_ranks(num_ranks, _peer_segments, 9000 * num_ranks, timeout_s=240)


def _peer_segments_held_step(rank, num_ranks, seed):
    """A training step's forward at the default window: each of 24 layers' recv_x is held until the
    step ends (as for backward), each in a segment of its own (over 10 MB, so the caching allocator
    does not share it), so a segment comes back once a step, 24 notes later. Senders map them while
    the second step names them again; from the third step on every dispatch comes directly, and
    every held output is exact."""
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    os.environ["MOELINK_PEER_SEGMENTS"] = "1"
    buf = common.make_buffer(num_ranks, (config, combine_config), (7168,))
    case = Case("held step", 512, 7168, 8, 64).resolved(num_ranks)
    routing = make_routing_all(case, seed, num_ranks)
    inputs = make_inputs_all(case, seed, num_ranks)
    mine = inputs[rank]
    topk_idx = torch.from_numpy(routing[rank]).cuda()
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buf.get_dispatch_layout(topk_idx,
                                                                                                 case.num_experts)
    want = ref.reference_dispatch(routing, [inp.dispatch_x(False) for inp in inputs],
                                  [inp.topk_weights for inp in inputs], rank, case.num_experts, num_ranks,
                                  case.alignment)
    layers, steps = 24, 4
    direct = []
    for step in range(steps):
        held = []
        for _ in range(layers):
            out = buf.dispatch(mine.dispatch_x(False), num_tokens_per_rank=num_tokens_per_rank,
                               is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
                               topk_idx=topk_idx, topk_weights=mine.topk_weights, expert_alignment=case.alignment,
                               config=config)
            held.append(out[0])
            del out
            if step >= 2:
                torch.cuda.synchronize()  # the kernel writes the flag: read it once it ran
                direct.append(_on_every_rank(buf.runtime.last_dispatch_direct))
        if step == steps - 1:
            for i, recv_x in enumerate(held):
                check_recv_x(recv_x, want, want.num_recv_tokens, case, f"rank {rank} held layer {i}")
        del held
    common.log(rank, f"[R={num_ranks}] held step: direct on every rank in steps 3-4: {sum(direct)}/{len(direct)}, "
                     f"{buf.runtime.peer_segments_mapped} peer segments mapped")
    # The same calls every step: the caching allocator hands each step the segments of the one
    # before, so a miss here means the table did not keep them.
    assert sum(direct) >= len(direct) - 2, f"rank {rank}: held layers did not come directly: {direct}"
    assert buf.runtime.peer_segments_mapped >= layers * (num_ranks - 1), \
        f"rank {rank}: {buf.runtime.peer_segments_mapped} segments mapped, fewer than the {layers} held per peer"
    buf.destroy()


@pytest.mark.parametrize("num_ranks", common.RANK_COUNTS)
def test_peer_segments_held_step(num_ranks):
    launcher.run_ranks(num_ranks, _peer_segments_held_step, 9700 * num_ranks, timeout_s=240)


def _on_every_rank(flag: bool) -> bool:
    """Whether `flag` holds on every rank of the world group (a collective)."""
    import torch

    t = torch.tensor([int(bool(flag))], dtype=torch.int32)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=common.world_group())
    return bool(t.item())


def _peer_segments_combine_pull(rank, num_ranks, seed):
    """Pull combine from ordinary torch inputs (window/peer_segments.hpp): no arena, and every round's
    combine input is a fresh torch tensor of the same shape (run_case's), its weights the dispatch's
    torch output. From the third round on the token owners read each rank's input in place (they map
    its segments the second time it names them, sharing the dispatch's table), with exact outputs
    every round; rounds without top-k weights pull x alone; rounds of 200 tokens end each channel's
    halves in short batches. Then one rank that does not take part (MOELINK_PEER_SEGMENTS=0):
    nobody's input is pulled, and all stay exact."""
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    os.environ["MOELINK_PEER_SEGMENTS"] = "1"
    buf = common.make_buffer(num_ranks, (config, combine_config), (4096,))
    pulled_rounds = []
    for i in range(10):
        case = Case(f"pull steady {i}", 512, 4096, 8, 64, with_weights=i < 7).resolved(num_ranks)
        run_case(buf, rank, num_ranks, case, seed + i, config, combine_config)
        pulled_rounds.append(buf.runtime.last_combine_pulled)
    common.log(rank, f"[R={num_ranks}] steady combines pulled: {pulled_rounds}, "
                     f"{buf.runtime.peer_segments_mapped} peer segments mapped")
    assert buf.runtime.peer_segments_mapped > 0, f"rank {rank}: no peer segment was mapped in 10 steady rounds"
    # The caching allocator may move an input to another segment now and then (and the rounds
    # without weights name one segment fewer); most steady rounds must still pull.
    assert sum(pulled_rounds[2:7]) >= 3, f"rank {rank}: steady combines with weights were not pulled: {pulled_rounds}"
    assert sum(pulled_rounds[7:]) >= 1, f"rank {rank}: steady combines without weights were not pulled: {pulled_rounds}"
    # Pulled everywhere, each channel's two blocks take half its tokens; at T=200 those halves end
    # in short batches (8 or 9 tokens at 2 ranks, 1 at 8), whose tokens several warps share, a slice
    # of the hidden size and of the bias apiece; at T=1200 they span several full batches and end
    # in a short one. A round splits only when every rank's input was pulled, so that is asked of
    # all ranks together. run_case overwrites each input right after its combine: an owner still
    # reading it then (a half not waited for) would sum NaN.
    split_rounds = []
    for i in range(12):
        tokens = 200 if i < 6 else 1200
        case = Case(f"pull split {tokens} {i}", tokens, 4096, 8, 64, num_bias=1).resolved(num_ranks)
        run_case(buf, rank, num_ranks, case, seed + 20 + i, config, combine_config)
        split_rounds.append(_on_every_rank(buf.runtime.last_combine_pulled))
    common.log(rank, f"[R={num_ranks}] combines pulled on every rank: {split_rounds}")
    assert sum(split_rounds[2:6]) >= 1 and sum(split_rounds[8:]) >= 1, \
        f"rank {rank}: steady combines were not pulled on every rank (no split ran): {split_rounds}"
    buf.destroy()

    _one_rank_out(rank, num_ranks, seed, config, combine_config, "last_combine_pulled",
                  "its combine input was pulled")
    common.log(rank, f"[R={num_ranks}] combine pull from segments: steady pulled, a rank out pushes: ok")


@pytest.mark.parametrize("num_ranks", common.RANK_COUNTS)
def test_peer_segments_combine_pull(num_ranks):
    launcher.run_ranks(num_ranks, _peer_segments_combine_pull, 9500 * num_ranks, timeout_s=240)
