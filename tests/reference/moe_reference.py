"""The one reference of moelink's intranode layout / dispatch / combine semantics (= deep_ep V1).

Every GPU test and the bench's verify step compare against these functions; nothing else in the tree
restates the semantics. Two halves:

- numpy (no torch needed, so tests/cpu can check it anywhere): routing generation, the layout, and
  where each received row comes from (`layout_np`, `dispatch_plan_np`).
- torch (CPU or CUDA tensors): input generation and the data-carrying references, built on the
  numpy half so that the row placement is stated exactly once.

Every input is a pure function of (seed, rank, ...), so each rank regenerates every other rank's
inputs instead of receiving them: the reference never depends on the communication it checks.

Conventions: R ranks, E experts, expert e lives on rank e // (E / R); topk_idx [T, K] int64 with
-1 = no expert; rows that rank d receives are ordered by (source rank, source token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

try:
    import torch
except ImportError:  # the numpy half serves tests/cpu on machines without torch
    torch = None

FP8_BLOCK = 128  # hidden elements per fp8 scale


# ---- numpy half ----------------------------------------------------------------------------------

def experts_per_rank(num_experts: int, num_ranks: int) -> int:
    if num_ranks <= 0 or num_experts < num_ranks or num_experts % num_ranks:
        raise ValueError(f"num_experts={num_experts} must be a positive multiple of num_ranks={num_ranks}")
    return num_experts // num_ranks


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints, identical in every process (unlike hash())."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def make_routing(seed: int, rank: int, num_tokens: int, num_topk: int, num_experts: int, num_ranks: int,
                 drop_prob: float = 0.0, nowhere_prob: float = 0.0, deaf_rank: int | None = None) -> np.ndarray:
    """topk_idx [T, K] int64 of `rank`: each token's K distinct highest-scoring experts of random
    scores, then each slot set to -1 with probability drop_prob and each whole token routed nowhere
    with probability nowhere_prob. deaf_rank: its experts are never chosen, so it receives nothing."""
    experts_per = experts_per_rank(num_experts, num_ranks)
    choosable = num_experts - (experts_per if deaf_rank is not None else 0)
    if not 1 <= num_topk <= choosable:
        raise ValueError(f"num_topk={num_topk} must be in [1, {choosable}] (E={num_experts}, deaf={deaf_rank})")
    rng = np.random.default_rng([seed, rank, 0x70C])
    scores = rng.random((num_tokens, num_experts))
    if deaf_rank is not None:
        # rng.random is in [0, 1), so -1 ranks below every choosable expert.
        scores[:, deaf_rank * experts_per:(deaf_rank + 1) * experts_per] = -1.0
    if num_tokens == 0:
        return np.empty((0, num_topk), dtype=np.int64)
    topk_idx = np.argpartition(-scores, num_topk - 1, axis=1)[:, :num_topk].astype(np.int64)
    topk_idx[rng.random((num_tokens, num_topk)) < drop_prob] = -1
    topk_idx[rng.random(num_tokens) < nowhere_prob] = -1
    return topk_idx


def _check_topk(topk_idx, num_experts: int) -> np.ndarray:
    topk_idx = np.asarray(topk_idx, dtype=np.int64)
    if topk_idx.ndim != 2:
        raise ValueError(f"topk_idx must be [T, K], got shape {topk_idx.shape}")
    if topk_idx.size and (topk_idx.min() < -1 or topk_idx.max() >= num_experts):
        raise ValueError(f"topk_idx values must be in [-1, {num_experts}), got "
                         f"[{topk_idx.min()}, {topk_idx.max()}]")
    return topk_idx


def expert_rank_np(topk_idx: np.ndarray, num_experts: int, num_ranks: int) -> np.ndarray:
    """[T, K] rank that holds each slot's expert, -1 for empty slots."""
    experts_per = experts_per_rank(num_experts, num_ranks)
    return np.where(topk_idx >= 0, topk_idx // experts_per, -1)


def layout_np(topk_idx, num_experts: int, num_ranks: int):
    """(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool)."""
    topk_idx = _check_topk(topk_idx, num_experts)
    valid = topk_idx >= 0
    num_tokens_per_expert = np.bincount(topk_idx[valid], minlength=num_experts).astype(np.int32)
    slot_rank = expert_rank_np(topk_idx, num_experts, num_ranks)
    is_token_in_rank = (slot_rank[:, :, None] == np.arange(num_ranks)[None, None, :]).any(axis=1)
    num_tokens_per_rank = is_token_in_rank.sum(axis=0).astype(np.int32)
    return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank


@dataclass
class RecvPlan:
    """Where each row that rank d receives comes from, and what it carries besides the data."""
    src_rank: np.ndarray        # [n] int64
    src_idx: np.ndarray         # [n] int64: the token's index on its source rank
    recv_topk_idx: np.ndarray   # [n, K] int64: local expert id (expert - d * E/R), -1 if not on d
    num_recv_tokens_per_expert: list[int]  # [E/R], each rounded up to the alignment

    @property
    def num_recv_tokens(self) -> int:
        return int(self.src_idx.shape[0])


def dispatch_plan_np(topk_idx_per_rank: Sequence, d: int, num_experts: int, num_ranks: int,
                     alignment: int = 1) -> RecvPlan:
    """The rows rank d receives: every (s, t) with a slot on d, ordered by s then t."""
    if len(topk_idx_per_rank) != num_ranks:
        raise ValueError(f"need the routing of all {num_ranks} ranks, got {len(topk_idx_per_rank)}")
    if alignment < 1:
        raise ValueError(f"alignment must be >= 1, got {alignment}")
    experts_per = experts_per_rank(num_experts, num_ranks)
    first = d * experts_per
    src_rank, src_idx, recv_topk = [], [], []
    counts = np.zeros(experts_per, dtype=np.int64)
    num_topk = None
    for s, topk_idx in enumerate(topk_idx_per_rank):
        topk_idx = _check_topk(topk_idx, num_experts)
        num_topk = topk_idx.shape[1] if num_topk is None else num_topk
        if topk_idx.shape[1] != num_topk:
            raise ValueError(f"rank {s} has K={topk_idx.shape[1]}, rank 0 has K={num_topk}")
        on_d = (topk_idx >= first) & (topk_idx < first + experts_per)
        tokens = np.nonzero(on_d.any(axis=1))[0]
        src_rank.append(np.full(tokens.shape[0], s, dtype=np.int64))
        src_idx.append(tokens.astype(np.int64))
        recv_topk.append(np.where(on_d[tokens], topk_idx[tokens] - first, -1))
        counts += np.bincount(topk_idx[on_d] - first, minlength=experts_per)
    return RecvPlan(src_rank=np.concatenate(src_rank), src_idx=np.concatenate(src_idx),
                    recv_topk_idx=np.concatenate(recv_topk).reshape(-1, num_topk).astype(np.int64),
                    num_recv_tokens_per_expert=[align_up(int(c), alignment) for c in counts])


# ---- torch half ----------------------------------------------------------------------------------

def _require_torch():
    if torch is None:
        raise ImportError("this part of moe_reference needs torch")
    return torch


def _as_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if torch is not None and isinstance(t, torch.Tensor) else np.asarray(t)


@dataclass
class RankInputs:
    """One rank's dispatch inputs; every tensor is a function of (seed, rank, salt) only."""
    x: "torch.Tensor"                     # [T, H] bf16, no zeros, so stale or zeroed rows show
    topk_weights: "torch.Tensor"          # [T, K] float32 in [0.1, 1.1)
    x_fp8: "torch.Tensor | None" = None   # [T, H] float8_e4m3fn, no zero or NaN bytes
    x_scales: "torch.Tensor | None" = None  # [T, H/128] float32 in [0.5, 1.5), row- or column-major,
    #                                           or [T, ceil(H/512)] int32 random words (packed UE8M0)

    def dispatch_x(self, fp8: bool):
        return (self.x_fp8, self.x_scales) if fp8 else self.x


def make_inputs(seed: int, rank: int, num_tokens: int, hidden: int, num_topk: int, fp8: bool = False,
                scales_col_major: bool = False, device="cpu", salt: int = 0, ue8m0: bool = False) -> RankInputs:
    """Deterministic inputs of `rank`. On CUDA the generator is Philox, so every process on the same
    GPU model regenerates bit-identical tensors."""
    torch = _require_torch()
    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(seed, rank, salt, 0x1A))
    x = torch.randn(num_tokens, hidden, generator=gen, device=device)
    x = torch.where(x >= 0, x + 0.25, x - 0.25).to(torch.bfloat16)
    topk_weights = torch.rand(num_tokens, num_topk, generator=gen, device=device) + 0.1
    inputs = RankInputs(x=x, topk_weights=topk_weights)
    if fp8:
        if hidden % FP8_BLOCK:
            raise ValueError(f"fp8 needs hidden % {FP8_BLOCK} == 0, got hidden={hidden}")
        # Bytes 1..126 with a random sign bit: every finite non-zero e4m3 value, never 0x00 / 0x7f (NaN).
        magnitude = torch.randint(1, 127, (num_tokens, hidden), generator=gen, device=device, dtype=torch.int16)
        sign = torch.randint(0, 2, (num_tokens, hidden), generator=gen, device=device, dtype=torch.int16) * 128
        inputs.x_fp8 = (magnitude + sign).to(torch.uint8).view(torch.float8_e4m3fn)
        num_scales = hidden // FP8_BLOCK
        if ue8m0:
            # Any 32-bit word, NaN patterns included: packed scales are data to move, not floats.
            cols = packed_ue8m0_columns(hidden)
            shape = (cols, num_tokens) if scales_col_major else (num_tokens, cols)
            words = torch.randint(-2**31, 2**31 - 1, shape, generator=gen, device=device, dtype=torch.int32)
            inputs.x_scales = words.t() if scales_col_major else words
        elif scales_col_major:
            inputs.x_scales = (torch.rand(num_scales, num_tokens, generator=gen, device=device) + 0.5).t()
        else:
            inputs.x_scales = torch.rand(num_tokens, num_scales, generator=gen, device=device) + 0.5
    return inputs


