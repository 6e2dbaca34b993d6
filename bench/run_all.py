"""The benchmark job: device facts, a correctness check against the reference, then every cell timed
for moelink and, in the same run, for DeepEP V1 (the anchor) when it is present.

    python3 bench/run_all.py [--cells 2x24,4x24,4x8,8x16 | --ranks 4,8 --sms 8,24]
                             [--tokens 4096[,...]] [--hidden 7168[,...]] [--topk 8] [--experts 256]
                             [--iters 30] [--warmup 5] [--anchor auto|none|PATH] [--arena] [--dry-run]

A cell RxS runs R ranks as processes on this host (several per GPU under MPS), each with S SMs, once
per size (every --tokens x --hidden), first with moelink, then with DeepEP, then (--arena) with
moelink and a receive arena. Both libraries are called as a framework calls them (bench_intranode.py
says how, and how a run is measured). Ratios come only from figures of this run; without an anchor
the ratio column says so (bench/anchor.py says where the anchor is looked for).

While a run is in progress a line shows its elapsed time; each finished run prints one row, as
nccl-tests does, and the end a markdown table with every op. MOELINK_BENCH_QUICK=1: verify on 2
ranks and default to 10 iterations. The table and the raw JSON go to $OUT (bench_intranode.md /
.json) if OUT is set, else to bench/last_run.json.
Exit status: 0 ok, 1 verify failed, 2 a moelink run failed (or bad arguments), 3 no usable GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (BENCH_DIR, REPO_ROOT / "tests" / "gpu"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import launcher  # noqa: E402 - imports no torch; the ranks it spawns do

# The ops a row shows (the markdown table and the JSON have every op of bench_intranode.OPS), with
# short titles. Kept here so that the parent process needs no torch.
ROW_OPS = (("dispatch_bf16", "bf16"), ("dispatch_fp8", "fp8"), ("dispatch_fp8_colmajor", "fp8 col"),
           ("dispatch_bf16_cached", "bf16 cached"), ("dispatch_fp8_cached", "fp8 cached"),
           ("dispatch_fp8_cached_colmajor", "fp8 c. col"),
           ("dispatch_bf16_cached_b2b", "bf16 c. b2b"), ("dispatch_fp8_cached_b2b", "fp8 c. b2b"),
           ("dispatch_fp8_cached_colmajor_b2b", "fp8 col b2b"),
           ("combine", "combine"),
           ("combine_torch_input", "comb. torch"), ("dispatch_bf16_held", "bf16 held"),
           ("dispatch_bf16_step", "bf16 step"))
OP_TITLES = {
    "dispatch_bf16": "dispatch bf16 uncached", "dispatch_fp8": "dispatch fp8 uncached (row-major scales)",
    "dispatch_fp8_colmajor": "dispatch fp8 uncached (column-major scales)",
    "dispatch_bf16_cached": "dispatch bf16 cached", "dispatch_fp8_cached": "dispatch fp8 cached",
    "dispatch_fp8_cached_colmajor": "dispatch fp8 cached (column-major scales)",
    "dispatch_bf16_cached_b2b": "dispatch bf16 cached, back to back (DeepEP's bench)",
    "dispatch_fp8_cached_b2b": "dispatch fp8 cached, back to back (DeepEP's bench)",
    "dispatch_fp8_cached_colmajor_b2b": "dispatch fp8 cached (column-major scales), back to back (DeepEP's bench)",
    "combine": "combine of recv_x", "combine_torch_input": "combine, torch-allocated input",
    "dispatch_bf16_held": "dispatch bf16 uncached, outputs held",
    "dispatch_bf16_step": "dispatch bf16 uncached, a step of held layers", "layout": "get_dispatch_layout",
    "layout_host": "get_dispatch_layout, host time of the call",
}
# The cells #11 is judged on: 2 and 4 ranks at 24 SMs, 4 at 8 (few SMs), 8 at 16 (a full GPU of ranks).
DEFAULT_CELLS = "2x24,4x24,4x8,8x16"
MAX_RANKS = 8  # one NVLink domain: the intranode mode this job measures
EXIT_VERIFY, EXIT_RUN, EXIT_NO_GPU = 1, 2, 3
PROGRESS_LINE_S = 15.0  # without a terminal (logs), one progress line this often

# Run in a child process so this process never initialises CUDA (the ranks are spawned from it).
GPU_PROBE = """
import sys
try:
    import torch
