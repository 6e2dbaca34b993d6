"""deep_ep, provided by moelink (the moelink-deep-ep distribution).

Code written for DeepEP V1 (``import deep_ep``; ``from deep_ep.utils import EventOverlap``; ``from
deep_ep.buffer import Buffer``) runs on moelink. The names come from ``moelink.compat``, the same
layout ``moelink.install_as_deep_ep()`` installs in-process; a name moelink does not provide yet
raises NotImplementedError naming it when used.
"""

__moelink_shim__ = True  # tells this package apart from a real DeepEP (build backend, moelink.compat)

from . import _conflicts  # noqa: E402

try:
    from moelink import compat as _compat
except ModuleNotFoundError as error:
    if error.name != "moelink":
        raise
    raise ImportError("deep_ep here is moelink's compatibility package (moelink-deep-ep) and needs moelink; "
                      "install it too: pip install <moelink checkout>") from error

globals().update(_compat.namespace(__name__))
__getattr__ = _compat.module_getattr(__name__)
_conflicts.warn_if_shadowing(__version__)  # noqa: F821 - set by namespace()

from . import buffer, utils  # noqa: E402,F401
