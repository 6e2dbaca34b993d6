"""Low-latency dispatch + combine against tests/reference/low_latency_reference.py, several ranks as
processes (on one GPU under MPS): every routed (source, token, expert) arrives once (counts,
layout_range, src_info, rows and scales bit-exact against the reference cast), the weighted combine
matches the reference within bf16 rounding, and the call shapes frameworks use work: hook mode with
work between send and receive, zero-copy combine input, `out=`, three dispatches in a row, CUDA graph
replays, low-latency calls mixed with normal-mode ones on one Buffer, two overlapped micro-batches in
hook mode with skewed ranks, and a third outstanding call timing out naming the limit.

Passed on one H200 with the ranks under MPS (2026-12-01). The launcher sets
MOELINK_EXPERIMENTAL_LOW_LATENCY=1 (the default now) so a caller's 0 cannot switch the mode off here.
"""

import re
from dataclasses import dataclass, replace

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import moelink  # noqa: E402

import checks  # noqa: E402
import common  # noqa: E402
import faults  # noqa: E402
import launcher  # noqa: E402
from checks import Case  # noqa: E402

from reference import low_latency_reference as ll  # noqa: E402
from reference import moe_reference as ref  # noqa: E402

ENV = {"MOELINK_EXPERIMENTAL_LOW_LATENCY": "1"}


@dataclass(frozen=True)
class LLCase:
    name: str
    max_tokens: int      # M
    num_tokens: int      # T (0: M)
    hidden: int
    num_topk: int
    num_experts: int     # 0: 4 per rank
    fp8: bool = False
    round_scale: bool = False
    ue8m0: bool = False
    drop_prob: float = 0.05

    def resolved(self, num_ranks):
        return replace(self, num_experts=self.num_experts or 4 * num_ranks, num_tokens=self.num_tokens or self.max_tokens)


CASES = [
    LLCase("one-token-bf16", 1, 1, 2048, 1, 0),
    LLCase("bf16", 128, 17, 7168, 8, 256),
    LLCase("fp8", 128, 0, 7168, 8, 256, fp8=True),
    LLCase("fp8-round", 128, 17, 4096, 9, 288, fp8=True, round_scale=True),
    LLCase("fp8-ue8m0", 256, 0, 2048, 8, 0, fp8=True, round_scale=True, ue8m0=True),
]


def expert_scale(e: int) -> float:
    """Expert e's output is its input times this, so a row summed from the wrong expert shows."""
    return 0.5 + 0.01 * e


def make_round(case: LLCase, seed: int, num_ranks: int):
    routing, inputs = [], []
    for s in range(num_ranks):
        routing.append(ref.make_routing(seed, s, case.num_tokens, case.num_topk, case.num_experts, num_ranks,
                                        drop_prob=case.drop_prob))
        inputs.append(ref.make_inputs(seed, s, case.num_tokens, case.hidden, case.num_topk, device="cuda"))
    return routing, inputs


def check_dispatch(out, case: LLCase, routing, inputs, rank: int, num_ranks: int, what: str):
    recv_x, recv_count, handle, _, _ = out
    src_info, layout_range, m, hidden, num_experts = handle
    assert (m, hidden, num_experts) == (case.max_tokens, case.hidden, case.num_experts), f"{what}: handle {handle[2:]}"
    plan = ll.low_latency_plan_np(routing, rank, case.num_experts, num_ranks)
    common.assert_values_equal(recv_count, torch.from_numpy(plan.recv_count).cuda(), f"{what}: recv_count")
    want_range = (torch.from_numpy(plan.begins()) << 32) | torch.from_numpy(plan.counts)
    common.assert_values_equal(layout_range, want_range.cuda(), f"{what}: layout_range")
    data, scales = recv_x if case.fp8 else (recv_x, None)
    for le in range(plan.counts.shape[0]):
        for s in range(num_ranks):
            begin, count = int(plan.begins()[le, s]), int(plan.counts[le, s])
            if count == 0:
                continue
            rows = torch.arange(begin, begin + count, device="cuda")
            got_tokens = src_info[le, rows]
            order = torch.argsort(got_tokens)
            tokens = torch.from_numpy(plan.tokens[le][s]).cuda()
            common.assert_values_equal(got_tokens[order].long(), tokens, f"{what}: src_info of expert {le} from {s}")
            x = inputs[s].x[tokens]
            got_rows = data[le, rows[order]]
            if not case.fp8:
                common.assert_bits_equal(got_rows, x, f"{what}: rows of expert {le} from rank {s}")
                continue
            want_q, want_scales = ll.cast_fp8(x, case.round_scale, case.ue8m0)
            common.assert_bits_equal(got_rows, want_q, f"{what}: fp8 rows of expert {le} from rank {s}")
            common.assert_bits_equal(scales[le, rows[order]].contiguous(), want_scales,
                                     f"{what}: scales of expert {le} from rank {s}")


