"""Output tensors in the receive arena: the memory peers write dispatched rows straight into."""

import math
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch

from . import _moelink

if TYPE_CHECKING:
    from .buffer import Buffer

# Tensors sharing one arena block each start at the alignment the runtime gives whole blocks, so a
# view is as aligned as a block of its own would be. The runtime owns the number; an extension that
# does not export it uses 512.
ARENA_ALIGNMENT: int = getattr(_moelink, "ARENA_ALIGNMENT", 512)


def arena_tensors(buf: "Buffer", parts: Sequence[Tuple[tuple, torch.dtype]],
                  separate: Sequence[Tuple[tuple, torch.dtype]] = (), stream: Optional[int] = None
                  ) -> Optional[List[torch.Tensor]]:
    """Tensors of the given (shape, dtype) in the receive arena, or None when it lacks room.

    ``parts`` share one block (they are dropped together); each of ``separate`` gets its own,
    so a handle keeping recv_src_idx does not pin recv_x's memory. ``stream`` (a CUDA stream
    handle; default the current stream) is where they are used first: a range freed by earlier
    tensors is handed out only after the work those queued."""
    if stream is None:
        stream = torch.cuda.current_stream(buf._device).cuda_stream
    if buf.runtime.num_arena_bytes == 0 or any(math.prod(shape) == 0 for shape, _ in parts):
        return None
    groups = [list(parts)] + [[part] for part in separate]
    out: List[torch.Tensor] = []
    for group in groups:
        offsets, total = [], 0
        for shape, dtype in group:
            total = (total + ARENA_ALIGNMENT - 1) // ARENA_ALIGNMENT * ARENA_ALIGNMENT
            offsets.append(total)
            total += math.prod(shape) * dtype.itemsize
        block = buf.runtime.arena_dlpack(total, stream)
        if block is None:
            return None  # the blocks taken so far go back to the arena with `out`
        raw = torch.from_dlpack(block)
        for (shape, dtype), offset in zip(group, offsets):
            size = math.prod(shape) * dtype.itemsize
            out.append(raw[offset:offset + size].view(dtype).view(shape))
    return out


def scales_column_major(x_scales: torch.Tensor) -> bool:
    """Whether [T, S] scales are column-major as torch makes them (empty((S, T)).t()): a token stride
    of 1, and either more than one scale or a scale stride other than 1. One token's column-major
    strides are (1, 1), so only the token stride tells them from row-major's (S, 1); one scale's
    are (1, T), where row-major's are (1, 1), so only the scale stride tells them (ue8m0 packs
    H 512 into one int32 column). The extension's add_recv_x decides it the same way."""
    return x_scales.stride(0) == 1 and (x_scales.size(1) > 1 or x_scales.stride(1) != 1)


def alloc_dispatch_outputs(buf: "Buffer", x: torch.Tensor, x_scales: Optional[torch.Tensor], hidden: int,
                           num_recv_tokens: int, num_topk: int = 0, with_weights: bool = False,
                           with_src_idx: bool = False, stream: Optional[int] = None
                           ) -> Tuple[Optional[torch.Tensor], ...]:
    """(recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx); num_topk == 0 leaves
    the top-k ones None, and recv_src_idx is None unless with_src_idx (an uncached dispatch).

    They come from the receive arena when it has room, so peers write rows straight into them;
    else from the caching allocator, whose segments peers map once they have seen them named
    twice (MOELINK_PEER_SEGMENTS), and until then the rows come through the rings."""
    n, device = num_recv_tokens, buf._device
    parts = [((n, hidden), x.dtype)]
    # Keep the caller's scale layout (column-major is what fp8 GEMMs read).
    scales_col_major = x_scales is not None and scales_column_major(x_scales)
    if x_scales is not None:
        num_scales = x_scales.size(1)
        parts.append(((num_scales, n) if scales_col_major else (n, num_scales), x_scales.dtype))
    if num_topk:
        parts.append(((n, num_topk), torch.int64))
        if with_weights:
            parts.append(((n, num_topk), torch.float32))
    separate = [((n,), torch.int32)] if with_src_idx else []
    # Asked of the Buffer, not of its runtime: the call to the extension is host time an uncached
    # dispatch's kernel waits for.
    tensors = arena_tensors(buf, parts, separate=separate, stream=stream) if buf.num_arena_bytes else None
    if tensors is None:
        tensors = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in parts + separate]
    taken = iter(tensors)
    recv_x = next(taken)
    recv_x_scales = None
    if x_scales is not None:
        recv_x_scales = next(taken)
        if scales_col_major:
            recv_x_scales = recv_x_scales.t()
    recv_topk_idx = next(taken) if num_topk else None
    recv_topk_weights = next(taken) if num_topk and with_weights else None
    recv_src_idx = next(taken) if with_src_idx else None
    return recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx
