"""deep_ep.buffer over moelink: Buffer (see moelink.compat)."""

from moelink import compat as _compat

globals().update(_compat.namespace(__name__))
__getattr__ = _compat.module_getattr(__name__)
