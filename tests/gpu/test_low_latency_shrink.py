"""Shrink (Buffer(..., enable_shrink=True)): the mask calls, a rank masked by hand that never takes part,
and a rank that stops after one round, which the survivors mask when it does not answer; in both the
survivors' dispatch and combine equal the reference over the live ranks (tokens from a masked rank
absent, top-k slots on its experts dropped). Without shrink the same loss is a TimeoutError naming the
rank. Ranks are processes on one GPU under MPS; the rank that stops stays alive without taking part
until the survivors are done (their next call still writes into its region, and writes into an
exited process's IPC memory are undefined; under MPS a fault faults every client, docs/TESTING.md).

Passed on one H200 with the ranks under MPS (2026-12-01).
"""

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import torch.distributed as dist  # noqa: E402

import moelink  # noqa: E402

import common  # noqa: E402
import launcher  # noqa: E402
from test_low_latency import CASES, ENV, check_combine, check_dispatch, combine_input, make_round  # noqa: E402

# bf16, M 128, 17 tokens, H 7168, top-8 of 288 experts (288 splits over 2, 3 and 4 ranks)
CASE = replace(CASES[1], num_experts=288)


def make_buffer(num_ranks, case, enable_shrink=True):
    hint = moelink.Buffer.get_low_latency_rdma_size_hint(case.max_tokens, case.hidden, num_ranks, case.num_experts)
    return moelink.Buffer(common.world_group(), num_nvl_bytes=0, num_rdma_bytes=hint, low_latency_mode=True,
                          num_qps_per_rank=case.num_experts // num_ranks, explicitly_destroy=True,
                          enable_shrink=enable_shrink)


def without(routing, masked, case, num_ranks):
    """The routing as the survivors' calls see it: a masked rank's tokens gone, slots on its experts -1."""
    experts_per_rank = case.num_experts // num_ranks
    result = []
    for s, topk in enumerate(routing):
        topk = topk.copy()
        if s in masked:
            topk[:] = -1
        for r in masked:
            topk[(topk >= r * experts_per_rank) & (topk < (r + 1) * experts_per_rank)] = -1
        result.append(topk)
    return result


def mask_of(buf, num_ranks):
    status = torch.full((num_ranks,), -1, dtype=torch.int32, device="cuda")
    buf.low_latency_query_mask_buffer(status)
    return status.cpu().tolist()


def survivor_round(buf, case, seed, rank, num_ranks, masked, what):
    routing, inputs = make_round(case, seed, num_ranks)
    idx = torch.from_numpy(routing[rank]).cuda()
    out = buf.low_latency_dispatch(inputs[rank].x, idx, case.max_tokens, case.num_experts, use_fp8=False)
    live = without(routing, masked, case, num_ranks)
    check_dispatch(out, case, live, inputs, rank, num_ranks, f"{what} dispatch")
    y = combine_input(case, out, inputs, rank, num_ranks)
    combined = buf.low_latency_combine(y, idx, inputs[rank].topk_weights, out[2])[0]
    check_combine(combined, case, live, inputs, rank, f"{what} combine")


def _mask_api(rank, num_ranks, seed):
    case = CASE.resolved(num_ranks)
    buf = make_buffer(num_ranks, case)
    assert mask_of(buf, num_ranks) == [0] * num_ranks
    other = 1 - rank
    buf.low_latency_update_mask_buffer(other, True)
    assert mask_of(buf, num_ranks) == [int(r == other) for r in range(num_ranks)]
    buf.low_latency_update_mask_buffer(other, False)
    assert mask_of(buf, num_ranks) == [0] * num_ranks
    buf.low_latency_update_mask_buffer(other, True)
    buf.low_latency_clean_mask_buffer()
    assert mask_of(buf, num_ranks) == [0] * num_ranks
    with pytest.raises(ValueError, match="rank_to_mask"):
        buf.low_latency_update_mask_buffer(num_ranks, True)
    with pytest.raises(ValueError, match="cannot mask itself"):
        buf.low_latency_update_mask_buffer(rank, True)
    buf.destroy()


def test_mask_calls():
    launcher.run_ranks(2, _mask_api, 71000, timeout_s=120, env=ENV)


def _masked_by_hand(rank, num_ranks, seed):
    case = CASE.resolved(num_ranks)
    buf = make_buffer(num_ranks, case)
    gone = num_ranks - 1
    if rank != gone:
        buf.low_latency_update_mask_buffer(gone, True)
        for i in range(3):
            survivor_round(buf, case, seed + i, rank, num_ranks, {gone}, f"rank {rank} round {i}")
        assert mask_of(buf, num_ranks)[gone] == 1
        common.log(rank, f"[R={num_ranks}] rank {gone} masked by hand: 3 rounds exact over the others")
    dist.barrier()  # the masked rank sits the calls out, then everyone destroys together
    buf.destroy()


@pytest.mark.parametrize("num_ranks", (3, 4))
def test_masked_rank_sits_out(num_ranks):
    launcher.run_ranks(num_ranks, _masked_by_hand, 72000 + num_ranks, timeout_s=300, env=ENV)


def _stops_after_one_round(rank, num_ranks, seed, enable_shrink):
    case = CASE.resolved(num_ranks)
    buf = make_buffer(num_ranks, case, enable_shrink=enable_shrink)
    gone = num_ranks - 1
    survivor_round(buf, case, seed, rank, num_ranks, set(), f"rank {rank} first round")
    if rank == gone:
        # It stops answering but stays alive until the others are done: their first call after it
        # still writes rows into its region, and writes into the IPC memory of a process that has
        # exited are undefined (under MPS a fault there would take every client down).
        torch.cuda.synchronize()
        dist.barrier()
        common.quiet_destroy(buf)
        return
    if enable_shrink:
        with pytest.warns(RuntimeWarning, match=f"rank {gone} did not answer"):
            survivor_round(buf, case, seed + 1, rank, num_ranks, {gone}, f"rank {rank} after rank {gone} left")
        survivor_round(buf, case, seed + 2, rank, num_ranks, {gone}, f"rank {rank} second round without it")
        assert mask_of(buf, num_ranks) == [1 if r == gone else 0 for r in range(num_ranks)]
        common.log(rank, f"[R={num_ranks}] rank {gone} left and was masked; survivors exact")
    else:
        routing, inputs = make_round(case, seed + 1, num_ranks)
        idx = torch.from_numpy(routing[rank]).cuda()
        out = buf.low_latency_dispatch(inputs[rank].x, idx, case.max_tokens, case.num_experts, use_fp8=False)
        torch.cuda.synchronize()  # the dispatch gives up on the lost rank after MOELINK_TIMEOUT_S
        assert torch.isnan(out[0].float()).all(), "a dispatch that lost a peer must leave poisoned outputs"
        with pytest.raises(TimeoutError, match=f"rank {gone}"):
            buf.low_latency_dispatch(inputs[rank].x, idx, case.max_tokens, case.num_experts, use_fp8=False)
    dist.barrier()  # the silent rank leaves with the others
    common.quiet_destroy(buf)


@pytest.mark.parametrize("num_ranks", (2, 3))
def test_a_rank_that_stops_is_masked(num_ranks):
    launcher.run_ranks(num_ranks, _stops_after_one_round, 73000 + num_ranks, True, timeout_s=300,
                       env={**ENV, "MOELINK_TIMEOUT_S": "5"})


def test_without_shrink_a_rank_that_stops_is_a_timeout():
    launcher.run_ranks(2, _stops_after_one_round, 74000, False, timeout_s=300, env={**ENV, "MOELINK_TIMEOUT_S": "5"})
