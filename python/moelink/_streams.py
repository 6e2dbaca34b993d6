"""Stream ordering of one Buffer operation against the caller's stream."""

import contextlib
import warnings
from typing import TYPE_CHECKING, Any, Optional, Sequence, Tuple

import torch

from ._checks import _check_bool, _tensors
from .event import EventOverlap

if TYPE_CHECKING:
    from .buffer import Buffer


def warn_local_errors(buf: "Buffer", messages: Optional[Sequence[str]] = None) -> None:
    """Bad input this rank alone saw in a low-latency call (ids outside [-1, num_experts), an expert
    named twice in a token): the call went on, since its peers did, and poisoned the rows it spoilt.
    Raising here would desynchronise the ranks, so it is a warning (Buffer.runtime.check_device_errors()
    raises them instead). `messages`: those an express call already took (it returns them)."""
    for message in buf.runtime.take_local_errors() if messages is None else messages:
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def check_order(previous_event: Any, async_finish: Any, allocate_on_comm_stream: Any) -> Tuple[bool, bool]:
    """(async_finish, allocate_on_comm_stream) as bools, after the rules every operation shares."""
    if previous_event is not None and not isinstance(previous_event, EventOverlap):
        raise TypeError(f"previous_event must be an EventOverlap or None, got {type(previous_event).__name__}")
    async_finish = _check_bool(async_finish, "async_finish")
    allocate_on_comm_stream = _check_bool(allocate_on_comm_stream, "allocate_on_comm_stream")
    if allocate_on_comm_stream and (previous_event is None or not async_finish):
        raise ValueError("allocate_on_comm_stream=True requires previous_event (an EventOverlap) and "
                         "async_finish=True: outputs allocated on the comm stream are only safe when the "
                         "comm stream is ordered after previous_event and the caller waits on the result")
    return async_finish, allocate_on_comm_stream


def _current_raw_stream(device: int) -> int:
    """The current stream's handle on CUDA device `device`. torch.cuda.current_stream builds a Stream
    object per call (a few microseconds of the host path every operation pays); the raw handle is
    all the runtime takes."""
    if _get_raw_stream is not None:
        return _get_raw_stream(device)
    return torch.cuda.current_stream(device).cuda_stream


_get_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


class _OpStreams:
    """How one operation orders itself against the caller's stream (the same for every operation).

    The runtime runs the operation on the comm stream after ``previous_event`` (or the current
    stream). With ``async_finish`` the caller's stream does not wait, so the caching allocator must
    learn that the comm stream still uses the tensors, or it would hand their memory out again once
    the caller drops them.
    """

    def __init__(self, buffer: "Buffer", previous_event: Any, async_finish: Any,
                 allocate_on_comm_stream: Any) -> None:
        if previous_event is None and async_finish is False and allocate_on_comm_stream is False:
            self.async_finish = self.allocate_on_comm_stream = False  # the defaults, which pass every rule
        else:
            self.async_finish, self.allocate_on_comm_stream = check_order(previous_event, async_finish,
                                                                          allocate_on_comm_stream)
        self.buffer = buffer
        self.comm_stream = buffer._comm_stream
        self._compute_stream = None
        self.order = (_current_raw_stream(buffer._device),
                      previous_event.event if previous_event is not None else None,
                      self.async_finish, self.allocate_on_comm_stream)

    @property
    def compute_stream(self) -> torch.cuda.Stream:
        """The caller's stream as a torch object, made only when record_stream needs one."""
        if self._compute_stream is None:
            self._compute_stream = torch.cuda.current_stream(self.buffer._device)
        return self._compute_stream

    def allocating(self) -> Any:
        """The stream context output tensors are allocated under."""
        if self.allocate_on_comm_stream:
            return torch.cuda.stream(self.comm_stream)
        return contextlib.nullcontext()

    def allocation_stream(self) -> int:
        """The CUDA stream handle outputs are allocated on (what ``allocating`` makes current)."""
        return self.comm_stream.cuda_stream if self.allocate_on_comm_stream else self.order[0]

    def keeps_tensors(self) -> bool:
        """Whether finish needs the operation's tensors: with async_finish, a comm-stream
        allocation or a receive arena. Otherwise the caller's stream waits for the operation before
        anything it queues next, so the caching allocator's stream order alone keeps them safe, and
        finish_joined, which skips collecting them, is enough."""
        return self.async_finish or self.allocate_on_comm_stream or bool(self.buffer.num_arena_bytes)

    def finish_joined(self, event: Any) -> EventOverlap:
        """finish for an operation for which keeps_tensors() is False."""
        warn_local_errors(self.buffer)
        return EventOverlap(event)

    def finish(self, event: Any, inputs: Sequence[Any], outputs: Sequence[Any]) -> EventOverlap:
        inputs, outputs = _tensors(*inputs), _tensors(*outputs)
        if self.buffer.num_arena_bytes:
            # record_stream cannot see arena tensors (they are not the caching allocator's): tell the
            # arena instead, so that a range is reused only after both streams are done with it.
            runtime = self.buffer.runtime
            compute, comm = self.order[0], self.comm_stream.cuda_stream
            for t in inputs + outputs:
                runtime.arena_record_stream(t.data_ptr(), compute)
                runtime.arena_record_stream(t.data_ptr(), comm)
        if self.async_finish:
            for t in inputs:
                t.record_stream(self.comm_stream)
            if not self.allocate_on_comm_stream:
                for t in outputs:
                    t.record_stream(self.comm_stream)
        if self.allocate_on_comm_stream:
            # Allocated on the comm stream but consumed on the caller's: reuse must wait for both.
            for t in outputs:
                t.record_stream(self.compute_stream)
        warn_local_errors(self.buffer)
        return EventOverlap(event, extra_tensors=tuple(inputs + outputs))