def packed_ue8m0_columns(hidden: int) -> int:
    """int32 columns of packed UE8M0 scales: four one-byte exponents per int, the last one padded."""
    return (hidden // FP8_BLOCK + 3) // 4


def make_bias(seed: int, rank: int, num_tokens: int, hidden: int, num_bias: int, device="cpu"):
    """None, one [T, H] bf16 tensor, or a pair: the shapes combine's `bias` accepts."""
    torch = _require_torch()
    if num_bias == 0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(seed, rank, 0xB1A5))
    biases = tuple(torch.randn(num_tokens, hidden, generator=gen, device=device).to(torch.bfloat16)
                   for _ in range(num_bias))
    return biases[0] if num_bias == 1 else biases


def reference_layout(topk_idx, num_experts: int, num_ranks: int):
    """The tuple get_dispatch_layout returns, minus the event: (num_tokens_per_rank, None,
    num_tokens_per_expert, is_token_in_rank), on topk_idx's device."""
    torch = _require_torch()
    device = topk_idx.device if isinstance(topk_idx, torch.Tensor) else "cpu"
    per_rank, per_expert, in_rank = layout_np(_as_numpy(topk_idx), num_experts, num_ranks)
    return (torch.from_numpy(per_rank).to(device), None, torch.from_numpy(per_expert).to(device),
            torch.from_numpy(in_rank).to(device))


def gather_rows(tensors_per_rank: Sequence, plan: RecvPlan):
    """Rows (src_rank[i], src_idx[i]) of per-rank [T_s, ...] tensors, concatenated, as a contiguous
    tensor on the tensors' device. fp8 goes through uint8 so no fp8 kernel is needed."""
    torch = _require_torch()
    parts = []
    for s, tensor in enumerate(tensors_per_rank):
        tokens = plan.src_idx[plan.src_rank == s]
        as_bytes = tensor.dtype == torch.float8_e4m3fn
        source = tensor.view(torch.uint8) if as_bytes else tensor
        parts.append(source[torch.from_numpy(tokens).to(tensor.device)])
    rows = torch.cat(parts, dim=0).contiguous()
    return rows.view(torch.float8_e4m3fn) if tensors_per_rank[0].dtype == torch.float8_e4m3fn else rows


@dataclass
class DispatchReference:
    """What rank d's dispatch must return for its first num_recv_tokens rows."""
    recv_x: object                      # [n, H] tensor, or (fp8 [n, H], scales [n, S]) row-major
    recv_topk_idx: "torch.Tensor"       # [n, K] int64
    recv_topk_weights: "torch.Tensor | None"  # [n, K] float32: the weight where the expert is on d, else 0
    num_recv_tokens_per_expert_list: list[int]
    recv_src_idx: "torch.Tensor"        # [n] int32
    plan: RecvPlan

    @property
    def num_recv_tokens(self) -> int:
        return self.plan.num_recv_tokens


