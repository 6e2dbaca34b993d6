"""Runtime v2 behaviour that is not an error path (contract F, G, H, J, K, L).

- co-residency: 8 ranks on one GPU; an explicit Config whose SMs do not fit 8 times is refused
  naming num_sms and the largest value that fits, and the default config adapts and is exact;
- stream-ordered arena reuse: an arena range freed while the caller's stream still reads it is not
  handed to the next dispatch before that read ran;
- destroy() while async outputs are alive, then freeing them, then a new Buffer;
- ~Buffer with explicitly_destroy=False waits for the peers (bounded when one never comes);
- epoch wrap-around: 200 back-to-back rounds across the 64-bit wrap at 2, 4 and 8 ranks;
- the first dispatch with num_worst_tokens > 0 does not stall the host (lazy module loading).
"""

import gc
import os
import re
import sys
import tempfile
import time

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import torch.distributed as dist  # noqa: E402

import moelink  # noqa: E402

import checks  # noqa: E402
import common  # noqa: E402
import faults  # noqa: E402
import launcher  # noqa: E402
from checks import Case, run_case  # noqa: E402
from test_intranode import _back_to_back  # noqa: E402

SMALL = Case("small", 256, 2048, 8, 64)


# ---- F: co-residency of 8 ranks on one GPU ----------------------------------------------------------

def _co_residency(rank, num_ranks, seed):
    device = torch.cuda.current_device()
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    sharing = sum(1 for r in range(num_ranks) if r % torch.cuda.device_count() == rank % torch.cuda.device_count())
    fits = num_sms // sharing // 2 * 2  # the largest even n with sharing * n <= SMs
    moelink.Buffer.set_num_sms(20)  # the class default, which does not fit 8 times on one Hopper GPU
    too_many = moelink.Config(20, 16, 128)
    buf = common.make_buffer(num_ranks, (too_many,), (SMALL.hidden,))
    case = SMALL.resolved(num_ranks)
    what = f"rank {rank}/{num_ranks} ({sharing} ranks on a {num_sms}-SM GPU)"
    if sharing * 20 > num_sms:
        r = faults.routed(case, seed, rank, num_ranks)
        kwargs = r.layout(buf)
        start = time.perf_counter()
        error = faults.expect_raises(ValueError, ["num_sms"], lambda: buf.dispatch(
            r.x, **kwargs, topk_weights=r.topk_weights, config=too_many), f"{what}: dispatch with num_sms=20")
        elapsed = time.perf_counter() - start
        assert re.search(rf"(?<!\d){fits}(?!\d)", str(error)), \
            f"{what}: the error does not name {fits}, the most SMs that fit: {error}"
        assert elapsed < 5.0, f"{what}: refusing the config took {elapsed:.1f} s; it must happen before launching"
        common.log(rank, f"[R={num_ranks}] explicit num_sms=20: ValueError: {error}")
    else:
        common.log(rank, f"[R={num_ranks}] {sharing} ranks x 20 SMs fit on {num_sms} SMs: nothing to refuse")
    # The default config (Buffer.num_sms = 20) adapts to what fits, and a round is exact.
    summary = run_case(buf, rank, num_ranks, case, seed + 1, None, None)
    common.log(rank, f"[R={num_ranks}] default config: {summary}")
    buf.destroy()


def test_co_residency():
    if torch.cuda.device_count() >= 8:
        pytest.skip("8 ranks get a GPU each here; co-residency on one GPU is not exercised")
    launcher.run_ranks(8, _co_residency, 23000, timeout_s=180)


# ---- G: stream-ordered arena reuse ----------------------------------------------------------------------

