"""EventOverlap: the handle every communication call returns, for overlapping it with compute."""

from typing import Any, Optional, Tuple

import torch

from . import _moelink


class EventOverlap:
    """A CUDA event recorded at the end of a communication operation.

    Arguments:
        event: a ``_moelink.EventHandle`` recorded at the operation's end on the communication
            stream (a low-latency call with neither previous_event nor async_finish: on the
            caller's stream, when first used), or None (nothing to wait for).
        extra_tensors: tensors to keep alive until this object is dropped. With ``async_finish`` the
            communication stream may still read or write them after the call returned, so the
            caller's references alone must not decide when their memory is reused.

    Used as a context manager, leaving the ``with`` block makes the current stream wait for the event::

        _, _, _, _, event = buffer.get_dispatch_layout(topk_idx, num_experts, async_finish=True)
        with event:
            ...  # compute that overlaps the communication
        # the current stream now waits for the layout
    """

    def __init__(self, event: Optional[_moelink.EventHandle] = None,
                 extra_tensors: Optional[Tuple[torch.Tensor, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Makes the current CUDA stream wait for the event (GPU-side; the host does not block).
        Does nothing when there is no event."""
        if self.event is not None:
            self.event.stream_wait(torch.cuda.current_stream().cuda_stream)

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        self.current_stream_wait()