def reference_dispatch(topk_idx_per_rank: Sequence, x_per_rank: Sequence, topk_weights_per_rank, d: int,
                       num_experts: int, num_ranks: int, alignment: int = 1) -> DispatchReference:
    """x_per_rank[s]: rank s's x, a tensor or an (fp8, scales) pair. topk_weights_per_rank: list or None."""
    torch = _require_torch()
    plan = dispatch_plan_np([_as_numpy(t) for t in topk_idx_per_rank], d, num_experts, num_ranks, alignment)
    if isinstance(x_per_rank[0], tuple):
        recv_x = (gather_rows([x[0] for x in x_per_rank], plan), gather_rows([x[1] for x in x_per_rank], plan))
        device = recv_x[0].device
    else:
        recv_x = gather_rows(x_per_rank, plan)
        device = recv_x.device
    recv_topk_idx = torch.from_numpy(plan.recv_topk_idx).to(device)
    recv_topk_weights = None
    if topk_weights_per_rank is not None:
        weights = gather_rows(topk_weights_per_rank, plan).float()
        recv_topk_weights = torch.where(recv_topk_idx >= 0, weights, torch.zeros_like(weights))
    return DispatchReference(recv_x=recv_x, recv_topk_idx=recv_topk_idx, recv_topk_weights=recv_topk_weights,
                             num_recv_tokens_per_expert_list=list(plan.num_recv_tokens_per_expert),
                             recv_src_idx=torch.from_numpy(plan.src_idx.astype(np.int32)).to(device), plan=plan)


def reference_combine(is_token_in_rank, rows_from: Callable, hidden: int, topk_idx=None, topk_weights=None,
                      num_experts: int | None = None, bias=None):
    """Combine on source rank s: (combined_x [T, H] bf16, combined_topk_weights [T, K] float32 or None).

    is_token_in_rank: s's [T, R] bool. rows_from(d, tokens) -> [len(tokens), H]: the rows that rank d
    feeds to combine for s's `tokens` (lets a test describe every rank's combine input without holding
    it). combined_x[t] = sum over d with is_token_in_rank[t, d] of rows_from(d, t), plus each bias,
    summed in float32 and rounded once to bf16. combined_topk_weights[t, k] = sum over those d of the
    weight d received for slot k (the weight where the expert is on d, else 0), i.e. the original
    weight for valid slots and 0 for -1 slots."""
    torch = _require_torch()
    num_tokens, num_ranks = is_token_in_rank.shape
    device = is_token_in_rank.device
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
    for d in range(num_ranks):
        tokens = torch.nonzero(is_token_in_rank[:, d]).flatten()
        if tokens.numel():
            acc.index_add_(0, tokens, rows_from(d, tokens).float())
    biases = () if bias is None else (bias if isinstance(bias, tuple) else (bias,))
    for b in biases:
        acc += b.float()
    combined_topk_weights = None
    if topk_weights is not None:
        slot_rank = torch.from_numpy(expert_rank_np(_as_numpy(topk_idx), num_experts, num_ranks)).to(device)
        weights = topk_weights.float()
        combined_topk_weights = torch.zeros_like(weights)
        for d in range(num_ranks):
            on_d = (slot_rank == d) & is_token_in_rank[:, d:d + 1]
            combined_topk_weights += torch.where(on_d, weights, torch.zeros_like(weights))
    return acc.to(torch.bfloat16), combined_topk_weights
