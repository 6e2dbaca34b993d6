#!/usr/bin/env bash
# The GPU suite in named groups within a time budget, for GPU time that is lent by the minute: builds
# (unless REBUILD=0 and a build exists), runs the groups under one MPS daemon, each bounded by its
# own limit and by what is left of the budget, packs the logs into $OUT/logs.tar.gz and prints one
# summary line per group ($OUT/summary.txt). scripts/test.sh runs the same tests without a budget.
#   OUT=/tmp/out bash scripts/gpu_groups.sh 540 api intranode24 lowlatency
# Groups: api lifecycle intranode24 intranode8 segments failures v2 graphs lowlatency llshrink llnvshmem logfmt frameworks internode internode8 internodefake internodefake8 internodenvshmem internodenvshmemall internodeworld internodeloss peerloss peerlossmid
#         peerlosslane peerlossall soak sanitize benchsmoke cputorch anchorsuite benchll benchinternode bench probehost interleaved variants pytest. anchorsuite:
#         DeepEP's own intranode test against moelink (tests/gpu/anchor_suite.py; needs
#         .anchors/deepep_tests). cputorch: the CPU tests that need torch (skipped where it is missing, as in CI). variants: scripts/bench_variants.sh on $VARIANTS (patch files, or base).
# Env: PYTEST_ARGS, PYTEST_LIMIT_S, SOAK_ARGS, SOAK_LIMIT_S and SANITIZE_LIMIT_S (default 300 s each), BENCH_ARGS, BENCH_LL_ARGS, BENCH_INTERNODE_ARGS, PROBE_ARGS, INTERLEAVED_ARGS, VARIANTS, VARIANT_BENCH_ARGS, VARIANT_RUN,
#      MOELINK_SANITIZE_TOOLS.
set -u
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to a directory for the logs}"
BUDGET=${1:-540}; shift
START=$(date +%s)
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 MOELINK_BUILD_DIR=build MOELINK_SKIP_DEPS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
summary="$OUT/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }
if [ ! -f build/python/moelink/libmoelink.so ] || [ "${REBUILD:-1}" = 1 ]; then
  t0=$(date +%s)
  if ! bash scripts/build.sh > "$OUT/logs/build.log" 2>&1; then
    say "BUILD FAILED"; tail -60 "$OUT/logs/build.log"; tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs; exit 1
  fi
  say "build ok in $(( $(date +%s) - t0 )) s"
