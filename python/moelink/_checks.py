"""The argument checks of the Buffer API, and the TRef tuple of a tensor (for tests and direct callers
of the extension; the operations pass tensors as they are).

Python checks only what it needs before it can allocate outputs or call the runtime (types, and the
ranks of tensors whose sizes it reads); the runtime checks dtypes, shapes and devices.
"""

from typing import Any, List, Optional, Tuple

import torch

from ._moelink import Config


def _check_int(value: Any, name: str, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = value.__index__()
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, int)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_tensor(value: Any, name: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")


def _check_dim(tensor: torch.Tensor, name: str, ndim: int) -> None:
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")


def _check_config(config: Any) -> Config:
    if not isinstance(config, Config):
        raise TypeError(f"config must be a moelink.Config or None, got {type(config).__name__}")
    return config


_DTYPE_NAMES: dict = {}


def _ref(tensor: Optional[torch.Tensor], name: str = "tensor") -> Optional[tuple]:
    """The TRef tuple the extension also takes: (data_ptr, dtype name, shape, strides, device
    ordinal). The operations pass tensors as they are (the extension reads them itself); tests and
    callers of the extension's methods use this."""
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor):
        _check_tensor(tensor, name)
    dtype = tensor.dtype
    dtype_name = _DTYPE_NAMES.get(dtype)
    if dtype_name is None:
        dtype_name = _DTYPE_NAMES[dtype] = str(dtype)[len("torch."):]
    return (tensor.data_ptr(), dtype_name, tensor.shape, tensor.stride(), tensor.get_device() if tensor.is_cuda else -1)


def _split_x(x: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(x, torch.Tensor):
        return x, None
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(t, torch.Tensor) for t in x):
        return x[0], x[1]
    raise TypeError("x must be a bf16 torch.Tensor [num_tokens, hidden] or a tuple (fp8 torch.Tensor "
                    "[num_tokens, hidden], scales: float32 [num_tokens, hidden / 128] or packed UE8M0 int32 "
                    f"[num_tokens, ceil(hidden / 512)]), got {type(x).__name__}")


def _split_bias(bias: Any) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    if bias is None:
        return None, None
    if isinstance(bias, torch.Tensor):
        return bias, None
    if isinstance(bias, (tuple, list)):
        if len(bias) > 2:
            raise ValueError(f"bias takes at most two tensors, got {len(bias)}")
        pair = list(bias) + [None] * (2 - len(bias))
        for i, t in enumerate(pair):
            _check_tensor(t, f"bias[{i}]", optional=True)
        return pair[0], pair[1]
    raise TypeError(f"bias must be a torch.Tensor, a tuple of at most two tensors, or None, got "
                    f"{type(bias).__name__}")


def _tensors(*values: Any) -> List[torch.Tensor]:
    return [t for t in values if isinstance(t, torch.Tensor)]
