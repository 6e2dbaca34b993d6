"""Internode normal mode on emulated nodes, beside intranode with the same ranks and SMs.

    python3 bench/bench_internode.py [--nodes 2] [--per-node 4] [--sms 16] [--tokens 4096]
                                     [--hidden 7168] [--topk 8] [--experts 256]
                                     [--lane stores|fake|nvshmem] [--iters 20] [--warmup 3] [--dry-run]

nodes x per-node ranks run as processes on the GPUs present (several per GPU under MPS) with
MOELINK_EXPERIMENTAL_INTERNODE=1 and MOELINK_NVL_RANKS=per-node (set in each rank). The same ranks then build an
intranode Buffer (MOELINK_NVL_RANKS = all of them) and time the same calls, so the two rows share
the processes, the routing and the SMs (`Buffer.set_num_sms`). Both Buffers are sized as deep_ep
users size them: `num_nvl_bytes` and `num_rdma_bytes` from the default dispatch and combine
configs' hints, `config=None` in every call. `--lane` is how the node-to-node leg fills its peers'
rings (MOELINK_DEBUG_LANE_FORCE_PUT: stores, the put path over IPC, or NVSHMEM puts with one PE per
rank on this host).

Each layout is verified first (one uncached + cached dispatch and combine against the reference,
tests/gpu/checks.py), then each op is timed alone as bench_intranode.py times it (L2 flushed,
device synchronized, ranks started together, events around the call; median of --iters). GB/s per
rank counts bytes as DeepEP's tests do (recv_rows x row bytes). On one GPU the figures measure
protocol overhead and HBM touches, not a network (issue #12).

Lane bytes: the rows that cross the node-to-node leg, counted from the routing (a token crosses once
per other node that has a rank it goes to), times the row's bytes; combine sends one partial row
back per (token, node). Printed per rank (mean over ranks), the same for every lane window.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (BENCH_DIR, REPO_ROOT / "tests", REPO_ROOT / "tests" / "gpu"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import launcher  # noqa: E402 - imports no torch; the ranks it spawns do
from run_all import EXIT_NO_GPU, EXIT_RUN, add_problem_arguments, job, refused_without_gpu  # noqa: E402

OPS = (("dispatch_bf16", "dispatch bf16, uncached"), ("dispatch_fp8", "dispatch fp8, uncached, row-major scales"),
       ("dispatch_fp8_colmajor", "dispatch fp8, uncached, column-major scales"),
       ("dispatch_bf16_cached", "dispatch bf16, cached"), ("dispatch_fp8_cached", "dispatch fp8, cached"),
       ("combine", "combine of recv_x"))
LANES = ("stores", "fake", "nvshmem")
LAYOUTS = ("internode", "intranode")


def lane_rows(is_token_in_rank, rank: int, per_node: int) -> int:
    """Rows of this rank's tokens that cross the node-to-node leg: per token, the other nodes with a
    rank it goes to. `is_token_in_rank` is [tokens, ranks] of bools (anything indexable so)."""
    node = rank // per_node
    rows = 0
    for flags in is_token_in_rank:
        nodes = {r // per_node for r, wanted in enumerate(flags) if wanted}
        rows += len(nodes - {node})
    return rows


def row_bytes(op: str, hidden: int) -> int:
    """Bytes of one row of op, as DeepEP's tests count them (fp8: data plus float32 scales)."""
    return hidden + 4 * hidden // 128 if "fp8" in op else 2 * hidden


# ---- on each rank -------------------------------------------------------------------------------

