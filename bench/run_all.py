"""The benchmark job: device facts, a correctness check against the reference, then the cells.

    python3 bench/run_all.py [--cells 4x24,4x8,8x16 | --ranks 4,8 --sms 8,24]
                             [--tokens 4096[,...]] [--hidden 7168[,...]] [--topk 8] [--experts 256]
                             [--iters 30] [--warmup 5] [--dry-run]

A cell RxS runs R ranks as processes on this host (several per GPU under MPS), each with S SMs, once
per size (every --tokens x --hidden). The options pick the shape only; how a run is measured is
bench/bench_intranode.py's (see bench/RESULTS.md). While a run is in progress a line shows its
elapsed time; each finished run prints one row, as nccl-tests does, and the end a markdown table.
MOELINK_BENCH_QUICK=1: verify on 2 ranks and default to 10 iterations. The table and the raw JSON
go to $OUT (bench_intranode.md / .json) if OUT is set, else to bench/last_run.json.
Exit status: 0 ok, 1 verify failed, 2 a run failed (or bad arguments), 3 no usable GPU.
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

# DeepEP V1 intranode GB/s (dispatch bf16, dispatch fp8, combine) on an H100 with ranks under MPS,
# measured at the default shape only.
DEEPEP_GBPS = {(4, 24): (149, 158, 181), (4, 8): (81, 78, 115), (8, 16): (87, 83, 101)}
DEEPEP_SHAPE = {"tokens": 4096, "hidden": 7168, "topk": 8, "experts": 256}
COMPARED_OPS = ("dispatch_bf16", "dispatch_fp8", "combine")
SHOWN_OPS = (*COMPARED_OPS, "dispatch_bf16_uncached", "combine_pushed")
OP_TITLES = ("dispatch bf16", "dispatch fp8", "combine", "uncached bf16", "combine pushed")
DEFAULT_CELLS = "4x24,4x8,8x16"
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
    parser.add_argument("--dry-run", action="store_true", help="print the runs this would do and exit (no GPU needed)")
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
    return args


def plan(args: argparse.Namespace) -> list[dict]:
    """One entry per run, in order: every cell at every size."""
    return [{"ranks": ranks, "num_sms": sms, "tokens": tokens, "hidden": hidden, "topk": args.topk,
             "experts": args.experts}
            for (ranks, sms), tokens, hidden in itertools.product(args.cells, args.tokens, args.hidden)]


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


def row_header() -> str:
    ops = " ".join(f"| {title:^16}" for title in OP_TITLES)
    units = " ".join(f"| {'time us':>8} {'GB/s':>7}" for _ in OP_TITLES)
    return f"# {ROW_SIZE} {ops}\n# {' ' * (len(ROW_SIZE) - 8)}{'rows':>8} {units}"


def format_row(result: dict) -> str:
    """One nccl-tests style line for a finished (or failed) run."""
    recv = result.get("recv_rows")
    recv_text = f"{sum(recv) // len(recv)}" if recv else "-"
    size = (f"{result['ranks']:>5} {result['num_sms']:>4} {result['tokens']:>7} {result['hidden']:>6} "
            f"{result['topk']:>4} {result['experts']:>7} {recv_text:>8}")
    if "error" in result:
        return f"  {size} | FAILED (see above)"
    ops = result["ops"]
    cols = " ".join(f"| {ops[op]['time_us_mean']:>8.1f} {ops[op]['gbps_mean']:>7.1f}" for op in SHOWN_OPS)
    return f"  {size} {cols}"


def deepep_reference(result: dict):
    if any(result.get(key) != value for key, value in DEEPEP_SHAPE.items()):
        return None
    return DEEPEP_GBPS.get((result["ranks"], result["num_sms"]))


def format_table(results: list[dict]) -> str:
    """The markdown table for bench/RESULTS.md: one row per (cell, size)."""
    lines = ["| cell | T | H | K | E | dispatch bf16 GB/s | dispatch fp8 GB/s | combine GB/s | uncached bf16 GB/s | "
             "combine, input pushed GB/s | time µs (bf16 / fp8 / combine / uncached / pushed) | "
             "DeepEP GB/s (bf16 / fp8 / combine) | ratio (bf16 / fp8 / combine / pushed) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        name = f"{result['ranks']}x{result['num_sms']}" + ("" if result.get("arena", True) else " rings")
        size = f"{result['tokens']} | {result['hidden']} | {result['topk']} | {result['experts']}"
        if "error" in result:
            lines.append(f"| {name} | {size} | FAILED | | | | | | | |")
            continue
        ops = result["ops"]
        gbps = [f"{ops[op]['gbps_mean']:.1f} (min {ops[op]['gbps_min']:.1f})" for op in SHOWN_OPS]
        times = " / ".join(f"{ops[op]['time_us_mean']:.0f}" for op in SHOWN_OPS)
        deepep = deepep_reference(result)
        if deepep:
            reference = " / ".join(str(v) for v in deepep)
            ratio = " / ".join(f"{ops[op]['gbps_mean'] / v:.2f}"
                               for op, v in zip((*COMPARED_OPS, "combine_pushed"), (*deepep, deepep[2])))
        else:
            reference = ratio = "-"
        lines.append(f"| {name} | {size} | {' | '.join(gbps)} | {times} | {reference} | {ratio} |")
    return "\n".join(lines)


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

def main(argv=None) -> int:
    quick = bool(os.environ.get("MOELINK_BENCH_QUICK"))
    args = parse_args(argv, quick)
    runs = plan(args)
    if args.dry_run:
        for run in runs:
            print(run_label(run))
        return 0
    problem = gpu_problem()
    if problem:
        print(f"moelink bench: {problem}; the benchmark needs PyTorch with CUDA and a Hopper GPU", file=sys.stderr)
        return EXIT_NO_GPU

    import bench_intranode  # noqa: PLC0415 - after sys.path is set and the GPU check; imports torch

    report = {"commit": git_commit(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick,
              "iters": args.iters, "warmup": args.warmup, "runs": runs, "cells": []}
    try:
        info = launcher.run_ranks(1, bench_intranode.device_info, timeout_s=120)[0]
    except launcher.RankFailure as failure:
        print(f"cannot query the device:\n{failure}", flush=True)
        return EXIT_VERIFY
    report["device"] = info
    print(f"device: {info['name']}, {info['sm_count']} SMs, {info['memory_gib']} GiB "
          f"(torch {info['torch']}, CUDA {info['cuda']}); commit {report['commit']}", flush=True)

    verify_ranks = 2 if quick else 4
    try:
        with Progress(f"verify on {verify_ranks} ranks"):
            launcher.run_ranks(verify_ranks, bench_intranode.verify, timeout_s=300)
        report["verify"] = {"ranks": verify_ranks, "ok": True}
        print(f"verify on {verify_ranks} ranks: ok", flush=True)
    except launcher.RankFailure as failure:
        report["verify"] = {"ranks": verify_ranks, "ok": False, "error": str(failure)}
        print(f"verify on {verify_ranks} ranks: FAILED\n{failure}", flush=True)

    print(f"\n{len(runs)} runs, median of {args.iters} iterations each (GB/s per rank, mean over ranks)")
    print(row_header(), flush=True)
    layout_run = None
    for index, run in enumerate(runs):
        measure_layout = layout_run is None and run["ranks"] == 4
        params = {"num_sms": run["num_sms"], "num_tokens": run["tokens"], "hidden": run["hidden"],
                  "num_topk": run["topk"], "num_experts": run["experts"], "iters": args.iters,
                  "warmup": args.warmup, "measure_layout": measure_layout}
        try:
            with Progress(f"[{index + 1}/{len(runs)}] {run_label(run)}"):
                result = launcher.run_ranks(run["ranks"], bench_intranode.bench_cell_job, params, timeout_s=600)[0]
        except launcher.RankFailure as failure:
            result = {**run, "error": str(failure)}
            print(f"{run_label(run)}: FAILED\n{failure}", flush=True)
        else:
            if measure_layout:
                layout_run = result
        report["cells"].append(result)
        print(format_row(result), flush=True)

    table = format_table(report["cells"])
    layout_us = layout_run.get("layout_us") if layout_run else None
    report["layout_us"] = layout_us
    footer = [f"copy bandwidth (1 GiB device-to-device, read + write): {info['copy_gbps']:.0f} GB/s"]
    if layout_us is not None:
        footer.append(f"layout (T={layout_run['tokens']}, K={layout_run['topk']}, E={layout_run['experts']}, "
                      f"4-rank cell, rank 0): {layout_us:.1f} µs")
    else:
        footer.append("layout: not measured (no 4-rank run)")
    if not report["verify"]["ok"]:
        footer.append("VERIFY FAILED: the numbers above come from a build that does not match the reference")
    text = "\n".join([f"{info['name']} ({info['sm_count']} SMs), commit {report['commit']}, "
                      f"median of {args.iters} iterations", "", table, "", *footer])
    print("\n" + text, flush=True)

    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "bench_intranode.md").write_text(text + "\n")
        json_path = Path(out_dir) / "bench_intranode.json"
    else:
        json_path = BENCH_DIR / "last_run.json"
    report["table"] = text
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"raw results: {json_path}")

    if not report["verify"]["ok"]:
        return EXIT_VERIFY
    return EXIT_RUN if any("error" in c for c in report["cells"]) else 0


if __name__ == "__main__":
    sys.exit(main())
