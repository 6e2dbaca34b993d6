"""Where the time of one timed call goes, from a chrome trace of `bench/probe_host.py --timeline`.

    python3 bench/timeline_report.py $OUT/timeline_moelink_dispatch_fp8_cached_rank0.json

Each call of the trace is timed as the benchmark times it: the start event's record (the first
cudaEventRecordWithFlags of the call) is time 0, the end event's record the last. For every CUDA
call, allocation and kernel of the call (numbered in order of appearance, #1, #2, ...), this prints
the median start, end and duration over the calls, in µs. Kernels that start before the next call
are counted with this one, so a kernel queued at the call's end still shows where it ran.
"""

from __future__ import annotations

import collections
import json
import statistics
import sys

KINDS = ("cuda_runtime", "kernel", "cpu_op", "gpu_memset", "gpu_memcpy")


def report(path: str) -> str:
    with open(path) as f:
        trace = json.load(f)
    events = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in KINDS),
                    key=lambda e: e["ts"])
    rows = collections.defaultdict(list)
    syncs = [i for i, e in enumerate(events) if e["name"] == "cudaEventSynchronize"]
    for j in syncs:
        records = [i for i in range(j) if events[i]["name"] == "cudaEventRecordWithFlags"]
        if len(records) < 2:
            continue
        first = records[-2]
        if any(events[k]["name"] == "cudaEventSynchronize" for k in range(first, j)):
            continue  # not one call's window
        t0 = events[first]["ts"]
        seen = collections.Counter()
        later_kernels = [e for e in events[j + 1:j + 40] if e.get("cat") == "kernel"]
        for e in events[first:j + 1] + later_kernels:
            name = e["name"][:44]
            seen[name] += 1
            rows[f"{e['cat'][:6]} {name}#{seen[name]}"].append((e["ts"] - t0, e["dur"]))
    lines = []
    for key in sorted(rows, key=lambda k: statistics.median(s for s, _ in rows[k])):
        v = rows[key]
        # Short host ops (tensor views, fills) are noise here; allocations and CUDA calls are kept.
        if len(v) < 4 or (key.startswith("cpu_op") and statistics.median(d for _, d in v) < 3):
            continue
        lines.append(f"{key:58s} n={len(v):3d} start {statistics.median(s for s, _ in v):8.1f}  "
                     f"end {statistics.median(s + d for s, d in v):8.1f}  dur {statistics.median(d for _, d in v):7.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"== {arg}")
        print(report(arg))
