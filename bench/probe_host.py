"""Where the host time of get_dispatch_layout, dispatch (fp8 and bf16, uncached and cached) and
combine goes, moelink beside DeepEP.

    bash scripts/with_mps.sh python3 bench/probe_host.py [--ranks 4] [--sms 24] [--calls 100]
        [--anchor auto|none|PATH] [--profile] [--trace] [--timeline] [--split]

An uncached dispatch waits on the host for its notify's counts, then allocates its outputs and
launches its kernel while the GPU idles: its host time is GPU time in every timed figure. Per rank,
after a device synchronize before each call (so the GPU is idle when it starts), this prints the
median / min / mean host time of each call, and for moelink the share of each runtime method (timed
through a wrapper of Buffer.runtime; intranode_notify_launch is the launch, intranode_notify_wait its wait); the
rest is Python. --profile adds a cProfile of rank 0's calls; --trace a torch.profiler (CUPTI) table of
rank 0's kernels and runtime calls, and its chrome trace in $OUT (rank 0 is slowed by it, so it
reaches each barrier last and its kernels show their own time, not a wait for a later peer);
--timeline every rank's chrome trace of calls timed as the benchmark times them (read them with
bench/timeline_report.py); --split each call timed alone, with the GPU ahead of the host, and back
to back (what the host path and an idle GPU's start add). MOELINK_HOST_STAMPS=DIR splits the runtime calls into their C++ phases.
Shape: 4096 tokens x 7168,
fp8 with row-major scales (the "col" rows: column-major), top-8 of 256, the bench's num_nvl_bytes (bench/bench_intranode.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (BENCH_DIR, REPO_ROOT / "tests", REPO_ROOT / "tests" / "gpu"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import launcher  # noqa: E402 - imports no torch


def probe(rank: int, num_ranks: int, impl: str, anchor_path: str | None, num_sms: int, calls: int,
          profile: bool, trace: bool, timeline: bool = False, split: bool = False, gpu_only: bool = False) -> str:
    import cProfile
    import io
    import os
    import pstats
    import time

    import torch
    import torch.distributed as dist

    import bench_intranode as bi
    from reference import moe_reference as ref

    mod = bi.load_impl(impl, anchor_path)
    mod.Buffer.set_num_sms(num_sms)
    buf = bi._make_buffer(mod, impl, num_ranks, 4096, 7168)
    topk_idx = torch.from_numpy(ref.make_routing(0, rank, 4096, 8, 256, num_ranks)).cuda()
    inputs = ref.make_inputs(0, rank, 4096, 7168, 8, fp8=True, device="cuda")
    layout = buf.get_dispatch_layout(topk_idx, 256)
    kwargs = dict(num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
                  num_tokens_per_expert=layout[2], topk_idx=topk_idx, topk_weights=inputs.topk_weights)
    spent: dict[str, float] = {}
    if impl == "moelink":
        buf.runtime = bi.TimedRuntime(buf.runtime)
        spent = buf.runtime.spent
    lines = []
    scales_col = inputs.x_scales.t().contiguous().t()  # the same values, column-major
    ops = (("get_dispatch_layout", lambda: buf.get_dispatch_layout(topk_idx, 256)),
           ("dispatch fp8 uncached", lambda: buf.dispatch((inputs.x_fp8, inputs.x_scales), **kwargs)),
           ("dispatch fp8 uncached col", lambda: buf.dispatch((inputs.x_fp8, scales_col), **kwargs)),
           ("dispatch fp8 cached col", lambda: buf.dispatch((inputs.x_fp8, scales_col), handle=handle)),
           ("dispatch bf16 uncached", lambda: buf.dispatch(inputs.x, **kwargs)),
           ("dispatch fp8 cached", lambda: buf.dispatch((inputs.x_fp8, inputs.x_scales), handle=handle)),
           ("dispatch bf16 cached", lambda: buf.dispatch(inputs.x, handle=handle)),
           ("combine", lambda: buf.combine(recv_x, handle, recv_weights)))
    recv_x, _, recv_weights, _, handle, _ = buf.dispatch(inputs.x, **kwargs)
    for name, op in ops:
        for _ in range(10):
            op()
        torch.cuda.synchronize()
        dist.barrier()
        spent.clear()
        times = sorted(bi.host_samples_us(op, calls, barrier=False))
        parts = "".join(f"; {k} {1e6 * v / calls:.1f}" for k, v in sorted(spent.items()))
        lines.append(f"{impl} rank {rank} {name}: host median {times[len(times) // 2]:.1f} µs, "
                     f"min {times[0]:.1f}, mean {sum(times) / calls:.1f}{parts}")
        dist.barrier()
        if profile:  # every rank makes the calls (they are collective); rank 0's are profiled
            profiler = cProfile.Profile() if rank == 0 and impl == "moelink" else None
            if profiler:
                profiler.enable()
            for _ in range(calls):
                torch.cuda.synchronize()
                op()
            if profiler:
                profiler.disable()
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
                lines.append(text.getvalue())
            torch.cuda.synchronize()
        spent.clear()
    if split:
        flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        for name, op in ops:
            alone, ahead, b2b = _split(op, flush, calls)
            lines.append(f"{impl} rank {rank} {name}: alone {alone:.1f} µs, GPU ahead {ahead:.1f}, "
                         f"back to back {b2b:.1f}: host path {alone - ahead:.1f}, cold start {ahead - b2b:.1f}")
    # After every host sample: a profiler leaves CUPTI hooked into every later CUDA call.
    if timeline:
        flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        for name, op in ops:
            elapsed = _timeline(rank, impl, name, op, flush, os.environ.get("OUT"), gpu_only=gpu_only)
            lines.append(f"{impl} rank {rank} {name}: timed as the benchmark does, under the profiler: "
                         f"median {elapsed:.1f} µs")
    if trace:
        for name, op in ops:
            table = _trace(rank, impl, name, op, os.environ.get("OUT"))
            if table:
                lines.append(table)
    dist.barrier()
    if hasattr(buf, "destroy"):
        buf.destroy()
    return "\n".join(lines)


def _split(op, flush, calls: int) -> tuple[float, float, float]:
    """Median µs of op timed three ways: alone, as the benchmark times it (its host path inside the
    events); with the GPU ahead (a ~0.5 ms sleep kernel queued before the start event, so the host
    has launched the call before the GPU reaches it: the GPU's own time from idle, the ranks' skew
    included); back to back. alone - ahead is what the host path costs the figure, ahead - b2b what
    starting from an idle GPU does."""
    import statistics

    import torch
    import torch.distributed as dist

    import bench_intranode as bi

    for _ in range(3):
        op()
    alone = statistics.median(bi.timed_samples_us(op, flush, calls))
    samples = []
    for _ in range(calls):
        flush.zero_()
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # ~0.5 ms at the H200's clock, more than any call's host path
        start.record()
        op()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    ahead = statistics.median(samples)
    b2b = bi.back_to_back_samples_us(op, flush, calls)
    return alone, ahead, statistics.mean(b2b[1:])


def _timeline(rank: int, impl: str, name: str, op, flush, out_dir: str | None, calls: int = 12,
              gpu_only: bool = False) -> float:
    """Every rank's kernels and CUDA calls over `calls` calls made as the benchmark times them (L2
    flushed, device synchronized, ranks at a barrier, events around the call), one chrome trace per
    rank: where the time between the start event and the end event goes. gpu_only records no host
    ops (CUPTI's kernels and runtime calls only), so the host path is slowed less."""
    import statistics

    from torch.profiler import ProfilerActivity, profile

    import bench_intranode as bi

    for _ in range(3):
        op()
    activities = [ProfilerActivity.CUDA] if gpu_only else [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        samples = bi.timed_samples_us(op, flush, calls)
    if out_dir:
        prof.export_chrome_trace(str(Path(out_dir) / f"timeline_{impl}_{name.replace(' ', '_')}_rank{rank}.json"))
    return statistics.median(samples)


def _trace(rank: int, impl: str, name: str, op, out_dir: str | None, calls: int = 20) -> str:
    """Rank 0's kernels and CUDA runtime calls over `calls` calls of op, as torch.profiler sees them;
    the other ranks make the same calls unprofiled."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if rank != 0:
        for _ in range(calls):
            torch.cuda.synchronize()
            op()
        torch.cuda.synchronize()
        return ""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            torch.cuda.synchronize()
            op()
        torch.cuda.synchronize()
    if out_dir:
        prof.export_chrome_trace(str(Path(out_dir) / f"probe_trace_{impl}_{name.replace(' ', '_')}.json"))
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14)
    return f"{impl} rank 0 {name}: torch.profiler over {calls} calls\n{table}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--sms", type=int, default=24)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--anchor", default="auto", help="DeepEP: auto (.anchors/), none, or a wheel / directory")
    parser.add_argument("--profile", action="store_true", help="add a cProfile of rank 0's moelink calls")
    parser.add_argument("--trace", action="store_true", help="add torch.profiler tables of rank 0's kernels")
    parser.add_argument("--timeline", action="store_true",
                        help="chrome traces of every rank's calls timed as the benchmark times them, in $OUT")
    parser.add_argument("--timeline-gpu", action="store_true",
                        help="as --timeline, recording CUDA activity only (no host ops): a host path slowed less")
    parser.add_argument("--split", action="store_true",
                        help="each call timed alone, with the GPU ahead of the host, and back to back")
    args = parser.parse_args(argv)
    import anchor  # noqa: PLC0415

    found = anchor.resolve(args.anchor, REPO_ROOT)
    print(f"anchor: {found.describe()}")
    impls = ["moelink"] + (["deep_ep"] if found.available else [])
    for impl in impls:
        results = launcher.run_ranks(args.ranks, ("probe_host", "probe", str(Path(__file__).resolve())), impl,
                                     found.path, args.sms, args.calls, args.profile, args.trace,
                                     args.timeline or args.timeline_gpu, args.split, args.timeline_gpu,
                                     timeout_s=300)
        for text in results:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
