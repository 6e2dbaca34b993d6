"""The C++ CPU tests' harness and their ctest registration: every MOELINK_TEST is its own ctest entry
(cpu.<name>), and a filter that selects nothing fails instead of passing empty."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest


@pytest.fixture(scope="module")
def binary(build_dir):
    path = build_dir / "moelink_cpu_tests"
    if not path.is_file():
        pytest.skip(f"{path} is not built (MOELINK_BUILD_TESTS=OFF?)")
    return path


def run(binary, *args):
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def listed(binary) -> list[str]:
    result = run(binary, "--list")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split()


def test_list_is_every_test_in_the_sources(repo_root, listed):
    in_sources = []
    for source in sorted((repo_root / "tests" / "cpu").glob("*.cpp")):
        in_sources += re.findall(r"^MOELINK_TEST\((\w+)\)", source.read_text(), re.MULTILINE)
    assert in_sources, "no MOELINK_TEST in tests/cpu/*.cpp"
    assert sorted(listed) == sorted(in_sources)
    assert len(set(listed)) == len(listed), "test names must be unique (each is a ctest entry)"


def test_ctest_has_one_entry_per_test(build_dir, listed):
    if shutil.which("ctest") is None:
        pytest.skip("ctest is not installed")
    result = subprocess.run(["ctest", "--test-dir", str(build_dir), "-N"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    registered = re.findall(r"Test\s+#\d+: (\S+)", result.stdout)
    assert sorted(name for name in registered if name.startswith("cpu.")) == sorted(f"cpu.{n}" for n in listed)


def test_exact_runs_one_test(binary, listed):
    result = run(binary, "--exact", listed[0])
    assert result.returncode == 0, result.stdout
    assert "1 passed, 0 failed" in result.stdout


def test_exact_needs_the_whole_name(binary, listed):
    result = run(binary, "--exact", listed[0][:-1])
    assert result.returncode != 0
    assert "no test is called" in result.stdout


def test_filter_matching_nothing_fails(binary):
    result = run(binary, "no_test_has_this_name")
    assert result.returncode != 0
    assert "0 passed, 0 failed" in result.stdout and "FAILED: no test" in result.stdout


def test_substring_filter_runs_matching_tests(binary, listed):
    expected = [name for name in listed if "topology" in name]
    result = run(binary, "topology")
    assert result.returncode == 0, result.stdout
    assert f"{len(expected)} passed, 0 failed" in result.stdout


def test_unknown_option_is_a_usage_error(binary):
    result = run(binary, "--no-such-option")
    assert result.returncode == 2 and "usage:" in result.stdout
