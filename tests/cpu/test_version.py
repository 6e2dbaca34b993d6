"""One version, in VERSION: CMake's project version, the wheel's metadata (pyproject.toml through
scikit-build-core's regex provider), moelink.__version__, the deep_ep shim and CHANGELOG.md agree."""

from __future__ import annotations

import re

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


@pytest.fixture(scope="module")
def version(repo_root) -> str:
    text = (repo_root / "VERSION").read_text()
    assert re.fullmatch(r"\d+\.\d+\.\d+\n?", text), f"VERSION must be one line MAJOR.MINOR.PATCH, got {text!r}"
    return text.strip()


def test_cmake_project_version(version, cache):
    # The configured tree read VERSION (project(moelink VERSION ...)); a hard-coded version would drift.
    assert cache.get("CMAKE_PROJECT_VERSION") == version


def test_pyproject_reads_version_file(repo_root, version, monkeypatch):
    pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"], "pyproject.toml must not state a version of its own"
    assert "version" in pyproject["project"]["dynamic"]
    settings = pyproject["tool"]["scikit-build"]["metadata"]["version"]
    assert settings["provider"] == "scikit_build_core.metadata.regex"
    assert settings["input"] == "VERSION"
    # What the wheel build will compute, by the same provider the build uses.
    regex = pytest.importorskip("scikit_build_core.metadata.regex")
    monkeypatch.chdir(repo_root)
    options = {key: value for key, value in settings.items() if key != "provider"}
    assert str(regex.dynamic_metadata("version", options)) == version


def test_package_version(version):
    try:
        import moelink
    except ImportError as error:
        pytest.skip(f"moelink is not importable: {error}")
    assert moelink.__version__ == version


def test_changelog_has_this_version(repo_root, version):
    changelog = (repo_root / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (.+)$", changelog, re.MULTILINE)
    assert headings and headings[0].startswith("Unreleased"), "CHANGELOG.md starts with the Unreleased section"
    assert version in headings, f"CHANGELOG.md has no '## {version}' section"


def test_license_is_mit(repo_root):
    text = (repo_root / "LICENSE").read_text()
    assert text.startswith("MIT License") and "moelink developers" in text
