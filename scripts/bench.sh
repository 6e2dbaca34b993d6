#!/usr/bin/env bash
# The main job: verify dispatch/combine against the reference and benchmark them on this GPU.
# Arguments go to bench/run_all.py.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! PYTHON="$PYTHON" bash scripts/has_gpu.sh; then
  echo "moelink: no CUDA GPU found; the main job (verify + benchmark dispatch/combine) needs a Hopper GPU" >&2
  exit 1
fi

bash scripts/deps.sh
bash scripts/build.sh
export PYTHONPATH="$PWD/build/python:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec bash scripts/with_mps.sh "$PYTHON" bench/run_all.py "$@"
