#!/usr/bin/env bash
# compute-sanitizer over the 2-rank intranode GPU suite: memcheck (out-of-bounds and misaligned
# accesses, CUDA API errors), then racecheck (shared-memory hazards). Every rank process is checked
# (--target-processes all); the small case list keeps the run short (MOELINK_TEST_CASES=small in
# tests/gpu/test_intranode.py).
#
#   bash scripts/sanitize.sh                              # memcheck, then racecheck
#   MOELINK_SANITIZE_TOOLS=memcheck bash scripts/sanitize.sh
#   MOELINK_SANITIZE_TESTS="tests/gpu/test_failures.py" bash scripts/sanitize.sh
#
# Logs go to $OUT/sanitize (or a temporary directory, printed). Exit status: 0 when every tool ran
# clean, 1 when a tool reported an error or a test failed, 2 when the tools could not run at all.
# Needs a build (scripts/build.sh) and a GPU.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/build/python:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
TOOLS=${MOELINK_SANITIZE_TOOLS:-memcheck racecheck}
read -r -a TESTS <<<"${MOELINK_SANITIZE_TESTS:-tests/gpu/test_intranode.py::test_intranode}"

SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}
for candidate in "$SANITIZER" /usr/local/cuda/bin/compute-sanitizer \
                 /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then
    SANITIZER=$candidate
    break
  fi
  SANITIZER=""
done
if [ -z "$SANITIZER" ]; then
  echo "sanitize: compute-sanitizer not found (put it on PATH or set COMPUTE_SANITIZER)" >&2
  exit 2
fi

LOG_DIR=${OUT:-$(mktemp -d -t moelink-sanitize.XXXXXX)}/sanitize
mkdir -p "$LOG_DIR"
echo "sanitize: $SANITIZER, logs in $LOG_DIR"

# 2 ranks, the small cases. Kernels run 10-100x slower under the tools, so every wait gets longer:
# the device-side peer timeout and the launcher's per-run limit.
export MOELINK_TEST_RANKS=2 MOELINK_TEST_CASES=small
export MOELINK_TIMEOUT_S=${MOELINK_TIMEOUT_S:-600}
export MOELINK_TEST_TIMEOUT_SCALE=${MOELINK_TEST_TIMEOUT_SCALE:-20}
export PYTHONUNBUFFERED=1

# Probe: one CUDA process under the tool, under MPS. compute-sanitizer does not support MPS clients
# on every driver (the tool then refuses to attach or the client fails to start), so when the probe
# fails the ranks run without MPS instead (MOELINK_NO_MPS=1: scripts/with_mps.sh runs them directly).
# Without MPS the ranks' kernels time-slice on the GPU rather than run side by side; moelink's waits
# still complete, only slower, which the longer timeouts above absorb.
probe() {
  timeout 300 bash scripts/with_mps.sh "$SANITIZER" --tool memcheck --target-processes all --error-exitcode 86 \
    "$PYTHON" -c "import torch; x = torch.ones(1 << 10, device='cuda'); assert x.sum().item() == 1024" \
    >"$LOG_DIR/probe.log" 2>&1
}
if probe; then
  echo "sanitize: the tool works under MPS"
else
  echo "sanitize: the probe failed under MPS (see $LOG_DIR/probe.log); running the ranks without MPS"
  export MOELINK_NO_MPS=1
  if ! probe; then
    echo "sanitize: compute-sanitizer cannot run a CUDA process here even without MPS:" >&2
    tail -n 20 "$LOG_DIR/probe.log" >&2
    exit 2
  fi
fi

status=0
summary=()
for tool in $TOOLS; do
  rm -f "$LOG_DIR/$tool".*.log
  echo "sanitize: $tool over ${TESTS[*]}"
  start=$(date +%s)
  # Each rank runs as the tool's own child (tests/gpu/launcher.py reads MOELINK_TEST_RANK_PREFIX): a
  # tool wrapped around pytest instrumented only pytest itself (one log for a 2-rank run, 2026-12-01).
  MOELINK_TEST_RANK_PREFIX="$SANITIZER --tool $tool --error-exitcode 86 --log-file $LOG_DIR/$tool.%p.log" \
    bash scripts/with_mps.sh "$PYTHON" -m pytest -q -x "${TESTS[@]}" 2>&1 | tee "$LOG_DIR/$tool.pytest.log"
  rc=${PIPESTATUS[0]}
  seconds=$(( $(date +%s) - start ))
  # One log per process; each ends with "ERROR SUMMARY: N errors" (racecheck adds a "RACECHECK
  # SUMMARY: N hazards displayed (E errors, W warnings)" line).
  shopt -s nullglob
  logs=("$LOG_DIR/$tool".*.log)
  shopt -u nullglob
  errors=0
  processes=0
  for log in ${logs[@]+"${logs[@]}"}; do
    [ "$log" = "$LOG_DIR/$tool.pytest.log" ] && continue
    processes=$((processes + 1))
    n=$(grep -Eo 'ERROR SUMMARY: [0-9]+' "$log" | awk '{s += $3} END {print s + 0}')
    r=$(grep -Eo 'RACECHECK SUMMARY: .*\(([0-9]+) errors?' "$log" | grep -Eo '\(([0-9]+) errors?' | tr -dc '0-9\n' |
        awk '{s += $1} END {print s + 0}')
    errors=$((errors + n + r))
    if [ "$n" -gt 0 ] || [ "$r" -gt 0 ]; then
      echo "sanitize: $tool reported errors in $log:"
      grep -E '^========= (Invalid|Error|Race|Warning|ERROR|RACECHECK)' "$log" | head -n 20
    fi
  done
  verdict=clean
  if [ "$processes" -lt "${MOELINK_TEST_RANKS:-2}" ]; then
    verdict="only $processes process logs for ${MOELINK_TEST_RANKS:-2} ranks: the ranks were not instrumented"
    status=1
  fi
  if [ "$errors" -gt 0 ]; then
    verdict="$errors errors"
    status=1
  fi
  if [ "$rc" -ne 0 ]; then
    verdict="$verdict, pytest exit $rc"
    status=1
  fi
  summary+=("$tool: $verdict ($processes processes, ${seconds} s)")
done

echo "sanitize summary:${MOELINK_NO_MPS:+ (without MPS)}"
for line in "${summary[@]}"; do
  echo "  $line"
done
exit $status
