"""Other installed distributions that provide the import package ``deep_ep`` (a real DeepEP).

Standard library only: the shim's build backend runs this file as a script in the interpreter pip
installs into (``python -I _conflicts.py``, outside pip's build isolation), and ``deep_ep`` imports
it to warn at import time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import sys
import warnings

SHIM_DISTRIBUTION = "moelink-deep-ep"
PACKAGE = "deep_ep"
MARKER = "__moelink_shim__"  # present in the shim's deep_ep/__init__.py


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _describe(dist: importlib.metadata.Distribution) -> str:
    return f"{dist.metadata['Name']} {dist.version} ({dist.locate_file('')})"


def other_distributions() -> list[str]:
    """Every installed distribution except the shim whose name is deep_ep or whose top-level names
    include deep_ep. Reads each distribution's metadata: for the build-time check."""
    found = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if _normalize(name) == SHIM_DISTRIBUTION:
            continue
        top_level = (dist.read_text("top_level.txt") or "").split()
        if _normalize(name) == _normalize(PACKAGE) or PACKAGE in top_level:
            found.add(_describe(dist))
    return sorted(found)


def distribution_named_deep_ep() -> list[str]:
    """The quick form for import time: only a distribution called deep_ep (what DeepEP installs as);
    a lookup by name, not a scan of every installed distribution."""
    try:
        return [_describe(importlib.metadata.distribution(PACKAGE))]
    except importlib.metadata.PackageNotFoundError:
        return []


def foreign_package() -> list[str]:
    """An importable deep_ep that is not the shim and that no distribution claims (a develop install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.origin:
        return []
    try:
        with open(spec.origin, encoding="utf-8") as source:
            if MARKER in source.read():
                return []
    except OSError:
        return []
    return [f"the deep_ep package at {spec.origin}"]


def warn_if_shadowing(version: str) -> None:
    others = distribution_named_deep_ep()
    if others:
        warnings.warn(
            f"this deep_ep is moelink's compatibility package ({SHIM_DISTRIBUTION} {version}), but "
            f"{', '.join(others)} is installed too and also provides deep_ep; their files overwrite each "
            f"other. Keep one: `pip uninstall {SHIM_DISTRIBUTION}` (use DeepEP) or `pip uninstall deep_ep` "
            f"then `pip install --force-reinstall ./compat/deep_ep` (use moelink)",
            RuntimeWarning, stacklevel=3)


if __name__ == "__main__":
    # The build backend's question: what in this interpreter's environment would we overwrite?
    json.dump(sorted(set(other_distributions()) | set(foreign_package())), sys.stdout)
