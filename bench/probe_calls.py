"""What one host call costs when N processes share the GPU under MPS, each call made right after a
barrier (cold, as the benchmarks' timed calls are) and again alone with a short sleep between calls.

    bash scripts/with_mps.sh python3 bench/probe_calls.py [--ranks 1,2,8] [--calls 100]

An operation's host path is a handful of such calls (tensor allocations, event records and waits,
launches) ahead of its kernel, and under MPS with several ranks each one costs several times what
it does in one process (bench/NOTES.md, tenth session): this says how many microseconds each kind
of call is worth, to choose what to cut. Per rank count it prints, for each call, the median µs of
the slowest process, after the barrier ("lockstep") and alone. Where moelink is importable it also
times one uncached dispatch's nine outputs made as the extension makes them, through torch's C
shim and through Python (moelink._moelink.make_outputs; python/bindings/convert.hpp's Outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def _calls(torch):
    stream = torch.cuda.Stream()
    x = torch.zeros(1024, device="cuda")
    ids = torch.zeros((4, 8), dtype=torch.int64, device="cuda")
    weights = torch.zeros((4, 8), dtype=torch.float32, device="cuda")
    event = torch.cuda.Event()
    return {
        "event record": lambda: event.record(stream),
        "stream wait": lambda: stream.wait_event(event),
        "event query": lambda: event.query(),
        "empty 14 MB (dtype, device keywords)": lambda: torch.empty((1024, 7168), dtype=torch.bfloat16, device="cuda"),
        "empty (dtype, device=0 keywords)": lambda: torch.empty((1024, 8), dtype=torch.int64, device=0),
        "new_empty (positional)": lambda: ids.new_empty((1024, 8)),
        "empty_strided (keywords)": lambda: torch.empty_strided((1024, 56), (1, 1024), dtype=torch.float32, device=0),
        "new_empty_strided (positional)": lambda: weights.new_empty_strided((1024, 56), (1, 1024)),
        "data_ptr()": lambda: ids.data_ptr(),
        "zeros(64) (a fill launch)": lambda: torch.zeros(64, dtype=torch.int32, device="cuda"),
        "elementwise launch": lambda: x.add_(1),
        **_moelink_calls(),
    }


def _moelink_calls():
    try:
        from moelink import _moelink
    except ImportError:
        return {}
    # An uncached dispatch's outputs at 4096 tokens x 4 ranks: recv_x, scales, top-k ids and weights,
    # recv_src_idx and the handle's four.
    n = 16384
    specs = [((n, 7168), "float8_e4m3fn", (), 0), ((n, 56), "float32", (1, n), 0), ((n, 8), "int64", (), 0),
             ((n, 8), "float32", (), 0), ((n,), "int32", (), 0), ((4, 4), "int32", (), 0), ((4, 12), "int32", (), 0),
             ((4, 12), "int32", (), 0), ((2,), "int64", (), 0)]

    def made(shim: bool):
        def call():
            _moelink.use_torch_shim(shim)
            _moelink.make_outputs(specs)
        return call

    if not _moelink.use_torch_shim(True):
        return {"9 outputs via Python (no shim here)": made(False)}
    return {"9 outputs via torch's C shim": made(True), "9 outputs via Python": made(False)}


def _worker(rank: int, barrier, results, calls: int) -> None:
    import torch

    torch.cuda.set_device(0)
    ops = _calls(torch)
    for _ in range(50):
        for op in ops.values():
            op()
    torch.cuda.synchronize()
    medians = {}
    for name, op in ops.items():
        lockstep, alone = [], []
        for _ in range(calls):
            barrier.wait()
            start = time.perf_counter()
            op()
            lockstep.append(time.perf_counter() - start)
        for _ in range(calls):
            start = time.perf_counter()
            op()
            alone.append(time.perf_counter() - start)
            time.sleep(0.0002)
        torch.cuda.synchronize()
        medians[name] = (statistics.median(lockstep) * 1e6, statistics.median(alone) * 1e6)
    results.put((rank, medians))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,8", help="comma-separated process counts (default 1,2,8)")
    parser.add_argument("--calls", type=int, default=100, help="calls of each kind per mode (default 100)")
    args = parser.parse_args()
    import torch.multiprocessing as mp

    if not __import__("torch").cuda.is_available():
        print("probe_calls: no GPU", file=sys.stderr)
        return 2
    report = {}
    for n in (int(r) for r in args.ranks.split(",")):
        ctx = mp.get_context("spawn")
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, barrier, results, args.calls)) for r in range(n)]
        for proc in procs:
            proc.start()
        per_rank = [results.get(timeout=600)[1] for _ in procs]
        for proc in procs:
            proc.join()
        slowest = {name: (max(m[name][0] for m in per_rank), max(m[name][1] for m in per_rank))
                   for name in per_rank[0]}
        report[n] = slowest
        print(f"{n} processes (µs, slowest process's median: after a barrier / alone):", flush=True)
        for name, (lockstep, alone) in slowest.items():
            print(f"  {name:<40} {lockstep:7.1f} / {alone:7.1f}", flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "probe_calls.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