except ImportError:
    print("PyTorch is not installed"); sys.exit(1)
if not torch.cuda.is_available():
    print("no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)"); sys.exit(1)
"""


# ---- arguments ------------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def parse_cells(text: str) -> list[tuple[int, int]]:
    cells = []
    for item in text.split(","):
        try:
            ranks, sms = item.lower().split("x")
            cells.append((int(ranks), int(sms)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"a cell is RANKSxSMS (e.g. 4x24), got {item!r}") from None
    return cells


def build_parser(quick: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cells = parser.add_argument_group("cells (ranks x SMs per rank)")
    cells.add_argument("--cells", type=parse_cells, default=None,
                       help=f"comma-separated RANKSxSMS pairs (default {DEFAULT_CELLS}); not with --ranks/--sms")
    cells.add_argument("--ranks", type=int_list, default=None,
                       help="comma-separated rank counts; every one is run with every --sms (default 4)")
    cells.add_argument("--sms", type=int_list, default=None,
                       help="comma-separated SMs per rank, even (default 24 when --ranks is given)")
    shape = parser.add_argument_group("shape (per rank)")
    shape.add_argument("--tokens", type=int_list, default=[4096], help="comma-separated tokens per rank (default 4096)")
    shape.add_argument("--hidden", type=int_list, default=[7168],
                       help="comma-separated hidden sizes, multiples of 128 (default 7168)")
    shape.add_argument("--topk", type=int, default=8, help="experts per token (default 8)")
    shape.add_argument("--experts", type=int, default=256, help="experts in total, a multiple of every rank count (default 256)")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--iters", type=int, default=10 if quick else 30, help="timed iterations, median reported")
    timing.add_argument("--warmup", type=int, default=2 if quick else 5, help="untimed iterations first")
    compare = parser.add_argument_group("comparison")
    compare.add_argument("--anchor", default="auto",
                         help="DeepEP to run side by side: auto (default), none, or a directory / wheel (bench/anchor.py)")
    compare.add_argument("--arena", action="store_true",
                         help="also run moelink with a receive arena (an opt-in moelink feature), labelled moelink+arena")
    timing.add_argument("--repeat", type=int, default=1,
                        help="run each cell's libraries this many times, alternating, and report per op the run "
                             "of median time (default 1): a machine drifts within a call")
    parser.add_argument("--dry-run", action="store_true", help="print the runs this would do and exit (no GPU needed)")
    parser.add_argument("--source-digest", action="store_true",
                        help="print the digest of this tree's sources that a run's header names, and exit")
    return parser


def parse_args(argv=None, quick: bool = False) -> argparse.Namespace:
    """Parsed and checked arguments; args.cells is the final [(ranks, sms)] list. Bad values exit 2."""
    parser = build_parser(quick)
    args = parser.parse_args(argv)
    if args.cells is not None and (args.ranks is not None or args.sms is not None):
        parser.error("--cells cannot be combined with --ranks/--sms")
    if args.ranks is not None or args.sms is not None:
        args.cells = list(itertools.product(args.ranks or [4], args.sms or [24]))
    elif args.cells is None:
        args.cells = parse_cells(DEFAULT_CELLS)
    for ranks, sms in args.cells:
        if not 1 <= ranks <= MAX_RANKS:
            parser.error(f"ranks must be in [1, {MAX_RANKS}] (one node), got {ranks}")
        if sms < 2 or sms % 2:
            parser.error(f"SMs per rank must be even and >= 2, got {sms}")
        if args.experts % ranks:
            parser.error(f"--experts {args.experts} is not a multiple of {ranks} ranks")
    if any(t < 1 for t in args.tokens):
        parser.error("--tokens must be >= 1")
    if any(h < 128 or h % 128 for h in args.hidden):
        parser.error("--hidden must be a multiple of 128 (fp8 scales cover 128 elements)")
    if not 1 <= args.topk <= args.experts:
        parser.error(f"--topk must be in [1, --experts], got {args.topk}")
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def plan(args: argparse.Namespace) -> list[dict]:
    """One entry per run, in order: every cell at every size."""
    return [{"ranks": ranks, "num_sms": sms, "tokens": tokens, "hidden": hidden, "topk": args.topk,
             "experts": args.experts}
            for (ranks, sms), tokens, hidden in itertools.product(args.cells, args.tokens, args.hidden)]


def add_problem_arguments(parser) -> None:
    """The one-shape options of the single-cell benchmarks (interleaved.py, bench_internode.py): the
    DeepSeek-V3-class shape #11 and #12 measure, per rank."""
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)