def _arena_reuse(rank, num_ranks, seed):
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    case = Case("arena-reuse", 512, 4096, 8, 64).resolved(num_ranks)
    buf = common.make_buffer(num_ranks, (config, combine_config), (case.hidden,), num_arena_bytes=256 * common.MIB)
    run_case(buf, rank, num_ranks, case, seed, config, combine_config)
    faults.cycles_per_second()
    what = f"rank {rank}/{num_ranks} arena reuse"
    r = faults.routed(case, seed + 1, rank, num_ranks)
    kwargs = r.layout(buf)
    want_a = r.want()
    fresh = checks.make_inputs_all(case, seed + 1, num_ranks, salt=1)  # same routing, other data
    want_b = r.want(fresh)
    assert want_a.num_recv_tokens > 0
    torch.cuda.synchronize()
    dist.barrier()

    out_a = buf.dispatch(r.x, **kwargs, topk_weights=r.topk_weights, config=config, previous_event=buf.capture(),
                         async_finish=True, allocate_on_comm_stream=True)
    out_a[5].current_stream_wait()
    recv_a = out_a[0]
    assert checks.in_arena(buf, recv_a), f"{what}: recv_x of round A is not in the arena; the test needs it there"
    address_a = recv_a.data_ptr()
    before_sleep = buf.capture()  # round B is ordered after round A, not after the late read below
    faults.gpu_sleep(0.2)
    late_copy = recv_a.clone()  # runs on the current stream once the sleep is over
    del out_a, recv_a  # round A's outputs die on the host while the current stream still has to read them

    out_b = buf.dispatch(fresh[rank].x, **kwargs, topk_weights=fresh[rank].topk_weights, config=config,
                         previous_event=before_sleep, async_finish=True, allocate_on_comm_stream=True)
    out_b[5].current_stream_wait()
    torch.cuda.synchronize()
    common.assert_bits_equal(late_copy[:want_a.num_recv_tokens], want_a.recv_x,
                             f"{what}: round A's recv_x, read after the sleep (round B wrote into its range?)")
    checks.check_dispatch(out_b, want_b, 0, case, f"{what}: round B")
    reused = "the same range" if out_b[0].data_ptr() == address_a else "another range"
    common.log(rank, f"[R={num_ranks}] arena range freed under a pending read: round B got {reused}; A read intact")
    del out_b
    buf.destroy()


def test_arena_reuse_is_stream_ordered():
    launcher.run_ranks(2, _arena_reuse, 29000, timeout_s=120)


# ---- H: destroy() with async outputs alive --------------------------------------------------------------

def _destroy_with_async_outputs(rank, num_ranks, seed):
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    case = SMALL.resolved(num_ranks)
    for i, (arena, on_comm_stream) in enumerate(((0, False), (0, True), (64 * common.MIB, False),
                                                  (64 * common.MIB, True))):
        buf = common.make_buffer(num_ranks, (config, combine_config), (case.hidden,), num_arena_bytes=arena)
        r = faults.routed(case, seed + i, rank, num_ranks)
        out = buf.dispatch(r.x, **r.layout(buf), topk_weights=r.topk_weights, config=config,
                           previous_event=buf.capture(), async_finish=True, allocate_on_comm_stream=on_comm_stream)
        combined = buf.combine(out[0], out[4], topk_weights=out[2], config=combine_config, previous_event=out[5],
                               async_finish=True, allocate_on_comm_stream=on_comm_stream)
        buf.destroy()  # the comm stream may still be running both
        del out, combined, r
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        del buf
        gc.collect()
        common.log(rank, f"[R={num_ranks}] destroy() with async outputs alive (arena={arena > 0}, "
                         f"allocate_on_comm_stream={on_comm_stream}), then freed: ok")
    buf = common.make_buffer(num_ranks, (config, combine_config), (case.hidden,))
    summary = run_case(buf, rank, num_ranks, case, seed + 10, config, combine_config)
    common.log(rank, f"[R={num_ranks}] a new Buffer afterwards: {summary}")
    buf.destroy()


def test_destroy_with_async_outputs():
    launcher.run_ranks(2, _destroy_with_async_outputs, 31000, timeout_s=120)


# ---- J: ~Buffer with explicitly_destroy=False -----------------------------------------------------------

IMPLICIT_TIMEOUT_S = 5.0


def _implicit_buffer(rank, num_ranks, seed):
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    buf = moelink.Buffer(common.world_group(), num_nvl_bytes=common.nvl_bytes_for((config, combine_config),
                                                                                   (SMALL.hidden,), num_ranks),
                         explicitly_destroy=False)
    run_case(buf, rank, num_ranks, SMALL.resolved(num_ranks), seed, config, combine_config)
    torch.cuda.synchronize()
    return buf


def _implicit_destroy_waits(rank, num_ranks, seed):
    buf = _implicit_buffer(rank, num_ranks, seed)
    dist.barrier()
    if rank == 1:
        time.sleep(2.0)
    start = time.perf_counter()
    del buf
    gc.collect()
    elapsed = time.perf_counter() - start
    if rank == 0:
        assert elapsed >= 1.5, (f"rank 0: dropping the Buffer took {elapsed:.2f} s; it must wait at the closing "
                                f"barrier for rank 1, which dropped its Buffer 2 s later")
    assert elapsed < 2.0 + IMPLICIT_TIMEOUT_S, f"rank {rank}: dropping the Buffer took {elapsed:.1f} s"
    common.log(rank, f"[R={num_ranks}] ~Buffer waited {elapsed:.2f} s for the peer's: ok")
    dist.barrier()


