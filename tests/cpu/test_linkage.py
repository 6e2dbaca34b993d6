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


# ---- NVSHMEM is a plugin, not a dependency -------------------------------------------------------

def test_core_does_not_link_nvshmem(build_dir, readelf):
    needed, _ = readelf(build_dir / "python" / "moelink" / "libmoelink.so")
    assert not [name for name in needed if "nvshmem" in name], \
        f"libmoelink links {needed}: NVSHMEM belongs in libmoelink_nvshmem.so, opened on first use"


def test_plugin_links_nvshmem(build_dir, readelf):
    plugin = build_dir / "python" / "moelink" / "libmoelink_nvshmem.so"
    if not plugin.is_file():
        pytest.skip("built without NVSHMEM")
    needed, _ = readelf(plugin)
    assert any(name.startswith("libnvshmem_host") for name in needed), needed
    assert not [name for name in needed if FORBIDDEN.search(name)]


def _copy_package(build_dir, tmp_path):
    import shutil

    target = tmp_path / "python"
    shutil.copytree(build_dir / "python", target)
    return target


def _run_python(python_path, code):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["PYTHONPATH"] = str(python_path)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


REQUIRE = """
import moelink
from moelink import _moelink
moelink.Config(24, 6, 256)  # the intranode side works
try:
    _moelink.nvshmem_require()
except RuntimeError as error:
    print("refused:", error)
else:
    print("loaded")
"""


def test_nvshmem_loads_on_demand(build_dir):
    if not (build_dir / "python" / "moelink" / "libmoelink_nvshmem.so").is_file():
        pytest.skip("built without NVSHMEM")
    result = _run_python(build_dir / "python", REQUIRE)
    assert result.returncode == 0 and result.stdout.strip() == "loaded", result.stdout + result.stderr


def test_without_nvshmem_installed(build_dir, tmp_path):
    """moelink imports where NVSHMEM is missing; using it says what to install."""
    import shutil
    import subprocess

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a stand-in plugin")
    package = _copy_package(build_dir, tmp_path)
    # A plugin that needs a library the loader cannot find, built against a stand-in that is then
    # deleted: the loader finds the plugin but not its NVSHMEM, as on a machine without it. The
    # stand-in's name is one no machine has; a real libnvshmem_host.so.3 on the system path (CI
    # machines may have one) would otherwise be found and the stand-in plugin loaded.
    missing = "libmoelink_test_no_such_nvshmem.so.3"
    stand_in = tmp_path / "stand-in"
    stand_in.mkdir()
    source = tmp_path / "empty.c"
    source.write_text("int moelink_stand_in;\n")
    for args in (["-o", str(stand_in / missing), f"-Wl,-soname,{missing}"],
                 ["-o", str(package / "moelink" / "libmoelink_nvshmem.so"), f"-L{stand_in}",
                  "-Wl,--no-as-needed", f"-l:{missing}"]):
        result = subprocess.run([compiler, "-shared", "-fPIC", str(source), *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    shutil.rmtree(stand_in)
    result = _run_python(package, REQUIRE)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.startswith("refused:") and missing in out, out
    assert "libnvshmem_host.so.3" in out and "pip install nvidia-nvshmem-cu13" in out, out


def test_without_the_plugin(build_dir, tmp_path):
    package = _copy_package(build_dir, tmp_path)
    (package / "moelink" / "libmoelink_nvshmem.so").unlink(missing_ok=True)
    result = _run_python(package, REQUIRE)
    assert result.returncode == 0 and result.stdout.startswith("refused:"), result.stdout + result.stderr
    assert "missing from this installation" in result.stdout or "built without NVSHMEM" in result.stdout, result.stdout


def test_plugin_exports_only_its_entry(build_dir):
    """The plugin holds a static copy of NVSHMEM's device library; none of its symbols may be bound to
    (or from) another NVSHMEM copy in the process (a DeepEP beside us)."""
    import shutil
    import subprocess

    plugin = build_dir / "python" / "moelink" / "libmoelink_nvshmem.so"
    if not plugin.is_file():
        pytest.skip("built without NVSHMEM")
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is not installed")
    out = subprocess.run(["nm", "-D", "--defined-only", str(plugin)], capture_output=True, text=True, check=True)
    names = [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]
    assert names == ["moelink_nvshmem_ops"], names
