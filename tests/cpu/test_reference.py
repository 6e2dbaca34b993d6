"""Checks tests/reference/moe_reference.py against brute force on tiny cases (numpy only).

The GPU tests trust the reference completely, so it is checked here against loops written
independently of its vectorised code, plus a few cases worked out by hand.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference import moe_reference as ref  # noqa: E402


def brute_layout(topk_idx, num_experts, num_ranks):
    experts_per = num_experts // num_ranks
    num_tokens = len(topk_idx)
    per_rank = [0] * num_ranks
    per_expert = [0] * num_experts
    in_rank = [[False] * num_ranks for _ in range(num_tokens)]
    for t in range(num_tokens):
        for e in topk_idx[t]:
            if e >= 0:
                per_expert[e] += 1
                in_rank[t][e // experts_per] = True
        for r in range(num_ranks):
            per_rank[r] += in_rank[t][r]
    return per_rank, per_expert, in_rank


def brute_dispatch(topk_per_rank, d, num_experts, num_ranks, alignment):
    experts_per = num_experts // num_ranks
    rows, recv_topk = [], []
    counts = [0] * experts_per
    for s, topk_idx in enumerate(topk_per_rank):
        for t, slots in enumerate(topk_idx):
            local = [e - d * experts_per if e >= 0 and e // experts_per == d else -1 for e in slots]
            if any(v >= 0 for v in local):
                rows.append((s, t))
                recv_topk.append(local)
            for v in local:
                if v >= 0:
                    counts[v] += 1
    aligned = [-(-c // alignment) * alignment for c in counts]
    return rows, recv_topk, aligned


def check_against_brute(topk_per_rank, num_experts, num_ranks, alignment):
    for s, topk_idx in enumerate(topk_per_rank):
        per_rank, per_expert, in_rank = ref.layout_np(topk_idx, num_experts, num_ranks)
        want_rank, want_expert, want_in_rank = brute_layout(topk_idx.tolist(), num_experts, num_ranks)
        assert per_rank.dtype == np.int32 and per_expert.dtype == np.int32 and in_rank.dtype == bool
        assert per_rank.tolist() == want_rank, f"rank {s}"
        assert per_expert.tolist() == want_expert, f"rank {s}"
        assert in_rank.reshape(len(topk_idx), num_ranks).tolist() == want_in_rank, f"rank {s}"
    for d in range(num_ranks):
        plan = ref.dispatch_plan_np(topk_per_rank, d, num_experts, num_ranks, alignment)
        rows, recv_topk, aligned = brute_dispatch([t.tolist() for t in topk_per_rank], d, num_experts,
                                                  num_ranks, alignment)
        assert list(zip(plan.src_rank.tolist(), plan.src_idx.tolist())) == rows, f"d={d}"
        assert plan.recv_topk_idx.tolist() == recv_topk, f"d={d}"
        assert plan.num_recv_tokens_per_expert == aligned, f"d={d}"
        assert plan.num_recv_tokens == len(rows)


def test_hand_worked_case():
    # E=4 over R=2: experts 0,1 on rank 0, experts 2,3 on rank 1.
    rank0 = np.array([[0, 3], [1, -1], [-1, -1], [2, 3]])
    rank1 = np.array([[3, 1]])
    per_rank, per_expert, in_rank = ref.layout_np(rank0, 4, 2)
    assert per_rank.tolist() == [2, 2]
    assert per_expert.tolist() == [1, 1, 1, 2]
    assert in_rank.tolist() == [[True, True], [True, False], [False, False], [False, True]]

    to_rank1 = ref.dispatch_plan_np([rank0, rank1], 1, 4, 2, alignment=1)
    assert list(zip(to_rank1.src_rank.tolist(), to_rank1.src_idx.tolist())) == [(0, 0), (0, 3), (1, 0)]
    assert to_rank1.recv_topk_idx.tolist() == [[-1, 1], [0, 1], [1, -1]]
    assert to_rank1.num_recv_tokens_per_expert == [1, 3]
    assert ref.dispatch_plan_np([rank0, rank1], 1, 4, 2, alignment=2).num_recv_tokens_per_expert == [2, 4]

    to_rank0 = ref.dispatch_plan_np([rank0, rank1], 0, 4, 2)
    assert list(zip(to_rank0.src_rank.tolist(), to_rank0.src_idx.tolist())) == [(0, 0), (0, 1), (1, 0)]
    assert to_rank0.recv_topk_idx.tolist() == [[0, -1], [1, -1], [-1, 1]]
    assert to_rank0.num_recv_tokens_per_expert == [1, 2]


@pytest.mark.parametrize("num_ranks,num_experts,num_topk", [(1, 4, 2), (2, 2, 1), (2, 8, 3), (4, 16, 4),
                                                            (8, 64, 8), (8, 8, 8)])
@pytest.mark.parametrize("drop_prob", [0.0, 0.3])
def test_random_against_brute(num_ranks, num_experts, num_topk, drop_prob):
    for seed in range(3):
        topk = [ref.make_routing(seed, s, 5 + 3 * s, num_topk, num_experts, num_ranks, drop_prob=drop_prob,
                                 nowhere_prob=0.2) for s in range(num_ranks)]
        check_against_brute(topk, num_experts, num_ranks, alignment=1 + seed * 3)


def test_empty_and_silent_ranks():
    num_ranks, num_experts = 4, 16
    topk = [ref.make_routing(7, s, 9, 4, num_experts, num_ranks, drop_prob=0.2) for s in range(num_ranks)]
    topk[1] = np.empty((0, 4), dtype=np.int64)       # sends nothing: no tokens
    topk[2] = np.full((6, 4), -1, dtype=np.int64)    # sends nothing: every slot empty
    check_against_brute(topk, num_experts, num_ranks, alignment=4)
    for d in range(num_ranks):
        plan = ref.dispatch_plan_np(topk, d, num_experts, num_ranks)
        assert not np.isin(plan.src_rank, [1, 2]).any()
    per_rank, per_expert, in_rank = ref.layout_np(topk[2], num_experts, num_ranks)
    assert per_rank.tolist() == [0] * 4 and per_expert.sum() == 0 and in_rank.shape == (6, 4) and not in_rank.any()
    assert ref.layout_np(topk[1], num_experts, num_ranks)[2].shape == (0, 4)


def test_all_empty():
    topk = [np.empty((0, 8), dtype=np.int64) for _ in range(2)]
    plan = ref.dispatch_plan_np(topk, 0, 64, 2, alignment=128)
    assert plan.num_recv_tokens == 0 and plan.recv_topk_idx.shape == (0, 8)
    assert plan.num_recv_tokens_per_expert == [0] * 32


def test_deaf_rank_receives_nothing():
    num_ranks, num_experts = 4, 32
    topk = [ref.make_routing(3, s, 50, 8, num_experts, num_ranks, deaf_rank=3) for s in range(num_ranks)]
    assert all((t // 8 != 3).all() for t in topk)
    plan = ref.dispatch_plan_np(topk, 3, num_experts, num_ranks, alignment=128)
    assert plan.num_recv_tokens == 0 and plan.num_recv_tokens_per_expert == [0] * 8
    check_against_brute(topk, num_experts, num_ranks, alignment=1)
    with pytest.raises(ValueError):
        ref.make_routing(3, 0, 5, 32, num_experts, num_ranks, deaf_rank=3)  # 32 > 24 choosable experts


def test_tokens_routed_nowhere():
    topk = ref.make_routing(11, 0, 400, 4, 16, 4, nowhere_prob=0.25)
    nowhere = (topk == -1).all(axis=1)
    assert 40 < nowhere.sum() < 160
    in_rank = ref.layout_np(topk, 16, 4)[2]
    assert not in_rank[nowhere].any()
    for d in range(4):
        assert not np.isin(ref.dispatch_plan_np([topk] * 4, d, 16, 4).src_idx, np.nonzero(nowhere)[0]).any()


def test_alignment_rounding():
    # Expert counts on rank 0 (experts 0..3 of E=8, R=2): [3, 0, 5, 128].
    tokens = [[0, -1]] * 3 + [[2, -1]] * 5 + [[3, -1]] * 128
    topk = [np.array(tokens), np.empty((0, 2), dtype=np.int64)]
    for alignment, want in [(1, [3, 0, 5, 128]), (4, [4, 0, 8, 128]), (128, [128, 0, 128, 128]),
                            (5, [5, 0, 5, 130])]:
        assert ref.dispatch_plan_np(topk, 0, 8, 2, alignment).num_recv_tokens_per_expert == want
    assert ref.align_up(0, 128) == 0 and ref.align_up(129, 128) == 256


def test_rows_ordered_by_source_then_token():
    num_ranks = 8
    topk = [ref.make_routing(5, s, 64, 8, 64, num_ranks, drop_prob=0.1) for s in range(num_ranks)]
    for d in range(num_ranks):
        plan = ref.dispatch_plan_np(topk, d, 64, num_ranks)
        key = plan.src_rank * 1_000_000 + plan.src_idx
        assert (np.diff(key) > 0).all(), f"d={d}: rows not strictly ordered by (source, token)"
    # Every (s, t, k) with a valid expert lands in exactly one rank's rows with the right local id.
    total = sum(int((t >= 0).sum()) for t in topk)
    assert sum(int((ref.dispatch_plan_np(topk, d, 64, num_ranks).recv_topk_idx >= 0).sum())
               for d in range(num_ranks)) == total


def test_routing_properties():
    topk = ref.make_routing(1, 2, 300, 8, 256, 8, drop_prob=0.1)
    assert topk.shape == (300, 8) and topk.dtype == np.int64
    assert np.array_equal(topk, ref.make_routing(1, 2, 300, 8, 256, 8, drop_prob=0.1))
    assert not np.array_equal(topk, ref.make_routing(1, 3, 300, 8, 256, 8, drop_prob=0.1))
    assert 0.05 < (topk == -1).mean() < 0.15
    for row in topk:
        valid = row[row >= 0]
        assert len(set(valid.tolist())) == len(valid), "experts of one token must be distinct"
    assert ref.make_routing(1, 0, 0, 8, 256, 8).shape == (0, 8)
    full = ref.make_routing(1, 0, 50, 8, 8, 8)  # K == E: every expert once
    assert (np.sort(full, axis=1) == np.arange(8)).all()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ref.layout_np(np.array([[0, 8]]), 8, 2)     # expert id out of range
    with pytest.raises(ValueError):
        ref.layout_np(np.array([[0, -2]]), 8, 2)    # only -1 marks an empty slot
    with pytest.raises(ValueError):
        ref.experts_per_rank(6, 4)
    with pytest.raises(ValueError):
        ref.dispatch_plan_np([np.zeros((1, 1), dtype=np.int64)], 0, 8, 2)  # routing of one rank missing


def test_seeds_are_process_independent():
    assert ref.mix_seed(1, 2, 3) == ref.mix_seed(1, 2, 3) != ref.mix_seed(1, 2, 4)
    assert 0 <= ref.mix_seed(0) < 2**64


def test_torch_half_matches_numpy_half():
    torch = pytest.importorskip("torch")
    num_ranks, num_experts, hidden = 2, 8, 256
    topk = [ref.make_routing(9, s, 6, 3, num_experts, num_ranks, drop_prob=0.3, nowhere_prob=0.2)
            for s in range(num_ranks)]
    inputs = [ref.make_inputs(9, s, 6, hidden, 3, fp8=True, scales_col_major=True) for s in range(num_ranks)]
    assert all((inp.x != 0).all() and inp.x.dtype == torch.bfloat16 for inp in inputs)
    for d in range(num_ranks):
        got = ref.reference_dispatch([torch.from_numpy(t) for t in topk], [inp.dispatch_x(True) for inp in inputs],
                                     [inp.topk_weights for inp in inputs], d, num_experts, num_ranks)
        rows, recv_topk, _ = brute_dispatch([t.tolist() for t in topk], d, num_experts, num_ranks, 1)
        for i, (s, t) in enumerate(rows):
            assert torch.equal(got.recv_x[0][i].view(torch.uint8), inputs[s].x_fp8[t].view(torch.uint8))
            assert torch.equal(got.recv_x[1][i], inputs[s].x_scales[t])
            for k in range(3):
                want = inputs[s].topk_weights[t, k].item() if recv_topk[i][k] >= 0 else 0.0
                assert got.recv_topk_weights[i, k].item() == want
        assert got.recv_src_idx.dtype == torch.int32 and got.recv_src_idx.tolist() == [t for _, t in rows]
    # combine: every rank d feeds back (its recv rows) * (d + 1).
    s = 0
    in_rank = ref.reference_layout(torch.from_numpy(topk[s]), num_experts, num_ranks)[3]
    bias = ref.make_bias(9, s, 6, hidden, 2)
    combined, weights = ref.reference_combine(
        in_rank, lambda d, t: inputs[s].x[t].float() * (d + 1), hidden, torch.from_numpy(topk[s]),
        inputs[s].topk_weights, num_experts, bias)
    for t in range(6):
        want = sum(inputs[s].x[t].float() * (d + 1) for d in range(num_ranks) if in_rank[t, d]) + \
            bias[0][t].float() + bias[1][t].float()
        assert torch.equal(combined[t], want.to(torch.bfloat16))
        for k in range(3):
            want_w = inputs[s].topk_weights[t, k].item() if topk[s][t, k] >= 0 else 0.0
            assert weights[t, k].item() == want_w
