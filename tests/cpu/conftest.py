"""Fixtures shared by the packaging tests: the repository, the build tree under test, an install of it.

The build tree is $MOELINK_BUILD_DIR (scripts/test.sh exports the one it built), else build/. Tests
that need one skip when it is not configured, as the extension tests do when it is not built.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def cmake_cache(build_dir: Path) -> dict[str, str]:
    """NAME -> value of a configured tree's CMakeCache.txt."""
    values = {}
    for line in (build_dir / "CMakeCache.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z_][A-Za-z0-9_.+-]*):[A-Z]+=(.*)$", line)
        if match:
            values[match.group(1)] = match.group(2)
    return values


def dynamic_section(path: Path) -> tuple[list[str], list[str]]:
    """(DT_NEEDED names, RUNPATH/RPATH entries) of an ELF file, read with readelf."""
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.*?)\]", out)
    paths = []
    for entry in re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*?)\]", out):
        paths += [p for p in entry.split(":") if p]
    return needed, paths


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def build_dir() -> Path:
    path = Path(os.environ.get("MOELINK_BUILD_DIR") or REPO_ROOT / "build")
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not (path / "CMakeCache.txt").is_file():
        pytest.skip(f"no configured build tree at {path} (bash scripts/build.sh makes one)")
    return path


@pytest.fixture(scope="session")
def cache(build_dir) -> dict[str, str]:
    return cmake_cache(build_dir)


@pytest.fixture(scope="session")
def readelf():
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    return dynamic_section


@pytest.fixture(scope="session")
def install_prefix(build_dir, tmp_path_factory) -> Path:
    """`cmake --install` of the build tree into a fresh prefix (the C++ package layout)."""
    prefix = tmp_path_factory.mktemp("prefix")
    result = subprocess.run(["cmake", "--install", str(build_dir), "--prefix", str(prefix)],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"cmake --install failed:\n{result.stdout}\n{result.stderr}"
    return prefix


@pytest.fixture(scope="session")
def installed_library(install_prefix) -> Path:
    found = sorted(install_prefix.glob("lib*/libmoelink.so"))
    assert found, f"no lib*/libmoelink.so under {install_prefix}"
    return found[0]


@pytest.fixture(scope="session")
def loader_env(cache) -> dict[str, str]:
    """The environment to run a binary linked against an installed libmoelink. An installed copy
    carries no absolute run paths, so its dependencies outside the loader's default path (pip's
    NVSHMEM wheel always is; the CUDA runtime may be) come from LD_LIBRARY_PATH, as they would for
    a user (README, Install)."""
    env = dict(os.environ)
    directories = []
    for name in ("NVSHMEM_HOST_LIBRARY", "CUDA_cudart_LIBRARY"):
        library = cache.get(name, "")
        if library and not library.endswith("NOTFOUND"):
            directories.append(str(Path(library).resolve().parent))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*directories, env.get("LD_LIBRARY_PATH")]))
    return env
