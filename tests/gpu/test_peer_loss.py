"""Lost peers and host-side timeouts (Runtime v2 contract I and N).

Peer loss: the last rank SIGKILLs itself at one of the points of a round, with MOELINK_TIMEOUT_S=5:
before its dispatch; after its dispatch's notify (every count exchanged) and before its dispatch
kernel ("notified"); between a finished dispatch and its combine; and in the middle of its dispatch
or its combine kernel. For those two its kernel dies as its peers see a death: the senders stop
after their first batch of rows (`buf.runtime.debug_halt_next_sends()`), which lands in the peers'
rings with no counter telling them, and the process is killed once that kernel is over. A kill
right after the launch would land while the victim still waits for its peers in the notify or the
opening, not mid-kernel; and on one GPU shared under MPS a process killed while its kernel writes a
peer's memory faults every client's context (seen with a two-process probe: the exporter then
fails even on its own buffers), which no runtime can survive. Every survivor must raise
TimeoutError naming the lost rank and the step within timeout + 5 s: at the call, or (for an operation that does not wait on the host)
through all-poisoned outputs and the next call. After that the Buffer is broken: every call raises
the same TimeoutError at once. destroy() comes back within timeout + 5 s and the survivors exit 0.

The same losses on an internode Buffer's lane (test_lane_peer_loss): a Buffer made one as
_internode makes its lane (serve_as_internode_lane: ring-only), with MOELINK_DEBUG_LANE_FORCE_PUT=
fake, so that its notify, openings, barriers and ring senders (the halting ones too) run the put
path's protocol over IPC (docs/internal/INTERNODE_LANE.md, step 2). A lane's rank n is node n: the
survivors' TimeoutError names the lost rank and its node. Not run on a GPU yet.

Host-side timeout: a notify that cannot start (its previous_event waits for a 15 s GPU sleep) makes
dispatch raise TimeoutError after MOELINK_TIMEOUT_S=2 and breaks the Buffer. A value error left
pending (num_worst_tokens too small) does not hide a peer lost meanwhile: the next dispatch opens
its collective as every call does (a pending data error is raised at a call's end, not its entry)
and raises TimeoutError naming the lost rank.
"""

import time

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import torch.distributed as dist  # noqa: E402

import moelink  # noqa: E402

import common  # noqa: E402
import faults  # noqa: E402
import launcher  # noqa: E402
from checks import Case, run_case  # noqa: E402
from faults import combine_outputs, dispatch_outputs  # noqa: E402

PEER_TIMEOUT_S = 5.0      # MOELINK_TIMEOUT_S of the peer-loss runs
STALL_TIMEOUT_S = 2.0     # MOELINK_TIMEOUT_S of the notify-stall run
SLACK_S = 5.0             # the contract's allowance on top of the timeout
STALL_S = 15.0            # how long the notify-stall run keeps its notify from starting
LATER_CALL_S = 2.0        # a broken Buffer refuses at once
VICTIM_HEAD_START_S = 0.5  # survivors' kernels of a "during" phase start this much after the victim's
CASE = Case("peer-loss", 256, 2048, 8, 64)
PHASES = ("before-dispatch", "notified", "during-dispatch", "after-dispatch", "during-combine")
MID_KERNEL = ("during-dispatch", "during-combine")  # the victim's senders halt, then it is killed
LANE_ENV = {"MOELINK_DEBUG_LANE_FORCE_PUT": "fake"}  # test_lane_peer_loss: the lane on the put path


class _DiesBeforeDispatchKernel:
    """The victim's runtime: every call goes through, but launching a dispatch's data kernel ends
    the process, after its notify has exchanged the counts with every peer."""

    def __init__(self, runtime):
        self._runtime = runtime

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def intranode_dispatch(self, *args, **kwargs):
        faults.die()

    def intranode_dispatch_uncached(self, x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_rank,
                                    num_tokens_per_expert, num_experts, expert_alignment, num_worst_tokens, config,
                                    order):
        # The default path's one call: its notify and host wait run, then the process ends where
        # the data kernel would be launched.
        self._runtime.intranode_notify_launch(x, x_scales, topk_idx, topk_weights, is_token_in_rank,
                                              num_tokens_per_rank, num_tokens_per_expert, num_experts,
                                              expert_alignment, num_worst_tokens, config, order)
        self._runtime.intranode_notify_wait()
        faults.die()


def _setup(rank, num_ranks, seed, lane=False):
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    if lane:
        # As _internode.build_stages makes its lane, before any operation; with the knob its rings
        # take a put-path mirror each, which the NVLink hint does not count.
        nvl = 2 * common.nvl_bytes_for((config, combine_config), (CASE.hidden,), num_ranks)
        buf = moelink.Buffer(common.world_group(), num_nvl_bytes=nvl, explicitly_destroy=True)
        buf.runtime.serve_as_internode_lane()
        assert buf.runtime.lane_window == "fake", buf.runtime.lane_window
    else:
        buf = common.make_buffer(num_ranks, (config, combine_config), (CASE.hidden,))
    case = CASE.resolved(num_ranks)
    run_case(buf, rank, num_ranks, case, seed, config, combine_config)  # every kernel has run once
    faults.cycles_per_second()
    return buf, case, config, combine_config


