"""PEP 517 build backend of moelink-deep-ep: a pure-Python wheel of ../deep_ep, standard library only.

Why a backend of our own: the shim must build on offline GPU hosts under pip's build isolation
(``requires = []``, so nothing is fetched), and pip runs no code of ours at install time except a
backend hook, so the hook is where a real DeepEP can be protected from being overwritten.

The check: before building, ``deep_ep/_conflicts.py`` runs as a script in the interpreter pip is
installing into (``sys.executable -I``: isolated mode ignores the PYTHONPATH through which pip's
build isolation hides that interpreter's site-packages). If another distribution provides
``deep_ep`` there, the build fails with what to do. ``--config-settings deep-ep-conflict=warn``
builds anyway (e.g. a wheel made for another machine). Limits: pip's --target, --prefix and --user
install elsewhere than that environment, and a wheel built once and installed later skips the
hook; ``import deep_ep`` then still warns (deep_ep/_conflicts.py).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

NAME = "moelink-deep-ep"
WHEEL_NAME = "moelink_deep_ep"  # the distribution name as wheel and dist-info file names spell it
SUMMARY = "The deep_ep import name over moelink (DeepEP V1's module layout) for code that writes `import deep_ep`"
SOURCE_DIR = Path(__file__).resolve().parents[1]  # compat/deep_ep
PACKAGE_DIR = SOURCE_DIR / "deep_ep"
TAG = "py3-none-any"
# Fixed timestamps make the wheel byte-for-byte reproducible.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def version() -> str:
    """The repository's VERSION (one version for moelink and this shim); an sdist carries a copy."""
    for candidate in (SOURCE_DIR / "VERSION", SOURCE_DIR.parents[1] / "VERSION"):
        if candidate.is_file():
            return candidate.read_text().strip()
    raise RuntimeError(f"{NAME}: no VERSION file next to {SOURCE_DIR} or at the repository root")


def _metadata(ver: str) -> str:
    # No Requires-Dist on moelink: it is installed from a checkout, and a requirement would send pip
    # to the package index for a "moelink" that is not ours. deep_ep/__init__.py says when it is missing.
    return (f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {ver}\nSummary: {SUMMARY}\n"
            "License: MIT\nRequires-Python: >=3.10\n")


def _wheel_file() -> str:
    return f"Wheel-Version: 1.0\nGenerator: moelink_shim_backend\nRoot-Is-Purelib: true\nTag: {TAG}\n"


def _dist_info(ver: str) -> str:
    return f"{WHEEL_NAME}-{ver}.dist-info"


def _conflicts() -> list[str]:
    """Distributions other than ours that provide deep_ep in the environment pip installs into."""
    result = subprocess.run([sys.executable, "-I", str(PACKAGE_DIR / "_conflicts.py")],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{NAME}: could not inspect the target environment ({sys.executable}):\n{result.stderr}")
    return json.loads(result.stdout or "[]")


def check_target_environment(config_settings: dict | None) -> None:
    others = _conflicts()
    if not others:
        return
    message = (f"{NAME} installs the import package deep_ep, which this environment ({sys.executable}) "
               f"already has from: {'; '.join(others)}. Installing would overwrite that DeepEP's files. "
               "Either `pip uninstall deep_ep` first, or keep DeepEP and call moelink.install_as_deep_ep() "
               "in-process instead. To build anyway (a wheel for another machine): "
               "--config-settings deep-ep-conflict=warn")
    if (config_settings or {}).get("deep-ep-conflict") == "warn":
        warnings.warn(message)
        print(f"WARNING: {message}", file=sys.stderr)
        return
    raise RuntimeError(message)


def _package_files() -> list[tuple[str, bytes]]:
    files = sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)
    return [(p.relative_to(SOURCE_DIR).as_posix(), p.read_bytes()) for p in files]


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def _write_wheel(wheel_directory: str, entries: list[tuple[str, bytes]], ver: str) -> str:
    dist_info = _dist_info(ver)
    entries = entries + [(f"{dist_info}/METADATA", _metadata(ver).encode()),
                         (f"{dist_info}/WHEEL", _wheel_file().encode())]
    license_file = SOURCE_DIR.parents[1] / "LICENSE"
    if license_file.is_file():
        entries.append((f"{dist_info}/LICENSE", license_file.read_bytes()))
    record_path = f"{dist_info}/RECORD"
    record = "\n".join([_record_line(p, d) for p, d in entries] + [f"{record_path},,"]) + "\n"
    entries.append((record_path, record.encode()))
    filename = f"{WHEEL_NAME}-{ver}-{TAG}.whl"
    with zipfile.ZipFile(Path(wheel_directory) / filename, "w", zipfile.ZIP_DEFLATED) as wheel:
        for path, data in entries:
            info = zipfile.ZipInfo(path, ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(info, data)
    return filename


# ---- PEP 517 hooks ------------------------------------------------------------------------------

def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    check_target_environment(config_settings)  # pip asks for metadata first: fail early
    ver = version()
    target = Path(metadata_directory) / _dist_info(ver)
    target.mkdir(parents=True, exist_ok=True)
    (target / "METADATA").write_text(_metadata(ver))
    (target / "WHEEL").write_text(_wheel_file())
    return target.name


prepare_metadata_for_build_editable = prepare_metadata_for_build_wheel


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    check_target_environment(config_settings)
    return _write_wheel(wheel_directory, _package_files(), version())


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    """pip install -e: a .pth file puts compat/deep_ep on sys.path, so edits take effect directly."""
    check_target_environment(config_settings)
    pth = (str(SOURCE_DIR) + os.linesep).encode()
    return _write_wheel(wheel_directory, [(f"{WHEEL_NAME}.pth", pth)], version())


def build_sdist(sdist_directory, config_settings=None):
    ver = version()
    root = f"{WHEEL_NAME}-{ver}"
    filename = f"{root}.tar.gz"
    members = [("pyproject.toml", (SOURCE_DIR / "pyproject.toml").read_bytes()),
               ("_backend/moelink_shim_backend.py", Path(__file__).read_bytes()),
               ("VERSION", (ver + "\n").encode()),  # the repository's VERSION is not in the sdist
               ("PKG-INFO", _metadata(ver).encode())] + _package_files()
    with tarfile.open(Path(sdist_directory) / filename, "w:gz", format=tarfile.PAX_FORMAT) as sdist:
        for path, data in members:
            info = tarfile.TarInfo(f"{root}/{path}")
            info.size = len(data)
            info.mode = 0o644
            sdist.addfile(info, io.BytesIO(data))
    return filename