def _implicit_destroy_bounded(rank, num_ranks, seed):
    buf = _implicit_buffer(rank, num_ranks, seed)
    dist.barrier()
    if rank == 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # never drops its Buffer
    start = time.perf_counter()
    del buf
    gc.collect()
    elapsed = time.perf_counter() - start
    limit = min(IMPLICIT_TIMEOUT_S, 10.0) + 5.0
    assert elapsed <= limit, f"rank 0: dropping the Buffer without its peer took {elapsed:.1f} s, limit {limit:.0f} s"
    common.log(rank, f"[R={num_ranks}] ~Buffer without the peer returned after {elapsed:.1f} s: ok")


def test_implicit_destroy_waits_for_peers():
    launcher.run_ranks(2, _implicit_destroy_waits, 37000, timeout_s=120,
                       env={"MOELINK_TIMEOUT_S": f"{IMPLICIT_TIMEOUT_S:g}"})


def test_implicit_destroy_is_bounded():
    launcher.run_ranks(2, _implicit_destroy_bounded, 37500, timeout_s=120,
                       env={"MOELINK_TIMEOUT_S": f"{IMPLICIT_TIMEOUT_S:g}"}, expect_exit={1: 0})


# ---- K: epoch wrap-around ------------------------------------------------------------------------------

EPOCH_START = 2**64 - 100


def _first_buffer_log(num_ranks) -> str:
    """stderr of building (and destroying) this process's first Buffer, where MOELINK_DEBUG=1 prints
    the knobs in use."""
    configs = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    with tempfile.TemporaryFile() as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            common.make_buffer(num_ranks, configs, (2048,)).destroy()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read().decode(errors="replace")
    sys.stderr.write(text)
    return text


def _wrap_around(rank, num_ranks, seed, rounds):
    log = _first_buffer_log(num_ranks)
    match = re.search(r"MOELINK_DEBUG_EPOCH_START=(\d+)", log)
    if match:
        assert int(match.group(1)) == EPOCH_START, f"rank {rank}: the runtime starts epochs at {match.group(1)}"
    else:
        common.log(rank, f"[R={num_ranks}] note: the knob log does not show MOELINK_DEBUG_EPOCH_START; the rounds "
                         f"below cannot tell whether the epochs wrapped")
    _back_to_back(rank, num_ranks, seed, rounds)


@pytest.mark.parametrize("num_ranks", common.RANK_COUNTS)
def test_epoch_wrap_around(num_ranks):
    launcher.run_ranks(num_ranks, _wrap_around, 41000 * num_ranks, 200, timeout_s=240,
                       env={"MOELINK_DEBUG_EPOCH_START": str(EPOCH_START), "MOELINK_DEBUG": "1"})


# ---- L: no host stall on the first dispatch -------------------------------------------------------------

FIRST_CALL_S = 0.2


def _first_dispatch_latency(rank, num_ranks, seed):
    assert os.environ.get("CUDA_MODULE_LOADING") == "LAZY", "the launcher must set CUDA_MODULE_LOADING=LAZY"
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    case = Case("first-call", 256, 2048, 8, 64, worst=True).resolved(num_ranks)
    buf = common.make_buffer(num_ranks, (config, combine_config), (case.hidden,))
    r = faults.routed(case, seed, rank, num_ranks)
    kwargs = r.layout(buf)  # not timed
    num_worst = num_ranks * case.num_tokens
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    out = buf.dispatch(r.x, **kwargs, topk_weights=r.topk_weights, num_worst_tokens=num_worst, config=config)
    elapsed = time.perf_counter() - start
    assert elapsed < FIRST_CALL_S, (f"rank {rank}: the first dispatch with num_worst_tokens took {elapsed:.3f} s to "
                                    f"return to the host, limit {FIRST_CALL_S} s")
    want = r.want()
    checks.check_dispatch(out, want, num_worst, case, f"rank {rank} first dispatch")
    faults.checked_combine(buf, r, out, want, combine_config, num_worst, what=f"rank {rank} first combine")
    common.log(rank, f"[R={num_ranks}] first dispatch returned after {1e3 * elapsed:.1f} ms and is exact: ok")
    buf.destroy()


def test_first_dispatch_does_not_stall():
    launcher.run_ranks(2, _first_dispatch_latency, 43000, timeout_s=120, env={"CUDA_MODULE_LOADING": "LAZY"})
