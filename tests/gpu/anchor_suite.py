"""DeepEP's own intranode test, run against moelink through the ``deep_ep`` name: the issue's
acceptance for the drop-in (its test passes unchanged apart from its launcher).

    bash scripts/with_mps.sh python3 tests/gpu/anchor_suite.py [--ranks 2,4] [--num-sms 24] [--suite DIR]
        [--impl moelink,deep_ep] [--anchor auto|PATH]

DIR holds DeepEP's tests/test_intranode.py and the utils.py it imports (default
.anchors/deepep_tests). They are DeepEP's code, not this repository's: .anchors/ is ignored, and
the folder's README says where the files come from. The test's `test_main` runs as it is; only its
launcher is replaced. DeepEP's `test_loop` binds rank r to GPU r through its init_dist (one GPU per
rank, NCCL). Here the ranks are processes of tests/gpu/launcher.py, several per GPU under MPS,
joined by gloo. Each rank then does what that test_loop does: default dtype bf16 and device cuda,
`deep_ep.Buffer(group, int(1e9), 0, low_latency_mode=False, num_qps_per_rank=1)`, seed = rank,
`test_main(num_sms, rank, num_ranks, rank, buffer, group)`. The module's `import test_low_latency`
gets an empty module: only its launcher's low-latency part (off there) uses it.

--impl deep_ep runs the same test with DeepEP V1 itself (the anchor, found as the benchmark finds
it: bench/anchor.py), which shows that the replaced launcher does not change what the test asks;
the default runs moelink, then DeepEP when an anchor is found.

Exit status: 0 every run passed, 1 a run failed, 3 no GPU, no suite, or (--impl deep_ep alone) no
anchor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
for _path in (HERE, REPO_ROOT / "tests", REPO_ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import launcher  # noqa: E402 - imports no torch

DEFAULT_SUITE = REPO_ROOT / ".anchors" / "deepep_tests"
SUITE_FILES = ("test_intranode.py", "utils.py")
EXIT_FAILED, EXIT_UNAVAILABLE = 1, 3


def run_suite(rank: int, num_ranks: int, suite_dir: str, num_sms: int, impl: str = "moelink",
              anchor_path: str | None = None) -> str:
    import types  # noqa: PLC0415

    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    import common  # noqa: PLC0415
    from bench_intranode import load_impl  # noqa: PLC0415 - the benchmark's way to import the anchor

    if impl == "moelink":
        import moelink  # noqa: PLC0415

        moelink.install_as_deep_ep()
        import deep_ep  # noqa: PLC0415
    else:
        deep_ep = load_impl("deep_ep", anchor_path)

    sys.path.insert(0, suite_dir)
    sys.modules.setdefault("test_low_latency", types.ModuleType("test_low_latency"))
    import test_intranode as suite  # noqa: PLC0415

    torch.set_default_dtype(torch.bfloat16)
    torch.set_default_device("cuda")
    group = common.world_group()
    buffer = deep_ep.Buffer(group, int(1e9), 0, low_latency_mode=False, num_qps_per_rank=1)
    torch.manual_seed(rank)
    suite.test_main(num_sms, rank, num_ranks, rank, buffer, group)
    dist.barrier()
    return "passed"


def missing_files(suite: Path) -> list[str]:
    return [name for name in SUITE_FILES if not (suite / name).is_file()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="2,4", help="comma-separated rank counts (default 2,4: DeepEP's 24 SMs "
                                                       "per rank fit 4 ranks on one GPU, not 8)")
    parser.add_argument("--num-sms", type=int, default=24, help="test_main's num_sms (DeepEP's test_loop: 24)")
    parser.add_argument("--suite", type=Path, default=DEFAULT_SUITE, help=f"default {DEFAULT_SUITE}")
    parser.add_argument("--impl", default=None, help="comma-separated: moelink, deep_ep (default: moelink, then "
                                                      "deep_ep when an anchor is found)")
    parser.add_argument("--anchor", default="auto", help="DeepEP for --impl deep_ep: auto (as the benchmark), or a "
                                                         "wheel or folder")
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    if args.impl and any(impl not in ("moelink", "deep_ep") for impl in args.impl.split(",")):
        parser.error(f"--impl: expected moelink and/or deep_ep, got {args.impl!r}")
    missing = missing_files(args.suite)
    if missing:
        print(f"anchor suite: {args.suite} lacks {', '.join(missing)} (DeepEP's tests; see this file's docstring)",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    from run_all import gpu_problem  # noqa: PLC0415 - probes in a child process

    problem = gpu_problem()
    if problem:
        print(f"anchor suite: {problem}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    import anchor as anchor_lookup  # noqa: PLC0415 - bench/anchor.py

    found = anchor_lookup.resolve(args.anchor, REPO_ROOT)
    impls = args.impl.split(",") if args.impl else ["moelink"] + (["deep_ep"] if found.available else [])
    if "deep_ep" in impls and not found.available:
        print(f"anchor suite: --impl deep_ep needs DeepEP: {found.reason}", file=sys.stderr)
        if impls == ["deep_ep"]:
            return EXIT_UNAVAILABLE
        impls.remove("deep_ep")
    status = 0
    for impl in impls:
        for num_ranks in ranks:
            what = f"DeepEP's test_intranode.test_main with {impl} on {num_ranks} ranks, {args.num_sms} SMs"
            print(f"anchor suite: {what}", flush=True)
            try:
                launcher.run_ranks(num_ranks, ("anchor_suite", "run_suite", str(Path(__file__).resolve())),
                                   str(args.suite.resolve()), args.num_sms, impl, found.path, timeout_s=900)
            except launcher.RankFailure as failure:
                print(f"anchor suite: {what}: FAILED\n{failure}", flush=True)
                status = EXIT_FAILED
                continue
            print(f"anchor suite: {what}: passed", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
