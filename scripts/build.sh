#!/usr/bin/env bash
# Configure (once) and build into build/. Extra arguments go to the configure step, e.g.
#   bash scripts/build.sh -DCMAKE_CUDA_ARCHITECTURES=90a
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BUILD_DIR=${MOELINK_BUILD_DIR:-build}
JOBS=${MOELINK_JOBS:-$(nproc)}
run() { echo "+ $*"; "$@"; }

configure=(-S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release)
# A configured tree keeps its generator; passing another one would make CMake refuse.
if [ ! -f "$BUILD_DIR/CMakeCache.txt" ] && command -v ninja >/dev/null 2>&1; then
  configure+=(-G Ninja)
fi
if "$PYTHON" -c "import nanobind" >/dev/null 2>&1; then
  # The interpreter itself, not a launcher shim (pyenv), so CMake and the tests agree on it.
  configure+=(-DMOELINK_BUILD_PYTHON=ON "-DPython_EXECUTABLE=$("$PYTHON" -c 'import sys; print(sys.executable)')")
else
  echo "moelink build: nanobind not importable; building without the Python extension"
fi
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  configure+=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
fi

echo "moelink build: configuring $BUILD_DIR/ (Release)"
run cmake "${configure[@]}" "$@"
echo "moelink build: building with $JOBS jobs"
run cmake --build "$BUILD_DIR" -j "$JOBS"
echo "moelink build: done ($BUILD_DIR/python/moelink)"