def refused_without_gpu(tool: str) -> bool:
    """True, having said why on stderr, when the GPU benchmark `tool` cannot run here (its caller
    then exits EXIT_NO_GPU)."""
    problem = gpu_problem()
    if problem:
        print(f"moelink {tool}: {problem}; the benchmark needs PyTorch with CUDA and a Hopper GPU", file=sys.stderr)
    return problem is not None


def gpu_problem() -> str | None:
    """Why the benchmark cannot run here, or None."""
    result = subprocess.run([sys.executable, "-c", GPU_PROBE], capture_output=True, text=True, timeout=300)
    if result.returncode == 0:
        return None
    lines = (result.stdout.strip() or result.stderr.strip()).splitlines()
    return lines[-1] if lines else f"the GPU probe failed (exit status {result.returncode})"


# ---- output -------------------------------------------------------------------------------------

def run_label(run: dict) -> str:
    return f"{run['ranks']}x{run['num_sms']} T={run['tokens']} H={run['hidden']} K={run['topk']} E={run['experts']}"


class Progress:
    """Shows that a run is alive while it runs: in place every second on a terminal, else one line
    every PROGRESS_LINE_S seconds (logs stay short)."""

    def __init__(self, label: str, stream=sys.stdout):
        self.label, self.stream = label, stream
        self.tty = stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        start = time.monotonic()
        interval = 1.0 if self.tty else PROGRESS_LINE_S
        while not self._stop.wait(interval):
            text = f"  {self.label}: running, {time.monotonic() - start:.0f} s"
            self.stream.write(f"\r{text}" if self.tty else f"{text}\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.tty:
            self.stream.write("\r\033[K")  # clear the progress line before the row
            self.stream.flush()


ROW_SIZE = f"{'ranks':>5} {'sms':>4} {'tokens':>7} {'hidden':>6} {'topk':>4} {'experts':>7} {'recv':>8}"
CELL_WIDTH = 13


def row_header() -> str:
    ops = " ".join(f"|{title:^{CELL_WIDTH}}" for _, title in ROW_OPS)
    units = " ".join(f"|{'GB/s  ratio':^{CELL_WIDTH}}" for _ in ROW_OPS)
    return (f"# {ROW_SIZE} {ops} | layout\n"
            f"# {' ' * (len(ROW_SIZE) - 8)}{'rows':>8} {units} |     us")


def _op(result: dict | None, name: str) -> dict | None:
    if not result or "error" in result:
        return None
    return result.get("ops", {}).get(name)


def ratio(mine: dict | None, theirs: dict | None) -> float | None:
    """How many times faster moelink is, both from this run: GB/s over GB/s, or for an op without a
    byte count (layout) DeepEP's time over moelink's. None where either is missing."""
    if not mine or not theirs:
        return None
    if mine.get("gbps_mean") and theirs.get("gbps_mean"):
        return mine["gbps_mean"] / theirs["gbps_mean"]
    if "gbps_mean" not in mine and "gbps_mean" not in theirs and mine.get("time_us_mean"):
        return theirs["time_us_mean"] / mine["time_us_mean"]
    return None


def format_row(run: dict, results: dict) -> str:
    """One nccl-tests style line per (cell, size): moelink's GB/s and its ratio to DeepEP for each
    op of ROW_OPS, then moelink's layout time."""
    mine, theirs = results.get("moelink"), results.get("deep_ep")
    recv = mine.get("recv_rows") if mine and "error" not in mine else None
    recv_text = f"{sum(recv) // len(recv)}" if recv else "-"
    size = (f"{run['ranks']:>5} {run['num_sms']:>4} {run['tokens']:>7} {run['hidden']:>6} "
            f"{run['topk']:>4} {run['experts']:>7} {recv_text:>8}")
    if mine is None or "error" in mine:
        return f"  {size} | moelink FAILED (see above)"
    cells = []
    for name, _ in ROW_OPS:
        op = _op(mine, name)
        if op is None or "gbps_mean" not in op:
            cells.append(f"|{'failed':^{CELL_WIDTH}}")
            continue
        r = ratio(op, _op(theirs, name))
        cells.append(f"|{op['gbps_mean']:>6.1f} {('x' + format(r, '.2f')) if r else '    -':>6}")
    layout = _op(mine, "layout")
    return f"  {size} {' '.join(cells)} | {layout['time_us_mean'] if layout else float('nan'):>6.1f}"


def two_touch_limit(copy_gbps: float, ranks: int, gpus: int) -> float:
    """Per-rank GB/s if every routed byte cost only its two HBM touches (read at the source, write at
    the destination) on a GPU whose copy moves copy_gbps (read + write) and is shared by the ranks on it."""
    ranks_per_gpu = max(1, -(-ranks // max(1, gpus)))
    return copy_gbps / (2 * ranks_per_gpu)


def _cell(op: dict | None) -> tuple[str, str]:
    if op is None:
        return "-", "-"
    gbps = f"{op['gbps_mean']:.1f}" if "gbps_mean" in op else "-"
    return f"{op['time_us_mean']:.1f}", gbps


def format_table(cells: list[dict], info: dict, anchor_note: str) -> str:
    """The markdown table: one row per (cell, size, op), moelink and DeepEP from this run."""
    arena = any("moelink+arena" in c["results"] for c in cells)
    head = ["cell", "T", "H", "K", "E", "op", "moelink µs", "moelink GB/s", "DeepEP µs", "DeepEP GB/s", "ratio",
            "% of two-touch limit"]
    if arena:
        head += ["moelink+arena GB/s", "arena ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        results = cell["results"]
        mine, theirs, with_arena = results.get("moelink"), results.get("deep_ep"), results.get("moelink+arena")
        prefix = (f"| {cell['ranks']}x{cell['num_sms']} | {cell['tokens']} | {cell['hidden']} | {cell['topk']} | "
                  f"{cell['experts']}")
        if mine is None or "error" in mine:
            lines.append(f"{prefix} | all | moelink FAILED |" + " |" * (len(head) - 7))
            continue
        limit = two_touch_limit(info.get("copy_gbps", 0.0), cell["ranks"], info.get("gpu_count", 1))
        for name, title in OP_TITLES.items():
            op, other = _op(mine, name), _op(theirs, name)
            if op is None and name in mine.get("errors", {}):
                row = [title, "raised", "", *_cell(other), "-", "-"]
            else:
                r = ratio(op, other)
                share = f"{100 * op['gbps_mean'] / limit:.0f}%" if op and "gbps_mean" in op and limit else "-"
                if theirs is None or "error" in theirs:
                    other_cells = ("no anchor", "-") if theirs is None else ("anchor failed", "-")
                elif other is None:
                    other_cells = ("raised" if name in theirs.get("errors", {}) else "-", "-")
                else:
                    other_cells = _cell(other)
                row = [title, *_cell(op), *other_cells, f"{r:.2f}" if r else "-", share]
            if arena:
                arena_op = _op(with_arena, name)
                r = ratio(arena_op, other)
                row += [_cell(arena_op)[1], f"{r:.2f}" if r else "-"]
            lines.append(f"{prefix} | " + " | ".join(row) + " |")
    lines.append("")
    paths = []
    for cell in cells:
        mine = cell["results"].get("moelink")
        if not mine or "error" in mine:
            continue
        ops = [f"{OP_TITLES[n]} {_op(mine, n)['in_place_ranks']}/{cell['ranks']}" for n in OP_TITLES
               if _op(mine, n) and "in_place_ranks" in _op(mine, n)]
        if ops:
            paths.append(f"{cell['ranks']}x{cell['num_sms']}: " + ", ".join(ops))
    if paths:
        lines.append("moelink ranks whose last timed call wrote rows in place (dispatch direct, combine pulled): "
                     + "; ".join(paths) + ".")
        lines.append("")
    placements = []
    for cell in cells:
        for impl, result in cell["results"].items():
            op = _op(result, "dispatch_fp8") if result and "error" not in result else None
            where = op.get("placement") if op else None
            if where and all(where):
                placements.append(f"{cell['ranks']}x{cell['num_sms']} {impl}: {placement_text(where)}")
    if placements:
        lines.append("Where each rank's thread ran as its uncached fp8 dispatch's timing began (CPU, package/core, "
                     "NUMA node): " + "; ".join(placements) + ".")
        lines.append("")
    late = [f"{cell['ranks']}x{cell['num_sms']} {impl}: {result['late_starts']}" for cell in cells
            for impl, result in cell["results"].items()
            if result and "error" not in result and any(result.get("late_starts") or ())]
    if late:
        lines.append("Timed calls that started past the ranks' shared deadline (bench_intranode.start_together), "
                     "per rank: " + "; ".join(late) + ".")
        lines.append("")
    lines.append(f"Anchor: {anchor_note}. Two-touch limit: {info.get('copy_gbps', 0):.0f} GB/s copy rate "
                 "(read + write) / (2 x ranks per GPU).")
    return "\n".join(lines)


SOURCE_PARTS = ("CMakeLists.txt", "cmake", "include", "src", "python", "bench")


def source_digest(root: Path = REPO_ROOT) -> str:
    """12 hex digits of SHA-256 over the paths and bytes of the files that decide what a run
    measures (SOURCE_PARTS; caches left out). The machine that runs the benchmark may hold an older
    `.git` than its files (a copy of the working tree), so the commit it prints can be stale; the
    digest is of the files themselves. `run_all.py --source-digest` prints it for a local tree."""
    import hashlib  # noqa: PLC0415

    digest = hashlib.sha256()
    for part in SOURCE_PARTS:
        base = root / part
        if base.is_file():
            files = [base]
        elif base.is_dir():
            files = sorted(p for p in base.rglob("*") if p.is_file())
        else:
            files = []
        for path in files:
            # Notes and results change after a run without changing what it ran.
            if "__pycache__" in path.parts or path.suffix in (".pyc", ".md") or path.name == "last_run.json":
                continue
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "uncommitted"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# ---- the job ------------------------------------------------------------------------------------

def job(name: str) -> tuple[str, str, str]:
    """bench_intranode.<name>, by reference: the ranks import it (and torch); this process does not."""
    return "bench_intranode", name, str(BENCH_DIR / "bench_intranode.py")


def merge_repeats(results: list[dict]) -> dict:
    """One library's repeated runs of a cell as one result: per op the entry of the run whose time
    is the median (the lower middle for an even count), with every run's time in `repeats_us`. A
    failed run is the result (its error is what to report)."""
    for result in results:
        if "error" in result:
            return result
    merged = dict(results[0])
    merged["ops"] = {}
    merged["errors"] = {}
    for result in results:
        for name, error in result.get("errors", {}).items():
            merged["errors"].setdefault(name, error)
    for name in results[0].get("ops", {}):
        entries = [r["ops"][name] for r in results if name in r.get("ops", {})]
        if len(entries) < len(results) or name in merged["errors"]:
            continue  # an op that did not run every time is not reported as if it had
        ordered = sorted(entries, key=lambda e: e["time_us_mean"])
        merged["ops"][name] = {**ordered[(len(ordered) - 1) // 2], "repeats_us": [e["time_us_mean"] for e in entries]}
    return merged


def run_cell(run: dict, impl: str, args: argparse.Namespace, anchor_path: str | None, label: str) -> dict:
    params = {"impl": impl, "num_sms": run["num_sms"], "num_tokens": run["tokens"], "hidden": run["hidden"],
              "num_topk": run["topk"], "num_experts": run["experts"], "iters": args.iters, "warmup": args.warmup,
              "anchor_path": anchor_path}
    try:
        with Progress(label):
            return launcher.run_ranks(run["ranks"], job("bench_cell_job"), params, timeout_s=300)[0]
    except launcher.RankFailure as failure:
        print(f"{label}: FAILED\n{failure}", flush=True)
        return {"impl": impl, "error": str(failure)}


def placement_text(where: list) -> str:
    """Ranks' placements (bench_intranode.placement) as one phrase, naming ranks that share a core."""
    text = ", ".join(f"rank {r} cpu {p['cpu']} ({p['core']}, node {p['node']})" for r, p in enumerate(where))
    by_core = {}
    for r, p in enumerate(where):
        by_core.setdefault(p["core"], []).append(r)
    shared = [ranks for ranks in by_core.values() if len(ranks) > 1]
    if shared:
        text += "; sharing a core: " + ", ".join("/".join(map(str, ranks)) for ranks in shared)
    return text


def main(argv=None) -> int:
    quick = os.environ.get("MOELINK_BENCH_QUICK", "0") not in ("", "0")
    args = parse_args(argv, quick)
    runs = plan(args)
    if args.source_digest:
        print(source_digest())
        return 0
    if args.dry_run:
        for run in runs:
            print(run_label(run))
        return 0
    if refused_without_gpu("bench"):
        return EXIT_NO_GPU

    import anchor as anchor_lookup  # noqa: PLC0415 - bench/ is on sys.path

    anchor = anchor_lookup.resolve(args.anchor, REPO_ROOT)
    if not anchor.available and args.anchor not in ("auto", "none"):
        # Asked for by path: a run without it would print no ratios and look like success.
        print(f"moelink bench: the anchor {args.anchor} is not usable: {anchor.reason}", file=sys.stderr)
        return EXIT_RUN
    impls = ["moelink"] + (["deep_ep"] if anchor.available else []) + (["moelink+arena"] if args.arena else [])
    report = {"commit": git_commit(), "sources": source_digest(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick,
              "iters": args.iters, "warmup": args.warmup, "repeat": args.repeat, "runs": runs, "impls": impls,
              "anchor": {"path": anchor.path, "version": anchor.version, "reason": anchor.reason}, "cells": []}
    try:
        info = launcher.run_ranks(1, job("device_info"), timeout_s=120)[0]
    except launcher.RankFailure as failure:
        print(f"cannot query the device:\n{failure}", flush=True)
        return EXIT_RUN
    report["device"] = info
    print(f"device: {info['name']}, {info['sm_count']} SMs, {info['memory_gib']} GiB, driver {info['driver']} "
          f"(torch {info['torch']}, CUDA {info['cuda']}); commit {report['commit']}, sources {report['sources']}",
          flush=True)
    print(f"anchor: {anchor.describe()}", flush=True)

    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        json_path = Path(out_dir) / "bench_intranode.json"
    else:
        json_path = BENCH_DIR / "last_run.json"

    def save() -> None:
        # After every step: a job cut off by a time limit still leaves what it measured.
        json_path.write_text(json.dumps(report, indent=2) + "\n")

    # Every rank count the runs use, as the benchmark calls it (default configs, no arena) and
    # with the arena; quick: 2 ranks only.
    verify_counts = [2] if quick else sorted({run["ranks"] for run in runs})
    report["verify"] = {"ranks": verify_counts, "ok": True}
    for verify_ranks in verify_counts:
        try:
            with Progress(f"verify on {verify_ranks} ranks"):
                launcher.run_ranks(verify_ranks, job("verify"), timeout_s=300)
            print(f"verify on {verify_ranks} ranks: ok", flush=True)
        except launcher.RankFailure as failure:
            report["verify"] = {"ranks": verify_counts, "ok": False, "error": str(failure)}
            print(f"verify on {verify_ranks} ranks: FAILED\n{failure}", flush=True)
            break
    save()

    repeats = (f", each library {args.repeat} times alternating (the run of median time per op)"
               if args.repeat > 1 else "")
    print(f"\n{len(runs)} runs x {len(impls)} ({', '.join(impls)}), median of {args.iters} iterations{repeats} "
          "(GB/s per rank, mean over ranks; ratio = moelink / DeepEP, both from this run; layout: DeepEP time / moelink time)")
    print(row_header(), flush=True)
    for index, run in enumerate(runs):
        repeated = {impl: [] for impl in impls}
        for repeat in range(args.repeat):
            for impl in impls:
                label = f"[{index + 1}/{len(runs)}] {run_label(run)} {impl}"
                if args.repeat > 1:
                    label += f" ({repeat + 1}/{args.repeat})"
                repeated[impl].append(run_cell(run, impl, args, anchor.path, label))
        results = {impl: merge_repeats(repeated[impl]) for impl in impls}
        report["cells"].append({**run, "results": results})
        print(format_row(run, results), flush=True)
        save()

    table = format_table(report["cells"], info, anchor.describe())
    footer = [f"copy bandwidth (1 GiB device-to-device, read + write): {info['copy_gbps']:.0f} GB/s"]
    if not report["verify"]["ok"]:
        footer.append("VERIFY FAILED: the numbers above come from a build that does not match the reference")
    text = "\n".join([f"{info['name']} ({info['sm_count']} SMs, driver {info['driver']}), commit {report['commit']} "
                      f"(sources {report['sources']}), median of {args.iters} iterations{repeats}", "", table, "", *footer])
    print("\n" + text, flush=True)

    if out_dir:
        (Path(out_dir) / "bench_intranode.md").write_text(text + "\n")
    report["table"] = text
    save()
    print(f"raw results: {json_path}")

    if not report["verify"]["ok"]:
        return EXIT_VERIFY
    failed = any("error" in c["results"]["moelink"] or c["results"]["moelink"].get("errors") for c in report["cells"])
    return EXIT_RUN if failed else 0


if __name__ == "__main__":
    sys.exit(main())