def _assert_broken(message, calls, what):
    """Every call raises the first TimeoutError again, at once."""
    for name, call in calls.items():
        start = time.perf_counter()
        error = faults.expect_raises(TimeoutError, [], call, f"{what}: {name} after the timeout")
        elapsed = time.perf_counter() - start
        assert str(error) == message, f"{what}: {name} raised another message: {str(error)!r} != {message!r}"
        assert elapsed < LATER_CALL_S, f"{what}: {name} on the broken Buffer took {elapsed:.1f} s"


def _peer_loss(rank, num_ranks, seed, phase, lane=False):
    victim = num_ranks - 1
    what = f"rank {rank}/{num_ranks} {phase}{' (lane, fake puts)' if lane else ''}"
    buf, case, config, combine_config = _setup(rank, num_ranks, seed, lane)
    # On a lane, rank n is node n, and the error says so.
    named = [f"rank {victim}"] + ([f"node {victim}"] if lane else [])
    r = faults.routed(case, seed + 1, rank, num_ranks)
    kwargs = r.layout(buf)
    num_worst = num_ranks * case.num_tokens
    out = y = None
    if phase in ("after-dispatch", "during-combine"):
        out, want = faults.checked_dispatch(buf, r, config, what=f"{what}: the dispatch before the loss")
        y = r.combine_input(want, want.num_recv_tokens)

    def dispatch(worst=0):
        return buf.dispatch(r.x, **kwargs, topk_weights=r.topk_weights, num_worst_tokens=worst, config=config)

    def combine():
        return buf.combine(y, out[4], topk_weights=out[2], config=combine_config)

    torch.cuda.synchronize()
    dist.barrier()  # the last collective: after it the victim may be gone
    start = time.perf_counter()
    if rank == victim:
        if phase in MID_KERNEL:
            buf.runtime.debug_halt_next_sends()
        if phase == "during-dispatch":
            dispatch(num_worst)  # returns without waiting on the host
        elif phase == "during-combine":
            combine()
        elif phase == "notified":
            buf.runtime = _DiesBeforeDispatchKernel(buf.runtime)
            buf._express = False  # the full path's extension calls, which the wrapper intercepts
            dispatch()  # its notify completes with the peers; it dies where the data kernel would launch
        if phase in MID_KERNEL:
            # Its receivers take the survivors' rows, so the kernel ends; its first batch went out
            # and nothing more will (the survivors' receivers time out on it).
            torch.cuda.synchronize()
        faults.die()

    if phase.startswith("during"):
        # The survivors' kernels start behind this sleep, so the victim's halted kernel is running
        # (its senders done with their first batch) when theirs start.
        faults.gpu_sleep(VICTIM_HEAD_START_S)
    if phase == "before-dispatch":
        call, host_wait, outputs = dispatch, True, None
    elif phase == "notified":
        call, host_wait, outputs = dispatch, False, dispatch_outputs
    elif phase == "during-dispatch":
        call, host_wait, outputs = (lambda: dispatch(num_worst)), False, dispatch_outputs
    else:
        call, host_wait, outputs = combine, False, combine_outputs
    next_call = lambda: buf.get_dispatch_layout(r.topk_idx, case.num_experts)  # noqa: E731
    raised = faults.expect_error(TimeoutError, named, call, host_wait=host_wait, in_call_ok=True,
                                 next_call=next_call, outputs=outputs, what=what)
    elapsed = time.perf_counter() - start
    assert elapsed <= PEER_TIMEOUT_S + SLACK_S, \
        f"{what}: the TimeoutError came {elapsed:.1f} s after the phase started, limit {PEER_TIMEOUT_S + SLACK_S:.0f} s"
    message = str(raised.error)
    assert any(word in message.lower() for word in faults.STEP_WORDS), \
        f"{what}: the TimeoutError names no step ({'/'.join(faults.STEP_WORDS)}): {message!r}"
    del raised

    later = {"get_dispatch_layout": next_call, "dispatch": dispatch,
             "dispatch(num_worst_tokens)": lambda: dispatch(num_worst)}
    if out is not None:
        later.update({"cached dispatch": lambda: buf.dispatch(r.x, handle=out[4], config=config), "combine": combine})
    _assert_broken(message, later, what)
    destroyed = faults.bounded_destroy(buf, PEER_TIMEOUT_S + SLACK_S, what)
    common.log(rank, f"[R={num_ranks}]{' lane' if lane else ''} {phase}: TimeoutError after {elapsed:.1f} s: "
                     f"{message}; {destroyed}")


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("num_ranks", (2, 4))
def test_peer_loss(num_ranks, phase):
    launcher.run_ranks(num_ranks, _peer_loss, 17000 * num_ranks + PHASES.index(phase), phase, timeout_s=120,
                       env={"MOELINK_TIMEOUT_S": f"{PEER_TIMEOUT_S:g}"}, expect_killed={num_ranks - 1})


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("num_ranks", (2, 4))
def test_lane_peer_loss(num_ranks, phase):
    launcher.run_ranks(num_ranks, _peer_loss, 17000 * num_ranks + 50 + PHASES.index(phase), phase, True,
                       timeout_s=120, env={"MOELINK_TIMEOUT_S": f"{PEER_TIMEOUT_S:g}", **LANE_ENV},
                       expect_killed={num_ranks - 1})


