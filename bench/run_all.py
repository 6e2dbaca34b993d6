"""The benchmark job: device facts, a correctness check against the reference, then the cells.

    python3 bench/run_all.py [--cells 4x24,4x8,8x16] [--iters 30] [--warmup 5]

A cell RxS runs R ranks as processes on this host (several per GPU under MPS), each with S SMs.
MOELINK_BENCH_QUICK=1: verify on 2 ranks and default to 10 iterations. The table and the raw JSON
go to $OUT (bench_intranode.md / .json) if OUT is set, else to bench/last_run.json.
Exit status: 1 if verify failed, 2 if a cell failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (BENCH_DIR, REPO_ROOT / "tests" / "gpu"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import launcher  # noqa: E402

# DeepEP V1 intranode GB/s (dispatch bf16, dispatch fp8, combine) on an H100 with ranks under MPS.
DEEPEP_GBPS = {(4, 24): (149, 158, 181), (4, 8): (81, 78, 115), (8, 16): (87, 83, 101)}
COMPARED_OPS = ("dispatch_bf16", "dispatch_fp8", "combine")


def parse_cells(text: str) -> list[tuple[int, int]]:
    cells = []
    for item in text.split(","):
        ranks, sms = item.lower().split("x")
        cells.append((int(ranks), int(sms)))
    return cells


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


def format_table(cells: list[dict]) -> str:
    lines = ["| cell | dispatch bf16 GB/s | dispatch fp8 GB/s | combine GB/s | uncached bf16 GB/s | "
             "combine, input pushed GB/s | time µs (bf16 / fp8 / combine / uncached / pushed) | "
             "DeepEP GB/s (bf16 / fp8 / combine) | ratio (bf16 / fp8 / combine / pushed) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        name = f"{cell['ranks']}x{cell['num_sms']}" + ("" if cell.get("arena", True) else " rings")
        if "error" in cell:
            lines.append(f"| {name} | FAILED | | | | | | | |")
            continue
        ops = cell["ops"]
        shown = (*COMPARED_OPS, "dispatch_bf16_uncached", "combine_pushed")
        gbps = [f"{ops[op]['gbps_mean']:.1f} (min {ops[op]['gbps_min']:.1f})" for op in shown]
        times = " / ".join(f"{ops[op]['time_us_mean']:.0f}" for op in shown)
        deepep = DEEPEP_GBPS.get((cell["ranks"], cell["num_sms"]))
        if deepep:
            reference = " / ".join(str(v) for v in deepep)
            ratio = " / ".join(f"{ops[op]['gbps_mean'] / v:.2f}"
                               for op, v in zip((*COMPARED_OPS, "combine_pushed"), (*deepep, deepep[2])))
        else:
            reference = ratio = "-"
        lines.append(f"| {name} | {' | '.join(gbps)} | {times} | {reference} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    quick = bool(os.environ.get("MOELINK_BENCH_QUICK"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="4x24,4x8,8x16", help="comma-separated RANKSxSMS")
    parser.add_argument("--iters", type=int, default=10 if quick else 30)
    parser.add_argument("--warmup", type=int, default=2 if quick else 5)
    args = parser.parse_args(argv)
    cells = parse_cells(args.cells)

    import bench_intranode  # noqa: PLC0415 - after sys.path is set; imports torch

    report = {"commit": git_commit(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick,
              "iters": args.iters, "warmup": args.warmup, "cells": []}
    try:
        info = launcher.run_ranks(1, bench_intranode.device_info, timeout_s=120)[0]
    except launcher.RankFailure as failure:
        print(f"cannot query the device:\n{failure}", flush=True)
        return 1
    report["device"] = info
    print(f"device: {info['name']}, {info['sm_count']} SMs, {info['memory_gib']} GiB "
          f"(torch {info['torch']}, CUDA {info['cuda']}); commit {report['commit']}", flush=True)

    verify_ranks = 2 if quick else 4
    try:
        launcher.run_ranks(verify_ranks, bench_intranode.verify, timeout_s=300)
        report["verify"] = {"ranks": verify_ranks, "ok": True}
        print(f"verify on {verify_ranks} ranks: ok", flush=True)
    except launcher.RankFailure as failure:
        report["verify"] = {"ranks": verify_ranks, "ok": False, "error": str(failure)}
        print(f"verify on {verify_ranks} ranks: FAILED\n{failure}", flush=True)

    layout_measured = False
    for num_ranks, num_sms in cells:
        measure_layout = not layout_measured and num_ranks == 4
        layout_measured |= measure_layout
        params = {"num_sms": num_sms, "iters": args.iters, "warmup": args.warmup, "measure_layout": measure_layout}
        try:
            cell = launcher.run_ranks(num_ranks, bench_intranode.bench_cell_job, params, timeout_s=600)[0]
        except launcher.RankFailure as failure:
            cell = {"ranks": num_ranks, "num_sms": num_sms, "error": str(failure)}
            print(f"cell {num_ranks}x{num_sms}: FAILED\n{failure}", flush=True)
        else:
            ops = cell["ops"]
            print(f"cell {num_ranks}x{num_sms}: " + ", ".join(f"{op} {ops[op]['gbps_mean']:.1f} GB/s"
                                                              for op in ops), flush=True)
        report["cells"].append(cell)

    table = format_table(report["cells"])
    layout_us = next((c["layout_us"] for c in report["cells"] if c.get("layout_us") is not None), None)
    report["layout_us"] = layout_us
    footer = [f"copy bandwidth (1 GiB device-to-device, read + write): {info['copy_gbps']:.0f} GB/s"]
    footer.append("layout (T=4096, K=8, E=256, 4-rank cell, rank 0): "
                  + (f"{layout_us:.1f} µs" if layout_us is not None else "not measured (no 4-rank cell)"))
    if not report["verify"]["ok"]:
        footer.append("VERIFY FAILED: the numbers above come from a build that does not match the reference")
    text = "\n".join([f"{info['name']} ({info['sm_count']} SMs), commit {report['commit']}, "
                      f"T=4096 H=7168 K=8 E=256, median of {args.iters} iterations", "", table, "", *footer])
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
        return 1
    return 2 if any("error" in c for c in report["cells"]) else 0


if __name__ == "__main__":
    sys.exit(main())
