"""The moelink-deep-ep distribution (compat/deep_ep): its wheel, an install next to moelink, and the
two guards against shadowing a real DeepEP (the build backend refuses to build for an environment
that has one; `import deep_ep` warns when one is installed too)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

SHIM = "compat/deep_ep"


@pytest.fixture(scope="module")
def backend(repo_root):
    path = repo_root / SHIM / "_backend" / "moelink_shim_backend.py"
    spec = importlib.util.spec_from_file_location("moelink_shim_backend", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def moelink_path(build_dir):
    path = build_dir / "python"
    if not sorted((path / "moelink").glob("_moelink*.so")):
        pytest.skip("the moelink extension is not built")
    return path


def fake_deep_ep(site: Path, with_package: bool = True) -> None:
    """What DeepEP's own setup.py leaves in site-packages (distribution deep_ep, top-level deep_ep)."""
    info = site / "deep_ep-1.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: deep_ep\nVersion: 1.0.0\n")
    (info / "top_level.txt").write_text("deep_ep\ndeep_ep_cpp\n")
    if with_package:
        (site / "deep_ep").mkdir()
        (site / "deep_ep" / "__init__.py").write_text("# the real DeepEP\n")


def python(*args, env=None, cwd=None):
    return subprocess.run([*args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_wheel(backend, repo_root, tmp_path):
    name = backend.build_wheel(str(tmp_path))
    version = (repo_root / "VERSION").read_text().strip()
    assert name == f"moelink_deep_ep-{version}-py3-none-any.whl"
    with zipfile.ZipFile(tmp_path / name) as wheel:
        names = set(wheel.namelist())
        info = f"moelink_deep_ep-{version}.dist-info"
        assert {"deep_ep/__init__.py", "deep_ep/utils.py", "deep_ep/buffer.py", "deep_ep/_conflicts.py",
                f"{info}/METADATA", f"{info}/WHEEL", f"{info}/RECORD"} <= names
        metadata = wheel.read(f"{info}/METADATA").decode()
        assert "Name: moelink-deep-ep\n" in metadata and f"Version: {version}\n" in metadata
        assert "Requires-Dist" not in metadata  # see the backend: no index lookups for "moelink"
        for line in wheel.read(f"{info}/RECORD").decode().splitlines():
            path, digest, size = line.split(",")
            if path.endswith("RECORD"):
                continue
            data = wheel.read(path)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={expected}" and int(size) == len(data), f"RECORD is wrong for {path}"
    (tmp_path / "again").mkdir()
    backend.build_wheel(str(tmp_path / "again"))
    assert (tmp_path / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), "wheel is not reproducible"


def test_sdist_builds_the_same_wheel(backend, tmp_path):
    import tarfile

    name = backend.build_sdist(str(tmp_path))
    with tarfile.open(tmp_path / name) as sdist:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.12 (and security backports) warn without one
            sdist.extractall(tmp_path / "src", filter="data")
        else:
            sdist.extractall(tmp_path / "src")
    root = tmp_path / "src" / name[:-len(".tar.gz")]
    spec = importlib.util.spec_from_file_location("sdist_backend", root / "_backend" / "moelink_shim_backend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.version() == backend.version()  # from the VERSION copied into the sdist
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert module.build_wheel(str(tmp_path / "a")) == backend.build_wheel(str(tmp_path / "b"))


def test_pip_install_and_import(repo_root, moelink_path, tmp_path):
    target = tmp_path / "site"
    result = python(sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
                    str(repo_root / SHIM))
    assert result.returncode == 0, result.stdout + result.stderr
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(moelink_path)]))
    script = textwrap.dedent("""
        import deep_ep, moelink
        from deep_ep import Buffer, Config, EventOverlap
        from deep_ep.utils import EventHandle, EventOverlap as UtilsEventOverlap, check_nvlink_connections
        from deep_ep.buffer import Buffer as BufferFromBuffer
        assert Config is moelink.Config and Buffer is moelink.Buffer is BufferFromBuffer
        assert EventOverlap is UtilsEventOverlap is moelink.EventOverlap
        assert deep_ep.__moelink_shim__ and deep_ep.__version__ == moelink.__version__
        assert EventHandle is moelink.EventHandle and check_nvlink_connections is moelink.check_nvlink_connections
        print("ok")
    """)
    result = python(sys.executable, "-W", "error", "-c", script, env=env, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_import_warns_next_to_a_real_deep_ep(repo_root, moelink_path, tmp_path):
    other = tmp_path / "other-site"
    fake_deep_ep(other, with_package=False)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo_root / SHIM), str(moelink_path), str(other)]))
    result = python(sys.executable, "-W", "always", "-c", "import deep_ep", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "deep_ep 1.0.0" in result.stderr and "also provides deep_ep" in result.stderr


def test_import_without_moelink_says_what_to_install(repo_root, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(repo_root / SHIM))
    script = "import sys; sys.modules['moelink'] = None; import deep_ep"  # None: moelink is not importable
    result = python(sys.executable, "-c", script, env=env, cwd=tmp_path)
    assert result.returncode != 0 and "needs moelink" in result.stderr


@pytest.fixture
def venv(tmp_path):
    """A bare environment (no pip: nothing to download) whose site-packages the test controls."""
    path = tmp_path / "venv"
    result = python(sys.executable, "-m", "venv", "--without-pip", str(path))
    if result.returncode != 0:
        pytest.skip(f"cannot create a venv: {result.stderr}")
    interpreter = path / "bin" / "python"
    site = Path(python(str(interpreter), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    return interpreter, site


def build_in(interpreter, repo_root, out, settings=None):
    script = (f"import sys; sys.path.insert(0, {str(repo_root / SHIM / '_backend')!r}); "
              f"import moelink_shim_backend as b; print(b.build_wheel({str(out)!r}, {settings!r}))")
    return python(str(interpreter), "-c", script)


def test_backend_refuses_an_environment_with_deep_ep(repo_root, venv, tmp_path):
    interpreter, site = venv
    assert build_in(interpreter, repo_root, tmp_path).returncode == 0  # a clean environment builds
    fake_deep_ep(site)
    result = build_in(interpreter, repo_root, tmp_path)
    assert result.returncode != 0
    assert "deep_ep 1.0.0" in result.stderr and "would overwrite that DeepEP's files" in result.stderr
    warned = build_in(interpreter, repo_root, tmp_path, {"deep-ep-conflict": "warn"})
    assert warned.returncode == 0 and "WARNING" in warned.stderr


def pip_into(interpreter, *args):
    if "--python" not in python(sys.executable, "-m", "pip", "--help").stdout:
        pytest.skip("this pip cannot install into another interpreter (pip --python needs pip >= 22.3)")
    return python(sys.executable, "-m", "pip", "--python", str(interpreter), "install", "--no-index", "--no-deps", *args)


def test_pip_installs_and_reinstalls_into_a_clean_environment(repo_root, venv):
    interpreter, site = venv
    for extra in ([], ["--force-reinstall"]):  # the shim itself is no conflict
        result = pip_into(interpreter, *extra, str(repo_root / SHIM))
        assert result.returncode == 0, result.stdout + result.stderr
    assert "__moelink_shim__" in (site / "deep_ep" / "__init__.py").read_text()
    # That environment has no moelink: importing says so.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = python(str(interpreter), "-c", "import deep_ep", env=env, cwd=site)
    assert result.returncode != 0 and "needs moelink" in result.stderr


def test_pip_refuses_to_install_over_deep_ep(repo_root, venv):
    interpreter, site = venv
    fake_deep_ep(site)
    result = pip_into(interpreter, str(repo_root / SHIM))
    assert result.returncode != 0
    assert "would overwrite that DeepEP's files" in result.stdout + result.stderr
    assert (site / "deep_ep" / "__init__.py").read_text() == "# the real DeepEP\n"
