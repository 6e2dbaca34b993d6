"""The low-latency mode over NVSHMEM (MOELINK_LL_TRANSPORT=nvshmem): the region is one symmetric
allocation; ranks NVSHMEM maps get stores, the others put-with-signal (the plugin's build of the
kernels). With MOELINK_DEBUG_LL_FORCE_PUT=1 every other rank counts as unmapped, so the put path runs
on one GPU. Each rank runs the same rounds first on an IPC Buffer, then on an NVSHMEM one, and the
outputs must be bit-equal: dispatch rows, scales, counts and source tokens (rows sorted by source
token within each (expert, source) block, whose order the slot claims leave open), and combined rows.
Every round is checked against the reference too (test_low_latency.py's checks).

Several PEs share one GPU under MPS and there is no NIC: NVSHMEM_REMOTE_TRANSPORT=none, as in
test_nvshmem.py. NEVER RUN ON A GPU when this note is written (the first step of #9's put path).
"""

import os

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import moelink  # noqa: E402

import common  # noqa: E402
import launcher  # noqa: E402
import test_low_latency as base  # noqa: E402
from test_low_latency import LLCase  # noqa: E402

ENV = {**base.ENV, **common.NVSHMEM_ONE_GPU_ENV}

# Small shapes: every PE's symmetric heap is carved from the one GPU.
CASES = [
    LLCase("one-token-bf16", 1, 1, 2048, 1, 0),
    LLCase("bf16", 64, 17, 2048, 8, 32),
    LLCase("fp8-round", 64, 0, 2048, 8, 32, fp8=True, round_scale=True),
    LLCase("fp8-ue8m0", 64, 0, 2048, 8, 32, fp8=True, round_scale=True, ue8m0=True),
]


def canonical_dispatch(out, case, num_ranks):
    """The dispatch's outputs on the host, rows sorted by source token within each (expert, source) block."""
    recv_x, recv_count, handle, _, _ = out
    src_info, layout_range = handle[0], handle[1]
    data, scales = recv_x if case.fp8 else (recv_x, None)
    counts = (layout_range & 0xFFFFFFFF).cpu()
    begins = (layout_range >> 32).cpu()
    rows, tokens, row_scales = [], [], []
    for le in range(counts.shape[0]):
        for s in range(num_ranks):
            b, c = int(begins[le, s]), int(counts[le, s])
            if c == 0:
                continue
            block = torch.arange(b, b + c, device=src_info.device)
            order = torch.argsort(src_info[le, block])
            rows.append(data[le, block[order]].view(torch.uint8).cpu())
            tokens.append(src_info[le, block[order]].cpu())
            if scales is not None:
                row_scales.append(scales[le, block[order]].contiguous().view(torch.uint8).cpu())
    return {"recv_count": recv_count.cpu(), "layout_range": layout_range.cpu(), "rows": rows, "tokens": tokens,
            "scales": row_scales}


def rounds(buf, case, seed, rank, num_ranks):
    """The same calls on any Buffer: plain, hook + zero-copy + out=, LogFMT, and three in a row. Returns
    every output that must not depend on the transport."""
    results = []

    def one(seed_i, hook=False, zero_copy=False, logfmt=False, what=""):
        routing, inputs = base.make_round(case, seed_i, num_ranks)
        topk_idx = torch.from_numpy(routing[rank]).cuda()
        out = buf.low_latency_dispatch(inputs[rank].x, topk_idx, case.max_tokens, case.num_experts,
                                       use_fp8=case.fp8, round_scale=case.round_scale, use_ue8m0=case.ue8m0,
                                       return_recv_hook=hook)
        if hook:
            torch.cuda._sleep(int(1e6))
            out[4]()
        base.check_dispatch(out, case, routing, inputs, rank, num_ranks, what)
        into = buf.get_next_low_latency_combine_buffer(out[2]) if zero_copy else None
        y = base.combine_input(case, out, inputs, rank, num_ranks, into)
        combined, _, combine_hook = buf.low_latency_combine(y, topk_idx, inputs[rank].topk_weights, out[2],
                                                            use_logfmt=logfmt, zero_copy=zero_copy,
                                                            return_recv_hook=hook)
        if hook:
            combine_hook()
        if not logfmt:
            base.check_combine(combined, case, routing, inputs, rank, what)
        results.append((what, canonical_dispatch(out, case, num_ranks), combined.view(torch.int16).cpu()))

    one(seed, what="plain")
    one(seed + 1, hook=True, zero_copy=True, what="hook, zero-copy")
    one(seed + 2, logfmt=True, what="LogFMT")
    for j in range(3):  # both parities, the first reused: the put counters accumulate across calls
        one(seed + 3 + j, what=f"in a row {j}")
    return results


