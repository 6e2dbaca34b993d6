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
                   "--anchor", "--arena", "--dry-run"):
        assert option in result.stdout


def test_bench_sh_help_needs_no_gpu_or_build(repo_root):
    result = subprocess.run(["bash", str(repo_root / "scripts" / "bench.sh"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--tokens" in result.stdout


def test_probe_host_help_needs_no_gpu(repo_root):
    result = subprocess.run([sys.executable, str(repo_root / "bench" / "probe_host.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--ranks" in result.stdout and "--profile" in result.stdout


def test_probe_calls_help_needs_no_gpu_nor_torch(repo_root):
    result = subprocess.run([sys.executable, str(repo_root / "bench" / "probe_calls.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--ranks" in result.stdout and "--calls" in result.stdout


def test_interleaved_plans_without_a_gpu_and_checks_its_arguments(repo_root):
    """bench/interleaved.py: --dry-run names every contestant (moelink, DeepEP unless --anchor
    none, one per --switch) per cell; a malformed switch or an unknown op is refused."""
    script = str(repo_root / "bench" / "interleaved.py")
    run = lambda *args: subprocess.run([sys.executable, script, *args], capture_output=True, text=True,  # noqa: E731
                                       timeout=120)
    result = run("--dry-run", "--cells", "2x24", "--switch", "exact:_dispatch_sizing=None")
    assert result.returncode == 0, result.stderr
    assert "2x24" in result.stdout and "moelink, deep_ep, moelink:exact" in result.stdout
    result = run("--dry-run", "--cells", "2x24", "--switch", "gather:env.MOELINK_SCALES_GATHER=1")
    assert result.returncode == 0 and "moelink, deep_ep, moelink:gather" in result.stdout, result.stderr
    result = run("--dry-run", "--anchor", "none", "--ops", "combine")
    assert result.returncode == 0 and "combine x 100 rounds: moelink\n" in result.stdout + "\n", result.stdout
    result = run("--dry-run", "--cells", "2x24", "--starts", "together,barrier")
    assert result.returncode == 0 and "moelink, deep_ep, moelink@barrier, deep_ep@barrier" in result.stdout
    for bad in (["--switch", "no-colon"], ["--switch", "x:1a=2"], ["--switch", "x:env.1a=2"], ["--switch", "moelink:a=1"], ["--ops", "layout"],
                ["--starts", "soon"], ["--starts", "barrier,barrier"], ["--starts", ""]):
        result = run("--dry-run", *bad)
        assert result.returncode == 2, (bad, result.stdout)


def test_bench_variants_needs_variants(repo_root, tmp_path):
    result = subprocess.run(["bash", str(repo_root / "scripts" / "bench_variants.sh")], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "OUT": str(tmp_path)})
    assert result.returncode == 2 and "usage" in result.stderr


def test_bench_variants_times_a_repeated_variant_again_in_its_own_build(repo_root, tmp_path):
    """base, X, base, X: each name is built once and run twice; the second pass gets its own logs
    (NAME.pass2), so the first is kept. The build and MPS steps are stubbed (no CUDA here)."""
    tree = tmp_path / "repo"
    (tree / "scripts").mkdir(parents=True)
    script = tree / "scripts" / "bench_variants.sh"
    script.write_text((repo_root / "scripts" / "bench_variants.sh").read_text())
    (tree / "scripts" / "build.sh").write_text(
        "mkdir -p build/python/moelink && touch build/python/moelink/libmoelink.so && echo build >> ../builds\n")
    (tree / "scripts" / "with_mps.sh").write_text('"$@"\n')
    patch = tmp_path / "X.patch"
    patch.write_text("--- /dev/null\n+++ b/marker\n@@ -0,0 +1 @@\n+patched\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "TMPDIR": str(tmp_path / "work")}
    result = subprocess.run(["bash", str(script), "--run", "cat marker", "base", str(patch), "base", str(patch)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0  # base has no marker: its run fails, and the script says so
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.endswith(": cat marker")] == ["base", "X", "base#2", "X#2"]
    assert "X#2: patched" in lines and "X: patched" in lines
    assert sorted(p.name for p in (out / "variants").iterdir()) == ["X", "X.pass2", "base", "base.pass2"]
    assert (tmp_path / "work" / "moelink-variants" / "builds").read_text().count("build") == 2


def test_defaults_are_the_readme_cells(run_all):
    args = run_all.parse_args([])
    assert args.cells == [(2, 24), (4, 24), (4, 8), (8, 16)]
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


def fake_result(run_all, impl="moelink", scale=1.0, errors=None):
    ops = {name: {"time_us_mean": (100.0 + i) / scale, "gbps_mean": (200.0 + i) * scale, "gbps_min": 190.0}
           for i, (name, _) in enumerate(run_all.ROW_OPS)}
    ops["layout"] = {"time_us_mean": 50.0 / scale}
    return {"impl": impl, "recv_rows": [30000, 30002], "ops": ops, "errors": errors or {}}


RUN = {"ranks": 4, "num_sms": 24, "tokens": 4096, "hidden": 7168, "topk": 8, "experts": 256}


def test_one_row_per_run_with_ratios_from_this_run(run_all):
    row = run_all.format_row(RUN, {"moelink": fake_result(run_all), "deep_ep": fake_result(run_all, "deep_ep", 0.5)})
    assert row.split()[:7] == ["4", "24", "4096", "7168", "8", "256", "30001"]
    assert "200.0" in row and "x2.00" in row
    alone = run_all.format_row(RUN, {"moelink": fake_result(run_all)})
    assert "x2" not in alone and "    -" in alone  # no anchor: no ratio
    failed = run_all.format_row(RUN, {"moelink": {"impl": "moelink", "error": "boom"}})
    assert "FAILED" in failed
    header = run_all.row_header()
    assert all(title in header for _, title in run_all.ROW_OPS)


def test_ratio_is_speed_over_speed(run_all):
    assert run_all.ratio({"gbps_mean": 300.0}, {"gbps_mean": 150.0}) == 2.0
    assert run_all.ratio({"time_us_mean": 25.0}, {"time_us_mean": 50.0}) == 2.0  # layout: time over time
    assert run_all.ratio({"gbps_mean": 300.0}, None) is None
    assert run_all.ratio(None, {"gbps_mean": 1.0}) is None


def test_no_figure_is_typed_in(repo_root):
    """Ratios divide by figures of the same run only: no DeepEP number lives in the bench's code."""
    import re

    for name in ("run_all.py", "bench_intranode.py", "anchor.py"):
        text = (repo_root / "bench" / name).read_text()
        assert not re.search(r"DEEPEP_GBPS|\(\s*149\s*,\s*158", text), f"bench/{name} holds typed-in DeepEP figures"


def test_table_marks_a_missing_or_failed_anchor(run_all):
    info = {"copy_gbps": 4000.0, "gpu_count": 1}
    cells = [{**RUN, "results": {"moelink": fake_result(run_all), "deep_ep": fake_result(run_all, "deep_ep", 0.5)}},
             {**RUN, "results": {"moelink": fake_result(run_all)}},
             {**RUN, "results": {"moelink": fake_result(run_all), "deep_ep": {"impl": "deep_ep", "error": "hung"}}}]
    table = run_all.format_table(cells, info, "DeepEP 1.2.1 from /x")
    rows = [line for line in table.splitlines() if line.startswith("| 4x24")]
    per_cell = len(run_all.OP_TITLES)
    assert len(rows) == 3 * per_cell
    assert "| 2.00 |" in rows[0] and "40%" in rows[0]        # 200 GB/s of 4000 / (2 x 4)
    assert "no anchor" in rows[per_cell]
    assert "anchor failed" in rows[2 * per_cell]
    assert "DeepEP 1.2.1 from /x" in table


def test_table_says_which_path_moelink_took(run_all):
    info = {"copy_gbps": 4000.0, "gpu_count": 1}
    mine = fake_result(run_all)
    mine["ops"]["dispatch_bf16"]["in_place_ranks"] = 4
    mine["ops"]["dispatch_bf16_held"]["in_place_ranks"] = 1
    table = run_all.format_table([{**RUN, "results": {"moelink": mine}}], info, "none")
    line = next(line for line in table.splitlines() if line.startswith("moelink ranks whose last timed call"))
    assert f"4x24: {run_all.OP_TITLES['dispatch_bf16']} 4/4" in line
    assert f"{run_all.OP_TITLES['dispatch_bf16_held']} 1/4" in line
    plain = run_all.format_table([{**RUN, "results": {"moelink": fake_result(run_all)}}], info, "none")
    assert "last timed call" not in plain  # DeepEP-only or older results: no line


def test_table_says_where_the_ranks_ran(run_all):
    info = {"copy_gbps": 4000.0, "gpu_count": 1}
    mine = fake_result(run_all)
    mine["ops"]["dispatch_fp8"]["placement"] = [{"cpu": 3, "core": "0/3", "node": "0"},
                                                {"cpu": 4, "core": "0/4", "node": "0"},
                                                {"cpu": 11, "core": "0/3", "node": "0"},
                                                {"cpu": 5, "core": "0/5", "node": "0"}]
    table = run_all.format_table([{**RUN, "results": {"moelink": mine}}], info, "none")
    line = next(line for line in table.splitlines() if line.startswith("Where each rank's thread ran"))
    assert "4x24 moelink: rank 0 cpu 3 (0/3, node 0)" in line and "sharing a core: 0/2" in line
    plain = run_all.format_table([{**RUN, "results": {"moelink": fake_result(run_all)}}], info, "none")
    assert "Where each rank" not in plain


def _bench_module(repo_root, monkeypatch, name: str):
    """bench/NAME.py loaded as the benchmarks load each other (bench/ and tests/gpu on the path)."""
    monkeypatch.syspath_prepend(str(repo_root / "tests" / "gpu"))
    monkeypatch.syspath_prepend(str(repo_root / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}_cli", repo_root / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def interleaved(repo_root, monkeypatch):
    return _bench_module(repo_root, monkeypatch, "interleaved")


def test_interleaved_summary_leaves_the_placement_out(interleaved):
    module = interleaved
    rank = {"_placement": {"cpu": 1, "core": "0/1", "node": "0"},
            "dispatch_fp8": {"moelink": [100.0, 110.0], "deep_ep": [200.0, 220.0]}}
    summary = module.summarize([rank, rank], ["moelink", "deep_ep"])
    assert list(summary) == ["dispatch_fp8"]
    assert summary["dispatch_fp8"]["deep_ep"]["ratio"] == pytest.approx(2.0)
    assert "skew_us" not in summary["dispatch_fp8"]["moelink"]


def test_interleaved_skew_is_the_spread_of_the_ranks_starts(interleaved):
    module = interleaved
    times = {"moelink": [100.0, 110.0, 120.0]}
    ranks = [{"dispatch_fp8": times, "_began_dispatch_fp8": {"moelink": [1_000, 5_000, 9_000]}},
             {"dispatch_fp8": times, "_began_dispatch_fp8": {"moelink": [3_000, 6_000, 19_000]}},
             {"dispatch_fp8": times, "_began_dispatch_fp8": {"moelink": [2_000, 5_500, 9_000]}}]
    # Per round, last minus first: 2, 1 and 10 µs; their median.
    assert module.summarize(ranks, ["moelink"])["dispatch_fp8"]["moelink"]["skew_us"] == pytest.approx(2.0)


def _start_rank(rank: int, port: int, paths: list[str], results) -> None:
    sys.path[:0] = paths
    import torch.distributed as dist  # noqa: PLC0415

    import bench_intranode  # noqa: PLC0415

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 1:
            time.sleep(0.05)  # arrives late: the shared deadline is set from its arrival
        deadlines = [(bench_intranode.start_together(), time.monotonic_ns()) for _ in range(3)]
        results.put((rank, deadlines, bench_intranode.start_together("barrier"), bench_intranode.LATE_STARTS[0]))
    finally:
        dist.destroy_process_group()


def test_start_together_releases_every_rank_at_one_shared_deadline(repo_root):
    """Both ranks get the same deadline each time, and neither returns before it."""
    pytest.importorskip("torch")
    import multiprocessing  # noqa: PLC0415
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    paths = [str(repo_root / "bench"), str(repo_root / "tests"), str(repo_root / "tests" / "gpu")]
    procs = [ctx.Process(target=_start_rank, args=(r, port, paths, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, rest) for r, *rest in (results.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    (d0, barrier0, _), (d1, barrier1, _) = got[0], got[1]
    assert [d for d, _ in d0] == [d for d, _ in d1]
    assert all(returned >= deadline for deadline, returned in d0 + d1)
    assert barrier0 is None and barrier1 is None


def test_placement_reads_this_machine(repo_root, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(repo_root / "tests" / "gpu"))
    monkeypatch.syspath_prepend(str(repo_root / "bench"))
    import bench_intranode

    where = bench_intranode.placement()
    assert set(where) == {"cpu", "core", "node"} and where["cpu"] in os.sched_getaffinity(0)
    assert "/" in where["core"]


def test_two_touch_limit(run_all):
    assert run_all.two_touch_limit(4000.0, 4, 1) == 500.0
    assert run_all.two_touch_limit(4000.0, 8, 8) == 2000.0  # one rank per GPU


# ---- the anchor ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def anchor(repo_root):
    spec = importlib.util.spec_from_file_location("bench_anchor", repo_root / "bench" / "anchor.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_anchor"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_anchor", None)


def fake_deep_ep(root, shim=False, version="1.2.1"):
    package = root / "deep_ep"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"__version__ = {version!r}\n" + ("__moelink_shim__ = True\n" if shim else ""))
    return root


def fake_wheel(directory):
    import zipfile

    wheel = directory / "deep_ep-1.2.1-py3-none-any.whl"
    info = "deep_ep-1.2.1.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("deep_ep/__init__.py", "__version__ = '1.2.1'\n")
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: deep_ep\nVersion: 1.2.1\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def test_anchor_none(anchor, repo_root):
    found = anchor.resolve("none", repo_root)
    assert not found.available and "ratios are not printed" in found.describe()


def test_anchor_directory(anchor, repo_root, tmp_path):
    found = anchor.resolve(str(fake_deep_ep(tmp_path)), repo_root)
    assert found.available and found.version == "1.2.1" and found.path == str(tmp_path)


def test_anchor_refuses_moelinks_shim(anchor, repo_root, tmp_path):
    found = anchor.resolve(str(fake_deep_ep(tmp_path, shim=True)), repo_root)
    assert not found.available and "shim" in found.reason


def test_anchor_wheel_is_installed_once(anchor, repo_root, tmp_path, monkeypatch):
    monkeypatch.setattr(anchor.tempfile, "gettempdir", lambda: str(tmp_path / "cache"))
    wheel = fake_wheel(tmp_path)
    first = anchor.resolve(str(wheel), repo_root)
    assert first.available, first.reason
    assert (tmp_path / "cache" / "moelink-anchor" / wheel.stem / "deep_ep").is_dir()
    assert anchor.resolve(str(wheel), repo_root).path == first.path


def test_anchor_auto_uses_the_environment_variable(anchor, repo_root, tmp_path, monkeypatch):
    monkeypatch.setenv(anchor.ENV, str(fake_deep_ep(tmp_path)))
    assert anchor.resolve("auto", repo_root).path == str(tmp_path)


def test_anchor_auto_without_deep_ep_says_where_to_put_it(anchor, tmp_path, monkeypatch):
    monkeypatch.delenv(anchor.ENV, raising=False)
    monkeypatch.setenv("PYTHONPATH", "")
    found = anchor.resolve("auto", tmp_path)  # a repo root without .anchors/
    if found.available:
        pytest.skip("this interpreter can import a deep_ep of its own")
    assert ".anchors/" in found.reason


def test_anchor_bad_directory(anchor, repo_root, tmp_path):
    found = anchor.resolve(str(tmp_path), repo_root)
    assert not found.available and "holds no deep_ep package" in found.reason


def test_progress_while_running(run_all, monkeypatch):
    monkeypatch.setattr(run_all, "PROGRESS_LINE_S", 0.02)
    stream = io.StringIO()
    with run_all.Progress("4x24 T=4096", stream):
        time.sleep(0.2)
    lines = stream.getvalue().splitlines()
    assert lines and all(line.startswith("  4x24 T=4096: running,") for line in lines)


# ---- the low-latency benchmark -------------------------------------------------------------------

def test_low_latency_bench_help_and_no_gpu(repo_root):
    script = str(repo_root / "bench" / "bench_low_latency.py")
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--experts" in result.stdout, result.stderr
    bad = subprocess.run([sys.executable, script, "--ranks", "3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a multiple of 3 ranks" in bad.stderr
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    none = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300, env=env)
    assert none.returncode == 3 and "needs PyTorch with CUDA" in none.stderr, none.stdout + none.stderr


def test_low_latency_floor(repo_root):
    spec = importlib.util.spec_from_file_location("bench_ll", repo_root / "bench" / "bench_low_latency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_ll"] = module
    try:
        spec.loader.exec_module(module)
        # 1000 rows of 2 x 7168 bytes, read and written, at 4000 GB/s: 2 * 1000 * 14336 / 4e9 s = 7.168 us
        assert abs(module.floor_us("dispatch_bf16", 1000, 7168, 4000.0) - 7.168) < 1e-9
        assert module.floor_us("dispatch_send_hook", 1000, 7168, 4000.0) is None
    finally:
        sys.modules.pop("bench_ll", None)


def test_the_probes_runtime_wrapper_sums_the_time_inside_its_calls(repo_root):
    """bench_intranode.TimedRuntime (probe_host, bench_low_latency --split-host): every method call
    of the runtime is timed into spent[name] (an exception too), and attributes that are not
    methods pass through."""
    pytest.importorskip("torch")  # bench_intranode imports it
    spec = importlib.util.spec_from_file_location("bench_intranode_probe", repo_root / "bench" / "bench_intranode.py")
    bench_intranode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_intranode)

    class Runtime:
        device_id = 3

        def slow(self):
            time.sleep(0.02)
            return "done"

        def fails(self):
            time.sleep(0.02)
            raise ValueError("bad")

    timed = bench_intranode.TimedRuntime(Runtime())
    assert timed.device_id == 3 and timed.spent == {}
    assert timed.slow() == "done" and timed.spent["slow"] >= 0.02
    with pytest.raises(ValueError):
        timed.fails()
    assert timed.spent["fails"] >= 0.02


def test_a_failing_rank_of_a_function_reference_is_a_rank_failure(repo_root, monkeypatch):
    """The bench names its rank jobs by (module, qualname, path) so that its parent never imports
    torch; when one fails the launcher must raise RankFailure (which the bench reports in its
    table), not crash on the reference. json.dumps fails as a rank job on any machine: without a
    GPU at the device pick, with one at the call."""
    pytest.importorskip("torch")
    import json

    monkeypatch.syspath_prepend(str(repo_root / "tests" / "gpu"))
    import launcher

    with pytest.raises(launcher.RankFailure, match="dumps on 2 ranks"):
        launcher.run_ranks(2, ("json", "dumps", json.__file__), timeout_s=60)


def test_the_path_is_asked_of_moelink_only(repo_root):
    """DeepEP's Buffer has a `runtime` too, without moelink's path counters: asking it made every
    DeepEP op of a cell fail (a run with no ratios at all)."""
    pytest.importorskip("torch")  # bench_intranode imports it at the top
    spec = importlib.util.spec_from_file_location("bench_intranode_path", repo_root / "bench" / "bench_intranode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Runtime:
        last_dispatch_direct, last_combine_pulled = True, False

    class Buf:
        runtime = Runtime()

    class DeepEpBuf:
        runtime = object()

    assert module._path(DeepEpBuf(), "deep_ep", "dispatch_bf16") is None
    assert module._path(Buf(), "moelink", "dispatch_bf16") is True
    assert module._path(Buf(), "moelink+arena", "combine_x") is False
    assert module._path(Buf(), "moelink", "layout") is None


def test_repeats_report_the_run_of_median_time(run_all):
    """--repeat N runs each library N times, alternating; per op the run of median time is kept
    (whole, so its GB/s matches its time), with every run's time beside it."""
    def result(times):
        return {"impl": "moelink", "recv_rows": [1], "errors": {},
                "ops": {"dispatch_bf16": {"time_us_mean": times[0], "gbps_mean": 1000.0 / times[0]},
                        "combine": {"time_us_mean": times[1], "gbps_mean": 1000.0 / times[1]}}}

    merged = run_all.merge_repeats([result((30.0, 10.0)), result((10.0, 20.0)), result((20.0, 30.0))])
    assert merged["ops"]["dispatch_bf16"]["time_us_mean"] == 20.0
    assert merged["ops"]["dispatch_bf16"]["gbps_mean"] == 50.0
    assert merged["ops"]["dispatch_bf16"]["repeats_us"] == [30.0, 10.0, 20.0]
    assert merged["ops"]["combine"]["time_us_mean"] == 20.0
    assert run_all.merge_repeats([result((30.0, 10.0)), result((10.0, 20.0))])["ops"]["dispatch_bf16"][
        "time_us_mean"] == 10.0  # an even count keeps the lower middle
    failed = {"impl": "moelink", "error": "boom"}
    assert run_all.merge_repeats([result((1.0, 1.0)), failed]) is failed
    raised = result((5.0, 5.0))
    raised["errors"] = {"combine": "Traceback ..."}
    del raised["ops"]["combine"]
    merged = run_all.merge_repeats([result((1.0, 1.0)), raised])
    assert "combine" not in merged["ops"] and merged["errors"] == {"combine": "Traceback ..."}


def test_repeat_must_be_positive(run_all):
    with pytest.raises(SystemExit):
        run_all.parse_args(["--repeat", "0"])
    assert run_all.parse_args(["--repeat", "3"]).repeat == 3


# ---- bench_internode.py --------------------------------------------------------------------------

@pytest.fixture
def bench_internode(repo_root, monkeypatch):
    return _bench_module(repo_root, monkeypatch, "bench_internode")


def test_bench_internode_plans_without_a_gpu_and_checks_its_arguments(repo_root):
    script = str(repo_root / "bench" / "bench_internode.py")
    run = lambda *args: subprocess.run([sys.executable, script, *args], capture_output=True, text=True,  # noqa: E731
                                       timeout=120)
    result = run("--dry-run")
    assert result.returncode == 0, result.stderr
    assert "2x4 (8 ranks, stores lane, 16 SMs), then intranode 8x16" in result.stdout
    assert run("--dry-run", "--nodes", "4", "--per-node", "2", "--lane", "fake").returncode == 0
    for bad in (["--nodes", "1"], ["--experts", "100"], ["--sms", "15"], ["--lane", "ucx"], ["--iters", "0"]):
        assert run("--dry-run", *bad).returncode == 2, bad


def test_lane_rows_count_other_nodes_once_per_token(bench_internode):
    # 2 nodes x 2 ranks; rank 1 (node 0) sends: token 0 to ranks 2 and 3 (node 1 once), token 1 to
    # its own node only, token 2 to rank 0 and rank 3, token 3 nowhere.
    flags = [[False, False, True, True], [True, True, False, False], [True, False, False, True], [False] * 4]
    assert bench_internode.lane_rows(flags, 1, 2) == 2
    assert bench_internode.lane_rows(flags, 2, 2) == 2  # node 1: tokens 1 and 2 reach node 0
    assert bench_internode.lane_rows(flags, 0, 4) == 0  # one node: nothing crosses
    assert bench_internode.row_bytes("dispatch_fp8_cached", 7168) == 7168 + 224
    assert bench_internode.row_bytes("combine", 7168) == 2 * 7168


def test_bench_internode_summary_and_table(bench_internode):
    ops = {name: 100.0 for name, _ in bench_internode.OPS}
    rank = {"internode": {"ops": ops, "recv_rows": 1000, "lane_rows": 500},
            "intranode": {"ops": {k: v / 2 for k, v in ops.items()}, "recv_rows": 1000, "lane_rows": 0}}
    summary = bench_internode.summarize([rank, rank], 7168)
    assert summary["internode"]["combine"]["gbps"] == pytest.approx(1000 * 2 * 7168 / 100e-6 / 1e9)
    assert summary["lane_mb"]["dispatch_bf16"] == pytest.approx(500 * 2 * 7168 / 1e6)
    args = bench_internode.parse_args([])
    table = bench_internode.format_table(summary, args)
    assert "| combine of recv_x | 100.0 |" in table and "| 2.00 |" in table



def test_source_digest_follows_the_code_not_the_notes(run_all, tmp_path):
    """A run's header names the digest of its sources: the same tree gives the same digest, a code
    change another one; notes, caches and the last run's JSON do not count."""
    (tmp_path / "src").mkdir()
    (tmp_path / "bench" / "__pycache__").mkdir(parents=True)
    (tmp_path / "src" / "a.cu").write_text("kernel")
    (tmp_path / "CMakeLists.txt").write_text("project(x)")
    first = run_all.source_digest(tmp_path)
    assert len(first) == 12 and run_all.source_digest(tmp_path) == first
    (tmp_path / "bench" / "NOTES.md").write_text("measured")
    (tmp_path / "bench" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (tmp_path / "bench" / "last_run.json").write_text("{}")
    assert run_all.source_digest(tmp_path) == first
    (tmp_path / "src" / "a.cu").write_text("kernel v2")
    assert run_all.source_digest(tmp_path) != first
    result = subprocess.run([sys.executable, str(run_all.REPO_ROOT / "bench" / "run_all.py"), "--source-digest"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == run_all.source_digest()