def _notify_stall(rank, num_ranks, seed):
    what = f"rank {rank}/{num_ranks} notify stall"
    buf, case, config, combine_config = _setup(rank, num_ranks, seed)
    out, _ = faults.checked_dispatch(buf, faults.routed(case, seed + 1, rank, num_ranks), config, what=what)
    r = faults.routed(case, seed + 2, rank, num_ranks)
    kwargs = r.layout(buf)
    torch.cuda.synchronize()  # the layout is done: nothing below is ordered after the current stream
    dist.barrier()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        faults.gpu_sleep(STALL_S)
        stalled = buf.capture()  # recorded on `side`, after the sleep

    def dispatch(previous_event=None):
        return buf.dispatch(r.x, **kwargs, topk_weights=r.topk_weights, config=config, previous_event=previous_event)

    start = time.perf_counter()
    error = faults.expect_raises(TimeoutError, [], lambda: dispatch(stalled), f"{what}: dispatch")
    elapsed = time.perf_counter() - start
    assert elapsed <= STALL_TIMEOUT_S + SLACK_S, \
        f"{what}: dispatch raised after {elapsed:.1f} s, limit {STALL_TIMEOUT_S + SLACK_S:.0f} s"
    message = str(error)
    assert any(word in message.lower() for word in faults.STEP_WORDS), f"{what}: names no step: {message!r}"
    _assert_broken(message, {
        "get_dispatch_layout": lambda: buf.get_dispatch_layout(r.topk_idx, case.num_experts),
        "dispatch": dispatch,
        "cached dispatch": lambda: buf.dispatch(r.x, handle=out[4], config=config),
        "combine": lambda: buf.combine(out[0], out[4], config=combine_config),
    }, what)
    torch.cuda.synchronize()  # the sleep ends and whatever was queued behind it finishes
    destroyed = faults.bounded_destroy(buf, STALL_TIMEOUT_S + SLACK_S, what)
    common.log(rank, f"[R={num_ranks}] notify stalled: TimeoutError after {elapsed:.1f} s: {message}; {destroyed}")


def test_notify_stall():
    launcher.run_ranks(2, _notify_stall, 19000, timeout_s=120, env={"MOELINK_TIMEOUT_S": f"{STALL_TIMEOUT_S:g}"})


def _pending_error_then_loss(rank, num_ranks, seed):
    victim = num_ranks - 1
    what = f"rank {rank}/{num_ranks} pending error, then loss"
    buf, case, config, _ = _setup(rank, num_ranks, seed)
    r = faults.routed(case, seed + 1, rank, num_ranks)
    num_worst = min(r.recv_counts()) - 1
    assert num_worst >= 1
    kwargs = r.layout(buf)

    def dispatch(worst=0):
        return buf.dispatch(r.x, **kwargs, topk_weights=r.topk_weights, num_worst_tokens=worst, config=config)

    # Every rank overflows. The GPU sleep holds the dispatch back until the call has returned, so
    # its error is still pending (unraised) when the peer dies.
    faults.gpu_sleep(0.5)
    pending = True
    try:
        dispatch(num_worst)
    except ValueError:  # its end saw the record after all; the loss must still be raised
        pending = False
    torch.cuda.synchronize()
    dist.barrier()  # every rank's overflowing dispatch is over
    if rank == victim:
        faults.die()
    start = time.perf_counter()
    error = faults.expect_raises(TimeoutError, [f"rank {victim}"], dispatch, f"{what}: the call after the overflow")
    elapsed = time.perf_counter() - start
    assert elapsed <= PEER_TIMEOUT_S + SLACK_S, f"{what}: the TimeoutError took {elapsed:.1f} s"
    # Broken now: every call raises the loss, the layout (which raised pending data errors) too.
    faults.expect_raises(TimeoutError, [f"rank {victim}"],
                         lambda: buf.get_dispatch_layout(r.topk_idx, case.num_experts),
                         f"{what}: a call on the broken Buffer")
    destroyed = faults.bounded_destroy(buf, PEER_TIMEOUT_S + SLACK_S, what)
    common.log(rank, f"[R={num_ranks}] ValueError {'pending' if pending else 'raised at the call'}, TimeoutError "
                     f"after {elapsed:.1f} s: {error}; {destroyed}")


def test_pending_error_then_loss():
    launcher.run_ranks(2, _pending_error_then_loss, 19500, timeout_s=120,
                       env={"MOELINK_TIMEOUT_S": f"{PEER_TIMEOUT_S:g}"}, expect_killed={1})
