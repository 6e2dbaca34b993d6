"""low_latency_combine(use_logfmt=True) against its documented bound (tests/reference/logfmt_reference.py),
several ranks as processes (on one GPU under MPS).

The experts' outputs are the tokens' rows times a per-expert factor and a per-expert column pattern
of powers of two (up to 2**14 either way) with zeroed columns, so groups hold wide ranges, values the
format flushes, and all-zero stretches; every expert has a group of equal values and one of
subnormals. One expert's pattern holds an infinity in one group and another's a NaN at value 0 of
one (both groups travel as bf16; NaN and infinity must come back as such). Each combined value must
lie within sum_k |w_k| * (REL_BOUND * |y_k| + 2**-12 * amax(group of y_k)) of the exact sum, plus
the bf16 rounding of the result. With one expert per token (and an odd number of groups per row)
the result must equal the reference's own decoding, up to one value in a thousand (float32 log2 /
exp2 last bits). Hook mode and zero-copy input as well; a bf16 round on the Buffer after them. Ranks
that disagree on use_logfmt get NaN rows for the tokens that needed the other format, and an error.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import common  # noqa: E402
import launcher  # noqa: E402
from test_low_latency import LLCase, expert_scale, make_ll_buffer, make_round, one_round  # noqa: E402

from reference import logfmt_reference as lf  # noqa: E402

ENV = {"MOELINK_EXPERIMENTAL_LOW_LATENCY": "1"}
# The third case has one expert per token, so each combined value is one decoded value times its
# weight and can be held against the reference's own decoding; its 17 groups per row (odd) leave
# half a warp without a group in the encoder's last step.
CASES = [LLCase("logfmt", 128, 0, 7168, 8, 256), LLCase("logfmt-small", 16, 5, 2048, 9, 48, drop_prob=0.2),
         LLCase("logfmt-one-expert", 64, 0, 2176, 1, 0, drop_prob=0.0)]
INF_EXPERT, INF_GROUP = 3, 2
# Groups of every expert that the format treats specially (the first two within every case's hidden
# size): a NaN whose only mantissa bit is the marker bit at value 0 of group NAN_GROUP of expert
# NAN_EXPERT (the group goes as bf16; the NaN must stay a NaN), all-equal values (step 0), subnormals.
NAN_EXPERT, NAN_GROUP, EQUAL_GROUP, SUBNORMAL_GROUP = 1, 4, 6, 9


def pattern(seed: int, e: int, hidden: int) -> torch.Tensor:
    """float32 [hidden]: expert e's column factors, the same on every rank."""
    g = torch.Generator().manual_seed(seed * 1000 + e)
    exponents = torch.randint(-14, 15, (hidden,), generator=g).float()
    factors = torch.exp2(exponents)
    factors[torch.rand(hidden, generator=g) < 0.05] = 0.0
    if e == INF_EXPERT:
        factors[INF_GROUP * lf.GROUP + 5] = float("inf")
    return factors.cuda()


def expert_rows(x: torch.Tensor, e: int, seed: int) -> torch.Tensor:
    """Expert e's output rows for input rows x: bf16."""
    rows = (x.float() * expert_scale(e) * pattern(seed, e, x.size(1))).to(torch.bfloat16)
    G = lf.GROUP
    rows[:, EQUAL_GROUP * G:(EQUAL_GROUP + 1) * G] = 1.5
    rows[:, SUBNORMAL_GROUP * G:(SUBNORMAL_GROUP + 1) * G] = \
        (torch.arange(G, device=rows.device) % 3 + 1).to(torch.bfloat16) * 1e-39
    if e == NAN_EXPERT:
        rows.view(torch.int16)[:, NAN_GROUP * G] = 0x7F81
    return rows


