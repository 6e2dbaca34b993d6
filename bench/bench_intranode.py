"""Intranode dispatch / combine of one (ranks, SMs) cell, timed the same way for moelink and for DeepEP
V1 (the anchor) in the same run, plus the verify step and device facts.

Every function here runs inside a rank spawned by tests/gpu/launcher.py (bench/run_all.py drives
them), so the parent process never touches CUDA.

Both libraries are called as a framework calls them: `Buffer.set_num_sms(S)`, `num_nvl_bytes` from
the default dispatch and combine configs' hints, `config=None`, no moelink-only keyword (the
`moelink+arena` variant adds its receive arena and is labelled so). The routing, inputs and call
sequence are identical; only the module differs.

Timing: each op is timed alone with CUDA events on the caller's stream, median over `iters`. Before
every iteration a 256 MB tensor is zeroed (evicting L2, so inputs come from HBM), the device is
synchronized and all ranks start together (start_together: a shared deadline on the host's
monotonic clock, spun to), so one rank's time does not include waiting for a peer that started
late. Bytes per rank, as DeepEP's tests count them: dispatch bf16 = recv_rows * H * 2;
fp8 = recv_rows * H * (1 + 4/128) (data plus float32 scales); combine = recv_rows * H * 2;
GB/s = bytes / time / 1e9.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parents[1]
for _dir in (REPO_ROOT / "tests", REPO_ROOT / "tests" / "gpu"):  # common.py adds build/python
    if str(_dir) not in sys.path:
        sys.path.insert(0, str(_dir))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common  # noqa: E402
from checks import Case, run_case  # noqa: E402
from reference import moe_reference as ref  # noqa: E402

FLUSH_BYTES = 256 * common.MIB
IMPLS = ("moelink", "deep_ep", "moelink+arena")
# (name, what it is) in report order; every one is timed for every impl.
OPS = (
    ("dispatch_bf16", "dispatch bf16, uncached (layout tensors passed; notify inside)"),
    ("dispatch_fp8", "dispatch fp8, uncached, row-major scales"),
    ("dispatch_fp8_colmajor", "dispatch fp8, uncached, column-major scales"),
    ("dispatch_bf16_cached", "dispatch bf16, cached (handle=)"),
    ("dispatch_fp8_cached", "dispatch fp8, cached, row-major scales"),
    ("dispatch_fp8_cached_colmajor", "dispatch fp8, cached, column-major scales"),
    # The cached dispatch as DeepEP's own benchmark times it (its tests' bench()): L2 flushed once,
    # then calls back to back, the mean of all but the first. The host of a cached call runs ahead
    # of the GPU there, as in a training step that queues work; the rows above time a call alone.
    ("dispatch_bf16_cached_b2b", "dispatch bf16, cached, back to back (DeepEP's bench)"),
    ("dispatch_fp8_cached_b2b", "dispatch fp8, cached, back to back (DeepEP's bench)"),
    ("dispatch_fp8_cached_colmajor_b2b", "dispatch fp8, cached, column-major scales, back to back (DeepEP's bench)"),
    ("combine", "combine of recv_x"),
    ("combine_torch_input", "combine of a torch-allocated copy of recv_x"),
    ("dispatch_bf16_held", "dispatch bf16, uncached, with earlier outputs held alive"),
    # A training step's forward: layer i's output lives until the step ends (backward frees it),
    # so its segment comes back once per step, not once per call as in the row above.
    ("dispatch_bf16_step", "dispatch bf16, uncached, each output held until a step of layers ends"),
    ("layout", "get_dispatch_layout"),
    # The caller's host time in get_dispatch_layout (it returns before the GPU is done): how much of
    # the layout figure, which events measure, is host work rather than the kernel.
    ("layout_host", "get_dispatch_layout, the caller's host time"),
)
OP_NAMES = tuple(name for name, _ in OPS)
HELD_OUTPUTS = 60  # a training step keeps every layer's expert inputs for backward
VERIFY_CASES = (Case("verify-bf16", 512, 7168, 8, 256), Case("verify-fp8", 512, 7168, 8, 256, fp8=True))


def arena_bytes(num_ranks: int, num_tokens: int, hidden: int) -> int:
    """Receive arena per rank of the moelink+arena variant: two worst-case bf16 recv_x (the one a
    handle keeps for combine and the one being timed) plus room for metadata."""
    return 2 * num_ranks * num_tokens * hidden * 2 + 64 * common.MIB


def load_impl(impl: str, anchor_path: str | None):
    """The module a framework would import: moelink, or DeepEP V1 from anchor_path."""
    if impl == "deep_ep":
        if anchor_path and anchor_path not in sys.path:
            sys.path.insert(0, anchor_path)
        import deep_ep  # noqa: PLC0415

        if getattr(deep_ep, "__moelink_shim__", False):
            raise RuntimeError("the deep_ep on the path is moelink's shim, not DeepEP")
        return deep_ep
    import moelink  # noqa: PLC0415

    return moelink


# How far past the last rank's arrival the shared start is set. The release of a gloo collective
# reaches the ranks tens of µs apart, up to ~1 ms for a rank whose core slept; a rank that arrives
# after the deadline starts at once and is counted in LATE_STARTS.
START_MARGIN_NS = 1_500_000
START_METHODS = ("together", "barrier")
START_METHOD = "together"
LATE_STARTS = [0]
START_LOG: list[int] = []  # monotonic ns at which each timed call began (interleaved.py pops them)


def start_together(method: str | None = None) -> int | None:
    """Every rank returns at about the same instant. A gloo barrier releases the ranks 15-35 µs
    apart under MPS (bench/NOTES.md, twelfth session), so a timed collective call would include its
    early peers' wait for the late one. Here the ranks agree on a deadline on CLOCK_MONOTONIC, which
    every process of one host shares, and spin to it; the deadline is returned (None for `barrier`,
    the plain barrier, kept to compare)."""
    method = method or START_METHOD
    if method == "barrier":
        dist.barrier()
        return None
    if method != "together":
        raise ValueError(f"start method: {method!r} is not one of {', '.join(START_METHODS)}")
    latest = torch.tensor([time.monotonic_ns()], dtype=torch.int64)
    dist.all_reduce(latest, op=dist.ReduceOp.MAX)
    deadline = int(latest.item()) + START_MARGIN_NS
    if time.monotonic_ns() > deadline:
        LATE_STARTS[0] += 1
    while time.monotonic_ns() < deadline:
        pass
    return deadline


def _time_us(op, flush, iters: int, warmup: int, barrier: bool = True, host: bool = False,
             back_to_back: bool = False) -> float:
    """Median µs of op: CUDA events around it on the caller's stream, or (host) the caller's thread
    time in the call, which returns before the GPU is done; or (back_to_back) the mean as DeepEP's
    benchmark takes it (back_to_back_samples_us)."""
    for _ in range(warmup):
        op()
    if host:
        return statistics.median(host_samples_us(op, iters, flush, barrier))
    if back_to_back:
        samples = back_to_back_samples_us(op, flush, iters)
        return statistics.mean(samples[1:] or samples)  # a smoke run's single sample is all there is
    return statistics.median(timed_samples_us(op, flush, iters, barrier))


def back_to_back_samples_us(op, flush, iters: int) -> list[float]:
    """µs of each of `iters` calls of op made back to back, CUDA events around each on the caller's
    stream, L2 flushed once before the first (with every rank met at a barrier): how DeepEP's tests
    time an op (their bench(), which averages all but the first)."""
    flush.zero_()
    torch.cuda.synchronize()
    start_together()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        op()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) * 1e3 for start, end in events]


def timed_samples_us(op, flush, iters: int, barrier: bool = True, start_method: str | None = None) -> list[float]:
    """µs of each of `iters` calls of op, CUDA events around it on the caller's stream, each made
    with L2 flushed (`flush` zeroed), the device synchronized and (`barrier`) all ranks started
    together (start_together, by `start_method` or START_METHOD). The one
    device-timing loop of the benchmarks (probe_host --timeline traces it)."""
    samples = []
    for _ in range(iters):
        flush.zero_()
        torch.cuda.synchronize()
        if barrier:
            start_together(start_method)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        START_LOG.append(time.monotonic_ns())
        start.record()
        op()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return samples


def host_samples_us(op, iters: int, flush=None, barrier: bool = True, after=None) -> list[float]:
    """The caller's thread time in each of `iters` calls of op (it returns before the GPU is done),
    each made with the GPU idle: `flush` zeroed (evicting L2) when given, the device synchronized,
    all ranks at a barrier when `barrier`. `after` gets each call's result, outside the timed
    region. The one host-timing loop of the benchmarks (bench_low_latency, probe_host)."""
    samples = []
    for _ in range(iters):
        if flush is not None:
            flush.zero_()
        torch.cuda.synchronize()
        if barrier:
            start_together()
        start = time.perf_counter()
        out = op()
        samples.append((time.perf_counter() - start) * 1e6)
        if after is not None:
            after(out)
    return samples


class TimedRuntime:
    """A Buffer's runtime whose method calls add their host time to `spent[name]` (seconds), an
    exception's too; attributes that are not methods pass through. The probes put it in place of
    Buffer.runtime: a call's host time minus what it spent here is the Python layer's."""

    def __init__(self, real) -> None:
        self.__dict__.update(_real=real, spent={})

    def __getattr__(self, attr: str):
        method = getattr(self._real, attr)
        if not callable(method):
            return method

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.spent[attr] = self.spent.get(attr, 0.0) + time.perf_counter() - start
        return timed


def _make_buffer(mod, impl: str, num_ranks: int, num_tokens: int, hidden: int):
    num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden * 2, num_ranks)
                        for config in (mod.Buffer.get_dispatch_config(num_ranks),
                                       mod.Buffer.get_combine_config(num_ranks)))
    extra = {"num_arena_bytes": arena_bytes(num_ranks, num_tokens, hidden)} if impl == "moelink+arena" else {}
    return mod.Buffer(common.world_group(), num_nvl_bytes, 0, explicitly_destroy=True, **extra)


def _held_count(recv_rows: int, hidden: int, num_ranks: int) -> int:
    """How many dispatch outputs to hold: HELD_OUTPUTS, fewer if the ranks sharing this GPU would
    fill more than a third of its memory with them. From the total, not the free memory, so that
    moelink and DeepEP hold the same number."""
    free = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory * 2 // 3
    per_output = recv_rows * hidden * 2 + recv_rows * 64
    ranks_here = max(1, num_ranks // max(1, torch.cuda.device_count()))
    return max(1, min(HELD_OUTPUTS, int(free * 0.5 / ranks_here / max(per_output, 1))))


def _path(buf, impl: str, name: str):
    """moelink's path in the op's last timed call on this rank: whether peers wrote the dispatch's
    rows straight into its outputs, or read the combine's input in place (None for other ops and
    for DeepEP, whose Buffer has a `runtime` too). Without it a slow row does not say whether the
    rings were taken."""
    if not impl.startswith("moelink") or name.startswith("layout"):
        return None
    runtime = buf.runtime
    return bool(runtime.last_combine_pulled if name.startswith("combine") else runtime.last_dispatch_direct)


def placement() -> dict:
    """Where the calling thread runs now: its CPU, that CPU's physical core ("package/core") and NUMA
    node (Linux; {} elsewhere). moelink's 2x24 rows took one of two times per process launch
    (bench/NOTES.md, eleventh session), and which CPUs the ranks' threads share is the first suspect."""
    try:
        with open("/proc/thread-self/stat") as f:
            cpu = int(f.read().rsplit(")", 1)[1].split()[36])  # field 39, "processor"
        topo = f"/sys/devices/system/cpu/cpu{cpu}"
        with open(f"{topo}/topology/physical_package_id") as f:
            package = f.read().strip()
        with open(f"{topo}/topology/core_id") as f:
            core = f.read().strip()
        nodes = [n[4:] for n in os.listdir(topo) if n.startswith("node") and n[4:].isdigit()]
        return {"cpu": cpu, "core": f"{package}/{core}", "node": nodes[0] if nodes else "?"}
    except (OSError, ValueError, IndexError):
        return {}


