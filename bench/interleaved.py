"""Interleaved timing on one GPU: in every round each contestant makes one call of the op, in turn,
each timed alone as bench_intranode.py times it (L2 flushed, device synchronized, ranks at a
barrier, CUDA events on the caller's stream). A machine drifts by 15-47% between the passes of
scripts/bench_variants.sh (bench/NOTES.md); calls a few milliseconds apart drift together, so the
per-round ratio sees through it where two medians minutes apart cannot.

    python3 bench/interleaved.py [--cells 2x24,4x24] [--ops dispatch_fp8,dispatch_fp8_cached]
                                 [--rounds 100] [--warmup 5] [--anchor auto|none|PATH]
                                 [--switch NAME:ATTR=EXPR ...] [--starts together[,barrier]]
                                 [--tokens 4096] [--hidden 7168]
                                 [--topk 8] [--experts 256] [--dry-run]

Contestants: moelink (this build), DeepEP V1 (the anchor, when there is one: bench/anchor.py) and
one moelink variant per --switch, which sets `buffer.ATTR = eval(EXPR)` on moelink's Buffer for its
calls only (e.g. `--switch exact:_dispatch_sizing=None` with wip/guessed_rows.patch applied, whose
binding skips its guess for a call without the memo), or with ATTR `env.NAME` the environment
variable NAME to str(eval(EXPR)) (a knob read at every call, e.g. `gather:env.MOELINK_SCALES_GATHER=1`). All share one process per rank and one moelink Buffer, so a switch must be
something a call reads afresh. Each start method after the first in --starts
(bench_intranode.start_together) adds moelink@METHOD and deep_ep@METHOD: the same calls, the ranks
released by that method instead. The order of the contestants rotates from round to round.

Per (cell, op, contestant) it prints the mean over ranks of each rank's median µs, and the median
over rounds of (its time / moelink's time) in the same round, with that ratio's quartiles: DeepEP's
row is the ratio #11 asks for (DeepEP's time over moelink's), measured in pairs; a variant's row is
below 1 where the variant is faster. "skew" is the median over rounds of the spread of the ranks'
start instants (last minus first, µs). Ops are bench_intranode.py's.
The table goes to $OUT/interleaved.md (and .json) when OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (BENCH_DIR, REPO_ROOT / "tests" / "gpu"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import anchor as anchor_lib  # noqa: E402
import launcher  # noqa: E402 - imports no torch; the ranks it spawns do
from run_all import EXIT_NO_GPU, MAX_RANKS, OP_TITLES, add_problem_arguments, parse_cells, placement_text, refused_without_gpu  # noqa: E402

# bench_intranode.prepared_calls' ops: one call each, timed alone (the back-to-back, held-output and
# host-time rows are bench_intranode's own).
OPS = ("dispatch_bf16", "dispatch_fp8", "dispatch_fp8_colmajor", "dispatch_bf16_cached", "dispatch_fp8_cached",
       "dispatch_fp8_cached_colmajor", "combine")
DEFAULT_OPS = "dispatch_bf16,dispatch_fp8,dispatch_fp8_cached,dispatch_fp8_cached_colmajor"


def parse_switch(text: str) -> tuple[str, str, str]:
    try:
        name, assignment = text.split(":", 1)
        attr, expr = assignment.split("=", 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a switch is NAME:ATTR=EXPR (e.g. exact:_dispatch_sizing=None), "
                                         f"got {text!r}") from None
    if not name or not (attr.isidentifier() or (attr.startswith("env.") and attr[4:].isidentifier())):
        raise argparse.ArgumentTypeError(f"a switch needs a name and an attribute name, got {text!r}")
    return name, attr, expr


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=parse_cells, default=parse_cells("2x24,4x24"),
                        help="comma-separated RANKSxSMS (default 2x24,4x24)")
    parser.add_argument("--ops", default=DEFAULT_OPS, help=f"comma-separated, of {', '.join(OPS)} (default {DEFAULT_OPS})")
    parser.add_argument("--rounds", type=int, default=100, help="timed rounds per op (default 100)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per contestant first (default 5)")
    parser.add_argument("--anchor", default="auto", help="DeepEP: auto (.anchors/), none, or a wheel / directory")
    parser.add_argument("--switch", type=parse_switch, action="append", default=[],
                        help="a moelink variant NAME:ATTR=EXPR (repeatable)")
    parser.add_argument("--starts", default="together",
                        help="comma-separated start methods (bench_intranode.START_METHODS); the first is the "
                             "contestants' own, each other adds NAME@METHOD contestants (default together)")
    add_problem_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.ops = [op for op in args.ops.split(",") if op]
    for op in args.ops:
        if op not in OPS:
            parser.error(f"--ops: {op!r} is not one of {', '.join(OPS)}")
    for ranks, sms in args.cells:
        if not 1 <= ranks <= MAX_RANKS or sms < 2 or sms % 2 or args.experts % ranks:
            parser.error(f"cell {ranks}x{sms}: ranks in [1, {MAX_RANKS}] dividing --experts, SMs even and >= 2")
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    args.starts = [m for m in args.starts.split(",") if m]
    if not args.starts or len(set(args.starts)) != len(args.starts) or set(args.starts) - {"together", "barrier"}:
        parser.error("--starts: distinct methods of together, barrier")
    names = [name for name, _, _ in args.switch]
    if len(set(names)) != len(names) or {"moelink", "deep_ep"} & set(names):
        parser.error("--switch names must be unique and neither 'moelink' nor 'deep_ep'")
    return args


def contestants(args: argparse.Namespace, with_anchor: bool) -> list[str]:
    impls = ["moelink"] + (["deep_ep"] if with_anchor else [])
    return (impls + [f"moelink:{name}" for name, _, _ in args.switch]
            + [f"{impl}@{method}" for method in args.starts[1:] for impl in impls])


# ---- on each rank -------------------------------------------------------------------------------

def interleaved_cell(rank, num_ranks, params: dict) -> dict:
    """{op: {contestant: [µs per round]}} on this rank, and "_placement" (bench_intranode.placement);
    every rank makes the same calls in order."""
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    import bench_intranode as bench  # noqa: PLC0415

    T, H, K, E = params["tokens"], params["hidden"], params["topk"], params["experts"]
    buffers, ops = {}, {}
    for impl in ("moelink", "deep_ep") if params["with_anchor"] else ("moelink",):
        mod = bench.load_impl(impl, params["anchor_path"])
        mod.Buffer.set_num_sms(params["num_sms"])
        buffers[impl] = bench._make_buffer(mod, impl, num_ranks, T, H)
        ops[impl] = bench.prepared_calls(buffers[impl], rank, num_ranks, T, H, K, E).ops
    switches = {f"moelink:{name}": (attr, eval(expr)) for name, attr, expr in params["switch"]}  # noqa: S307
    starts = params["starts"]
    methods = {name: starts[0] for name in list(ops) + list(switches)}
    methods.update({f"{impl}@{method}": method for method in starts[1:] for impl in ops})
    names = list(methods)
    flush = torch.empty(bench.FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")

    @contextlib.contextmanager
    def switched(name: str):
        # Set around the timed call, not inside it: a property's Python and extension calls would
        # otherwise be host time in front of the variant's launch, a few µs its rows paid alone.
        name = name.split("@", 1)[0]
        if name not in switches:
            yield ops[name]
            return
        attr, value = switches[name]
        if attr.startswith("env."):
            var = attr[4:]
            saved = os.environ.get(var)
            os.environ[var] = str(value)
            try:
                yield ops["moelink"]
            finally:
                if saved is None:
                    del os.environ[var]
                else:
                    os.environ[var] = saved
            return
        buf = buffers["moelink"]
        saved = getattr(buf, attr)
        setattr(buf, attr, value)
        try:
            yield ops["moelink"]
        finally:
            setattr(buf, attr, saved)

    results = {"_placement": bench.placement()}  # where this rank's thread ran as the rounds began
    for op in params["ops"]:
        for name in names:
            with switched(name) as calls:
                for _ in range(params["warmup"]):
                    calls[op]()
        times = {name: [] for name in names}
        began = {name: [] for name in names}
        for r in range(params["rounds"]):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                with switched(name) as calls:
                    times[name].append(bench.timed_samples_us(calls[op], flush, 1, start_method=methods[name])[0])
                began[name].append(bench.START_LOG.pop())
        results[op] = times
        results[f"_began_{op}"] = began
    results["_late_starts"] = bench.LATE_STARTS[0]
    torch.cuda.synchronize()
    dist.barrier()
    for buf in buffers.values():
        buf.destroy()
    return results


# ---- in the parent ------------------------------------------------------------------------------

def summarize(per_rank: list[dict], names: list[str]) -> dict:
    """{op: {contestant: {"us": mean over ranks of medians, "ratio": ..., "q1": ..., "q3": ...}}}; the
    ratio is the contestant's time over moelink's in the same round (< 1: the contestant is faster),
    its median over rounds, then the mean over ranks."""
    out = {}
    for op in (op for op in per_rank[0] if not op.startswith("_")):
        out[op] = {}
        for name in names:
            medians = [statistics.median(r[op][name]) for r in per_rank]
            entry = {"us": statistics.mean(medians)}
            began = [r.get(f"_began_{op}", {}).get(name) for r in per_rank]
            if all(began):
                entry["skew_us"] = statistics.median((max(b) - min(b)) / 1e3 for b in zip(*began))
            if name != "moelink":
                ratios = [[c / m for m, c in zip(r[op]["moelink"], r[op][name])] for r in per_rank]
                quartiles = [statistics.quantiles(x, n=4) if len(x) > 1 else [x[0]] * 3 for x in ratios]
                entry.update(ratio=statistics.mean(q[1] for q in quartiles),
                             q1=statistics.mean(q[0] for q in quartiles), q3=statistics.mean(q[2] for q in quartiles))
            out[op][name] = entry
    return out


def format_table(cells: list[dict]) -> str:
    lines = ["| cell | op | contestant | µs (median) | its µs / moelink's, same round: median (q1-q3) | skew µs |",
             "|---|---|---|---|---|---|"]
    for cell in cells:
        for op, by_name in cell["summary"].items():
            for name, entry in by_name.items():
                ratio = "-" if "ratio" not in entry else f"{entry['ratio']:.3f} ({entry['q1']:.3f}-{entry['q3']:.3f})"
                skew = f"{entry['skew_us']:.1f}" if "skew_us" in entry else "-"
                lines.append(f"| {cell['cell']} | {OP_TITLES.get(op, op)} | {name} | {entry['us']:.1f} | {ratio} "
                             f"| {skew} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        for ranks, sms in args.cells:
            print(f"{ranks}x{sms}: {', '.join(args.ops)} x {args.rounds} rounds: "
                  f"{', '.join(contestants(args, args.anchor != 'none'))}")
        return 0
    if refused_without_gpu("interleaved"):
        return EXIT_NO_GPU
    anchor = anchor_lib.resolve(args.anchor, REPO_ROOT)
    print(f"anchor: {anchor.describe()}", flush=True)
    names = contestants(args, anchor.available)
    cells = []
    for ranks, sms in args.cells:
        params = {"num_sms": sms, "tokens": args.tokens, "hidden": args.hidden, "topk": args.topk,
                  "experts": args.experts, "ops": args.ops, "rounds": args.rounds, "warmup": args.warmup,
                  "anchor_path": anchor.path, "with_anchor": anchor.available, "switch": args.switch,
                  "starts": args.starts}
        per_rank = launcher.run_ranks(ranks, ("interleaved", "interleaved_cell", str(Path(__file__).resolve())), params,
                                      timeout_s=600)
        cells.append({"cell": f"{ranks}x{sms}", "summary": summarize(per_rank, names), "raw": per_rank})
        print(format_table(cells[-1:]), flush=True)
        where = [r.get("_placement") for r in per_rank]
        if all(where):
            print(f"{ranks}x{sms}: where each rank's thread ran (CPU, package/core, NUMA node): "
                  f"{placement_text(where)}", flush=True)
        late = [r.get("_late_starts", 0) for r in per_rank]
        if any(late):
            print(f"{ranks}x{sms}: calls started past the shared deadline, per rank: {late}", flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "interleaved.md").write_text(format_table(cells) + "\n")
        Path(out, "interleaved.json").write_text(json.dumps({"anchor": anchor.describe(), "cells": cells}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
