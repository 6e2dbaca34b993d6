"""deep_ep V1's module layout over moelink, for code that writes ``import deep_ep``.

Frameworks import from three places: ``deep_ep`` (``Buffer``, ``Config``, ``EventOverlap``,
``topk_idx_t``), ``deep_ep.utils`` (``EventHandle``, ``EventOverlap``, ``check_nvlink_connections``)
and ``deep_ep.buffer`` (``Buffer``). This module is the one definition of that layout, used twice:

- ``install_as_deep_ep()`` registers it in ``sys.modules`` for the current process;
- the ``moelink-deep-ep`` distribution (``compat/deep_ep/``, ``pip install ./compat/deep_ep``) is an
  installed ``deep_ep`` package whose modules fill themselves from ``namespace()``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Any, Callable, Dict

# Set on every module of the deep_ep view (here and in the installed shim), so a real DeepEP can be
# told apart from us.
SHIM_MARKER = "__moelink_shim__"
MODULE_NAMES = ("deep_ep", "deep_ep.utils", "deep_ep.buffer")

# module -> the deep_ep names it holds; each is looked up on moelink under the same name.
_LAYOUT = {
    "deep_ep": ("Buffer", "Config", "EventOverlap"),
    "deep_ep.utils": ("EventHandle", "EventOverlap", "check_nvlink_connections"),
    "deep_ep.buffer": ("Buffer", "Config", "EventOverlap"),
}
# Resolved on first access: moelink.topk_idx_t needs torch, and its ImportError should come from use,
# not from ``import deep_ep`` on a torch-free machine.
_LAZY = {"deep_ep": ("topk_idx_t",)}
def _moelink_version() -> str:
    from . import __version__

    return __version__


def _moelink_attribute(name: str) -> Any:
    import moelink

    return getattr(moelink, name)


def namespace(module: str) -> Dict[str, Any]:
    """The names of deep_ep module ``module`` ("deep_ep", "deep_ep.utils" or "deep_ep.buffer"), as
    moelink provides them (without torch, moelink's stand-ins that raise ImportError on use)."""
    names: Dict[str, Any] = {SHIM_MARKER: True}
    for name in _LAYOUT[module]:
        names[name] = _moelink_attribute(name)
    if module == "deep_ep":
        names["__version__"] = _moelink_version()
    return names


def module_getattr(module: str) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` (PEP 562) resolving ``module``'s lazy names on use."""
    lazy = _LAZY.get(module, ())

    def __getattr__(name: str) -> Any:
        if name in lazy:
            return _moelink_attribute(name)  # moelink says why when torch is missing
        raise AttributeError(f"module {module!r} (moelink's deep_ep compatibility layer) has no attribute {name!r}")

    return __getattr__


def _make_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name, f"deep_ep V1's {name} over moelink (moelink.install_as_deep_ep).")
    module.__dict__.update(namespace(name))
    module.__getattr__ = module_getattr(name)  # type: ignore[attr-defined]
    is_package = name == "deep_ep"
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=is_package)
    if is_package:
        module.__path__ = []  # a package, so `import deep_ep.utils` is a submodule import
    return module


def _installed_deep_ep_origin() -> str | None:
    """Where an importable deep_ep package that is not moelink's lives, else None (never imports it)."""
    try:
        spec = importlib.util.find_spec("deep_ep")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        with open(spec.origin, encoding="utf-8") as source:
            if SHIM_MARKER in source.read():
                return None
    except OSError:
        pass
    return spec.origin


def install_as_deep_ep() -> types.ModuleType:
    """Makes ``import deep_ep``, ``deep_ep.utils`` and ``deep_ep.buffer`` give moelink in this process.

    For code that writes ``import deep_ep`` when installing the ``moelink-deep-ep`` shim is not wanted.
    Call it before that code imports deep_ep. Idempotent; returns the ``deep_ep`` module.

    Raises RuntimeError when a real DeepEP is already imported (replacing it under the code that holds
    it would mix the two). Warns when a real DeepEP is installed but not imported: from now on this
    process uses moelink under its name.
    """
    existing = sys.modules.get("deep_ep")
    if existing is not None:
        if getattr(existing, SHIM_MARKER, False):
            return existing
        where = getattr(existing, "__file__", None) or repr(existing)
        raise RuntimeError(
            f"moelink.install_as_deep_ep(): a deep_ep that is not moelink is already imported ({where}); "
            "call install_as_deep_ep() before anything imports deep_ep, or use that deep_ep instead")
    origin = _installed_deep_ep_origin()
    if origin is not None:
        warnings.warn(f"moelink.install_as_deep_ep(): deep_ep is installed at {origin}; this process now uses "
                      "moelink under the name deep_ep instead", RuntimeWarning, stacklevel=2)
    modules = {name: _make_module(name) for name in MODULE_NAMES}
    top = modules["deep_ep"]
    top.utils = modules["deep_ep.utils"]  # type: ignore[attr-defined]
    top.buffer = modules["deep_ep.buffer"]  # type: ignore[attr-defined]
    sys.modules.update(modules)
    return top
