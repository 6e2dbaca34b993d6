"""Buffer lifecycle: repeated create/sync/destroy without leaks, and peers that never arrive."""

import time

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import torch.distributed as dist  # noqa: E402

import common  # noqa: E402
import launcher  # noqa: E402

ROUNDS = 50
LEAK_LIMIT = 16 * common.MIB
PEER_TIMEOUT_S = 3.0


def _create_destroy(rank, num_ranks, rounds):
    configs = common.make_configs(num_ranks, common.num_sms_for(num_ranks))

    def one_round():
        # The constructor bootstraps (all-gather of IPC handles + sync), so ranks move in lockstep.
        common.make_buffer(num_ranks, configs, (7168,)).destroy()

    one_round()  # warm-up: lazy CUDA/IPC state and allocator pools are not leaks
    free_before = common.settled_free_memory()
    start = time.perf_counter()
    for _ in range(rounds):
        one_round()
    elapsed = time.perf_counter() - start
    free_after = common.settled_free_memory()
    lost = free_before - free_after
    assert lost <= LEAK_LIMIT, (f"rank {rank}: {rounds} create/destroy rounds lost {lost / common.MIB:.1f} MiB of "
                                f"device memory (limit {LEAK_LIMIT / common.MIB:.0f} MiB)")
    common.log(rank, f"[R={num_ranks}] {rounds} create/sync/destroy rounds in {elapsed:.1f} s, "
                     f"free memory change {-lost / common.MIB:+.1f} MiB: ok")


def _raw_buffer(rank, num_ranks):
    """A bare extension Buffer and everyone's (device ids, IPC handles), exchanged over gloo."""
    from moelink import _moelink

    configs = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    buf = _moelink.Buffer(rank, num_ranks, common.nvl_bytes_for(configs, (2048,), num_ranks), 0,
                          explicitly_destroy=True, timeout_s=PEER_TIMEOUT_S, device=torch.cuda.current_device())
    device_ids = [None] * num_ranks
    ipc_handles = [None] * num_ranks
    dist.all_gather_object(device_ids, buf.device_id)
    dist.all_gather_object(ipc_handles, buf.local_ipc_handle())
    return buf, device_ids, ipc_handles


def _missing_peer(rank, num_ranks):
    missing = num_ranks - 1

    # 1. The last rank never calls sync: every other rank's sync must time out and name it.
    buf, device_ids, ipc_handles = _raw_buffer(rank, num_ranks)
    if rank != missing:
        start = time.perf_counter()
        with pytest.raises(TimeoutError) as info:
            buf.sync(device_ids, ipc_handles, None)
        message = str(info.value)
        assert f"rank {missing}" in message and "sync" in message, \
            f"rank {rank}: the sync timeout must name rank {missing} and the step 'sync': {message!r}"
        waited = time.perf_counter() - start
        assert waited < 10 * PEER_TIMEOUT_S, f"rank {rank}: sync gave up after {waited:.1f} s, limit {PEER_TIMEOUT_S} s"
        common.log(rank, f"[R={num_ranks}] sync without rank {missing}: TimeoutError after {waited:.1f} s: {message}")
    dist.barrier()
    # Peers first: they may have mapped the missing rank's memory before waiting for it.
    if rank != missing:
        common.quiet_destroy(buf)
    dist.barrier()
    if rank == missing:
        common.quiet_destroy(buf)
    dist.barrier()

    # 2. Everyone syncs, then the last rank skips destroy: the others' destroy barrier must time out.
    buf, device_ids, ipc_handles = _raw_buffer(rank, num_ranks)
    buf.sync(device_ids, ipc_handles, None)
    assert buf.is_available(), f"rank {rank}: not available after a complete sync"
    if rank != missing:
        with pytest.raises(TimeoutError) as info:
            buf.destroy()
        message = str(info.value)
        assert f"rank {missing}" in message, f"rank {rank}: the destroy timeout must name rank {missing}: {message!r}"
        common.log(rank, f"[R={num_ranks}] destroy without rank {missing}: TimeoutError: {message}")
    dist.barrier()
    if rank == missing:
        # Not destroy(): its barrier would touch peer memory that the peers freed when theirs failed.
        # Dropping the Buffer frees it without a barrier (the runtime warns that destroy() was skipped).
        del buf
    dist.barrier()


@pytest.mark.parametrize("num_ranks", common.RANK_COUNTS)
def test_create_destroy_loop(num_ranks):
    launcher.run_ranks(num_ranks, _create_destroy, ROUNDS, timeout_s=240)


@pytest.mark.parametrize("num_ranks", common.RANK_COUNTS)
def test_missing_peer(num_ranks):
    launcher.run_ranks(num_ranks, _missing_peer, timeout_s=120)