def prepared_calls(buf, rank: int, num_ranks: int, num_tokens: int, hidden: int, num_topk: int, num_experts: int,
                   seed: int = 0) -> SimpleNamespace:
    """This rank's inputs, its layout and one uncached dispatch (for the handle and recv_x) on
    `buf`, and `ops`: closures of the single calls the timed ops are made of (OP_NAMES' dispatches
    and combine of recv_x), as a framework makes them. bench_cell and interleaved.py time these."""
    # Routing as in training: top-k of random scores, every slot used.
    topk_idx = torch.from_numpy(ref.make_routing(seed, rank, num_tokens, num_topk, num_experts, num_ranks)).cuda()
    inputs = ref.make_inputs(seed, rank, num_tokens, hidden, num_topk, fp8=True, device="cuda")
    fp8_row = (inputs.x_fp8, inputs.x_scales)
    fp8_col = (inputs.x_fp8, inputs.x_scales.t().contiguous().t())
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
        buf.get_dispatch_layout(topk_idx, num_experts)
    layout = dict(num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                  is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
                  topk_idx=topk_idx, topk_weights=inputs.topk_weights)
    recv_x, _, _, _, handle, _ = buf.dispatch(inputs.x, **layout)
    ops = {
        "dispatch_bf16": lambda: buf.dispatch(inputs.x, **layout),
        "dispatch_fp8": lambda: buf.dispatch(fp8_row, **layout),
        "dispatch_fp8_colmajor": lambda: buf.dispatch(fp8_col, **layout),
        "dispatch_bf16_cached": lambda: buf.dispatch(inputs.x, handle=handle),
        "dispatch_fp8_cached": lambda: buf.dispatch(fp8_row, handle=handle),
        "dispatch_fp8_cached_colmajor": lambda: buf.dispatch(fp8_col, handle=handle),
        "combine": lambda: buf.combine(recv_x, handle),
    }
    return SimpleNamespace(topk_idx=topk_idx, inputs=inputs, layout=layout, recv_x=recv_x, handle=handle, ops=ops)


