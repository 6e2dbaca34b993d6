#!/usr/bin/env bash
# The test command: build, C++ and Python CPU tests, then the GPU tests when a GPU is visible.
# Exits non-zero if anything failed. MOELINK_SKIP_DEPS=1 skips scripts/deps.sh; MOELINK_BUILD_DIR
# (default build/) is the build tree used, as in scripts/build.sh.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PYTHON=${PYTHON:-python3}
BUILD_DIR=${MOELINK_BUILD_DIR:-build}
case "$BUILD_DIR" in /*) ;; *) BUILD_DIR="$PWD/$BUILD_DIR" ;; esac
export MOELINK_BUILD_DIR="$BUILD_DIR"
export PYTHONPATH="$BUILD_DIR/python:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
failed=()

if [ "${MOELINK_SKIP_DEPS:-0}" != 1 ]; then
  bash scripts/deps.sh
fi
if ! bash scripts/build.sh; then
  echo "moelink test: BUILD FAILED" >&2
  exit 1
fi

echo "moelink test: C++ CPU tests"
# --no-tests=error: a build that registered no C++ test must not pass as "all passed".
ctest --test-dir "$BUILD_DIR" --output-on-failure --no-tests=error || failed+=("ctest")

echo "moelink test: Python CPU tests"
"$PYTHON" -m pytest -q tests/cpu
rc=$?
# 5 = nothing collected: tests/cpu may hold only C++ tests.
if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then failed+=("pytest tests/cpu"); fi

if PYTHON="$PYTHON" bash scripts/has_gpu.sh; then
  echo "moelink test: GPU tests"
  PYTHONUNBUFFERED=1 bash scripts/with_mps.sh "$PYTHON" -m pytest -q -x tests/gpu
  rc=$?
  if [ $rc -eq 5 ]; then
    echo "moelink test: no GPU tests were collected from tests/gpu" >&2
    failed+=("pytest tests/gpu (nothing collected)")
  elif [ $rc -ne 0 ]; then
    failed+=("pytest tests/gpu")
  fi
else
  echo "no GPU found: GPU tests skipped (CPU tests ran)"
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "moelink test: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "moelink test: all passed"
