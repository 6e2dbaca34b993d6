"""deep_ep.utils over moelink: EventHandle, EventOverlap, check_nvlink_connections (see moelink.compat)."""

from moelink import compat as _compat

globals().update(_compat.namespace(__name__))
__getattr__ = _compat.module_getattr(__name__)
