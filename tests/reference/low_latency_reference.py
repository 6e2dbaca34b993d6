"""The one reference of moelink's low-latency dispatch / combine semantics (= deep_ep V1's).

Low-latency dispatch sends each (token, top-k slot) to the rank of that slot's expert and lands it
in an expert-major receive tensor: recv_x [E_local, R * M, H], where local expert le's valid rows are
its first recv_count[le] rows, the rows from source rank s forming one contiguous block
(layout_range[le][s] = begin << 32 | count, blocks in source order). Within a block the rows may come
in any order; src_info names each row's source token. Combine sends each expert's output row back to
its token's rank, which sums them weighted by topk_weights (float32, one bf16 rounding).

numpy half (no torch): the size hint deep_ep documents, and which tokens each (expert, source) block
holds. torch half: the fp8 cast (per 128 values: scale = max(amax, 1e-4) * (1/448), optionally rounded up
to a power of two, optionally packed as UE8M0 exponent bytes) and the weighted combine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from reference.moe_reference import FP8_BLOCK, _as_numpy, _check_topk, _require_torch, align_up, experts_per_rank

FP8_MAX = 448.0       # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-4     # an all-zero block still gets a finite scale
UE8M0_PER_INT = 4     # UE8M0 exponent bytes packed per int32


# ---- numpy half ----------------------------------------------------------------------------------

def dispatch_message_bytes(hidden: int) -> int:
    """deep_ep V1's dispatch message: a 16-byte header, then a bf16 row or an fp8 row and its scales."""
    return 16 + max(2 * hidden, hidden + 4 * (hidden // FP8_BLOCK))


def combine_message_bytes(hidden: int) -> int:
    return 2 * hidden + 4 * (hidden // FP8_BLOCK)


def deep_ep_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                           num_experts: int) -> int:
    """The bytes deep_ep V1's get_low_latency_rdma_size_hint returns for these arguments: two buffers
    of (send area + receive area + signals), then (n + 128) // 128 * 128, which adds 128 bytes even
    when n is a multiple of 128 (tests/gpu/test_low_latency.py compares it with DeepEP's own when the
    anchor is present). moelink's hint is this, so a num_rdma_bytes sized for deep_ep fits moelink."""
    m, e = num_max_dispatch_tokens_per_rank, num_experts
    del num_ranks  # the formula does not depend on it
    send = max(m * dispatch_message_bytes(hidden), e * m * combine_message_bytes(hidden))
    recv = max(e * m * dispatch_message_bytes(hidden), e * m * combine_message_bytes(hidden))
    return (2 * send + 2 * recv + 2 * align_up(4 * e, 128) + 128) // 128 * 128


@dataclass
class LowLatencyPlan:
    """What rank d receives in a low-latency dispatch."""
    tokens: list          # tokens[le][s]: sorted np.int64 array of the tokens of s routed to local expert le
    counts: np.ndarray    # [E_local, R] int64: len(tokens[le][s])

    @property
    def recv_count(self) -> np.ndarray:
        """[E_local] int32: valid rows per local expert."""
        return self.counts.sum(axis=1).astype(np.int32)

    def begins(self) -> np.ndarray:
        """[E_local, R] int64: where each source's block starts (blocks in source order)."""
        return np.cumsum(self.counts, axis=1) - self.counts


def low_latency_plan_np(topk_idx_per_rank: Sequence, d: int, num_experts: int, num_ranks: int) -> LowLatencyPlan:
    """Every (s, t, e) with e on rank d: e's local index le = e - d * E_local. Routing is expected to
    name distinct experts per token: moelink sends a repeated expert once and reports the repeat
    (a local error), where this plan would count it twice; no test routes a token to one expert twice."""
    if len(topk_idx_per_rank) != num_ranks:
        raise ValueError(f"need the routing of all {num_ranks} ranks, got {len(topk_idx_per_rank)}")
    experts_per = experts_per_rank(num_experts, num_ranks)
    first = d * experts_per
    tokens = [[None] * num_ranks for _ in range(experts_per)]
    counts = np.zeros((experts_per, num_ranks), dtype=np.int64)
    for s, topk_idx in enumerate(topk_idx_per_rank):
        topk_idx = _check_topk(topk_idx, num_experts)
        for le in range(experts_per):
            rows, _ = np.nonzero(topk_idx == first + le)
            tokens[le][s] = np.sort(rows).astype(np.int64)
            counts[le, s] = rows.shape[0]
    return LowLatencyPlan(tokens=tokens, counts=counts)


# ---- torch half ----------------------------------------------------------------------------------

def cast_fp8(x, round_scale: bool = False, use_ue8m0: bool = False):
    """(fp8 e4m3fn [n, H], scales) of bf16 x [n, H]: scales float32 [n, H / 128], or with use_ue8m0
    (which needs round_scale) int32 [n, H / 512] of packed exponent bytes, the scale of block 4i + j
    in byte j of int i. Quantized values are x / scale rounded to nearest even, in float32."""
    torch = _require_torch()
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0 needs round_scale")
    n, hidden = x.shape
    if hidden % FP8_BLOCK:
        raise ValueError(f"fp8 needs hidden % {FP8_BLOCK} == 0, got {hidden}")
    blocks = x.float().view(n, hidden // FP8_BLOCK, FP8_BLOCK)
    amax = blocks.abs().amax(dim=2).clamp(min=AMAX_FLOOR)
    # Times the reciprocal (float32), as deep_ep and the kernels compute it; a true division differs
    # from it in the last bit for about half of all amax values.
    scale = amax * (1.0 / FP8_MAX)
    if round_scale:
        # The next power of two at or above the scale, from its float32 exponent.
        bits = scale.view(torch.int32)
        exponent = (bits >> 23) & 0xFF
        mantissa = bits & 0x7FFFFF
        exponent = exponent + (mantissa != 0).to(torch.int32)
        scale = (exponent << 23).view(torch.float32)
    quantized = (blocks / scale.unsqueeze(2)).view(n, hidden).to(torch.float8_e4m3fn)
    if not use_ue8m0:
        return quantized, scale
    if (hidden // FP8_BLOCK) % UE8M0_PER_INT:
        raise ValueError(f"use_ue8m0 needs hidden % {FP8_BLOCK * UE8M0_PER_INT} == 0, got {hidden}")
    exponents = ((scale.view(torch.int32) >> 23) & 0xFF).view(n, -1, UE8M0_PER_INT)
    shifts = torch.arange(UE8M0_PER_INT, device=x.device, dtype=torch.int32) * 8
    return quantized, (exponents << shifts).sum(dim=2, dtype=torch.int64).to(torch.int32)


def dequantize_fp8(quantized, scales):
    """float32 [n, H] of a cast_fp8 result with float32 scales."""
    torch = _require_torch()
    n, hidden = quantized.shape
    values = quantized.float().view(n, hidden // FP8_BLOCK, FP8_BLOCK)
    return (values * scales.float().unsqueeze(2)).view(n, hidden).to(torch.float32)


def reference_combine(topk_idx, topk_weights, rows_of: Callable, hidden: int):
    """combined_x [T, H] bf16 on the token's rank: sum over k with topk_idx[t, k] >= 0 of
    topk_weights[t, k] * rows_of(e, tokens)[i], in float32, rounded once. rows_of(e, tokens) returns
    expert e's output rows (bf16 [len(tokens), H]) for those tokens of this rank."""
    torch = _require_torch()
    num_tokens, num_topk = topk_idx.shape
    device = topk_idx.device
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
    topk = _as_numpy(topk_idx)
    for k in range(num_topk):
        for e in np.unique(topk[:, k][topk[:, k] >= 0]):
            tokens = torch.from_numpy(np.nonzero(topk[:, k] == e)[0]).to(device)
            acc.index_add_(0, tokens, rows_of(int(e), tokens).float() * topk_weights[tokens, k:k + 1].float())
    return acc.to(torch.bfloat16)
