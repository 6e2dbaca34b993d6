"""moelink: expert-parallel MoE communication (dispatch / combine) with the Python API of deep_ep V1.

``import moelink as deep_ep`` is meant to work. The C++ core lives in the ``_moelink`` extension, which
has no PyTorch dependency; the torch-facing classes (``Buffer``, ``EventOverlap``) load only when torch
is installed, so ``import moelink`` (and ``moelink.Config``) still works on machines without it.
"""

# torch first: it loads the CUDA runtime its wheel ships (libcudart.so.13), which libmoelink then
# shares instead of needing one on the loader path of its own.
try:
    import torch as _torch
except ImportError:
    _torch = None

from . import _moelink  # noqa: E402
from ._moelink import Config  # noqa: E402

__version__ = "0.1.0"

if _torch is not None:
    from .buffer import Buffer
    from .event import EventOverlap

    # The dtype of expert indices (topk_idx) everywhere in the API.
    topk_idx_t = _torch.int64
else:

    class _NeedsTorch(type):
        # Fails on use rather than on import, so torch-free code can still reach Config.
        def __call__(cls, *args, **kwargs):
            raise ImportError(f"moelink.{cls.__name__} needs PyTorch")

        def __getattr__(cls, name):
            raise ImportError(f"moelink.{cls.__name__} needs PyTorch")

    class Buffer(metaclass=_NeedsTorch):
        pass

    class EventOverlap(metaclass=_NeedsTorch):
        pass

    def __getattr__(name):
        if name == "topk_idx_t":
            raise ImportError("moelink.topk_idx_t needs PyTorch")
        raise AttributeError(f"module 'moelink' has no attribute {name!r}")


__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t", "__version__"]