def combine_input(case: LLCase, out, inputs, rank: int, num_ranks: int, into=None):
    """[E_local, R*M, H] bf16: row j of local expert le is x_src[token] * expert_scale(e); the rows
    past recv_count are random (combine must not read them)."""
    _, recv_count, (src_info, layout_range, m, hidden, num_experts), _, _ = out
    e_local = num_experts // num_ranks
    y = into if into is not None else torch.empty((e_local, num_ranks * m, hidden), dtype=torch.bfloat16, device="cuda")
    y.copy_(torch.randn(y.shape, device="cuda").to(torch.bfloat16))
    counts = (layout_range & 0xFFFFFFFF).cpu().numpy()
    begins = (layout_range >> 32).cpu().numpy()
    for le in range(e_local):
        e = rank * e_local + le
        for s in range(num_ranks):
            b, c = int(begins[le, s]), int(counts[le, s])
            if c:
                tokens = src_info[le, b:b + c].long()
                y[le, b:b + c] = (inputs[s].x[tokens].float() * expert_scale(e)).to(torch.bfloat16)
    return y


def check_combine(combined, case: LLCase, routing, inputs, rank: int, what: str):
    mine = inputs[rank]
    topk_idx = torch.from_numpy(routing[rank]).cuda()
    want = ll.reference_combine(topk_idx, mine.topk_weights,
                                lambda e, tokens: (mine.x[tokens].float() * expert_scale(e)).to(torch.bfloat16),
                                case.hidden)
    assert tuple(combined.shape) == tuple(want.shape), f"{what}: combined_x shape {tuple(combined.shape)}"
    if want.numel():
        atol = 1e-2 * max(want.float().abs().max().item(), 1e-3)
        torch.testing.assert_close(combined.float(), want.float(), rtol=1e-2, atol=atol,
                                   msg=lambda m: f"{what}: combined_x\n{m}")