def double_batch(buf, case, seed, rank, num_ranks):
    """Two micro-batches in hook mode (send 0, send 1, hook 0, hook 1), skewed ranks: both parities'
    counters outstanding at once."""
    results = []
    batches = [base.make_round(case, seed + j, num_ranks) for j in range(2)]
    idx = [torch.from_numpy(routing[rank]).cuda() for routing, _ in batches]
    sent = [buf.low_latency_dispatch(inputs[rank].x, idx[j], case.max_tokens, case.num_experts, use_fp8=False,
                                     return_recv_hook=True) for j, (_, inputs) in enumerate(batches)]
    if rank % 2:
        torch.cuda._sleep(int(2e6))
    for out in sent:
        out[4]()
    ys = [base.combine_input(case, sent[j], inputs, rank, num_ranks) for j, (_, inputs) in enumerate(batches)]
    combined = [buf.low_latency_combine(ys[j], idx[j], inputs[rank].topk_weights, sent[j][2], return_recv_hook=True)
                for j, (_, inputs) in enumerate(batches)]
    if (rank + 1) % 2:
        torch.cuda._sleep(int(2e6))
    for c in combined:
        c[2]()
    for j, (routing, inputs) in enumerate(batches):
        base.check_dispatch(sent[j], case, routing, inputs, rank, num_ranks, f"double batch {j}")
        base.check_combine(combined[j][0], case, routing, inputs, rank, f"double batch {j} combine")
        results.append((f"double batch {j}", canonical_dispatch(sent[j], case, num_ranks),
                        combined[j][0].view(torch.int16).cpu()))
    return results


def interleaved_zero_copy(buf, case, seed, rank, num_ranks):
    """Two micro-batches with a zero-copy combine: dispatch A, fill A's combine buffer, dispatch B,
    combine A (zero-copy), combine B. The put path stages messages in the send areas: dispatch B must
    not stage into the buffer A's outputs wait in. Run twice around one plain round, so that both
    relations of the call numbers' parity to the combines' count are met."""
    results = []

    def once(seed_i, what):
        batches = [base.make_round(case, seed_i + j, num_ranks) for j in range(2)]
        idx = [torch.from_numpy(routing[rank]).cuda() for routing, _ in batches]
        inputs = [b[1] for b in batches]
        out_a = buf.low_latency_dispatch(inputs[0][rank].x, idx[0], case.max_tokens, case.num_experts, use_fp8=False)
        y_a = base.combine_input(case, out_a, inputs[0], rank, num_ranks, buf.get_next_low_latency_combine_buffer(out_a[2]))
        out_b = buf.low_latency_dispatch(inputs[1][rank].x, idx[1], case.max_tokens, case.num_experts, use_fp8=False)
        combined_a = buf.low_latency_combine(y_a, idx[0], inputs[0][rank].topk_weights, out_a[2], zero_copy=True)[0]
        y_b = base.combine_input(case, out_b, inputs[1], rank, num_ranks)
        combined_b = buf.low_latency_combine(y_b, idx[1], inputs[1][rank].topk_weights, out_b[2])[0]
        for j, (out, combined) in enumerate(((out_a, combined_a), (out_b, combined_b))):
            routing = batches[j][0]
            base.check_dispatch(out, case, routing, inputs[j], rank, num_ranks, f"{what} {j}")
            base.check_combine(combined, case, routing, inputs[j], rank, f"{what} {j} combine")
            results.append((f"{what} {j}", canonical_dispatch(out, case, num_ranks), combined.view(torch.int16).cpu()))

    once(seed, "interleaved zero-copy")
    routing, inputs = base.make_round(case, seed + 7, num_ranks)
    topk_idx = torch.from_numpy(routing[rank]).cuda()
    out = buf.low_latency_dispatch(inputs[rank].x, topk_idx, case.max_tokens, case.num_experts, use_fp8=False)
    buf.low_latency_combine(base.combine_input(case, out, inputs, rank, num_ranks), topk_idx,
                            inputs[rank].topk_weights, out[2])
    once(seed + 20, "interleaved zero-copy, shifted")
    return results


