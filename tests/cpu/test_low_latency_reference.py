"""Low-latency mode's host-visible facts without a GPU or torch: the size hint against deep_ep V1's
formula, and the reference's plan of which tokens each (expert, source) block holds."""

import numpy as np
import pytest

from reference import low_latency_reference as ll
from reference import moe_reference as ref

try:
    from moelink import _moelink
except ImportError as e:  # noqa: F841 - the reference tests below still run
    _moelink = None


def test_deep_ep_formula_by_hand():
    # M = 2, H = 128, E = 4: dispatch message 16 + max(256, 128 + 4) = 272, combine 256 + 4 = 260.
    send = max(2 * 272, 4 * 2 * 260)
    recv = max(4 * 2 * 272, 4 * 2 * 260)
    # deep_ep rounds with (n + 128) // 128 * 128: one more 128 bytes when n is aligned already.
    assert ll.deep_ep_rdma_size_hint(2, 128, 2, 4) == (2 * send + 2 * recv + 2 * 128 + 128) // 128 * 128


@pytest.mark.skipif(_moelink is None, reason="moelink._moelink is not built")
@pytest.mark.parametrize("m, hidden, ranks, experts", [
    (1, 128, 1, 1), (128, 7168, 8, 256), (256, 4096, 4, 288), (17, 2048, 2, 8), (4096, 7168, 16, 256)])
def test_hint_is_never_below_deep_eps(m, hidden, ranks, experts):
    hint = _moelink.Buffer.low_latency_rdma_size_hint(m, hidden, ranks, experts)
    assert hint >= ll.deep_ep_rdma_size_hint(m, hidden, ranks, experts)
    assert hint % 128 == 0


@pytest.mark.skipif(_moelink is None, reason="moelink._moelink is not built")
@pytest.mark.parametrize("args, word", [((0, 128, 2, 4), "num_max_dispatch_tokens_per_rank"),
                                        ((4, 100, 2, 4), "hidden"), ((4, 128, 2, 5), "num_experts")])
def test_hint_rejects_bad_arguments(args, word):
    with pytest.raises(ValueError, match=word):
        _moelink.Buffer.low_latency_rdma_size_hint(*args)


def test_plan_holds_every_routed_slot_once():
    num_ranks, num_experts, num_tokens, num_topk = 4, 16, 37, 3
    routing = [ref.make_routing(5, s, num_tokens, num_topk, num_experts, num_ranks, drop_prob=0.2)
               for s in range(num_ranks)]
    routed = sum(int((r >= 0).sum()) for r in routing)
    total = 0
    for d in range(num_ranks):
        plan = ll.low_latency_plan_np(routing, d, num_experts, num_ranks)
        assert plan.counts.shape == (num_experts // num_ranks, num_ranks)
        total += int(plan.counts.sum())
        begins = plan.begins()
        for le in range(num_experts // num_ranks):
            e = d * (num_experts // num_ranks) + le
            assert begins[le, 0] == 0
            for s in range(num_ranks):
                tokens = plan.tokens[le][s]
                assert np.all(np.diff(tokens) > 0), "a block's tokens are sorted and distinct here"
                assert set(tokens.tolist()) == set(np.nonzero((routing[s] == e).any(axis=1))[0].tolist())
                if s:
                    assert begins[le, s] == begins[le, s - 1] + plan.counts[le, s - 1]
        assert list(plan.recv_count) == list(plan.counts.sum(axis=1))
    assert total == routed


def test_plan_counts_a_repeated_expert_per_slot():
    routing = [np.array([[1, 1], [0, -1]], dtype=np.int64), np.array([[-1, -1]], dtype=np.int64)]
    plan = ll.low_latency_plan_np(routing, 0, 4, 2)
    assert plan.counts.tolist() == [[1, 0], [2, 0]]