def bench_cell(rank, num_ranks, impl, num_sms, num_tokens=4096, hidden=7168, num_topk=8, num_experts=256, iters=30,
               warmup=5, seed=0, anchor_path=None) -> dict:
    """Times every op of OPS on every rank with `impl`; returns the cell's summary (the same on
    every rank). An op that raises is reported as such; the others still run."""
    mod = load_impl(impl, anchor_path)
    mod.Buffer.set_num_sms(num_sms)
    buf = _make_buffer(mod, impl, num_ranks, num_tokens, hidden)
    calls = prepared_calls(buf, rank, num_ranks, num_tokens, hidden, num_topk, num_experts, seed)
    inputs, layout, recv_x, handle, topk_idx = calls.inputs, calls.layout, calls.recv_x, calls.handle, calls.topk_idx
    recv_rows = recv_x.shape[0]
    recv_x_torch = recv_x.clone()
    bf16_bytes = recv_rows * hidden * 2
    fp8_bytes = recv_rows * hidden * (1 + 4 / 128)
    held = []

    def hold_then_dispatch():
        return buf.dispatch(inputs.x, **layout)

    step_outputs = []

    def step_dispatch():
        if len(step_outputs) == num_held:  # the step's backward is done: every layer's output goes
            step_outputs.clear()
        out = buf.dispatch(inputs.x, **layout)
        step_outputs.append(out[0])
        return out

    ops = {name: (call, fp8_bytes if "fp8" in name else bf16_bytes) for name, call in calls.ops.items()}
    ops.update({
        "combine_torch_input": (lambda: buf.combine(recv_x_torch, handle), bf16_bytes),
        "dispatch_bf16_held": (hold_then_dispatch, bf16_bytes),
        "dispatch_bf16_step": (step_dispatch, bf16_bytes),
        "layout": (lambda: buf.get_dispatch_layout(topk_idx, num_experts), 0),
        "layout_host": (lambda: buf.get_dispatch_layout(topk_idx, num_experts), 0),
    })
    # The same calls, timed back to back (_time_us(back_to_back=True)).
    ops["dispatch_bf16_cached_b2b"] = ops["dispatch_bf16_cached"]
    ops["dispatch_fp8_cached_b2b"] = ops["dispatch_fp8_cached"]
    ops["dispatch_fp8_cached_colmajor_b2b"] = ops["dispatch_fp8_cached_colmajor"]
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    mine, errors = {}, {}
    num_held = 0

    def everyone_ok(name: str) -> bool:
        # Every rank makes the same collective calls: after each step all learn whether any failed,
        # and all stop together (a rank that went on alone would wait in a barrier forever).
        flags = [None] * num_ranks
        dist.all_gather_object(flags, name not in errors)
        return all(flags)

    for name in OP_NAMES:
        op, nbytes = ops[name]
        if name == "dispatch_bf16_held":
            num_held = _held_count(recv_rows, hidden, num_ranks)
            counts = [None] * num_ranks
            dist.all_gather_object(counts, num_held)
            num_held = min(counts)  # every rank must make the same number of dispatches
            try:
                held.extend(buf.dispatch(inputs.x, **layout)[0] for _ in range(num_held))
            except Exception:  # noqa: BLE001 - reported with the op; the protocol may be unusable now
                errors[name] = traceback.format_exc(limit=3)
            if not everyone_ok(name):
                break
        op_warmup = warmup
        if name == "dispatch_bf16_step":
            held.clear()  # the layers of a step take that memory (num_held of them, as above)
            op_warmup = 2 * num_held + warmup  # timed from the third step on: keys seen in two steps before
        where = placement()
        try:
            mine[name] = (_time_us(op, flush, iters, op_warmup, host=name == "layout_host",
                                   back_to_back=name.endswith("_b2b")), nbytes, _path(buf, impl, name), where)
        except Exception:  # noqa: BLE001 - an op the library refuses is a result, not a crash
            errors[name] = traceback.format_exc(limit=3)
        if not everyone_ok(name):
            break  # a failed collective leaves the ranks in an unknown state: stop this impl here
    step_outputs.clear()
    del held
    gathered = [None] * num_ranks
    dist.all_gather_object(gathered, {"ops": mine, "errors": errors, "recv_rows": recv_rows,
                                      "late_starts": LATE_STARTS[0]})
    if not any(g["errors"] for g in gathered):
        buf.destroy()

    summary = {"impl": impl, "version": getattr(mod, "__version__", "?"), "ranks": num_ranks, "num_sms": num_sms,
               "tokens": num_tokens, "hidden": hidden, "topk": num_topk, "experts": num_experts, "iters": iters,
               "recv_rows": [g["recv_rows"] for g in gathered], "held": num_held, "ops": {}, "errors": {},
               "late_starts": [g.get("late_starts", 0) for g in gathered]}  # the process's so far, per rank
    for name in OP_NAMES:
        failed = [g["errors"][name] for g in gathered if name in g["errors"]]
        if failed:
            summary["errors"][name] = failed[0]
            continue
        if not all(name in g["ops"] for g in gathered):
            continue  # not reached: an earlier op failed
        times = [g["ops"][name][0] for g in gathered]
        nbytes = [g["ops"][name][1] for g in gathered]
        entry = {"time_us_mean": statistics.mean(times), "time_us": times, "bytes": nbytes}
        paths = [g["ops"][name][2] for g in gathered]
        if all(p is not None for p in paths):
            entry["in_place_ranks"] = sum(paths)  # ranks whose last timed call went direct / pulled
        entry["placement"] = [g["ops"][name][3] for g in gathered]  # each rank's, as the op's timing began
        if all(nbytes):
            gbps = [b / (t * 1e-6) / 1e9 for b, t in zip(nbytes, times)]
            entry.update(gbps_mean=statistics.mean(gbps), gbps_min=min(gbps))
        summary["ops"][name] = entry
    return summary


