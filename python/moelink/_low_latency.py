"""Low-latency mode: not implemented yet.

A Buffer built with ``low_latency_mode=True`` allocates its buffers, so deep_ep code constructs it
unchanged; these are the operations that then only say they are missing.
"""

from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple

import torch

from .event import EventOverlap

if TYPE_CHECKING:
    from .buffer import Buffer

_LOW_LATENCY_NOT_IMPLEMENTED = "low-latency mode is not implemented yet in moelink"


def rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    raise NotImplementedError(_LOW_LATENCY_NOT_IMPLEMENTED)


def clean_buffer(buf: "Buffer", num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
    raise NotImplementedError(_LOW_LATENCY_NOT_IMPLEMENTED)


def dispatch(buf: "Buffer", x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor],
             dispatch_wait_recv_cost_stats: Optional[torch.Tensor], use_fp8: bool, round_scale: bool,
             use_ue8m0: bool, async_finish: bool, return_recv_hook: bool
             ) -> Tuple[Any, torch.Tensor, tuple, EventOverlap, Callable]:
    raise NotImplementedError(_LOW_LATENCY_NOT_IMPLEMENTED)


def combine(buf: "Buffer", x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: tuple,
            use_logfmt: bool, zero_copy: bool, async_finish: bool, return_recv_hook: bool,
            out: Optional[torch.Tensor], combine_wait_recv_cost_stats: Optional[torch.Tensor]
            ) -> Tuple[torch.Tensor, EventOverlap, Callable]:
    raise NotImplementedError(_LOW_LATENCY_NOT_IMPLEMENTED)


def next_combine_buffer(buf: "Buffer", handle: tuple) -> torch.Tensor:
    raise NotImplementedError(_LOW_LATENCY_NOT_IMPLEMENTED)


def update_mask_buffer(buf: "Buffer", rank_to_mask: int, mask: bool) -> None:
    raise NotImplementedError(_LOW_LATENCY_NOT_IMPLEMENTED)


def query_mask_buffer(buf: "Buffer", mask_status: torch.Tensor) -> None:
    raise NotImplementedError(_LOW_LATENCY_NOT_IMPLEMENTED)


def clean_mask_buffer(buf: "Buffer") -> None:
    raise NotImplementedError(_LOW_LATENCY_NOT_IMPLEMENTED)