def run_all(rank, num_ranks, seed, transport, force_put):
    os.environ.pop("MOELINK_LL_TRANSPORT", None)
    os.environ["MOELINK_DEBUG_LL_FORCE_PUT"] = "1" if force_put else "0"
    if transport != "ipc":
        os.environ["MOELINK_LL_TRANSPORT"] = transport
    cases = [c.resolved(num_ranks) for c in CASES]
    buf = base.make_ll_buffer(num_ranks, cases)
    assert buf.runtime.uses_nvshmem == (transport == "nvshmem"), "the transport knob was not taken"
    # Which kernels run: the forced put must take the plugin's put path (else the comparison below
    # would pass vacuously, the store kernels against themselves); without it, log what NVSHMEM mapped.
    if force_put:
        assert buf.runtime.low_latency_puts == (num_ranks > 1), "MOELINK_DEBUG_LL_FORCE_PUT did not take the put path"
    elif transport == "ipc":
        assert not buf.runtime.low_latency_puts
    else:
        common.log(rank, f"[R={num_ranks}] nvshmem without forced put: put path {buf.runtime.low_latency_puts}")
    results = []
    for i, case in enumerate(cases):
        buf.clean_low_latency_buffer(case.max_tokens, case.hidden, case.num_experts)
        results += [(f"{case.name} {what}", d, c) for what, d, c in rounds(buf, case, seed + 10 * i, rank, num_ranks)]
    case = cases[1]
    buf.clean_low_latency_buffer(case.max_tokens, case.hidden, case.num_experts)
    results += double_batch(buf, case, seed + 500, rank, num_ranks)
    results += interleaved_zero_copy(buf, case, seed + 600, rank, num_ranks)
    torch.cuda.synchronize()
    buf.destroy()
    return results


def compare(got, want, what):
    assert len(got) == len(want), f"{what}: {len(got)} rounds against {len(want)}"
    for (name, d_got, c_got), (_, d_want, c_want) in zip(got, want):
        for key in ("recv_count", "layout_range"):
            assert torch.equal(d_got[key], d_want[key]), f"{what} {name}: {key} differs from the IPC path"
        for key in ("rows", "tokens", "scales"):
            assert len(d_got[key]) == len(d_want[key]), f"{what} {name}: {key} blocks differ"
            for b, (g, w) in enumerate(zip(d_got[key], d_want[key])):
                assert torch.equal(g, w), f"{what} {name}: {key} of block {b} not bit-equal to the IPC path"
        assert torch.equal(c_got, c_want), f"{what} {name}: combined rows not bit-equal to the IPC path"


def _bit_equal(rank, num_ranks, seed, force_put):
    want = run_all(rank, num_ranks, seed, "ipc", False)
    got = run_all(rank, num_ranks, seed, "nvshmem", force_put)
    compare(got, want, f"rank {rank}/{num_ranks} nvshmem{' forced put' if force_put else ''}")
    common.log(rank, f"[R={num_ranks}] nvshmem{' (forced put)' if force_put else ''}: {len(got)} rounds bit-equal to ipc")


@pytest.mark.parametrize("force_put", [False, True], ids=["mapped-or-put", "forced-put"])
@pytest.mark.parametrize("num_ranks", (2, 4))
def test_nvshmem_bit_equal_to_ipc(num_ranks, force_put):
    launcher.run_ranks(num_ranks, _bit_equal, 71000 + 10 * num_ranks + force_put, force_put, timeout_s=300, env=ENV)


def _zero_copy_logfmt_refused(rank, num_ranks, seed):
    os.environ["MOELINK_LL_TRANSPORT"] = "nvshmem"
    os.environ["MOELINK_DEBUG_LL_FORCE_PUT"] = "1"
    case = CASES[1].resolved(num_ranks)
    buf = base.make_ll_buffer(num_ranks, [case])
    routing, inputs = base.make_round(case, seed, num_ranks)
    topk_idx = torch.from_numpy(routing[rank]).cuda()
    out = buf.low_latency_dispatch(inputs[rank].x, topk_idx, case.max_tokens, case.num_experts, use_fp8=False)
    y = base.combine_input(case, out, inputs, rank, num_ranks, buf.get_next_low_latency_combine_buffer(out[2]))
    with pytest.raises(ValueError, match="zero-copy LogFMT"):
        buf.low_latency_combine(y, topk_idx, inputs[rank].topk_weights, out[2], use_logfmt=True, zero_copy=True)
    # The refusal is the host's, before any launch: the ranks stay in step.
    combined = buf.low_latency_combine(y, topk_idx, inputs[rank].topk_weights, out[2], zero_copy=True)[0]
    base.check_combine(combined, case, routing, inputs, rank, "zero-copy bf16 after the refusal")
    torch.cuda.synchronize()
    buf.destroy()


def test_zero_copy_logfmt_is_refused_on_the_put_path():
    launcher.run_ranks(2, _zero_copy_logfmt_refused, 71500, timeout_s=200, env=ENV)


def test_transport_knob_rejects_a_bad_value():
    launcher.run_ranks(1, _bad_knob, 71600, timeout_s=120, env={**ENV, "MOELINK_LL_TRANSPORT": "rdma"})


def _bad_knob(rank, num_ranks, seed):
    with pytest.raises(ValueError, match="MOELINK_LL_TRANSPORT"):
        moelink.Buffer(common.world_group(), num_nvl_bytes=0, num_rdma_bytes=1 << 20, low_latency_mode=True)
