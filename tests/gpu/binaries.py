"""Finding the C++ test programs the build puts under build/tests/gpu, and whether a GPU is here.
Torch-free, so the tests that drive those programs import nothing heavy."""
import os
import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def build_dir() -> Path:
    path = Path(os.environ.get("MOELINK_BUILD_DIR", "build"))
    return path if path.is_absolute() else REPO_ROOT / path


def find_binary(name: str) -> Path | None:
    root = build_dir()
    for candidate in (root / "tests" / "gpu" / name, root / "bin" / name, root / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def has_gpu() -> bool:
    try:
        import torch  # noqa: PLC0415 - optional; nvidia-smi is the fallback

        return torch.cuda.is_available()
    except ImportError:
        pass
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return False
    listing = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=30)
    return listing.returncode == 0 and "GPU" in listing.stdout