def combine_input(out, inputs, rank, num_ranks, seed, into=None):
    _, _, (src_info, layout_range, m, hidden, num_experts), _, _ = out
    e_local = num_experts // num_ranks
    y = into if into is not None else torch.empty((e_local, num_ranks * m, hidden), dtype=torch.bfloat16, device="cuda")
    y.copy_(torch.randn(y.shape, device="cuda").to(torch.bfloat16))
    counts, begins = (layout_range & 0xFFFFFFFF).cpu().numpy(), (layout_range >> 32).cpu().numpy()
    for le in range(e_local):
        e = rank * e_local + le
        for s in range(num_ranks):
            b, c = int(begins[le, s]), int(counts[le, s])
            if c:
                y[le, b:b + c] = expert_rows(inputs[s].x[src_info[le, b:b + c].long()], e, seed)
    return y


def check(combined, topk_idx, weights, x, seed, what):
    """combined [T, H] bf16 within the bound of the exact sum; non-finite exactly where it is."""
    T, H = x.shape
    exact = torch.zeros(T, H, dtype=torch.float64, device="cuda")
    allowed = torch.zeros(T, H, dtype=torch.float64, device="cuda")
    for k in range(topk_idx.size(1)):
        for e in torch.unique(topk_idx[:, k]).tolist():
            if e < 0:
                continue
            tokens = torch.nonzero(topk_idx[:, k] == e).flatten()
            rows = expert_rows(x[tokens], e, seed).double()
            w = weights[tokens, k:k + 1].double()
            exact[tokens] += w * rows
            # A bf16 group (one with an infinity) is exact but for value 0's last bit: its finite
            # values' largest sets the flush term, not the infinity.
            finite_abs = torch.nan_to_num(rows.abs(), nan=0.0, posinf=0.0)
            amax = finite_abs.view(len(tokens), -1, lf.GROUP).amax(dim=2).repeat_interleave(lf.GROUP, dim=1)
            allowed[tokens] += w.abs() * (lf.REL_BOUND * rows.abs() + 2.0 ** -lf.FLUSH_OCTAVES * amax)
    got = combined.double()
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isnan(got), torch.isnan(exact)) and torch.equal(torch.isinf(got), torch.isinf(exact)), \
        f"{what}: NaN or infinity where the exact sum has none, or not where it has"
    # The result's bf16 rounding: half a step, relative for normal values, 2**-134 for subnormal ones.
    allowed = allowed + 2.0 ** -8 * exact.abs() + 2.0 ** -133
    err = (got - exact).abs()[finite]
    worst = (err / allowed[finite]).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: an error {worst:.3f} x the documented bound"
    if topk_idx.size(1) == 1 and T:
        # One expert per token: the value is bf16(w x decode(encode(y))), which the reference computes
        # too, so they must be equal (a kernel that sent plain bf16 would differ in most values).
        # float32 log2 / exp2 differ from numpy's in the last bit, so a value on a rounding boundary
        # may take the neighbouring code or bf16 step: up to one in a thousand may differ.
        e_of = topk_idx[:, 0]
        want = torch.zeros(T, H, dtype=torch.float32)
        for e in torch.unique(e_of).tolist():
            if e < 0:
                continue
            tokens = torch.nonzero(e_of == e).flatten()
            rows = expert_rows(x[tokens], e, seed).float().cpu().numpy()
            decoded = torch.from_numpy(np.stack([lf.roundtrip(r) for r in rows]))
            want[tokens.cpu()] = (decoded * weights[tokens, :1].float().cpu()).to(torch.bfloat16).float()
        got32, ok = combined.float().cpu(), torch.isfinite(want)
        off = int((got32[ok] != want[ok]).sum())
        assert off <= 2 + ok.sum().item() // 1000, f"{what}: {off} of {ok.sum().item()} values differ from the reference's decoding"
        assert torch.equal(got32[~ok].isnan(), want[~ok].isnan()), f"{what}: NaN and infinity differ from the reference's"
    return worst


