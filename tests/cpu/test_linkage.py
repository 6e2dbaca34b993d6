"""What the shared libraries link against: never libtorch / libc10 (the core and the extension are
torch-free, so one wheel serves every torch build), and installed copies are relocatable (their run
paths are $ORIGIN-relative; the build tree's may name absolute directories of this machine).

The wheel's layout is checked by tests/cpu/test_wheel.py.
"""

from __future__ import annotations

import re

import pytest

FORBIDDEN = re.compile(r"torch|c10", re.IGNORECASE)


def build_tree_libraries(build_dir):
    package = build_dir / "python" / "moelink"
    libraries = [package / "libmoelink.so"]
    libraries += sorted(package.glob("_moelink*.so"))
    return [path for path in libraries if path.is_file()]


def test_build_tree_needs_no_torch(build_dir, readelf):
    libraries = build_tree_libraries(build_dir)
    if not libraries:
        pytest.skip(f"nothing built under {build_dir}/python/moelink")
    assert any(path.name == "libmoelink.so" for path in libraries)
    for path in libraries:
        needed, _ = readelf(path)
        assert needed, f"readelf found no DT_NEEDED in {path}"
        bad = [name for name in needed if FORBIDDEN.search(name)]
        assert not bad, f"{path.name} links {bad}: the core and the extension must not depend on PyTorch"


def test_core_needs_no_python(build_dir, readelf):
    # libmoelink is the C++ API as well: it must load in a process without a Python interpreter.
    needed, _ = readelf(build_dir / "python" / "moelink" / "libmoelink.so")
    assert not [name for name in needed if name.startswith("libpython")]


def test_extension_finds_the_core_beside_it(build_dir, readelf):
    extensions = sorted((build_dir / "python" / "moelink").glob("_moelink*.so"))
    if not extensions:
        pytest.skip("the extension is not built")
    needed, paths = readelf(extensions[0])
    assert "libmoelink.so" in needed
    assert "$ORIGIN" in paths, f"{extensions[0].name} run paths {paths} lack $ORIGIN"


def test_installed_library(installed_library, readelf):
    needed, paths = readelf(installed_library)
    assert not [name for name in needed if FORBIDDEN.search(name)]
    absolute = [p for p in paths if not p.startswith("$ORIGIN")]
    assert not absolute, (f"installed {installed_library.name} has run paths {absolute} that are not "
                          "$ORIGIN-relative (see INSTALL_RPATH in CMakeLists.txt)")
