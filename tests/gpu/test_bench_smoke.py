"""The benchmark's cell code on a tiny shape (2 ranks, 1 iteration), for moelink and, when an anchor is
found (bench/anchor.py), for DeepEP: every op runs and reports a time, so a full benchmark run does
not find a broken cell after minutes of GPU time. Figures here mean nothing."""

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import launcher  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import anchor as anchor_lookup  # noqa: E402
import bench_intranode  # noqa: E402

PARAMS = {"num_sms": 8, "num_tokens": 64, "hidden": 2048, "num_topk": 4, "num_experts": 16, "iters": 1, "warmup": 0}


def _check(result, impl):
    assert result["impl"] == impl
    assert not result["errors"], f"{impl}: {result['errors']}"
    assert set(result["ops"]) == set(bench_intranode.OP_NAMES), sorted(result["ops"])
    assert all(op["time_us_mean"] > 0 for op in result["ops"].values())
    assert result["held"] >= 1


@pytest.mark.parametrize("impl", ["moelink", "moelink+arena"])
def test_moelink_cell(impl):
    result = launcher.run_ranks(2, bench_intranode.bench_cell_job, {**PARAMS, "impl": impl}, timeout_s=300)[0]
    _check(result, impl)


def test_anchor_cell():
    found = anchor_lookup.resolve("auto", BENCH.parent)
    if not found.available:
        pytest.skip(found.reason)
    result = launcher.run_ranks(2, bench_intranode.bench_cell_job,
                                {**PARAMS, "impl": "deep_ep", "anchor_path": found.path}, timeout_s=300)[0]
    _check(result, "deep_ep")
