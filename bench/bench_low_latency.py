"""Low-latency dispatch / combine latency on this GPU, beside the HBM floor for the same bytes.

    bash scripts/with_mps.sh python3 bench/bench_low_latency.py [--ranks 2,4,8] [--tokens 128]
        [--hidden 7168] [--topk 8] [--experts 256,288] [--iters 50] [--warmup 10] [--reps 10] [--full-path] [--split-host]

Each (ranks, experts) runs R ranks as processes (several per GPU under MPS) with
MOELINK_EXPERIMENTAL_LOW_LATENCY=1, checks one round against the GPU suite's reference checks, then
times: dispatch bf16, dispatch fp8, combine (bf16, of the bf16 dispatch's layout), and the send call
of a hook-mode dispatch (return_recv_hook=True; the hook runs untimed after it). Timing: all ranks
start together (bench_intranode.start_together), then CUDA events around one call on the caller's
stream; per iteration the slowest rank's time counts; the median over iterations is shown. No L2 flush: decode runs these
back to back on warm data.

Floor: the time the same bytes take at this GPU's copy rate (1 GiB device-to-device, read + write
counted), every routed row read once and written once, summed over the ranks sharing a GPU:
dispatch bf16 2 x rows x 2H, fp8 2 x rows x (H + 4H/128), combine 2 x rows x 2H, with rows = the
(token, expert) pairs of all ranks on the GPU. DeepEP V1's low-latency mode cannot run without an
RDMA NIC (it forces IBGDA), so there is no anchor here. A second line per run splits the call's
time: the caller's host time in it, the per-call time of --reps eager calls queued back to back, and
of a captured call replayed --reps times (the GPU alone; the hook op has no graph figure). Raw JSON goes to $OUT/bench_low_latency.json
when OUT is set. Exit status: 0 ok, 1 a check failed, 2 a run failed, 3 no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (BENCH_DIR, REPO_ROOT / "tests", REPO_ROOT / "tests" / "gpu"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import launcher  # noqa: E402 - imports no torch
from run_all import EXIT_NO_GPU, EXIT_RUN, EXIT_VERIFY, Progress, int_list, job, refused_without_gpu  # noqa: E402

ENV = {"MOELINK_EXPERIMENTAL_LOW_LATENCY": "1"}
OPS = ("dispatch_bf16", "dispatch_fp8", "combine", "dispatch_send_hook")
# call: one call after a barrier, events around it (the headline); host: the caller's time in the
# call; back_to_back: eager calls queued in a row; graph: a captured call replayed in a row.
MEASURES = ("call", "host", "back_to_back", "graph")


def _event_us(iters: int, reps: int, timed, after=None) -> list[float]:
    """Per call, over `reps` calls of timed() queued back to back between two events, after all
    ranks started together (bench_intranode.start_together); after(result) runs untimed. With
    reps > 1 what skew is left between ranks' starts is spread over the reps."""
    import torch  # noqa: PLC0415

    from bench_intranode import start_together  # noqa: PLC0415

    samples = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start_together()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            out = timed()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / reps)
        if after:
            after(out)
    return samples


def _latency_us(op, iters: int, warmup: int, after=None) -> list[float]:
    for _ in range(warmup):
        out = op()
        if after:
            after(out)
    return _event_us(iters, 1, op, after)


def _graph_us(once, iters: int, reps: int) -> list[float]:
    """As back_to_back, with once() (a call and what follows it) captured in a CUDA graph and
    replayed: the GPU's time per call with no host work, as a server that replays decode graphs
    sees it."""
    import torch  # noqa: PLC0415

    once()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        once()
    samples = _event_us(iters, reps, graph.replay)
    del graph
    return samples