def bench_layouts(rank, num_ranks, params: dict) -> dict:
    """{layout: {"ops": {op: median µs}, "recv_rows": int, "lane_rows": int}} on this rank."""
    import torch  # noqa: PLC0415

    import bench_intranode as bench  # noqa: PLC0415
    import common  # noqa: PLC0415
    import moelink  # noqa: PLC0415
    from checks import Case, run_case  # noqa: PLC0415

    T, H, K, E = params["tokens"], params["hidden"], params["topk"], params["experts"]
    # Read when a Buffer is built, so set here, in the rank, before the first one.
    os.environ["MOELINK_EXPERIMENTAL_INTERNODE"] = "1"
    if params["lane"] != "stores":
        os.environ["MOELINK_DEBUG_LANE_FORCE_PUT"] = params["lane"]
    if params["lane"] == "nvshmem":
        os.environ.update(common.NVSHMEM_ONE_GPU_ENV)
    moelink.Buffer.set_num_sms(params["num_sms"])
    flush = torch.empty(bench.FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    results = {}
    for layout in LAYOUTS:
        # Read at construction: the internode Buffer spans nodes of per_node ranks, the other one node.
        os.environ["MOELINK_NVL_RANKS"] = str(params["per_node"] if layout == "internode" else num_ranks)
        configs = (moelink.Buffer.get_dispatch_config(num_ranks), moelink.Buffer.get_combine_config(num_ranks))
        nvl = max(c.get_nvl_buffer_size_hint(2 * H, num_ranks) for c in configs)
        rdma = max(c.get_rdma_buffer_size_hint(2 * H, num_ranks) for c in configs) if layout == "internode" else 0
        buf = moelink.Buffer(common.world_group(), nvl, rdma, explicitly_destroy=True)
        spans = buf._topology.num_rdma_ranks > 1
        if spans != (layout == "internode"):
            raise RuntimeError(f"the {layout} Buffer has {buf._topology.num_rdma_ranks} nodes")
        for i, fp8 in enumerate((False, True)):
            case = Case(f"verify-{layout}-{'fp8' if fp8 else 'bf16'}", 512, H, K, E, fp8=fp8).resolved(num_ranks)
            common.log(rank, run_case(buf, rank, num_ranks, case, params["seed"] + i, None, None))
        calls = bench.prepared_calls(buf, rank, num_ranks, T, H, K, E, params["seed"])
        medians = {}
        for name, _ in OPS:
            op = calls.ops[name]
            for _ in range(params["warmup"]):
                op()
            medians[name] = statistics.median(bench.timed_samples_us(op, flush, params["iters"]))
        flags = calls.layout["is_token_in_rank"].cpu().tolist()
        results[layout] = {"ops": medians, "recv_rows": int(calls.recv_x.shape[0]),
                           "lane_rows": lane_rows(flags, rank, params["per_node"])}
        del calls
        torch.cuda.synchronize()
        buf.destroy()
    return results


# ---- in the parent ------------------------------------------------------------------------------

def summarize(per_rank: list[dict], hidden: int) -> dict:
    """{layout: {op: {"us", "gbps"}}, "lane_mb": {op: MB per rank}}: µs the mean over ranks of each
    rank's median, GB/s the mean of each rank's recv_rows x row bytes / its time."""
    out = {}
    for layout in LAYOUTS:
        out[layout] = {}
        for name, _ in OPS:
            times = [r[layout]["ops"][name] for r in per_rank]
            gbps = [r[layout]["recv_rows"] * row_bytes(name, hidden) / (t * 1e-6) / 1e9
                    for r, t in zip(per_rank, times)]
            out[layout][name] = {"us": statistics.mean(times), "gbps": statistics.mean(gbps)}
    lane = statistics.mean(r["internode"]["lane_rows"] for r in per_rank)
    out["lane_mb"] = {name: lane * row_bytes(name, hidden) / 1e6 for name, _ in OPS}
    return out


def format_table(summary: dict, args: argparse.Namespace) -> str:
    cell = f"{args.nodes}x{args.per_node}"
    lines = [f"{cell} emulated nodes ({args.lane} lane) beside intranode {args.nodes * args.per_node}x, "
             f"{args.sms} SMs, {args.tokens} tokens/rank, H {args.hidden}, top-{args.topk} of {args.experts}; "
             "median µs, GB/s per rank (recv rows x row bytes / time)", "",
             "| op | internode µs | internode GB/s | intranode µs | intranode GB/s | internode / intranode time "
             "| lane MB per rank |", "|---|---|---|---|---|---|---|"]
    for name, title in OPS:
        inter, intra = summary["internode"][name], summary["intranode"][name]
        lines.append(f"| {title} | {inter['us']:.1f} | {inter['gbps']:.1f} | {intra['us']:.1f} | {intra['gbps']:.1f} "
                     f"| {inter['us'] / intra['us']:.2f} | {summary['lane_mb'][name]:.1f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--per-node", type=int, default=4, help="GPUs (ranks) per emulated node")
    parser.add_argument("--sms", type=int, default=16, help="Buffer.set_num_sms for both layouts (even)")
    add_problem_arguments(parser)
    parser.add_argument("--lane", choices=LANES, default="stores",
                        help="how the node-to-node leg fills its peers' rings (MOELINK_DEBUG_LANE_FORCE_PUT)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    ranks = args.nodes * args.per_node
    if args.nodes < 2 or args.per_node < 1 or ranks > 16:
        parser.error("--nodes must be >= 2 and --per-node >= 1, with at most 16 ranks in all")
    if args.experts % ranks:
        parser.error(f"--experts {args.experts} is not a multiple of {ranks} ranks")
    if args.sms < 2 or args.sms % 2:
        parser.error("--sms must be even and >= 2")
    if args.iters < 1 or args.warmup < 0 or args.tokens < 1:
        parser.error("--iters and --tokens must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    ranks = args.nodes * args.per_node
    if args.dry_run:
        print(f"{args.nodes}x{args.per_node} ({ranks} ranks, {args.lane} lane, {args.sms} SMs), then intranode "
              f"{ranks}x{args.sms}: {', '.join(name for name, _ in OPS)} x {args.iters} iterations")
        return 0
    if refused_without_gpu("bench_internode"):
        return EXIT_NO_GPU
    info = launcher.run_ranks(1, job("device_info"), timeout_s=120)[0]
    print(f"device: {info['name']}, {info['sm_count']} SMs, copy {info['copy_gbps']:.0f} GB/s (read + write)",
          flush=True)
    params = {"per_node": args.per_node, "num_sms": args.sms, "tokens": args.tokens, "hidden": args.hidden,
              "topk": args.topk, "experts": args.experts, "iters": args.iters, "warmup": args.warmup,
              "seed": args.seed, "lane": args.lane}
    try:
        per_rank = launcher.run_ranks(ranks, ("bench_internode", "bench_layouts", str(Path(__file__).resolve())),
                                      params, timeout_s=600)
    except launcher.RankFailure as failure:
        print(f"bench_internode {args.nodes}x{args.per_node}: FAILED\n{failure}", file=sys.stderr)
        return EXIT_RUN
    summary = summarize(per_rank, args.hidden)
    table = format_table(summary, args)
    print(table, flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "bench_internode.md").write_text(table + "\n")
        Path(out, "bench_internode.json").write_text(json.dumps({"args": vars(args), "device": info,
                                                                  "summary": summary, "raw": per_rank}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
