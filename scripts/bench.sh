#!/usr/bin/env bash
# The main job: verify dispatch/combine against the reference and benchmark them on this GPU.
# Arguments go to bench/run_all.py (bash scripts/bench.sh --help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# --help and --dry-run need neither a GPU nor a build; bad arguments are reported before either.
for arg in "$@"; do
  case "$arg" in -h|--help|--dry-run) exec "$PYTHON" bench/run_all.py "$@" ;; esac
done
"$PYTHON" bench/run_all.py --dry-run "$@" >/dev/null || exit $?
if ! PYTHON="$PYTHON" bash scripts/has_gpu.sh; then
  echo "moelink: no CUDA GPU found; the main job (verify + benchmark dispatch/combine) needs a Hopper GPU" >&2
  exit 3  # bench/run_all.py's no-GPU code (1 means verify failed)
fi

bash scripts/deps.sh
bash scripts/build.sh
BUILD_DIR=${MOELINK_BUILD_DIR:-build}
case "$BUILD_DIR" in /*) ;; *) BUILD_DIR="$PWD/$BUILD_DIR" ;; esac
export PYTHONPATH="$BUILD_DIR/python:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec bash scripts/with_mps.sh "$PYTHON" bench/run_all.py "$@"
