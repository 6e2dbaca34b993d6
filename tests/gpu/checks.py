"""One intranode dispatch + cached dispatch + combine round, checked against the reference.

Shared by tests/gpu/test_intranode.py and the bench's verify step. Each rank regenerates every
rank's routing and inputs from the seed, so the expectations need no communication. moelink
allocates every output, so stale data cannot be poisoned in advance; instead every case uses fresh
random data that never contains zeros and every received element is compared bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

import common
from reference import moe_reference as ref

SLEEP_CYCLES = int(2e7)  # ~10 ms on an H100: long enough that work not ordered after it reads early data


def combine_scale(d: int) -> float:
    """Rank d feeds combine its received rows times this, so a row summed from the wrong rank shows."""
    return 0.5 + 0.125 * d


@dataclass(frozen=True)
class Case:
    name: str
    num_tokens: int
    hidden: int
    num_topk: int
    num_experts: int            # 0: one expert per rank
    fp8: bool = False
    scales_col_major: bool = False
    drop_prob: float = 0.1      # chance that a top-k slot is -1
    nowhere_prob: float = 0.0   # chance that a token is routed to no expert at all
    silent: str = ""            # "empty": rank R//2 has T=0; "minus_one": all of its slots are -1
    deaf: bool = False          # rank R-1 receives nothing (its experts are never chosen)
    alignment: int = 1
    worst: bool = False         # num_worst_tokens = R * T
    use_async: bool = False     # previous_event + async_finish, with inputs written late
    num_bias: int = 0
    with_weights: bool = True
    ue8m0: bool = False         # fp8 scales as packed UE8M0 int32
    with_topk: bool = True      # False: dispatch routed by is_token_in_rank alone (no topk_idx / weights)

    def resolved(self, num_ranks: int) -> "Case | None":
        """The case for num_ranks (E filled in, K capped by the choosable experts), or None if E
        cannot be split over num_ranks."""
        num_experts = self.num_experts or num_ranks
        if num_experts < num_ranks or num_experts % num_ranks:
            return None
        choosable = num_experts - (num_experts // num_ranks if self.deaf else 0)
        return replace(self, num_experts=num_experts, num_topk=min(self.num_topk, choosable))

    def tokens_of(self, rank: int, num_ranks: int) -> int:
        return 0 if self.silent == "empty" and rank == num_ranks // 2 else self.num_tokens

    def describe(self) -> str:
        kind = ("fp8" + ("/ue8m0" if self.ue8m0 else "") + ("/col" if self.scales_col_major else "")) \
            if self.fp8 else "bf16"
        extras = [flag for flag, on in (("async", self.use_async), ("worst", self.worst), ("deaf", self.deaf),
                                        (f"silent={self.silent}", self.silent), (f"bias{self.num_bias}", self.num_bias),
                                        (f"align{self.alignment}", self.alignment > 1),
                                        ("no-weights", not self.with_weights),
                                        ("no-topk", not self.with_topk)) if on]
        return (f"{self.name}: T={self.num_tokens} H={self.hidden} K={self.num_topk} E={self.num_experts} {kind}"
                + (" " + " ".join(extras) if extras else ""))


# A covering subset, not the cross product: every T, H, K, E, dtype, alignment and option appears,
# and the big T=4096 / H=7168 shape runs for bf16 and fp8 at every rank count.
# Shared by test_intranode.py and test_internode.py.
COVERING_CASES = [
    Case("empty", 0, 2048, 8, 64),
    Case("one-token", 1, 2048, 1, 0),
    Case("odd-hidden", 127, 2056, 4, 64, drop_prob=0.2),
    Case("fp8-align", 127, 2048, 8, 256, fp8=True, alignment=128),
    Case("fp8-colmajor", 127, 4096, 4, 64, fp8=True, scales_col_major=True),
    Case("fp8-ue8m0", 127, 7168, 8, 256, fp8=True, ue8m0=True),
    Case("fp8-ue8m0-colmajor-worst", 200, 2048, 4, 64, fp8=True, scales_col_major=True, ue8m0=True, worst=True),
    Case("big", 4096, 7168, 8, 256),
    Case("big-fp8", 4096, 7168, 8, 256, fp8=True),
    Case("silent-empty", 512, 4096, 8, 256, silent="empty"),
    Case("silent-minus-one", 512, 2048, 4, 64, silent="minus_one"),
    Case("deaf", 512, 4096, 4, 64, deaf=True),
    Case("nowhere-bias-pair", 300, 2048, 8, 256, nowhere_prob=0.1, num_bias=2),
    Case("bias-align", 256, 7168, 8, 64, num_bias=1, alignment=128),
    Case("worst", 256, 2048, 8, 256, worst=True),
    Case("worst-fp8-colmajor", 200, 4096, 4, 64, fp8=True, scales_col_major=True, worst=True),
    Case("async", 1024, 2048, 8, 256, use_async=True),
    Case("async-fp8-worst", 128, 7168, 8, 64, fp8=True, use_async=True, worst=True, num_bias=1),
    Case("expert-per-rank", 127, 4096, 8, 0, fp8=True, nowhere_prob=0.05),
    Case("no-weights", 64, 2048, 4, 64, with_weights=False, alignment=4),
    Case("no-topk", 200, 2048, 8, 256, with_topk=False, with_weights=False, alignment=4, drop_prob=0.2),
    Case("no-topk-fp8-worst", 128, 4096, 4, 64, fp8=True, with_topk=False, with_weights=False, worst=True),
]


def make_routing_all(case: Case, seed: int, num_ranks: int) -> list[np.ndarray]:
    deaf_rank = num_ranks - 1 if case.deaf else None
    routing = [ref.make_routing(seed, s, case.tokens_of(s, num_ranks), case.num_topk, case.num_experts, num_ranks,
                                case.drop_prob, case.nowhere_prob, deaf_rank) for s in range(num_ranks)]
    if case.silent == "minus_one":
        routing[num_ranks // 2][:] = -1
    return routing


def make_inputs_all(case: Case, seed: int, num_ranks: int, salt: int = 0) -> list[ref.RankInputs]:
    return [ref.make_inputs(seed, s, case.tokens_of(s, num_ranks), case.hidden, case.num_topk, case.fp8,
                            case.scales_col_major, device="cuda", salt=salt, ue8m0=case.ue8m0)
            for s in range(num_ranks)]


def _poisoned_like(t):
    out = torch.empty_like(t)
    (out.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else out).fill_(0)
    return out


def written_late(x):
    """A copy of x (a tensor or a tuple) that the current stream writes only after a long sleep:
    an operation that is not ordered after the current stream reads zeros instead."""
    items = x if isinstance(x, tuple) else (x,)
    copies = tuple(_poisoned_like(t) for t in items)
    torch.cuda._sleep(SLEEP_CYCLES)
    for dst, src in zip(copies, items):
        if src.dtype == torch.float8_e4m3fn:
            dst.view(torch.uint8).copy_(src.view(torch.uint8))
        else:
            dst.copy_(src)
    return copies if isinstance(x, tuple) else copies[0]


ARENA_POISON = 0xA5  # bf16 0xA5A5, int64 0xA5A5..., float 0xA5A5A5A5: none is a value a case produces


def poison_arena(buf) -> None:
    """Fills the receive arena's largest free range, where the next outputs will be carved (first
    fit), so an output row nobody wrote shows up as poison instead of as a stale correct row."""
    free = buf.runtime.arena_largest_free()
    if free:
        block = torch.from_dlpack(buf.runtime.arena_dlpack(free))
        block.fill_(ARENA_POISON)
        del block


def in_arena(buf, t) -> bool:
    base = buf.runtime.local_nvl_buffer()
    return t is not None and buf.runtime.num_arena_bytes > 0 and t.data_ptr() >= base + buf.num_nvl_bytes


def check_recv_x(recv_x, want: ref.DispatchReference, num_rows: int, case: Case, what: str) -> None:
    n = want.num_recv_tokens
    if case.fp8:
        assert isinstance(recv_x, tuple) and len(recv_x) == 2, f"{what}: fp8 recv_x must be (data, scales)"
        data, scales = recv_x
        assert tuple(data.shape) == (num_rows, case.hidden), f"{what}: recv_x shape {tuple(data.shape)}"
        columns = ref.packed_ue8m0_columns(case.hidden) if case.ue8m0 else case.hidden // ref.FP8_BLOCK
        assert tuple(scales.shape) == (num_rows, columns), f"{what}: recv scales shape {tuple(scales.shape)}"
        assert scales.dtype == (torch.int32 if case.ue8m0 else torch.float32), f"{what}: recv scales {scales.dtype}"
        if case.scales_col_major:
            assert scales.t().is_contiguous(), f"{what}: column-major scales came back with strides {scales.stride()}"
        else:
            assert scales.is_contiguous(), f"{what}: row-major scales came back with strides {scales.stride()}"
        common.assert_bits_equal(data[:n], want.recv_x[0], f"{what}: recv_x fp8")
        common.assert_bits_equal(scales[:n], want.recv_x[1], f"{what}: recv_x scales")
    else:
        assert isinstance(recv_x, torch.Tensor), f"{what}: bf16 recv_x must be a tensor, got {type(recv_x)}"
        assert tuple(recv_x.shape) == (num_rows, case.hidden), f"{what}: recv_x shape {tuple(recv_x.shape)}"
        common.assert_bits_equal(recv_x[:n], want.recv_x, f"{what}: recv_x")


def check_dispatch(out, want: ref.DispatchReference, num_worst: int, case: Case, what: str) -> None:
    recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, _ = out
    n = want.num_recv_tokens
    num_rows = num_worst or n
    check_recv_x(recv_x, want, num_rows, case, what)
    if not case.with_topk:
        assert recv_topk_idx is None, f"{what}: recv_topk_idx of a dispatch without topk_idx must be None"
    else:
        assert tuple(recv_topk_idx.shape) == (num_rows, case.num_topk), \
            f"{what}: recv_topk_idx shape {tuple(recv_topk_idx.shape)}"
        common.assert_values_equal(recv_topk_idx[:n], want.recv_topk_idx, f"{what}: recv_topk_idx")
        assert bool((recv_topk_idx[n:] == -1).all()), f"{what}: recv_topk_idx rows >= {n} must be -1"
    if case.with_weights:
        assert tuple(recv_topk_weights.shape) == (num_rows, case.num_topk), \
            f"{what}: recv_topk_weights shape {tuple(recv_topk_weights.shape)}"
        common.assert_values_equal(recv_topk_weights[:n], want.recv_topk_weights, f"{what}: recv_topk_weights")
    else:
        assert recv_topk_weights is None, f"{what}: recv_topk_weights without topk_weights must be None"
    want_list = [] if num_worst else want.num_recv_tokens_per_expert_list
    assert list(per_expert) == want_list, f"{what}: num_recv_tokens_per_expert_list {list(per_expert)} != {want_list}"
    recv_src_idx = handle[3]
    assert tuple(recv_src_idx.shape) == (num_rows,), f"{what}: recv_src_idx shape {tuple(recv_src_idx.shape)}"
    common.assert_values_equal(recv_src_idx[:n], want.recv_src_idx, f"{what}: recv_src_idx (handle[3])")
    assert bool((recv_src_idx[n:] == -1).all()), f"{what}: recv_src_idx rows >= {n} must be -1"


def check_handle(handle, routing, num_experts: int, rank: int, num_ranks: int, what: str) -> None:
    """The matrices and info of an intranode handle (the notify computes them, the dispatch kernel
    copies them in), from every rank's routing: rank_prefix_matrix[s][d] = rows d receives from
    ranks <= s; channel_prefix_matrix[d][c] = this rank's tokens to d in channels <= c;
    recv_channel_prefix_matrix[s][c] = rows this rank receives from s in channels < c; a channel
    is a contiguous run of ceil(T / C) of its source's tokens. The info says the dispatch ran."""
    experts_per_rank = num_experts // num_ranks
    num_channels = handle[1].shape[1]

    def routed(topk_idx) -> np.ndarray:  # [T, R]: token t goes to rank d
        ids = np.asarray(topk_idx)
        return np.stack([((ids >= d * experts_per_rank) & (ids < (d + 1) * experts_per_rank)).any(axis=1)
                         for d in range(num_ranks)], axis=1)

    def per_channel(mask: np.ndarray) -> np.ndarray:  # [R, C]: tokens to each rank in each channel
        per = max(-(-mask.shape[0] // num_channels), 1)
        return np.stack([mask[c * per:(c + 1) * per].sum(axis=0) for c in range(num_channels)], axis=1)

    masks = [routed(r) for r in routing]
    to_me = np.stack([per_channel(m)[rank] for m in masks])  # [s][c]
    expected = (("rank_prefix_matrix", 0, np.cumsum(np.stack([m.sum(axis=0) for m in masks]), axis=0)),
                ("channel_prefix_matrix", 1, np.cumsum(per_channel(masks[rank]), axis=1)),
                ("recv_channel_prefix_matrix", 2, np.cumsum(to_me, axis=1) - to_me))
    for name, index, want in expected:
        got = handle[index].cpu().numpy()
        assert got.shape == want.shape and (got == want).all(), \
            f"{what}: handle[{index}] ({name}) {got.tolist()} != {want.tolist()}"
    assert int(handle[5][1]) == 0, f"{what}: the handle's info says the dispatch failed: {handle[5].tolist()}"


def combine_input(inputs, plan: ref.RecvPlan, rank: int, num_rows: int, hidden: int):
    """What rank `rank` feeds combine: bf16(x_s[t] * combine_scale(rank)) for each received (s, t);
    rows past the real ones (num_worst_tokens padding) hold random values combine must ignore."""
    rows = ref.gather_rows([inp.x for inp in inputs], plan)
    y = torch.randn(num_rows, hidden, device="cuda").to(torch.bfloat16)
    y[:plan.num_recv_tokens] = (rows.float() * combine_scale(rank)).to(torch.bfloat16)
    return y


def check_combine(got_x, got_weights, want_x, want_weights, what: str) -> None:
    # Each element is an fp32 sum of <= R bf16 terms and <= 2 bias terms rounded once to bf16. The
    # kernel may sum in another order, which can move the fp32 result across a bf16 rounding
    # boundary: 1 bf16 ulp is 2^-8 ~ 0.4% relative, so rtol 1e-2 allows about two ulps; atol
    # (relative to the largest output) covers sums that cancel to near zero, where the fp32 rounding
    # of the large terms dominates. A wrong or missing row is off by O(1) relative and still fails.
    assert tuple(got_x.shape) == tuple(want_x.shape) and got_x.dtype == torch.bfloat16, \
        f"{what}: combined_x {tuple(got_x.shape)} {got_x.dtype}, expected {tuple(want_x.shape)} bfloat16"
    if want_x.numel():
        atol = 1e-2 * want_x.float().abs().max().item()
        torch.testing.assert_close(got_x.float(), want_x.float(), rtol=1e-2, atol=atol,
                                   msg=lambda m: f"{what}: combined_x\n{m}")
    if want_weights is None:
        assert got_weights is None, f"{what}: combined_topk_weights without topk_weights must be None"
    else:
        # Exactly one rank contributes each valid slot (0 for the others), so the sum is exact.
        torch.testing.assert_close(got_weights, want_weights, rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"{what}: combined_topk_weights\n{m}")


def run_case(buf, rank: int, num_ranks: int, case: Case, seed: int, config, combine_config) -> str:
    """Layout, uncached dispatch, cached dispatch of fresh data, combine; raises on the first
    mismatch. Returns a one-line summary."""
    start = time.perf_counter()
    what = f"rank {rank}/{num_ranks} {case.name}"
    num_experts = case.num_experts
    routing = make_routing_all(case, seed, num_ranks)
    inputs = make_inputs_all(case, seed, num_ranks)
    mine = inputs[rank]
    topk_idx = torch.from_numpy(routing[rank]).cuda()
    topk_weights = mine.topk_weights if case.with_weights else None

    *layout, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    expected_layout = ref.reference_layout(topk_idx, num_experts, num_ranks)
    topology = buf._topology
    common.check_layout(layout, expected_layout, what,
                        num_nvl_ranks=topology.num_nvl_ranks if topology.num_rdma_ranks > 1 else None)
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank = layout

    want = ref.reference_dispatch(routing, [inp.dispatch_x(case.fp8) for inp in inputs],
                                  [inp.topk_weights for inp in inputs] if case.with_weights else None,
                                  rank, num_experts, num_ranks, case.alignment)
    num_worst = num_ranks * case.num_tokens if case.worst else 0
    x = mine.dispatch_x(case.fp8)
    previous_event = None
    if case.use_async:
        x = written_late(x)
        previous_event = buf.capture()
    poison_arena(buf)
    # Without top-k the rows are routed by is_token_in_rank alone (deep_ep's first test case).
    out = buf.dispatch(x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                       num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx if case.with_topk else None,
                       topk_weights=topk_weights,
                       expert_alignment=case.alignment, num_worst_tokens=num_worst, config=config,
                       previous_event=previous_event, async_finish=case.use_async)
    if case.use_async:
        out[-1].current_stream_wait()
    check_dispatch(out, want, num_worst, case, what)
    handle = out[4]
    if topology.num_rdma_ranks == 1:  # an internode handle holds other matrices
        check_handle(handle, routing, num_experts, rank, num_ranks, what)
    recv_topk_weights = out[2]
    direct = in_arena(buf, out[0][0] if case.fp8 else out[0])

    # Cached: same routing, fresh data; the rows must land where the handle says.
    fresh = make_inputs_all(case, seed, num_ranks, salt=1)
    want_cached = ref.reference_dispatch(routing, [inp.dispatch_x(case.fp8) for inp in fresh], None, rank,
                                         num_experts, num_ranks, case.alignment)
    poison_arena(buf)
    cached = buf.dispatch(fresh[rank].dispatch_x(case.fp8), handle=handle, config=config)
    assert cached[1] is None and cached[2] is None and cached[3] is None, \
        f"{what}: cached dispatch must return None for recv_topk_idx, recv_topk_weights and the per-expert list"
    check_recv_x(cached[0], want_cached, num_worst or want.num_recv_tokens, case, f"{what} (cached)")
    del fresh, want_cached, cached

    y = combine_input(inputs, want.plan, rank, num_worst or want.num_recv_tokens, case.hidden)
    if buf.num_arena_bytes and seed % 2 == 0:
        # Every other case feeds combine from the arena, so peers read this rank's rows in place.
        in_place = buf.arena_empty(y.shape, y.dtype)
        if in_place is not None:
            in_place.copy_(y)
            y = in_place
    bias = ref.make_bias(seed, rank, case.tokens_of(rank, num_ranks), case.hidden, case.num_bias, device="cuda")
    previous_event = None
    if case.use_async:
        y = written_late(y)
        previous_event = buf.capture()
    # combined_x is allocated by the combine: a block of NaN of its size, freed just before, is what
    # the caching allocator hands it, so a row the combine leaves unwritten is caught.
    nan_block = torch.full((case.tokens_of(rank, num_ranks), case.hidden), float("nan"), dtype=torch.bfloat16,
                           device="cuda")
    del nan_block
    combined_x, combined_weights, event = buf.combine(y, handle, topk_weights=recv_topk_weights, bias=bias,
                                                      config=combine_config, previous_event=previous_event,
                                                      async_finish=case.use_async)
    if case.use_async:
        event.current_stream_wait()
    else:
        # This rank's combine ends only once every token owner has read its input (pulled in place
        # or pushed): overwritten now, on the caller's stream, a late reader would sum NaN.
        y.fill_(float("nan"))
        if recv_topk_weights is not None:
            recv_topk_weights.fill_(float("nan"))
    want_x, want_weights = ref.reference_combine(
        expected_layout[3], lambda d, tokens: (mine.x[tokens].float() * combine_scale(d)).to(torch.bfloat16),
        case.hidden, topk_idx, topk_weights, num_experts, bias)
    check_combine(combined_x, combined_weights, want_x, want_weights, what)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    path = "direct" if direct else "rings"
    return f"{case.describe()}: recv {want.num_recv_tokens} rows on rank {rank} ({path}), ok in {elapsed:.2f} s"