def make_ll_buffer(num_ranks: int, cases):
    hint = max(moelink.Buffer.get_low_latency_rdma_size_hint(c.max_tokens, c.hidden, num_ranks, c.num_experts)
               for c in cases)
    return moelink.Buffer(common.world_group(), num_nvl_bytes=0, num_rdma_bytes=hint, low_latency_mode=True,
                          num_qps_per_rank=max(c.num_experts for c in cases) // num_ranks, explicitly_destroy=True)


def one_round(buf, case, seed, rank, num_ranks, hook=False, zero_copy=False, use_out=False, what=""):
    routing, inputs = make_round(case, seed, num_ranks)
    topk_idx = torch.from_numpy(routing[rank]).cuda()
    out = buf.low_latency_dispatch(inputs[rank].x, topk_idx, case.max_tokens, case.num_experts, use_fp8=case.fp8,
                                   round_scale=case.round_scale, use_ue8m0=case.ue8m0, return_recv_hook=hook)
    if hook:
        torch.cuda._sleep(int(1e6))  # work between the send and the receive
        out[4]()
    check_dispatch(out, case, routing, inputs, rank, num_ranks, what)
    into = buf.get_next_low_latency_combine_buffer(out[2]) if zero_copy else None
    y = combine_input(case, out, inputs, rank, num_ranks, into)
    target = torch.full((case.num_tokens, case.hidden), float("nan"), dtype=torch.bfloat16, device="cuda") \
        if use_out else None
    combined, _, combine_hook = buf.low_latency_combine(y, topk_idx, inputs[rank].topk_weights, out[2],
                                                        zero_copy=zero_copy, return_recv_hook=hook, out=target)
    if hook:
        combine_hook()
    if use_out:
        assert combined.data_ptr() == target.data_ptr(), f"{what}: out= was not written in place"
    check_combine(combined, case, routing, inputs, rank, what)


def _low_latency(rank, num_ranks, seed):
    cases = [c.resolved(num_ranks) for c in CASES]
    buf = make_ll_buffer(num_ranks, cases)
    last_experts = None
    for i, case in enumerate(cases):
        what = f"rank {rank}/{num_ranks} {case.name}"
        if case.num_experts != last_experts:  # a new expert count moves the signal words (as in deep_ep)
            buf.clean_low_latency_buffer(case.max_tokens, case.hidden, case.num_experts)
            last_experts = case.num_experts
        # The express calls (one extension call each) unless switched off: every other case takes
        # the full Python path instead.
        buf._express = i % 2 == 0
        one_round(buf, case, seed + i, rank, num_ranks, what=what)
        one_round(buf, case, seed + 100 + i, rank, num_ranks, hook=True, zero_copy=True, use_out=True,
                  what=f"{what} (hook, zero-copy, out=)")
        common.log(rank, f"[R={num_ranks}] {case.name}: plain and hook/zero-copy/out= rounds exact")
    # Three dispatches in a row (both parities, and the first reused); the third is checked.
    case = cases[1]
    buf.clean_low_latency_buffer(case.max_tokens, case.hidden, case.num_experts)  # another expert count
    rounds = []
    for j in range(3):
        routing, inputs = make_round(case, seed + 200 + j, num_ranks)
        out = buf.low_latency_dispatch(inputs[rank].x, torch.from_numpy(routing[rank]).cuda(), case.max_tokens,
                                       case.num_experts, use_fp8=False)
        rounds.append((routing, inputs, out))
    check_dispatch(rounds[-1][2], case, *rounds[-1][:2], rank, num_ranks, f"rank {rank} third dispatch in a row")
    buf.destroy()


@pytest.mark.parametrize("num_ranks", common.RANK_COUNTS)
def test_low_latency(num_ranks):
    launcher.run_ranks(num_ranks, _low_latency, 61000 * num_ranks, timeout_s=300, env=ENV)


def _graphs(rank, num_ranks, seed):
    case = CASES[1].resolved(num_ranks)
    buf = make_ll_buffer(num_ranks, [case])
    x = torch.empty((case.num_tokens, case.hidden), dtype=torch.bfloat16, device="cuda")
    topk_idx = torch.empty((case.num_tokens, case.num_topk), dtype=torch.int64, device="cuda")
    weights = torch.empty((case.num_tokens, case.num_topk), dtype=torch.float32, device="cuda")

    def ops():
        out = buf.low_latency_dispatch(x, topk_idx, case.max_tokens, case.num_experts, use_fp8=False)
        y = (out[0].float() * 2.0).to(torch.bfloat16)
        return out, buf.low_latency_combine(y, topk_idx, weights, out[2])[0]

    def load(i):
        routing, inputs = make_round(case, seed + i, num_ranks)
        x.copy_(inputs[rank].x)
        topk_idx.copy_(torch.from_numpy(routing[rank]).cuda())
        weights.copy_(inputs[rank].topk_weights)
        return routing, inputs

    routing, inputs = load(0)
    ops()  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops()
    for i in range(1, 101):
        routing, inputs = load(i)
        graph.replay()
        check_dispatch(captured[0], case, routing, inputs, rank, num_ranks, f"rank {rank} replay {i}")
        mine = inputs[rank]
        want = ll.reference_combine(torch.from_numpy(routing[rank]).cuda(), mine.topk_weights,
                                    lambda e, tokens: (mine.x[tokens].float() * 2.0).to(torch.bfloat16), case.hidden)
        torch.testing.assert_close(captured[1].float(), want.float(), rtol=1e-2,
                                   atol=1e-2 * max(want.float().abs().max().item(), 1e-3))
        if i % 10 == 0:  # an eager round between replays
            one_round(buf, case, seed + 1000 + i, rank, num_ranks, what=f"rank {rank} eager after replay {i}")
    # Normal mode on the same Buffer in between needs an NVLink buffer; a fresh one checks mixing.
    del graph, captured
    buf.destroy()


@pytest.mark.parametrize("num_ranks", (2, 4))
def test_low_latency_graphs(num_ranks):
    launcher.run_ranks(num_ranks, _graphs, 63000 * num_ranks, timeout_s=300, env=ENV)


def _mixed_modes(rank, num_ranks, seed):
    """Normal dispatch/combine -> clean_low_latency_buffer -> low-latency -> normal, on one Buffer."""
    case = CASES[1].resolved(num_ranks)
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    hint = moelink.Buffer.get_low_latency_rdma_size_hint(case.max_tokens, case.hidden, num_ranks, case.num_experts)
    buf = moelink.Buffer(common.world_group(), num_nvl_bytes=common.nvl_bytes_for((config, combine_config), (2048,),
                                                                                    num_ranks),
                         num_rdma_bytes=hint, low_latency_mode=True, explicitly_destroy=True)
    normal = Case("normal", 256, 2048, 8, 64).resolved(num_ranks)
    checks.run_case(buf, rank, num_ranks, normal, seed, config, combine_config)
    buf.clean_low_latency_buffer(case.max_tokens, case.hidden, case.num_experts)
    one_round(buf, case, seed + 1, rank, num_ranks, what=f"rank {rank} low-latency between normal rounds")
    checks.run_case(buf, rank, num_ranks, normal, seed + 2, config, combine_config)
    buf.destroy()


def test_mixed_modes():
    launcher.run_ranks(2, _mixed_modes, 65000, timeout_s=300, env=ENV)


def test_rejects_bad_arguments():
    """Host checks that need no peer: 1 rank."""
    launcher.run_ranks(1, _bad_arguments, 67000, timeout_s=120, env=ENV)


def small_single_rank(seed):
    """A one-rank buffer and one small round for the host-check tests."""
    case = LLCase("small", 16, 8, 2048, 4, 4).resolved(1)
    buf = make_ll_buffer(1, [case])
    routing, inputs = make_round(case, seed, 1)
    return case, buf, routing, inputs, inputs[0].x, torch.from_numpy(routing[0]).cuda()


def _bad_arguments(rank, num_ranks, seed):
    case, buf, routing, inputs, x, topk_idx = small_single_rank(seed)
    for call, word in ((lambda: buf.low_latency_dispatch(x, topk_idx, 4, case.num_experts), "x"),
                       (lambda: buf.low_latency_dispatch(x[:, :100].contiguous(), topk_idx[:, :1].contiguous(), 16, 4),
                        "hidden"),
                       (lambda: buf.low_latency_dispatch(x, topk_idx, 16, 4, use_fp8=True, use_ue8m0=True), "round_scale"),
                       (lambda: buf.low_latency_dispatch(x, topk_idx, 16, 4, async_finish=True, return_recv_hook=True),
                        "return_recv_hook"),
                       (lambda: buf.low_latency_dispatch(x, topk_idx, 4096, 4), "num_rdma_bytes")):
        with pytest.raises(ValueError, match=word):
            call()
    one_round(buf, case, seed + 1, rank, num_ranks, what="after the rejected calls")
    buf.destroy()


def test_bad_expert_ids():
    """Ids outside [-1, E) and an expert named twice in a token are found mid-call by one rank (low-latency
    calls have no agreement step): the call goes on, the slot is skipped, a combined row that needed it
    is poisoned, and the next operation warns naming token and slot (raising would leave the rank's
    peers waiting); check_device_errors() raises it instead."""
    launcher.run_ranks(1, _bad_expert_ids, 68000, timeout_s=120, env=ENV)
    launcher.run_ranks(2, _bad_expert_ids, 68100, timeout_s=120, env=ENV)


def _small_with_bad_ids(rank, num_ranks, seed, twice=True):
    """A small round, and rank 0's routing spoilt: token 3 slot 1 outside [-1, E), and (twice) token
    5 naming expert 0 in slots 0 and 2. One rank's input only: its peers never hear of it."""
    case = LLCase("small", 16, 8, 2048, 4, 4 * num_ranks).resolved(num_ranks)
    buf = make_ll_buffer(num_ranks, [case])
    routing, inputs = make_round(case, seed, num_ranks)
    topk_idx = torch.from_numpy(routing[rank]).cuda()
    bad = topk_idx.clone()
    if rank == 0:
        bad[3, 1] = case.num_experts + 7
        if twice:
            bad[5, 0] = bad[5, 2] = 0
    return case, buf, routing, inputs, topk_idx, bad


def _bad_expert_ids(rank, num_ranks, seed):
    import warnings

    case, buf, routing, inputs, topk_idx, bad = _small_with_bad_ids(rank, num_ranks, seed)
    x, M, E = inputs[rank].x, case.max_tokens, case.num_experts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = buf.low_latency_dispatch(x, bad, M, E, use_fp8=False)
        torch.cuda.synchronize()
        buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=False)  # the next operation reports it
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if rank == 0:
        assert any("token 3 slot 1" in m and "outside [-1, num_experts)" in m for m in messages) or \
            any("token 5" in m and "names one expert" in m for m in messages), messages
    else:
        assert not messages, messages
    out = buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=False)
    check_dispatch(out, case, routing, inputs, rank, num_ranks, "dispatch after the bad one")
    y = combine_input(case, out, inputs, rank, num_ranks)
    # The error reaches the host either as a warning of an operation that collected it, or from
    # check_device_errors(), depending on when the kernel wrote it.
    raised = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        combined = buf.low_latency_combine(y, bad, inputs[rank].topk_weights, out[2])[0]
        torch.cuda.synchronize()
        try:
            buf.runtime.check_device_errors()
        except ValueError as error:
            raised = str(error)
    reports = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] + ([raised] if raised else [])
    if rank == 0:
        assert torch.isnan(combined[3].float()).all(), "the token with a bad id was not poisoned"
        assert torch.isnan(combined[5].float()).all(), "the token naming an expert twice was not poisoned"
        assert any(re.search(r"topk_idx: token [35]", m) for m in reports), reports
    else:
        assert not reports, reports
    one_round(buf, case, seed + 1, rank, num_ranks, what="after the bad ids")
    buf.destroy()


