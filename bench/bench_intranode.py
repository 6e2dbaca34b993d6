"""Intranode dispatch / combine bandwidth of one (ranks, SMs) cell, the verify step, and device facts.

Every function here runs inside a rank spawned by tests/gpu/launcher.py (bench/run_all.py drives
them), so the parent process never touches CUDA.

Timing: each op is timed alone with CUDA events on the caller's stream, median over `iters`. Before
every iteration a 256 MB tensor is zeroed (evicting L2, so inputs come from HBM), the device is
synchronized and all ranks meet at a barrier, so one rank's time does not include waiting for a
peer that started late. Bytes per rank: dispatch bf16 = recv_rows * H * 2; fp8 = recv_rows * H *
(1 + 4/128) (data plus float32 scales); combine = recv_rows * H * 2; GB/s = bytes / time / 1e9.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT / "tests", REPO_ROOT / "tests" / "gpu"):  # common.py adds build/python
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common  # noqa: E402
from checks import Case, run_case  # noqa: E402
from reference import moe_reference as ref  # noqa: E402

FLUSH_BYTES = 256 * common.MIB
OPS = ("dispatch_bf16", "dispatch_fp8", "combine", "dispatch_bf16_uncached", "combine_pushed")
VERIFY_CASES = (Case("verify-bf16", 512, 7168, 8, 256), Case("verify-fp8", 512, 7168, 8, 256, fp8=True))


def arena_bytes(num_ranks: int, num_tokens: int, hidden: int) -> int:
    """Receive arena per rank: two worst-case bf16 recv_x (the one a handle keeps for combine and
    the one being timed) plus room for metadata. MOELINK_BENCH_ARENA=0 benches the ring path."""
    if os.environ.get("MOELINK_BENCH_ARENA", "1") == "0":
        return 0
    return 2 * num_ranks * num_tokens * hidden * 2 + 64 * common.MIB


def _time_us(op, flush, iters: int, warmup: int, barrier: bool = True) -> float:
    for _ in range(warmup):
        op()
    samples = []
    for _ in range(iters):
        flush.zero_()
        torch.cuda.synchronize()
        if barrier:
            dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        op()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return statistics.median(samples)


def bench_cell(rank, num_ranks, num_sms, num_tokens=4096, hidden=7168, num_topk=8, num_experts=256, iters=30,
               warmup=5, measure_layout=False, seed=0) -> dict:
    """Times the four ops on every rank and returns the cell's summary (the same on every rank)."""
    config, combine_config = common.make_configs(num_ranks, num_sms)
    buf = common.make_buffer(num_ranks, (config, combine_config), (hidden,),
                             num_arena_bytes=arena_bytes(num_ranks, num_tokens, hidden))
    # Routing as in training: top-k of random scores, every slot used.
    topk_idx = torch.from_numpy(ref.make_routing(seed, rank, num_tokens, num_topk, num_experts, num_ranks)).cuda()
    inputs = ref.make_inputs(seed, rank, num_tokens, hidden, num_topk, fp8=True, device="cuda")
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    uncached_args = dict(num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                         num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
                         topk_weights=inputs.topk_weights, config=config)
    recv_x, _, _, _, handle, _ = buf.dispatch(inputs.x, **uncached_args)
    recv_rows = recv_x.shape[0]
    # recv_x lives in the arena (peers read it in place); a copy in torch memory is pushed through
    # the rings, as an expert output allocated by torch would be.
    recv_x_torch = recv_x.clone()
    fp8_x = (inputs.x_fp8, inputs.x_scales)
    ops = {
        "dispatch_bf16": (lambda: buf.dispatch(inputs.x, handle=handle, config=config), recv_rows * hidden * 2),
        "dispatch_fp8": (lambda: buf.dispatch(fp8_x, handle=handle, config=config),
                         recv_rows * hidden * 2 * (1 + 4 / 128) / 2),
        "combine": (lambda: buf.combine(recv_x, handle, config=combine_config), recv_rows * hidden * 2),
        "dispatch_bf16_uncached": (lambda: buf.dispatch(inputs.x, **uncached_args), recv_rows * hidden * 2),
        "combine_pushed": (lambda: buf.combine(recv_x_torch, handle, config=combine_config), recv_rows * hidden * 2),
    }
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    mine = {name: (_time_us(op, flush, iters, warmup), nbytes) for name, (op, nbytes) in ops.items()}
    layout_us = None
    if measure_layout and rank == 0:
        # Alone on the device (the other ranks wait on the host), as a layout runs in practice.
        layout_us = _time_us(lambda: buf.get_dispatch_layout(topk_idx, num_experts), flush, iters, warmup,
                             barrier=False)
    gathered = [None] * num_ranks
    dist.all_gather_object(gathered, {"ops": mine, "recv_rows": recv_rows, "layout_us": layout_us})
    buf.destroy()

    summary = {"ranks": num_ranks, "num_sms": num_sms, "arena": buf.num_arena_bytes > 0, "tokens": num_tokens, "hidden": hidden, "topk": num_topk,
               "experts": num_experts, "iters": iters, "recv_rows": [g["recv_rows"] for g in gathered],
               "layout_us": gathered[0]["layout_us"], "ops": {}}
    for name in OPS:
        times = [g["ops"][name][0] for g in gathered]
        nbytes = [g["ops"][name][1] for g in gathered]
        gbps = [b / (t * 1e-6) / 1e9 for b, t in zip(nbytes, times)]
        summary["ops"][name] = {"time_us_mean": statistics.mean(times), "gbps_mean": statistics.mean(gbps),
                                "gbps_min": min(gbps), "time_us": times, "bytes": nbytes}
    return summary


def bench_cell_job(rank, num_ranks, params: dict) -> dict:
    return bench_cell(rank, num_ranks, **params)


def verify(rank, num_ranks, seed=77) -> None:
    """Dispatch (uncached + cached) and combine against the reference at the bench's shape. The last
    rank takes its rows through the rings, the others straight into arena outputs."""
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    buf = common.make_buffer(num_ranks, (config, combine_config), (7168,),
                             num_arena_bytes=0 if rank == num_ranks - 1 else arena_bytes(num_ranks, 512, 7168))
    for i, case in enumerate(VERIFY_CASES):
        common.log(rank, f"verify [R={num_ranks}] " + run_case(buf, rank, num_ranks, case.resolved(num_ranks),
                                                                seed + i, config, combine_config))
    buf.destroy()


def copy_bandwidth(num_bytes=1 << 30, iters=10) -> float:
    """Device-to-device copy of num_bytes, in GB/s counting both the read and the write."""
    src = torch.ones(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    copy_us = _time_us(lambda: dst.copy_(src), flush, iters, warmup=2, barrier=False)
    return 2 * num_bytes / (copy_us * 1e-6) / 1e9


def device_info(rank, num_ranks) -> dict:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": props.name, "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / (1 << 30), 1), "copy_gbps": copy_bandwidth(),
            "torch": torch.__version__, "cuda": torch.version.cuda}
