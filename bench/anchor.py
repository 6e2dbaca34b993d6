"""Finding DeepEP V1 (the anchor) for side-by-side runs, without importing it (or torch) here.

    --anchor auto   (default) $MOELINK_BENCH_ANCHOR if set, else the newest .anchors/deep_ep-*.whl of
                    the repository, else a deep_ep the interpreter can import already
    --anchor PATH   a directory holding the deep_ep package, or a deep_ep wheel
    --anchor none   moelink alone; no ratios

A wheel is installed once with `pip install --no-deps --target` into a cache directory under the
temporary directory and reused. The chosen deep_ep is imported in a child process to check that it
loads and is not moelink's own deep_ep shim.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ENV = "MOELINK_BENCH_ANCHOR"
# DeepEP 1.2.1 has no __version__; its dist-info (kept by pip install --target) has the version.
PROBE = """
import importlib.metadata, json, deep_ep
version = getattr(deep_ep, "__version__", None)
if version is None:
    try:
        version = importlib.metadata.version("deep_ep")
    except importlib.metadata.PackageNotFoundError:
        pass
print(json.dumps({"file": getattr(deep_ep, "__file__", None), "version": version,
                  "shim": bool(getattr(deep_ep, "__moelink_shim__", False))}))
"""


@dataclass
class Anchor:
    path: str | None       # put first on sys.path of the anchor's ranks; None: importable as is
    version: str | None    # DeepEP's version, when it says; "unknown" otherwise
    reason: str = ""       # why there is no anchor (then available is False)

    @property
    def available(self) -> bool:
        return not self.reason

    def describe(self) -> str:
        if not self.available:
            return f"none ({self.reason}); ratios are not printed"
        where = self.path or "the interpreter's own site-packages"
        return f"DeepEP {self.version} from {where}"


def _install(wheel: Path) -> Path:
    target = Path(tempfile.gettempdir()) / "moelink-anchor" / wheel.stem
    if (target / "deep_ep").is_dir():
        return target
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                             "--disable-pip-version-check", "--target", str(target), str(wheel)],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"pip could not install {wheel.name}: {(result.stderr or result.stdout).strip()[-500:]}")
    return target


def _probe(path: str | None, python: str) -> dict:
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [path, env.get("PYTHONPATH")]))
    result = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise RuntimeError(f"import deep_ep failed: {last[-1] if last else f'exit status {result.returncode}'}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def resolve(choice: str, repo_root: Path, python: str = sys.executable) -> Anchor:
    """The anchor `choice` ("auto", "none" or a path) names, or an unavailable one saying why."""
    if choice == "none":
        return Anchor(None, None, "disabled with --anchor none")
    if choice == "auto":
        target = os.environ.get(ENV, "")
        if not target:
            wheels = sorted((repo_root / ".anchors").glob("deep_ep-*.whl"))
            target = str(wheels[-1]) if wheels else ""
    else:
        target = choice
    try:
        path = None
        if target.endswith(".whl"):
            path = str(_install(Path(target)))
        elif target:
            if not Path(target, "deep_ep").is_dir():
                raise RuntimeError(f"{target} holds no deep_ep package")
            path = target
        found = _probe(path, python)
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as error:
        if choice == "auto" and not target:
            return Anchor(None, None, "no DeepEP found: put its wheel in .anchors/, pass --anchor PATH, or set "
                                      f"{ENV} ({error})")
        return Anchor(None, None, f"{target}: {error}")
    if found.get("shim"):
        return Anchor(None, None, f"the deep_ep at {found.get('file')} is moelink's shim, not DeepEP")
    return Anchor(path, found.get("version") or "unknown")