def test_an_error_collected_while_capturing_leaves_later_errors_reported():
    """A local error of an eager call that the first call inside a CUDA graph capture collects: the
    record's claim must be given back outside the graph too (the memset the capture takes runs only
    at replays), so a bad id of the next eager call is reported again; a replay after it is fine."""
    launcher.run_ranks(2, _error_across_capture, 68500, timeout_s=120, env=ENV)


def _error_across_capture(rank, num_ranks, seed):
    import warnings

    case, buf, routing, inputs, topk_idx, bad = _small_with_bad_ids(rank, num_ranks, seed, twice=False)
    x, M, E = inputs[rank].x, case.max_tokens, case.num_experts

    def reports(call):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
            torch.cuda.synchronize()
            try:
                buf.runtime.check_device_errors()
            except ValueError as error:
                return [str(w.message) for w in caught] + [str(error)]
        return [str(w.message) for w in caught]

    # The kernel records; nobody has read it yet: the sleep holds the kernel back until the call (and
    # its end, which collects what is recorded) has returned. A call that allocates fresh memory
    # may wait for the GPU (cudaMalloc can synchronise), so a good call first fills the allocator's
    # cache, and the sleep is measured, not a guessed cycle count.
    buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=False)
    torch.cuda.synchronize()
    faults.cycles_per_second()
    with warnings.catch_warnings(record=True) as early:
        warnings.simplefilter("always")
        faults.gpu_sleep(0.2)
        buf.low_latency_dispatch(x, bad, M, E, use_fp8=False)
    assert not early, [str(w.message) for w in early]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.cuda.graph(graph):  # its first call collects the eager call's error
            buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=False)
    seen = [str(w.message) for w in caught]
    if rank == 0:
        assert any("token 3 slot 1" in m for m in seen), f"the first captured call did not report it: {seen}"
    # An eager call with a bad id again: its error must be recorded (the claim was given back).
    again = reports(lambda: buf.low_latency_dispatch(x, bad, M, E, use_fp8=False))
    if rank == 0:
        assert any("token 3 slot 1" in m for m in again), f"the second bad id went unreported: {again}"
    else:
        assert not again, again
    graph.replay()
    torch.cuda.synchronize()
    del graph
    one_round(buf, case, seed + 1, rank, num_ranks, what="after the capture")
    buf.destroy()


