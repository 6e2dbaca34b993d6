"""What deep_ep V1 keeps in ``deep_ep.utils``: ``EventHandle``, ``EventOverlap``, ``check_nvlink_connections``."""

import socket
import warnings
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from . import _moelink
from ._nvlink import local_problems
from .event import EventOverlap

__all__ = ["EventHandle", "EventOverlap", "check_nvlink_connections"]


class EventHandle(_moelink.EventHandle):
    """A CUDA event recorded on the current torch stream when constructed (deep_ep's ``EventHandle()``).

    Frameworks pass ``EventOverlap(EventHandle())`` as ``previous_event``, so that the operation runs
    after everything queued so far on their stream.
    """

    def __init__(self) -> None:
        super().__init__(torch.cuda.current_stream().cuda_stream)

    def current_stream_wait(self) -> None:
        """Makes the current torch stream wait for the event (the host does not block)."""
        self.stream_wait(torch.cuda.current_stream().cuda_stream)


def _device_uuid(device: int) -> str:
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def check_nvlink_connections(group: Optional["dist.ProcessGroup"] = None) -> None:
    """Checks that every two ranks of ``group`` on one host but on different GPUs are connected by NVLink.

    A collective over ``group`` (default: the world group): every rank must call it. Every rank raises the same RuntimeError naming the pairs
    without NVLink, so no rank goes on alone. Ranks sharing a GPU, and ranks on different hosts, are
    not checked. Where NVML (``pip install nvidia-ml-py``) is not available the check is skipped with
    a warning.
    """
    if group is None:
        group = dist.group.WORLD
    host = socket.gethostname()
    entries: List[Any] = [None] * group.size()
    dist.all_gather_object(entries, (host, _device_uuid(torch.cuda.current_device())), group=group)
    # Each host is checked by its first rank; the findings go to everyone.
    first = min(r for r, (h, _) in enumerate(entries) if h == host)
    mine = local_problems(entries, host) if group.rank() == first else []
    found: List[Any] = [None] * group.size()
    dist.all_gather_object(found, mine, group=group)
    if any(f is None for f in found):
        warnings.warn("moelink.check_nvlink_connections: NVML (pynvml, from nvidia-ml-py) is not available on "
                      "some host; NVLink connectivity was not checked there", RuntimeWarning, stacklevel=2)
    problems = [p for f in found if f for p in f]
    if problems:
        raise RuntimeError("moelink.check_nvlink_connections: " + "; ".join(problems))
