"""bench/run_all.py's command line (scripts/bench.sh passes its arguments on): --help, the shape
options, the run plan, the per-run rows and the no-GPU exit. The measurement itself needs a GPU
(tests/gpu, scripts/bench.sh)."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import time

import pytest


@pytest.fixture(scope="module")
def run_all(repo_root):
    spec = importlib.util.spec_from_file_location("bench_run_all", repo_root / "bench" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli(repo_root, *args, env=None):
    return subprocess.run([sys.executable, str(repo_root / "bench" / "run_all.py"), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_help_lists_the_options(repo_root):
    result = cli(repo_root, "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--tokens", "--hidden", "--topk", "--experts", "--ranks", "--sms", "--cells", "--iters",
                   "--dry-run"):
        assert option in result.stdout


def test_bench_sh_help_needs_no_gpu_or_build(repo_root):
    result = subprocess.run(["bash", str(repo_root / "scripts" / "bench.sh"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--tokens" in result.stdout


def test_defaults_are_the_readme_cells(run_all):
    args = run_all.parse_args([])
    assert args.cells == [(4, 24), (4, 8), (8, 16)]
    assert (args.tokens, args.hidden, args.topk, args.experts) == ([4096], [7168], 8, 256)
    assert (args.iters, args.warmup) == (30, 5)


def test_ranks_and_sms_make_every_cell(run_all):
    assert run_all.parse_args(["--ranks", "2,4", "--sms", "8,16"]).cells == [(2, 8), (2, 16), (4, 8), (4, 16)]
    assert run_all.parse_args(["--sms", "8"]).cells == [(4, 8)]
    assert run_all.parse_args(["--cells", "2x8,8x24"]).cells == [(2, 8), (8, 24)]


def test_plan_is_every_cell_at_every_size(run_all):
    args = run_all.parse_args(["--ranks", "2", "--sms", "8", "--tokens", "128,4096", "--hidden", "2048,7168",
                               "--topk", "4", "--experts", "64"])
    runs = run_all.plan(args)
    assert [(r["tokens"], r["hidden"]) for r in runs] == [(128, 2048), (128, 7168), (4096, 2048), (4096, 7168)]
    assert all((r["ranks"], r["num_sms"], r["topk"], r["experts"]) == (2, 8, 4, 64) for r in runs)


@pytest.mark.parametrize("argv", [
    ["--ranks", "3"],                    # 256 experts do not split over 3 ranks
    ["--ranks", "16"],                   # more than one node
    ["--sms", "7"],                      # odd
    ["--hidden", "100"],                 # not a multiple of 128
    ["--tokens", "0"],
    ["--topk", "0"],
    ["--topk", "300"],
    ["--tokens", "many"],
    ["--cells", "4by24"],
    ["--cells", "4x24", "--ranks", "2"],  # two ways of naming cells
    ["--iters", "0"],
])
def test_bad_arguments_exit_2(run_all, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_all.parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_dry_run_prints_the_plan(repo_root):
    result = cli(repo_root, "--dry-run", "--ranks", "2,4", "--tokens", "128,256")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["2x24 T=128 H=7168 K=8 E=256", "2x24 T=256 H=7168 K=8 E=256",
                                          "4x24 T=128 H=7168 K=8 E=256", "4x24 T=256 H=7168 K=8 E=256"]


def test_no_gpu_is_a_clear_error(repo_root):
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this also holds on a GPU machine.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = cli(repo_root, "--iters", "1", env=env)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "needs PyTorch with CUDA and a Hopper GPU" in result.stderr
    assert "Traceback" not in result.stderr


def fake_result(run_all, ranks=4, sms=24, tokens=4096, **overrides):
    ops = {op: {"time_us_mean": 100.0 + i, "gbps_mean": 200.0 + i, "gbps_min": 190.0} for i, op in
           enumerate(run_all.SHOWN_OPS)}
    return {"ranks": ranks, "num_sms": sms, "tokens": tokens, "hidden": 7168, "topk": 8, "experts": 256,
            "recv_rows": [30000, 30002], "arena": True, "ops": ops, **overrides}


def test_one_row_per_run(run_all):
    row = run_all.format_row(fake_result(run_all))
    assert row.split()[:7] == ["4", "24", "4096", "7168", "8", "256", "30001"]
    assert "100.0" in row and "200.0" in row
    failed = run_all.format_row({**fake_result(run_all), "error": "boom", "recv_rows": None})
    assert "FAILED" in failed
    header = run_all.row_header()
    assert all(title in header for title in run_all.OP_TITLES)


def test_table_compares_with_deepep_only_at_its_shape(run_all):
    table = run_all.format_table([fake_result(run_all), fake_result(run_all, tokens=128)])
    rows = table.splitlines()[2:]
    assert len(rows) == 2
    assert "149 / 158 / 181" in rows[0]          # 4x24 at DeepEP's shape
    assert rows[1].rstrip("|").endswith("- | - ")  # same cell, another size: no reference


def test_progress_while_running(run_all, monkeypatch):
    monkeypatch.setattr(run_all, "PROGRESS_LINE_S", 0.02)
    stream = io.StringIO()
    with run_all.Progress("4x24 T=4096", stream):
        time.sleep(0.2)
    lines = stream.getvalue().splitlines()
    assert lines and all(line.startswith("  4x24 T=4096: running,") for line in lines)