def _double_batch(rank, num_ranks, seed):
    """Two micro-batches overlapped as inference servers do: send 0, send 1, hook 0, hook 1, for the
    dispatch and then the combine, with ranks skewed by a GPU sleep before their hooks."""
    case = CASES[1].resolved(num_ranks)
    buf = make_ll_buffer(num_ranks, [case])
    M, E = case.max_tokens, case.num_experts
    for i in range(4):
        rounds = [make_round(case, seed + 10 * i + j, num_ranks) for j in range(2)]
        idx = [torch.from_numpy(routing[rank]).cuda() for routing, _ in rounds]
        sent = [buf.low_latency_dispatch(inputs[rank].x, idx[j], M, E, use_fp8=False, return_recv_hook=True)
                for j, (_, inputs) in enumerate(rounds)]
        if (rank + i) % 2:
            torch.cuda._sleep(int(2e6))
        for out in sent:
            out[4]()
        for j, (routing, inputs) in enumerate(rounds):
            check_dispatch(sent[j], case, routing, inputs, rank, num_ranks, f"rank {rank} round {i} batch {j}")
        ys = [combine_input(case, sent[j], inputs, rank, num_ranks) for j, (_, inputs) in enumerate(rounds)]
        combined = [buf.low_latency_combine(ys[j], idx[j], inputs[rank].topk_weights, sent[j][2],
                                            return_recv_hook=True)
                    for j, (_, inputs) in enumerate(rounds)]
        if (rank + i + 1) % 2:
            torch.cuda._sleep(int(2e6))
        for result in combined:
            result[2]()
        for j, (routing, inputs) in enumerate(rounds):
            check_combine(combined[j][0], case, routing, inputs, rank, f"rank {rank} round {i} batch {j} combine")
    common.log(rank, f"[R={num_ranks}] double batch: 4 rounds exact")
    buf.destroy()