fi
export PYTHONPATH="$PWD/build/python:$PWD/tests"
groups_script=$(mktemp)
cat > "$groups_script" <<'INNER'
set -u
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
group() {
  local name=$1 limit=$2; shift 2
  local remain; remain=$(left)
  if [ "$remain" -lt 30 ]; then echo "$name: NOT RUN (budget)" | tee -a "$summary"; return; fi
  [ "$limit" -gt "$remain" ] && limit=$remain
  local t0; t0=$(date +%s)
  timeout -k 5 "$limit" env "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s: $(grep -E 'passed|failed|error' "$OUT/logs/$name.log" | tail -1)" | tee -a "$summary"
  if [ "$rc" != 0 ]; then settle; fi
}
# Ranks killed after a failure can leave the MPS server refusing new clients ("CUDA-capable device
# busy") for a while; the next group would fail on that alone. Wait (at most 60 s, each try bounded:
# a server may hang a client instead of refusing it) until a context opens again.
settle() {
  local deadline=$(( $(date +%s) + 60 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    timeout -k 2 15 python3 -c "import torch; torch.zeros(1, device='cuda')" > /dev/null 2>&1 && return 0
    sleep 1
  done
  echo "device still refusing new CUDA contexts 60 s after a failed group" | tee -a "$summary"
}
P="python3 -m pytest -q -p no:cacheprovider -x"
for g in $TEST_GROUPS; do
  case $g in
    api) group api 120 $P tests/gpu/test_api_validation.py tests/gpu/test_layout.py tests/gpu/test_cpp_api.py tests/gpu/test_nvshmem.py ;;
    lifecycle) group lifecycle 150 $P tests/gpu/test_lifecycle.py ;;
    intranode24) group intranode24 200 MOELINK_TEST_RANKS=2,4 $P tests/gpu/test_intranode.py -k "not peer_segments" ;;
    intranode8) group intranode8 200 MOELINK_TEST_RANKS=8 $P tests/gpu/test_intranode.py -k "not peer_segments" ;;
    segments) group segments 360 $P tests/gpu/test_intranode.py -k peer_segments ;;
    failures) group failures 150 $P tests/gpu/test_failures.py ;;
    v2) group v2 240 $P tests/gpu/test_runtime_v2.py ;;
    graphs) group graphs 200 $P tests/gpu/test_graphs.py ;;
    lowlatency) group lowlatency 400 $P tests/gpu/test_low_latency.py ;;
    llshrink) group llshrink 240 $P tests/gpu/test_low_latency_shrink.py ;;
    llnvshmem) group llnvshmem 400 $P tests/gpu/test_low_latency_nvshmem.py tests/gpu/test_nvshmem.py ;;
    logfmt) group logfmt 200 $P tests/gpu/test_low_latency_logfmt.py ;;
    frameworks) group frameworks 200 $P tests/gpu/test_frameworks.py ;;
    internode) group internode 300 $P tests/gpu/test_internode.py -k "(2-2 or back_to_back or knob or bad_expert_id) and not fake and not nvshmem" ;;
    internode8) group internode8 300 $P tests/gpu/test_internode.py -k "(2-4 or 4-2 or default_configs) and not fake and not nvshmem" ;;
    internodefake) group internodefake 400 $P tests/gpu/test_internode.py -k "fake and (2-2 or back_to_back or bit_equal)" ;;
    internodefake8) group internodefake8 400 $P tests/gpu/test_internode.py -k "fake and (2-4 or 4-2) and not bit_equal" ;;
    # internodenvshmem: the NVSHMEM lane bit-equal to the stores lane (2 x 2, 4 x 2, 2 x 4 passed on one H200, 2026-12-03/04)
    # (docs/internal/INTERNODE_LANE.md step 3); internodenvshmemall: every internode test over the NVSHMEM lane
    # (the case matrix at the three layouts, 200 rounds, the bit-equality, the peer loss).
    internodenvshmem) group internodenvshmem 400 $P tests/gpu/test_internode.py -k nvshmem_lane ;;
    internodenvshmemall) group internodenvshmemall 540 python3 -m pytest -q -p no:cacheprovider --durations=0 tests/gpu/test_internode.py -k nvshmem ;;
    # internodeworld: one NVSHMEM world shared by a low-latency Buffer and an internode Buffer's lanes.
    internodeworld) group internodeworld 300 $P tests/gpu/test_internode.py -k world_is_shared ;;
    # pytest: any selection (PYTEST_ARGS, under PYTEST_LIMIT_S, default 300 s), every failure shown.
    # PYTEST_ARGS is shell words (a quoted -k expression stays one argument).
    pytest) group pytest "${PYTEST_LIMIT_S:-300}" bash -c "python3 -m pytest -q -p no:cacheprovider --durations=0 ${PYTEST_ARGS:-}" ;;
    # internodeloss (about 1 min): a rank of a 2 x 2 internode Buffer lost, over the stores and the fake-puts lane.
    internodeloss) group internodeloss 180 $P tests/gpu/test_internode.py -k "peer_loss and not nvshmem" ;;
    peerloss) group peerloss 300 $P tests/gpu/test_peer_loss.py -k "not lane" ;;
    peerlossmid) group peerlossmid 150 $P tests/gpu/test_peer_loss.py -k "during and not lane" ;;
    # peerlosslane (about 2.5 min): test_peer_loss's ten losses on a fake-puts lane Buffer.
    peerlosslane) group peerlosslane 300 $P tests/gpu/test_peer_loss.py -k lane ;;
    peerlossall) group peerlossall 540 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_peer_loss.py ;;
    soak) group soak "${SOAK_LIMIT_S:-300}" python3 bench/soak.py ${SOAK_ARGS:-} ;;
    sanitize) group sanitize "${SANITIZE_LIMIT_S:-300}" OUT="$OUT/logs" bash scripts/sanitize.sh ;;
    benchsmoke) group benchsmoke 150 $P tests/gpu/test_bench_smoke.py ;;
    cputorch) group cputorch 300 $P tests/cpu/test_python_api.py tests/cpu/test_deep_ep_compat.py tests/cpu/test_internode_composition.py tests/cpu/test_reference.py tests/cpu/test_bench_cli.py ;;
    anchorsuite) group anchorsuite 400 python3 tests/gpu/anchor_suite.py ;;
    benchll) group benchll 300 python3 bench/bench_low_latency.py ${BENCH_LL_ARGS:-} ;;
    benchinternode) group benchinternode 300 python3 bench/bench_internode.py ${BENCH_INTERNODE_ARGS:-} ;;
    probehost) group probehost 150 python3 bench/probe_host.py ${PROBE_ARGS:-} ;;
    interleaved) group interleaved 540 python3 bench/interleaved.py ${INTERLEAVED_ARGS:-} ;;
    variants)
      if [ -n "${VARIANT_RUN:-}" ]; then
        group variants 540 bash scripts/bench_variants.sh --run "$VARIANT_RUN" ${VARIANTS:-base}
      else
        group variants 540 bash scripts/bench_variants.sh --bench "${VARIANT_BENCH_ARGS:---cells 4x24,4x8}" ${VARIANTS:-base}
      fi ;;
    bench) group bench 300 python3 bench/run_all.py ${BENCH_ARGS:-} ;;
    *) echo "$g: unknown group" | tee -a "$summary" ;;
  esac
done
INNER
export BUDGET START summary OUT TEST_GROUPS="$*"
bash scripts/with_mps.sh bash "$groups_script"
say "total $(( $(date +%s) - START )) s"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