def _logfmt(rank, num_ranks, seed):
    cases = [c.resolved(num_ranks) for c in CASES]
    buf = make_ll_buffer(num_ranks, cases)
    for i, case in enumerate(cases):
        buf.clean_low_latency_buffer(case.max_tokens, case.hidden, case.num_experts)
        for hook in (False, True):
            routing, inputs = make_round(case, seed + 10 * i + hook, num_ranks)
            topk_idx = torch.from_numpy(routing[rank]).cuda()
            out = buf.low_latency_dispatch(inputs[rank].x, topk_idx, case.max_tokens, case.num_experts, use_fp8=False,
                                           return_recv_hook=hook)
            if hook:
                out[4]()
            into = buf.get_next_low_latency_combine_buffer(out[2]) if hook else None
            y = combine_input(out, inputs, rank, num_ranks, seed, into)
            combined, _, combine_hook = buf.low_latency_combine(y, topk_idx, inputs[rank].topk_weights, out[2],
                                                                use_logfmt=True, zero_copy=hook,
                                                                return_recv_hook=hook)
            if hook:
                combine_hook()
            worst = check(combined, topk_idx, inputs[rank].topk_weights, inputs[rank].x, seed,
                          f"rank {rank}/{num_ranks} {case.name}{' (hook, zero-copy)' if hook else ''}")
            common.log(rank, f"[R={num_ranks}] {case.name} hook={hook}: worst error {worst:.3f} x the bound")
    # A plain bf16 round after LogFMT ones on the same Buffer: within bf16 rounding.
    buf.clean_low_latency_buffer(cases[0].max_tokens, cases[0].hidden, cases[0].num_experts)
    one_round(buf, cases[0], seed + 99, rank, num_ranks, what=f"rank {rank}/{num_ranks} bf16 after LogFMT")
    buf.destroy()


@pytest.mark.parametrize("num_ranks", common.RANK_COUNTS)
def test_logfmt_combine_within_its_bound(num_ranks):
    launcher.run_ranks(num_ranks, _logfmt, 64000 * num_ranks, timeout_s=300, env=ENV)


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_ranks_that_disagree_on_use_logfmt_get_poisoned_rows_and_an_error(num_ranks):
    launcher.run_ranks(num_ranks, _disagree, 65000 * num_ranks, timeout_s=200, env=ENV)


def _disagree(rank, num_ranks, seed):
    """Rank 0 combines with use_logfmt=True, the others without: each token that needs an expert of
    a rank in the other format comes back NaN, the others as usual, every rank hears why (at the
    call or from check_device_errors), and the Buffer stays usable."""
    import warnings  # noqa: PLC0415

    case = CASES[1].resolved(num_ranks)
    buf = make_ll_buffer(num_ranks, [case])
    routing, inputs = make_round(case, seed, num_ranks)
    topk_idx = torch.from_numpy(routing[rank]).cuda()
    out = buf.low_latency_dispatch(inputs[rank].x, topk_idx, case.max_tokens, case.num_experts, use_fp8=False)
    y = combine_input(out, inputs, rank, num_ranks, seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        combined = buf.low_latency_combine(y, topk_idx, inputs[rank].topk_weights, out[2], use_logfmt=rank == 0)[0]
        torch.cuda.synchronize()
    messages = [str(w.message) for w in caught]
    try:
        buf.runtime.check_device_errors()
    except ValueError as error:
        messages.append(str(error))
    e_local = case.num_experts // num_ranks
    other = (topk_idx >= 0) & (((topk_idx // e_local) == 0) != (rank == 0))
    spoilt = other.any(dim=1)
    assert any("use_logfmt" in m for m in messages) == bool(spoilt.any()), f"rank {rank}: {messages}"
    assert bool(combined[spoilt].isnan().all()), f"rank {rank}: a token that needed the other format is not poisoned"
    assert bool(torch.isfinite(combined[~spoilt][:, :INF_GROUP * lf.GROUP]).all()), f"rank {rank}: a good token poisoned"
    one_round(buf, CASES[1].resolved(num_ranks), seed + 1, rank, num_ranks, what=f"rank {rank} after the disagreement")
    buf.destroy()
