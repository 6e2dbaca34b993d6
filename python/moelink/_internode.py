"""Internode normal mode (NVLink within a node, RDMA between nodes): not implemented yet.

Buffer.dispatch and Buffer.combine come here when the ranks span more than one node, so these are
where the implementation goes; until then they only say so.
"""

from typing import TYPE_CHECKING, Optional, Tuple, Union

import torch

from ._moelink import Config
from .event import EventOverlap

if TYPE_CHECKING:
    from .buffer import Buffer

_INTERNODE_NOT_IMPLEMENTED = "internode normal mode is not implemented yet in moelink"


def dispatch(buf: "Buffer", x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], handle: Optional[tuple],
             num_tokens_per_rank: Optional[torch.Tensor], num_tokens_per_rdma_rank: Optional[torch.Tensor],
             is_token_in_rank: Optional[torch.Tensor], num_tokens_per_expert: Optional[torch.Tensor],
             topk_idx: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor], expert_alignment: int,
             num_worst_tokens: int, config: Optional[Config], previous_event: Optional[EventOverlap],
             async_finish: bool, allocate_on_comm_stream: bool) -> tuple:
    raise NotImplementedError(_INTERNODE_NOT_IMPLEMENTED)


def combine(buf: "Buffer", x: torch.Tensor, handle: tuple, topk_weights: Optional[torch.Tensor],
            bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None], config: Optional[Config],
            previous_event: Optional[EventOverlap], async_finish: bool, allocate_on_comm_stream: bool) -> tuple:
    raise NotImplementedError(_INTERNODE_NOT_IMPLEMENTED)
