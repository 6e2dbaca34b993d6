#!/usr/bin/env bash
# Installs what a fresh machine lacks, and nothing when everything is there: the GPU machine has no
# internet, so a present package must never send us to pip or apt. A failed install is a warning;
# the build or tests that need the package then say precisely what is missing.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PYTHON=${PYTHON:-python3}
say() { echo "moelink deps: $*"; }

# requirement line -> the module that proves it is installed
import_name() {
  case "$1" in
    scikit-build-core*) echo scikit_build_core ;;
    nvidia-nvshmem-cu13*) echo nvidia.nvshmem ;;
    *) echo "${1%%[=<>!~ ]*}" ;;
  esac
}

# An NVSHMEM installed outside pip (NVSHMEM_HOME, distro package) serves the build as well as the wheel.
system_nvshmem() {
  [ -n "${NVSHMEM_HOME:-}" ] && [ -f "$NVSHMEM_HOME/include/nvshmem.h" ] && return 0
  compgen -G "/usr/include/nvshmem*/nvshmem.h" >/dev/null && return 0
  [ -f /usr/include/nvshmem.h ] || [ -f /usr/local/include/nvshmem.h ]
}

# Offline machines must fail fast instead of retrying every package for minutes.
PIP=("$PYTHON" -m pip install -q --disable-pip-version-check --retries 1 --timeout 15)

missing=()
while IFS= read -r requirement || [ -n "$requirement" ]; do
  requirement=${requirement%%#*}
  requirement=$(echo "$requirement" | xargs)
  [ -z "$requirement" ] && continue
  module=$(import_name "$requirement")
  if [ "$module" = nvidia.nvshmem ] && system_nvshmem; then
    continue
  fi
  if ! "$PYTHON" -c "import $module" >/dev/null 2>&1; then
    missing+=("$requirement")
  fi
done < requirements-dev.txt

if [ ${#missing[@]} -eq 0 ]; then
  say "python packages present"
else
  say "installing ${missing[*]}"
  if ! "${PIP[@]}" "${missing[@]}"; then
    # One unavailable package (offline, no wheel for this platform) must not block the others.
    for requirement in "${missing[@]}"; do
      "${PIP[@]}" "$requirement" >/dev/null 2>&1 ||
        say "WARNING: pip could not install $requirement (offline?); continuing"
    done
  fi
fi

# CMake >= 3.24: apt first (system package), pip's cmake wheel when apt is unavailable or too old.
cmake_ok() {
  command -v cmake >/dev/null 2>&1 || return 1
  local version
  version=$(cmake --version | head -n1 | awk '{print $3}')
  [ "$(printf '%s\n%s\n' 3.24 "$version" | sort -V | head -n1)" = 3.24 ]
}
if cmake_ok; then
  say "cmake present ($(cmake --version | head -n1 | awk '{print $3}'))"
else
  if ! command -v cmake >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
    say "installing cmake with apt"
    $sudo apt-get install -y -qq cmake >/dev/null 2>&1 ||
      { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq cmake >/dev/null 2>&1; } ||
      say "WARNING: apt could not install cmake"
  fi
  if ! cmake_ok; then
    say "installing cmake with pip"
    "${PIP[@]}" "cmake>=3.24" || say "WARNING: pip could not install cmake"
  fi
fi
exit 0