def _split_host_us(buf, op, iters: int, after) -> list[float]:
    """Per call, the host time spent inside the extension (runtime) calls of op, timed as the host
    figure is (barrier before each call); the wrapper's own cost is on the Python side."""
    from bench_intranode import TimedRuntime, host_samples_us  # noqa: PLC0415

    timed, real = TimedRuntime(buf.runtime), buf.runtime
    inside = []

    def split():
        timed.spent.clear()
        result = op()
        inside.append(sum(timed.spent.values()) * 1e6)
        return result

    buf.runtime = timed
    try:
        host_samples_us(split, iters, after=after)
    finally:
        buf.runtime = real
    return inside


def bench_ll(rank, num_ranks, params: dict) -> dict:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    import common  # noqa: PLC0415
    import moelink  # noqa: PLC0415
    from bench_intranode import host_samples_us  # noqa: PLC0415
    from test_low_latency import LLCase, check_combine, check_dispatch, combine_input, make_round  # noqa: PLC0415

    case = LLCase("bench", params["tokens"], params["tokens"], params["hidden"], params["topk"], params["experts"],
                  drop_prob=0.0)
    hint = moelink.Buffer.get_low_latency_rdma_size_hint(case.max_tokens, case.hidden, num_ranks, case.num_experts)
    buf = moelink.Buffer(common.world_group(), 0, hint, low_latency_mode=True,
                         num_qps_per_rank=case.num_experts // num_ranks, explicitly_destroy=True)
    buf._express = not params.get("full_path", False)
    routing, inputs = make_round(case, params["seed"], num_ranks)
    topk_idx = torch.from_numpy(routing[rank]).cuda()
    x, weights = inputs[rank].x, inputs[rank].topk_weights
    M, E = case.max_tokens, case.num_experts

    out = buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=False)
    check_dispatch(out, case, routing, inputs, rank, num_ranks, f"bench rank {rank}")
    y = combine_input(case, out, inputs, rank, num_ranks)
    check_combine(buf.low_latency_combine(y, topk_idx, weights, out[2])[0], case, routing, inputs, rank,
                  f"bench rank {rank}")
    handle = out[2]

    ops = {
        "dispatch_bf16": (lambda: buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=False), None),
        "dispatch_fp8": (lambda: buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=True), None),
        "combine": (lambda: buf.low_latency_combine(y, topk_idx, weights, handle), None),
        "dispatch_send_hook": (lambda: buf.low_latency_dispatch(x, topk_idx, M, E, use_fp8=False,
                                                                return_recv_hook=True),
                               lambda result: result[4]()),
    }
    reps = params.get("reps", 10)
    mine = {}
    for name, (op, after) in ops.items():
        def once(op=op, after=after):
            out = op()
            if after:
                after(out)
        mine[name] = {"call": _latency_us(op, params["iters"], params["warmup"], after),
                      "host": host_samples_us(op, params["iters"], after=after),
                      "back_to_back": _event_us(params["iters"], reps, once)}
        if name != "dispatch_send_hook":  # a hook's graph would time send and receive together
            mine[name]["graph"] = _graph_us(once, params["iters"], reps)
        if params.get("split_host"):
            mine[name]["host_in_extension"] = _split_host_us(buf, op, params["iters"], after)
    routed = int((topk_idx >= 0).sum().item())
    gathered = [None] * num_ranks
    dist.all_gather_object(gathered, {"samples": mine, "routed": routed})
    buf.destroy()
    summary = {"ranks": num_ranks, **{k: params[k] for k in ("tokens", "hidden", "topk", "experts", "iters")},
               "reps": reps, "routed_rows": sum(g["routed"] for g in gathered), "ops": {}}
    for name in OPS:
        entry = {}
        for how in MEASURES + ("host_in_extension",):
            if how not in mine[name]:
                continue
            worst = [max(g["samples"][name][how][i] for g in gathered) for i in range(params["iters"])]
            entry[how] = {"median_us": statistics.median(worst), "min_us": min(worst)}
        entry["median_us"] = entry["call"]["median_us"]
        summary["ops"][name] = entry
    return summary


