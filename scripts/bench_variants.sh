#!/usr/bin/env bash
# Source variants side by side in one GPU call: each variant is a patch applied to a copy of this
# tree ("base" is the tree as it is), built on its own and timed by bench/run_all.py, DeepEP in the
# same run when present. Figures of fresh machines differ by up to 30% (bench/NOTES.md), so a
# kernel change is judged only against the base timed in the same call, never against a table.
#   OUT=/tmp/out bash scripts/bench_variants.sh [--bench "ARGS" | --run "CMD"] base PATCH...
# Writes $OUT/variants/NAME/{build.log,bench.log,bench_intranode.md} (a name's later passes:
# NAME.passN, in the tree its first pass built) and prints one line per variant and op (µs, ratio
# to DeepEP). --run times something else in each tree instead (e.g.
# "python3 bench/bench_low_latency.py --ranks 8"), printing its log's last lines. A patch is made
# with `git diff -- FILES > .scratch/NAME.patch`.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to a directory for the logs}"
OUT=$(realpath "$OUT")  # the runs cd into their trees
BENCH_ARGS="--cells 4x24,4x8"
RUN=""
case "${1:-}" in
  --bench | --run)
    [ $# -ge 2 ] || { echo "$0: $1 needs a value" >&2; exit 2; }
    if [ "$1" = --bench ]; then BENCH_ARGS=$2; else RUN=$2; fi
    shift 2 ;;
esac
[ -n "$RUN" ] || RUN="python3 bench/run_all.py $BENCH_ARGS"
[ $# -gt 0 ] || { echo "usage: $0 [--bench ARGS | --run CMD] base|PATCH..." >&2; exit 2; }
export MOELINK_SKIP_DEPS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
root=$PWD
work=${TMPDIR:-/tmp}/moelink-variants
status=0
declare -A passes  # a variant named again (base, X, base, X) is timed again in the tree it built
for variant in "$@"; do
  name=$(basename "$variant" .patch)
  passes[$name]=$(( ${passes[$name]:-0} + 1 ))
  label=$name
  [ "${passes[$name]}" -gt 1 ] && label="$name#${passes[$name]}"
  tree="$work/$name"
  if [ "${passes[$name]}" -gt 1 ]; then
    [ -f "$tree/build/python/moelink/libmoelink.so" ] || { echo "$name: no build from its first pass"; continue; }
    log="$OUT/variants/$name.pass${passes[$name]}"
    mkdir -p "$log"
  else
    log="$OUT/variants/$name"
    mkdir -p "$log"
    rm -rf "$tree" && mkdir -p "$tree"
    # The tree without build outputs; the anchors and scratch patches come along (the bench looks
    # for DeepEP in .anchors/).
    tar -C "$root" --exclude='./build' --exclude='./build-*' --exclude='./.git' -cf - . | tar -C "$tree" -xf -
    variant=$(realpath "$variant" 2>/dev/null || echo "$variant")
    [ "$name" = base ] && variant=base
    if [ "$variant" != base ] && ! (cd "$tree" && { command -v patch > /dev/null && patch -p1 -s < "$variant" ||
                                                  git apply "$variant"; }) > "$log/patch.log" 2>&1; then
      echo "$name: PATCH FAILED ($(head -1 "$log/patch.log"))"; status=1; continue
    fi
    if ! (cd "$tree" && MOELINK_BUILD_DIR=build bash scripts/build.sh > "$log/build.log" 2>&1); then
      echo "$name: BUILD FAILED (see $log/build.log)"; tail -20 "$log/build.log"; status=1; continue
    fi
  fi
  # shellcheck disable=SC2086  # RUN is a command line
  (cd "$tree" && OUT="$log" MOELINK_BUILD_DIR=build PYTHONPATH="$tree/build/python:$tree/tests" \
     bash scripts/with_mps.sh $RUN > "$log/bench.log" 2>&1) || status=1
  if [ ! -f "$log/bench_intranode.md" ]; then
    echo "$label: $RUN"; tail -25 "$log/bench.log" | sed "s/^/$label: /"
  else
    # cell | op | moelink µs | DeepEP µs | ratio
    grep -E '^\| [0-9]+x[0-9]+ ' "$log/bench_intranode.md" |
      awk -F'|' -v n="$label" '{printf "%-12s %-6s %-50s %9s µs  DeepEP %9s  ratio %s\n", n, $2, $7, $8, $10, $12}'
  fi
done
exit $status