def bench_cell_job(rank, num_ranks, params: dict) -> dict:
    return bench_cell(rank, num_ranks, **params)


def verify(rank, num_ranks, seed=77) -> None:
    """Dispatch (uncached + cached) and combine against the reference at the bench's shape: first
    as the benchmark times it (default configs, no arena on any rank), then with explicit configs
    where the last rank takes its rows through the rings and the others straight into arena outputs."""
    import moelink  # noqa: PLC0415

    defaults = (moelink.Buffer.get_dispatch_config(num_ranks), moelink.Buffer.get_combine_config(num_ranks))
    buf = common.make_buffer(num_ranks, defaults, (7168,))
    for i, case in enumerate(VERIFY_CASES):
        common.log(rank, f"verify [R={num_ranks}, defaults] " + run_case(buf, rank, num_ranks, case.resolved(num_ranks),
                                                                          seed + i, None, None))
    buf.destroy()
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    buf = common.make_buffer(num_ranks, (config, combine_config), (7168,),
                             num_arena_bytes=0 if rank == num_ranks - 1 else arena_bytes(num_ranks, 512, 7168))
    for i, case in enumerate(VERIFY_CASES):
        common.log(rank, f"verify [R={num_ranks}] " + run_case(buf, rank, num_ranks, case.resolved(num_ranks),
                                                                seed + 10 + i, config, combine_config))
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
            "torch": torch.__version__, "cuda": torch.version.cuda, "gpu_count": torch.cuda.device_count(),
            "driver": _driver_version()}


def _driver_version() -> str:
    try:
        import subprocess  # noqa: PLC0415

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "?"
    except (OSError, IndexError, ValueError):
        return "?"

