#!/usr/bin/env bash
# Refreshes the checked-in typing stub python/moelink/_moelink.pyi after a change to the bindings:
# builds (scripts/build.sh, into $MOELINK_BUILD_DIR or build/; the build regenerates the stub) and
# copies the generated stub over the checked-in one. Review the diff like any API change.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=${MOELINK_BUILD_DIR:-build}
bash scripts/build.sh
stub="$BUILD_DIR/stubs/_moelink.pyi"
if [ ! -f "$stub" ]; then
  echo "moelink update_stubs: $stub was not generated (is nanobind installed, so the extension is built?)" >&2
  exit 1
fi
cp "$stub" python/moelink/_moelink.pyi
echo "moelink update_stubs: python/moelink/_moelink.pyi refreshed from $stub"
git --no-pager diff --stat -- python/moelink/_moelink.pyi 2>/dev/null || true
