"""Buffers, configs and comparisons shared by the GPU tests and the bench (imported in every rank)."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent
for _path in (TESTS_DIR, Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
# Appended, so a build named by PYTHONPATH (scripts/test.sh) wins over a stale one here.
if (REPO_ROOT / "build" / "python").is_dir() and str(REPO_ROOT / "build" / "python") not in sys.path:
    sys.path.append(str(REPO_ROOT / "build" / "python"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import moelink  # noqa: E402

def _rank_counts() -> tuple:
    """The rank counts the multi-rank tests run at: MOELINK_TEST_RANKS (e.g. "2" or "2,4"), default
    2, 4 and 8. scripts/sanitize.sh narrows it; the tests that need a particular count ignore it."""
    value = os.environ.get("MOELINK_TEST_RANKS", "2,4,8")
    try:
        counts = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"MOELINK_TEST_RANKS must be a comma-separated list of ints, got {value!r}") from None
    if not counts or any(c not in (2, 4, 8) for c in counts):
        raise ValueError(f"MOELINK_TEST_RANKS must list rank counts out of 2, 4 and 8, got {value!r}")
    return counts


RANK_COUNTS = _rank_counts()
MIB = 1 << 20
# NVSHMEM with several PEs on one GPU under MPS and no NIC: P2P only, no NVLS or NCCL, a symmetric
# heap that fits beside the other ranks, the bootstrap on loopback, MPS's thread limit not read.
NVSHMEM_ONE_GPU_ENV = {
    "NVSHMEM_REMOTE_TRANSPORT": "none",
    "NVSHMEM_DISABLE_NVLS": "1",
    "NVSHMEM_DISABLE_NCCL": "1",
    "NVSHMEM_SYMMETRIC_SIZE": "512m",
    "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo",
    "NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "1",
}


def num_sms_for(num_ranks: int) -> int:
    """SMs per rank such that all ranks' kernels fit on one 132-SM GPU at once (ranks x SMs <= 128):
    every rank spins waiting for its peers, so they must all be resident together."""
    return {1: 24, 2: 24, 4: 16, 8: 8}[num_ranks]


def make_configs(num_ranks: int, num_sms: int):
    """(dispatch config, combine config): the presets for num_ranks with num_sms overridden."""
    moelink.Buffer.set_num_sms(num_sms)
    configs = []
    # MOELINK_BENCH_NVL="chunk,slots" overrides both presets' NVLink chunk and ring sizes (tuning sweeps).
    override = os.environ.get("MOELINK_BENCH_NVL")
    for preset in (moelink.Buffer.get_dispatch_config(num_ranks), moelink.Buffer.get_combine_config(num_ranks)):
        chunk, slots = preset.num_max_nvl_chunked_send_tokens, preset.num_max_nvl_chunked_recv_tokens
        if override:
            chunk, slots = (int(v) for v in override.split(","))
        configs.append(moelink.Config(num_sms, chunk, slots))
    return tuple(configs)


def nvl_bytes_for(configs, hidden_sizes, num_ranks: int) -> int:
    """The NVLink buffer every listed config needs for every listed hidden size. Rows are sized as
    bf16 (2 bytes per element), which also covers fp8 rows with their scales."""
    return max(cfg.get_nvl_buffer_size_hint(2 * hidden, num_ranks) for cfg in configs for hidden in hidden_sizes)


_world = None


def world_group():
    global _world
    if _world is None:
        _world = dist.new_group(list(range(dist.get_world_size())))
    return _world


def make_buffer(num_ranks: int, configs, hidden_sizes, **kwargs) -> "moelink.Buffer":
    return moelink.Buffer(world_group(), num_nvl_bytes=nvl_bytes_for(configs, hidden_sizes, num_ranks),
                          explicitly_destroy=True, **kwargs)


def log(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def settled_free_memory() -> int:
    """Device-wide free bytes once every rank got here with nothing queued and no cached blocks.
    Under MPS all ranks share the device, so they must measure at the same point of the program."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    dist.barrier()
    free = torch.cuda.mem_get_info()[0]
    dist.barrier()
    return free


def _bits(t: "torch.Tensor") -> "torch.Tensor":
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _first_bad_rows(mismatch: "torch.Tensor") -> str:
    rows = mismatch.reshape(mismatch.shape[0], -1).any(dim=1) if mismatch.dim() > 1 else mismatch
    bad = torch.nonzero(rows).flatten()
    return f"{bad.numel()} of {rows.numel()} rows differ, first at row {bad[0].item()}"


def assert_bits_equal(got, want, what: str) -> None:
    """Bit-exact equality (a stale row of random data, a -0.0 or a NaN payload all count)."""
    assert got is not None, f"{what}: got None"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    if got.numel() == 0:
        return
    want = want.to(got.device)
    got_bits, want_bits = _bits(got), _bits(want)
    if not torch.equal(got_bits, want_bits):
        raise AssertionError(f"{what}: {_first_bad_rows(got_bits != want_bits)}")


def assert_values_equal(got, want, what: str) -> None:
    """Exact equality by value (0.0 == -0.0): for outputs that are copies or sums of one non-zero term."""
    assert got is not None, f"{what}: got None"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    want = want.to(got.device)
    if got.numel() and not torch.equal(got, want):
        raise AssertionError(f"{what}: {_first_bad_rows(got != want)}")


def check_layout(got, want, what: str, num_nvl_ranks: int | None = None) -> None:
    """got: get_dispatch_layout's tuple (event dropped); want: reference_layout's. num_nvl_ranks: GPUs
    per node when the ranks span nodes (then num_tokens_per_rdma_rank counts the tokens each node
    gets), else None (then it must be None)."""
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank = got
    if num_nvl_ranks is None:
        assert num_tokens_per_rdma_rank is None, f"{what}: num_tokens_per_rdma_rank must be None intranode"
    else:
        # Sizes spelled out: view() cannot infer a -1 dimension of an empty tensor (T = 0).
        in_node = want[3].view(want[3].size(0), want[3].size(1) // num_nvl_ranks, num_nvl_ranks).any(dim=2)
        assert_values_equal(num_tokens_per_rdma_rank, in_node.sum(dim=0, dtype=torch.int32),
                            f"{what}: num_tokens_per_rdma_rank")
    assert_values_equal(num_tokens_per_rank, want[0], f"{what}: num_tokens_per_rank")
    assert_values_equal(num_tokens_per_expert, want[2], f"{what}: num_tokens_per_expert")
    assert_values_equal(is_token_in_rank, want[3], f"{what}: is_token_in_rank")


def quiet_destroy(buffer) -> None:
    """Cleanup after a provoked failure: the buffer may be unusable or its peers gone, so destroy()
    may time out or refuse; what is under test has already been asserted."""
    try:
        buffer.destroy()
    except (TimeoutError, RuntimeError):
        pass