@pytest.mark.parametrize("num_ranks", (2, 4))
def test_double_batch_hooks(num_ranks):
    launcher.run_ranks(num_ranks, _double_batch, 66000 + num_ranks, timeout_s=300, env=ENV)


def _three_outstanding(rank, num_ranks, seed):
    case = CASES[1].resolved(num_ranks)
    buf = make_ll_buffer(num_ranks, [case])
    routing, inputs = make_round(case, seed, num_ranks)
    idx = torch.from_numpy(routing[rank]).cuda()
    sent = [buf.low_latency_dispatch(inputs[rank].x, idx, case.max_tokens, case.num_experts, use_fp8=False,
                                     return_recv_hook=True) for _ in range(3)]
    torch.cuda.synchronize()  # the third send waits for a receive nobody runs, until MOELINK_TIMEOUT_S
    with pytest.raises(TimeoutError, match="at most two low-latency calls may be outstanding"):
        sent[0][4]()
    common.quiet_destroy(buf)


def test_a_third_outstanding_call_times_out_naming_the_limit():
    launcher.run_ranks(2, _three_outstanding, 66500, timeout_s=120, env={**ENV, "MOELINK_TIMEOUT_S": "3"})


def test_hint_matches_the_anchors():
    """get_low_latency_rdma_size_hint against DeepEP V1's own (bench/anchor.py finds it), shape by shape."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "bench"
    sys.path.insert(0, str(bench))
    import anchor as anchor_lookup

    found = anchor_lookup.resolve("auto", bench.parent)
    if not found.available:
        pytest.skip(found.reason)
    shapes = [(128, 7168, 8, 256), (128, 7168, 8, 288), (1, 128, 2, 4), (256, 2048, 4, 64), (3, 4096, 2, 16)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [found.path, os.environ.get("PYTHONPATH")])))
    code = ("import json, deep_ep; print(json.dumps([deep_ep.Buffer.get_low_latency_rdma_size_hint(*s) "
            f"for s in {shapes!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    ours = [moelink.Buffer.get_low_latency_rdma_size_hint(*s) for s in shapes]
    assert ours == theirs, list(zip(shapes, ours, theirs))
    assert ours == [ll.deep_ep_rdma_size_hint(*s) for s in shapes]
