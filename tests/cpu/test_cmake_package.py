"""`cmake --install` gives a CMake package a C++ project can use: find_package(moelink) +
target_link_libraries(app moelink::moelink), with the installed version file honoured.

Builds tests/cpu/consumer/ (its own project, CXX only) against an install of the build tree into a
temporary prefix and runs it; it calls only what needs no GPU.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def configure(repo_root, prefix, binary_dir, *extra):
    command = ["cmake", "-S", str(repo_root / "tests" / "cpu" / "consumer"), "-B", str(binary_dir),
               f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release", *extra]
    if shutil.which("ninja"):
        command += ["-G", "Ninja"]
    return subprocess.run(command, capture_output=True, text=True)


def test_installed_layout(install_prefix, installed_library):
    cmake_dir = installed_library.parent / "cmake" / "moelink"
    for name in ("moelinkConfig.cmake", "moelinkConfigVersion.cmake", "moelinkTargets.cmake"):
        assert (cmake_dir / name).is_file(), f"{name} is not installed in {cmake_dir}"
    assert (install_prefix / "include" / "moelink" / "buffer.hpp").is_file()
    targets = (cmake_dir / "moelinkTargets.cmake").read_text()
    assert "moelink::moelink" in targets
    assert "find_dependency(CUDAToolkit)" in (cmake_dir / "moelinkConfig.cmake").read_text()


def test_consumer_builds_and_runs(repo_root, install_prefix, tmp_path, loader_env):
    version = (repo_root / "VERSION").read_text().strip()
    binary_dir = tmp_path / "consumer"
    result = configure(repo_root, install_prefix, binary_dir, f"-DREQUESTED_VERSION={version}")
    assert result.returncode == 0, f"configuring the consumer failed:\n{result.stdout}\n{result.stderr}"
    # The consumer's link resolves libmoelink's own dependencies too (the CUDA runtime): same environment.
    result = subprocess.run(["cmake", "--build", str(binary_dir)], capture_output=True, text=True, env=loader_env)
    assert result.returncode == 0, f"building the consumer failed:\n{result.stdout}\n{result.stderr}"
    executable = binary_dir / "consumer"
    result = subprocess.run([str(executable)], capture_output=True, text=True, env=loader_env, timeout=60)
    assert result.returncode == 0, f"the consumer failed:\n{result.stdout}\n{result.stderr}"
    assert f"moelink {version} consumer: ok" in result.stdout


def test_version_file_rejects_another_minor(repo_root, install_prefix, tmp_path):
    major, minor, _ = (int(part) for part in (repo_root / "VERSION").read_text().strip().split("."))
    result = configure(repo_root, install_prefix, tmp_path / "consumer", f"-DREQUESTED_VERSION={major}.{minor + 1}")
    assert result.returncode != 0, "find_package(moelink <next minor>) should not accept this install"
    assert "moelinkConfigVersion.cmake" in result.stderr or "version" in result.stderr.lower()
