"""The MOELINK_* environment variables the Python side reads, all of them.

Each is read when it is needed, not at import, so a job may set it after ``import moelink`` and
before building its Buffer. (The runtime reads its own, e.g. the timeout, in C++.)
"""

import os


def arena_bytes() -> int:
    """``MOELINK_ARENA_BYTES``: bytes of receive arena when Buffer gets ``num_arena_bytes=None``;
    default 0 (no arena). Any float literal is accepted, so ``2e9`` works."""
    value = os.environ.get("MOELINK_ARENA_BYTES", "0")
    try:
        num_bytes = int(float(value))
    except ValueError:
        raise ValueError(f"MOELINK_ARENA_BYTES must be a number of bytes, got {value!r}") from None
    if num_bytes < 0:
        raise ValueError(f"MOELINK_ARENA_BYTES must be >= 0, got {value!r}")
    return num_bytes


def experimental_low_latency() -> bool:
    """``MOELINK_EXPERIMENTAL_LOW_LATENCY`` (0/1, default 1): 0 switches the low-latency operations
    off (they raise NotImplementedError). On by default since their GPU suite passed on one H200
    (ranks under MPS); kept as a switch while the mode has not run across real NVLink."""
    value = os.environ.get("MOELINK_EXPERIMENTAL_LOW_LATENCY", "1")
    if value not in ("0", "1"):
        raise ValueError(f"MOELINK_EXPERIMENTAL_LOW_LATENCY must be 0 or 1, got {value!r}")
    return value == "1"


def experimental_internode() -> bool:
    """``MOELINK_EXPERIMENTAL_INTERNODE`` (0/1, default 0): run internode normal mode (python/moelink/
    _internode.py) over nodes emulated on one host (its GPU suite passed there; the NVSHMEM leg
    between hosts is not written); without it internode dispatch and combine raise
    NotImplementedError."""
    value = os.environ.get("MOELINK_EXPERIMENTAL_INTERNODE", "0")
    if value not in ("0", "1"):
        raise ValueError(f"MOELINK_EXPERIMENTAL_INTERNODE must be 0 or 1, got {value!r}")
    return value == "1"


def torch_shim() -> bool:
    """``MOELINK_TORCH_SHIM`` (0/1, default 1): the extension makes an operation's output tensors
    through torch's C shim (one C++ allocation each, the Python tensors made after the kernel's
    launch) and reads the express calls' tensor arguments through it, where the loaded torch has one
    that passes the extension's check; 0 makes every output with a Python call into torch and reads
    every argument through its Python attributes, as before (python/bindings/convert.hpp). Read at
    each Buffer's construction."""
    value = os.environ.get("MOELINK_TORCH_SHIM", "1")
    if value not in ("0", "1"):
        raise ValueError(f"MOELINK_TORCH_SHIM must be 0 or 1, got {value!r}")
    return value == "1"


def nvl_ranks(num_ranks: int) -> int:
    """``MOELINK_NVL_RANKS``: GPUs per node; default ``min(num_ranks, 8)`` (deep_ep fixes it at 8,
    which splits jobs on nodes of fewer GPUs wrongly)."""
    value = os.environ.get("MOELINK_NVL_RANKS")
    if value is None:
        return min(num_ranks, 8)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"MOELINK_NVL_RANKS must be an int, got {value!r}") from None