def floor_us(op: str, routed_rows_on_gpu: int, hidden: int, copy_gbps: float) -> float | None:
    row = {"dispatch_bf16": 2 * hidden, "dispatch_fp8": hidden + 4 * hidden // 128, "combine": 2 * hidden}.get(op)
    if row is None or not copy_gbps:
        return None
    return 2 * routed_rows_on_gpu * row / (copy_gbps * 1e3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int_list, default=[2, 4, 8])
    parser.add_argument("--tokens", type=int, default=128, help="tokens per rank (= num_max_dispatch_tokens_per_rank)")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int_list, default=[256, 288])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=10, help="calls in a row for the back-to-back and graph figures")
    parser.add_argument("--full-path", action="store_true",
                        help="time the calls through the full Python path, not the express calls (Buffer._express)")
    parser.add_argument("--split-host", action="store_true",
                        help="also time the host time spent inside the extension's calls (the rest is Python); "
                             "with MOELINK_HOST_STAMPS=DIR the runtime's phases go to DIR too")
    args = parser.parse_args(argv)
    for ranks in args.ranks:
        for experts in args.experts:
            if experts % ranks:
                parser.error(f"--experts {experts} is not a multiple of {ranks} ranks")
    if refused_without_gpu("bench"):
        return EXIT_NO_GPU
    info = launcher.run_ranks(1, job("device_info"), timeout_s=120)[0]
    print(f"device: {info['name']}, {info['sm_count']} SMs, copy {info['copy_gbps']:.0f} GB/s (read + write)")
    print(f"# {'ranks':>5} {'experts':>7} {'tokens':>6} {'hidden':>6} {'topk':>4} | "
          + " | ".join(f"{name:>18}" for name in OPS) + " |  (median us, slowest rank; floor us)")
    report = {"device": info, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": []}
    status = 0
    for ranks in args.ranks:
        for experts in args.experts:
            params = {"tokens": args.tokens, "hidden": args.hidden, "topk": args.topk, "experts": experts,
                      "iters": args.iters, "warmup": args.warmup, "reps": args.reps, "seed": 7,
                      "full_path": args.full_path, "split_host": args.split_host}
            try:
                with Progress(f"{ranks} ranks, {experts} experts"):
                    result = launcher.run_ranks(ranks, ("bench_low_latency", "bench_ll", str(Path(__file__).resolve())), params,
                                                timeout_s=600, env=ENV)[0]
            except launcher.RankFailure as failure:
                text = str(failure)
                print(f"{ranks} ranks, {experts} experts: FAILED\n{text}", flush=True)
                report["runs"].append({"ranks": ranks, "experts": experts, "error": text})
                status = EXIT_VERIFY if "AssertionError" in text else EXIT_RUN
                continue
            gpus = max(1, info.get("gpu_count", 1))
            on_gpu = result["routed_rows"] * min(ranks, -(-ranks // gpus)) // ranks
            cells, others = [], []
            for name in OPS:
                op = result["ops"][name]
                op["floor_us"] = floor_us(name, on_gpu, args.hidden, info["copy_gbps"])
                floor = f"{op['floor_us']:.1f}" if op["floor_us"] else "-"
                cells.append(f"{op['median_us']:>9.1f} ({floor:>6})")
                others.append(" / ".join(f"{op[how]['median_us']:.1f}" if how in op else "-" for how in MEASURES[1:]))
            print(f"  {ranks:>5} {experts:>7} {args.tokens:>6} {args.hidden:>6} {args.topk:>4} | "
                  + " | ".join(cells) + " |", flush=True)
            print(f"  {'host / back-to-back / graph':>38} | " + " | ".join(f"{o:>18}" for o in others) + " |",
                  flush=True)
            if args.split_host:
                inside = [f"{result['ops'][name]['host_in_extension']['median_us']:.1f}" for name in OPS]
                print(f"  {'host inside the extension calls':>38} | " + " | ".join(f"{v:>18}" for v in inside) + " |",
                      flush=True)
            report["runs"].append(result)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "bench_low_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
