"""Value errors across ranks (Runtime v2 contract A-D), on 2 and 4 ranks, one launch each.

Every step provokes one error on one shared Buffer and checks, on every rank, that it surfaces where
the contract says: at the call when the operation waits on the host (uncached dispatch without
num_worst_tokens), else as poisoned outputs (every byte 0xFF) and a ValueError from the next call,
or from the end of the call itself where its host sees the record by then (a collective raises a
data error after its launches, so the call ran on every rank and only its outputs are lost; a rank
that raised there has no outputs, so the poison is checked only on the ranks whose call returned).
The message names what differed ("operation", "config", "hidden", "dtype", "top-k", "num_experts",
"handle") or the rank whose data or arguments were wrong. No step may wait for MOELINK_TIMEOUT_S
(20 s): each must be over within LIMIT_S. After every step a full checked round (layout, dispatch,
cached dispatch, combine) on the same Buffer must pass bit-exact: value errors leave it usable.
"""

import time
from dataclasses import dataclass, replace

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

import torch.distributed as dist  # noqa: E402

import moelink  # noqa: E402

import common  # noqa: E402
import faults  # noqa: E402
import launcher  # noqa: E402
from checks import Case, run_case  # noqa: E402
from faults import cached_outputs, combine_outputs, dispatch_outputs, expect_error  # noqa: E402

HIDDEN, OTHER_HIDDEN = 2048, 2176
BASE = Case("base", 128, HIDDEN, 8, 64)
ODD_RANK = 0        # B: the rank that disagrees with the others or whose arguments are rejected
BAD_RANK = 1        # C: the rank whose topk_idx or num_worst_tokens is wrong
TIMEOUT_S = 20      # MOELINK_TIMEOUT_S of the run
LIMIT_S = 10.0      # "within a few seconds": well before a timeout could be what ended the wait
IMMEDIATE_S = 2.0   # a rank rejecting its own arguments raises at once
HOLD_S = 0.5        # a GPU sleep that keeps a dispatch's record from the host until the call's end


@dataclass
class Ctx:
    buf: "moelink.Buffer"
    rank: int
    num_ranks: int
    seed: int
    config: "moelink.Config"
    combine_config: "moelink.Config"

    @property
    def odd(self) -> bool:
        return self.rank == ODD_RANK

    def routed(self, case: Case = BASE, salt: int = 0) -> faults.Routed:
        return faults.routed(case.resolved(self.num_ranks), self.seed + salt, self.rank, self.num_ranks)

    def layout_call(self, r: faults.Routed):
        """The "next call" of the steps: local, cheap, and a moelink call on the same Buffer."""
        return lambda: self.buf.get_dispatch_layout(r.topk_idx, r.case.num_experts)

    def what(self, step: str) -> str:
        return f"rank {self.rank}/{self.num_ranks} {step}"


def variant_configs(config, combine_config):
    """(other num_sms, other dispatch chunk, other combine ring slots) of the presets."""
    chunk, slots = config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens
    combine_chunk, combine_slots = (combine_config.num_max_nvl_chunked_send_tokens,
                                    combine_config.num_max_nvl_chunked_recv_tokens)
    return (moelink.Config(config.num_sms - 2, chunk, slots), moelink.Config(config.num_sms, max(1, chunk // 2), slots),
            moelink.Config(combine_config.num_sms, combine_chunk, combine_slots // 2))


# ---- B: ranks disagree -----------------------------------------------------------------------------

def _uncached_disagreement(ctx: Ctx, word: str, case: Case = BASE, config=None) -> faults.Raised:
    """The odd rank dispatches `case` with `config`, the others BASE with the preset; the dispatch
    waits on the host for the counts, so every rank raises at the call."""
    r = ctx.routed(case if ctx.odd else BASE)
    kwargs = r.layout(ctx.buf)
    config = config if ctx.odd and config is not None else ctx.config
    return expect_error(ValueError, [word],
                        lambda: ctx.buf.dispatch(r.x, **kwargs, topk_weights=r.topk_weights, config=config),
                        host_wait=True, what=ctx.what(f"dispatch disagreeing on {word}"))


def step_operation(ctx: Ctx) -> faults.Raised:
    """The odd rank combines while the others run a cached dispatch of the same handle."""
    r = ctx.routed()
    out, _ = faults.checked_dispatch(ctx.buf, r, ctx.config, what=ctx.what("dispatch before the mix-up"))
    if ctx.odd:
        call, outputs = (lambda: ctx.buf.combine(out[0], out[4], config=ctx.combine_config)), combine_outputs
    else:
        call, outputs = (lambda: ctx.buf.dispatch(r.x, handle=out[4], config=ctx.config)), cached_outputs
    return expect_error(ValueError, ["operation"], call, host_wait=False, next_call=ctx.layout_call(r),
                        outputs=outputs, in_call_ok=True, what=ctx.what("combine vs cached dispatch"))


def step_config_num_sms(ctx: Ctx) -> faults.Raised:
    return _uncached_disagreement(ctx, "config", config=variant_configs(ctx.config, ctx.combine_config)[0])


def step_config_chunk(ctx: Ctx) -> faults.Raised:
    return _uncached_disagreement(ctx, "config", config=variant_configs(ctx.config, ctx.combine_config)[1])


def step_combine_config(ctx: Ctx) -> faults.Raised:
    """Combine, which does not wait on the host, with other ring slots on the odd rank."""
    r = ctx.routed()
    out, want = faults.checked_dispatch(ctx.buf, r, ctx.config, what=ctx.what("dispatch"))
    y = r.combine_input(want, want.num_recv_tokens)
    config = variant_configs(ctx.config, ctx.combine_config)[2] if ctx.odd else ctx.combine_config
    return expect_error(ValueError, ["config"],
                        lambda: ctx.buf.combine(y, out[4], topk_weights=out[2], config=config),
                        host_wait=False, next_call=ctx.layout_call(r), outputs=combine_outputs, in_call_ok=True,
                        what=ctx.what("combine disagreeing on config"))


def step_hidden(ctx: Ctx) -> faults.Raised:
    return _uncached_disagreement(ctx, "hidden", case=replace(BASE, hidden=OTHER_HIDDEN))


def step_dtype(ctx: Ctx) -> faults.Raised:
    return _uncached_disagreement(ctx, "dtype", case=replace(BASE, fp8=True))


def step_topk(ctx: Ctx) -> faults.Raised:
    return _uncached_disagreement(ctx, "top-k", case=replace(BASE, num_topk=4))


def step_num_experts(ctx: Ctx) -> faults.Raised:
    return _uncached_disagreement(ctx, "num_experts", case=replace(BASE, num_experts=128))


def _two_dispatches(ctx: Ctx):
    """Two checked dispatches of different routing; the odd rank gets the first, the others the second."""
    rounds = []
    for salt in (0, 1):
        r = ctx.routed(salt=salt)
        out, want = faults.checked_dispatch(ctx.buf, r, ctx.config, what=ctx.what(f"dispatch {salt}"))
        rounds.append((r, out, want))
    return rounds[0] if ctx.odd else rounds[1]


def step_handle_cached(ctx: Ctx) -> faults.Raised:
    r, out, _ = _two_dispatches(ctx)
    return expect_error(ValueError, ["handle"], lambda: ctx.buf.dispatch(r.x, handle=out[4], config=ctx.config),
                        host_wait=False, next_call=ctx.layout_call(r), outputs=cached_outputs, in_call_ok=True,
                        what=ctx.what("cached dispatch with handles of different dispatches"))


def step_handle_combine(ctx: Ctx) -> faults.Raised:
    r, out, want = _two_dispatches(ctx)
    y = r.combine_input(want, want.num_recv_tokens)
    return expect_error(ValueError, ["handle"],
                        lambda: ctx.buf.combine(y, out[4], topk_weights=out[2], config=ctx.combine_config),
                        host_wait=False, next_call=ctx.layout_call(r), outputs=combine_outputs, in_call_ok=True,
                        what=ctx.what("combine with handles of different dispatches"))


def step_seen_at_different_calls(ctx: Ctx) -> faults.Raised:
    """The gap raising at a call's end closes: ranks' hosts see one data error at different calls.
    BAD_RANK's combine disagrees on config and waits behind a GPU sleep, so the record lands on every
    rank only HOLD_S later; the others wait for their device, so they see it at the next call, while
    BAD_RANK's host is still ahead of its GPU and sees it a call or more later. Every rank then makes
    the same two collectives (cached dispatch, combine) and, after its device is idle, a layout call.
    Each rank must raise the ValueError exactly once and nobody a TimeoutError: a rank that raised on
    entry would open nothing while BAD_RANK, which had not seen the record, waited in the cached
    dispatch for it."""
    r = ctx.routed()
    out, want = faults.checked_dispatch(ctx.buf, r, ctx.config, what=ctx.what("dispatch"))
    y = r.combine_input(want, want.num_recv_tokens)
    bad = ctx.rank == BAD_RANK
    first_config = variant_configs(ctx.config, ctx.combine_config)[2] if bad else ctx.combine_config
    calls = (
        ("combine disagreeing on config",
         lambda: ctx.buf.combine(y, out[4], topk_weights=out[2], config=first_config)),
        ("cached dispatch", lambda: ctx.buf.dispatch(r.x, handle=out[4], config=ctx.config)),
        ("combine", lambda: ctx.buf.combine(y, out[4], topk_weights=out[2], config=ctx.combine_config)),
        ("layout after the device is idle", ctx.layout_call(r)),
    )
    if bad:
        faults.cycles_per_second()  # measured once, before the sleep (it synchronizes)
    # The hosts start the calls together, so that the sleep, not a peer's late host, holds the record.
    dist.barrier()
    if bad:
        faults.gpu_sleep(HOLD_S)
    raised = []
    for i, (name, call) in enumerate(calls):
        if i == len(calls) - 1:
            torch.cuda.synchronize()  # any record still pending is visible to the host now
        what = ctx.what(f"{name} (call {i + 1} of {len(calls)})")
        start = time.perf_counter()
        try:
            call()
        except TimeoutError as error:
            raise AssertionError(f"{what}: a rank waited for a peer that did not open the operation: "
                                 f"{error}") from error
        except ValueError as error:
            faults.check_message(error, ["config"], what)
            raised.append((i, name, error))
        elapsed = time.perf_counter() - start
        assert elapsed < LIMIT_S, f"{what} took {elapsed:.1f} s (MOELINK_TIMEOUT_S={TIMEOUT_S})"
        if i == 0 and not bad:
            torch.cuda.synchronize()  # the record lands here, once BAD_RANK's combine has opened
    assert len(raised) == 1, (f"{ctx.what('config disagreement seen at different calls')}: the ValueError must "
                              f"be raised exactly once; raised at {[(i + 1, n) for i, n, _ in raised]}")
    where = [None] * ctx.num_ranks
    dist.all_gather_object(where, raised[0][0])
    peers = {w for rank, w in enumerate(where) if rank != BAD_RANK}
    assert where[BAD_RANK] not in peers, (
        f"{ctx.what('config disagreement seen at different calls')}: every rank raised at the same call "
        f"({where}): the {HOLD_S} s GPU sleep before rank {BAD_RANK}'s combine did not keep the record from "
        f"its host, so the step did not reproduce the gap")
    i, name, error = raised[0]
    return faults.Raised(error, name)


def step_second_error_while_pending(ctx: Ctx) -> faults.Raised:
    """A rank's record holds one data error until its host raises it; a second one found meanwhile
    is not recorded but counted, and the first error says so when it is raised. A GPU sleep on
    every rank keeps both records from the hosts until both operations are made: a combine that
    disagrees on config (the odd rank's ring slots), then one that disagrees on the operation (the
    odd rank combines while the others make a cached dispatch). Both return poisoned outputs; once
    the device is idle the next call raises the config error, once, with "and 1 later operation"
    (or the second call raises it at its end, which drains first); the call after that returns."""
    r = ctx.routed()
    out, want = faults.checked_dispatch(ctx.buf, r, ctx.config, what=ctx.what("dispatch"))
    y = r.combine_input(want, want.num_recv_tokens)
    first_config = variant_configs(ctx.config, ctx.combine_config)[2] if ctx.odd else ctx.combine_config
    calls = [("combine disagreeing on config",
              lambda: ctx.buf.combine(y, out[4], topk_weights=out[2], config=first_config), combine_outputs)]
    if ctx.odd:
        calls.append(("combine while the others make a cached dispatch",
                      lambda: ctx.buf.combine(y, out[4], topk_weights=out[2], config=ctx.combine_config),
                      combine_outputs))
    else:
        calls.append(("cached dispatch while the odd rank combines",
                      lambda: ctx.buf.dispatch(r.x, handle=out[4], config=ctx.config), cached_outputs))
    faults.cycles_per_second()  # measured once, before the sleep (it synchronizes)
    dist.barrier()
    faults.gpu_sleep(HOLD_S)
    start = time.perf_counter()
    returned, raised = [], None
    for i, (name, call, outputs) in enumerate(calls):
        what = ctx.what(f"{name} (call {i + 1} of 2, behind a {HOLD_S} s GPU sleep)")
        try:
            returned.append((what, call(), outputs))
        except ValueError as error:
            if i == 0:
                # Not a library fault: the hold failed, and the second error was then recorded.
                elapsed = time.perf_counter() - start
                raise AssertionError(f"{what}: raised at its own end after {elapsed:.2f} s ({error}): the {HOLD_S} "
                                     f"s GPU sleep did not keep the record from the host until the second operation "
                                     f"was made") from error
            raised = faults.Raised(error, "call")
    torch.cuda.synchronize()
    for what, result, outputs in returned:
        faults.assert_poisoned(outputs(result), f"{what}: the outputs")
    if raised is None:
        raised = faults.Raised(faults.expect_raises(ValueError, [], ctx.layout_call(r),
                                                    ctx.what("the call after both failed operations")), "next call")
    what = ctx.what(f"the error raised at the {raised.where} after two failed operations")
    faults.check_message(raised.error, ["disagree on the config", "and 1 later operation on this rank failed too"],
                         what)
    assert "disagree on the operation" not in str(raised.error), f"{what}: names the second error: {raised.error}"
    try:
        ctx.layout_call(r)()
    except Exception as error:  # noqa: BLE001 - reported as raised twice
        raise AssertionError(f"{ctx.what('the call after the raise')}: raised {type(error).__name__} ({error}); the "
                             f"count was raised with the first error and the second was never recorded") from error
    return raised


# ---- B: one rank's arguments fail moelink's own checks ------------------------------------------------

def _rejected(ctx: Ctx, call, kind, words, host_wait, next_call, outputs, step,
              next_is_collective=False) -> faults.Raised:
    """The odd rank raises kind naming `words` at once; the others learn it is out and raise
    ValueError naming it (at the call when they wait on the host, else at the call's end or the
    next call). The odd rank records nothing (Buffer::abstain), so where the others may raise at
    the next call, its own next call returns: it raised its error once, at the call.
    next_is_collective: every rank makes the next call, which raises at its end where the error is
    still pending."""
    if ctx.odd:
        start = time.perf_counter()
        raised = expect_error(kind, words, call, host_wait=True, what=ctx.what(f"{step}, own arguments"))
        elapsed = time.perf_counter() - start
        assert elapsed < IMMEDIATE_S, f"{ctx.what(step)}: rejecting its own arguments took {elapsed:.1f} s"
        if not host_wait:
            # The peers' record lands when the last of them has opened: with the device idle, a
            # record of this rank's own would be visible here too, and the next call would raise it.
            torch.cuda.synchronize()
            what = ctx.what(f"{step}, own arguments: the next call")
            try:
                next_call()
            except Exception as error:  # noqa: BLE001 - reported as raised twice
                raise AssertionError(f"{what} raised {type(error).__name__} ({error}) after the rank had raised "
                                     f"its own error at the call: a rank that rejected its own arguments must "
                                     f"record nothing") from error
        return raised
    return expect_error(ValueError, [f"rank {ODD_RANK}"], call, host_wait=host_wait, in_call_ok=True,
                        next_call=next_call, outputs=outputs, next_is_collective=next_is_collective,
                        what=ctx.what(f"{step}, rank {ODD_RANK} rejected"))


def step_rejected_dispatch(ctx: Ctx) -> faults.Raised:
    r = ctx.routed()
    kwargs = r.layout(ctx.buf)
    weights = r.topk_weights[:, :-1].contiguous() if ctx.odd else r.topk_weights
    return _rejected(ctx, lambda: ctx.buf.dispatch(r.x, **kwargs, topk_weights=weights, config=ctx.config),
                     ValueError, ["topk_weights"], True, None, None, "dispatch with a wrong-shaped topk_weights")


def step_rejected_combine(ctx: Ctx) -> faults.Raised:
    r = ctx.routed()
    out, want = faults.checked_dispatch(ctx.buf, r, ctx.config, what=ctx.what("dispatch"))
    y = r.combine_input(want, want.num_recv_tokens)
    if ctx.odd:
        y = y[1:]  # one row fewer than the handle's recv_src_idx
    return _rejected(ctx, lambda: ctx.buf.combine(y, out[4], topk_weights=out[2], config=ctx.combine_config),
                     ValueError, ["x"], False, ctx.layout_call(r), combine_outputs, "combine with a wrong-shaped x")


def step_rejected_type(ctx: Ctx) -> faults.Raised:
    r = ctx.routed()
    out, _ = faults.checked_dispatch(ctx.buf, r, ctx.config, what=ctx.what("dispatch"))
    x = r.x.float() if ctx.odd else r.x
    return _rejected(ctx, lambda: ctx.buf.dispatch(x, handle=out[4], config=ctx.config), TypeError, ["x"], False,
                     ctx.layout_call(r), cached_outputs, "cached dispatch with a float32 x")


def step_rejected_then_collective(ctx: Ctx) -> faults.Raised:
    """As step_rejected_type, but the next call is the combine, a collective, which every rank makes:
    it runs on every rank and raises at its end where the error is still pending (the odd rank's
    record, and a peer's whose host had not seen it at the cached dispatch's end); a peer that raised
    it there gets the combine's outputs. Raised on entry instead, a rank would open nothing while its
    peers wait in the combine for it."""
    r = ctx.routed()
    out, want = faults.checked_dispatch(ctx.buf, r, ctx.config, what=ctx.what("dispatch"))
    x = r.x.float() if ctx.odd else r.x
    y = r.combine_input(want, want.num_recv_tokens)
    return _rejected(ctx, lambda: ctx.buf.dispatch(x, handle=out[4], config=ctx.config), TypeError, ["x"], False,
                     lambda: ctx.buf.combine(y, out[4], topk_weights=out[2], config=ctx.combine_config),
                     cached_outputs, "cached dispatch with a float32 x, then combine", next_is_collective=True)


def step_unreadable_dispatch(ctx: Ctx) -> faults.Raised:
    """A dtype the extension cannot read at all (float64; a float32 x is read, then refused by the
    runtime's checks): the rank abstains from the notify as for any rejection of its own, so its
    peers raise instead of waiting for it."""
    r = ctx.routed()
    x = r.x.double() if ctx.odd else r.x
    kwargs = r.layout(ctx.buf)
    return _rejected(ctx, lambda: ctx.buf.dispatch(x, **kwargs, topk_weights=r.topk_weights, config=ctx.config),
                     TypeError, ["x", "dtype"], True, None, None, "dispatch with a float64 x")


def step_unreadable_cached(ctx: Ctx) -> faults.Raised:
    r = ctx.routed()
    out, _ = faults.checked_dispatch(ctx.buf, r, ctx.config, what=ctx.what("dispatch"))
    x = r.x.double() if ctx.odd else r.x
    return _rejected(ctx, lambda: ctx.buf.dispatch(x, handle=out[4], config=ctx.config), TypeError, ["x", "dtype"],
                     False, ctx.layout_call(r), cached_outputs, "cached dispatch with a float64 x")


def step_unreadable_combine(ctx: Ctx) -> faults.Raised:
    r = ctx.routed()
    out, want = faults.checked_dispatch(ctx.buf, r, ctx.config, what=ctx.what("dispatch"))
    y = r.combine_input(want, want.num_recv_tokens)
    if ctx.odd:
        y = y.double()
    return _rejected(ctx, lambda: ctx.buf.combine(y, out[4], topk_weights=out[2], config=ctx.combine_config),
                     TypeError, ["x", "dtype"], False, ctx.layout_call(r), combine_outputs,
                     "combine with a float64 x")


# ---- C: one rank's data is wrong -------------------------------------------------------------------------

def _bad_expert_id(ctx: Ctx, value: int) -> faults.Raised:
    """An id outside [-1, E) in BAD_RANK's topk_idx, passed to get_dispatch_layout and dispatch."""
    r = ctx.routed()
    topk_idx = r.topk_idx.clone()
    if ctx.rank == BAD_RANK:
        topk_idx[r.case.num_tokens // 2, 1] = value
    words = ["topk_idx", f"rank {BAD_RANK}"]
    what = ctx.what(f"expert id {value} on rank {BAD_RANK}")
    try:
        num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = \
            ctx.buf.get_dispatch_layout(topk_idx, r.case.num_experts)
    except ValueError as error:
        # Allowed on the rank that holds the id only; its peers must still hear of it.
        assert ctx.rank == BAD_RANK, f"{what}: get_dispatch_layout raised on a rank without bad ids: {error}"
        faults.check_message(error, words, what)
        return faults.Raised(error, "layout")
    return expect_error(ValueError, words, lambda: ctx.buf.dispatch(
        r.x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=r.topk_weights,
        config=ctx.config), host_wait=True, what=what)


def step_bad_expert_high(ctx: Ctx) -> faults.Raised:
    return _bad_expert_id(ctx, BASE.num_experts + 3)


def step_bad_expert_low(ctx: Ctx) -> faults.Raised:
    return _bad_expert_id(ctx, -2)


def step_worst_one_rank(ctx: Ctx) -> faults.Raised:
    """num_worst_tokens one row short on BAD_RANK only, enough on the others."""
    r = ctx.routed()
    counts = r.recv_counts()
    assert counts[BAD_RANK] >= 2, f"rank {BAD_RANK} receives only {counts[BAD_RANK]} rows; pick another seed"
    num_worst = counts[BAD_RANK] - 1 if ctx.rank == BAD_RANK else ctx.num_ranks * r.case.num_tokens
    kwargs = r.layout(ctx.buf)
    return expect_error(ValueError, ["num_worst_tokens", f"rank {BAD_RANK}"], lambda: ctx.buf.dispatch(
        r.x, **kwargs, topk_weights=r.topk_weights, num_worst_tokens=num_worst, config=ctx.config),
        host_wait=False, next_call=ctx.layout_call(r), outputs=dispatch_outputs, in_call_ok=True,
        what=ctx.what(f"num_worst_tokens={num_worst} (rank {BAD_RANK} receives {counts[BAD_RANK]})"))


# ---- D: a failed dispatch's handle -------------------------------------------------------------------------

def _overflowed_dispatch(ctx: Ctx):
    """A dispatch whose num_worst_tokens is too small on every rank, its error raised at the next
    call: (routed, its outputs, num_worst_tokens). Every rank needs its failed handle back, so the
    error must not come out at the dispatch's own end (where a collective raises what its host sees
    by then): a GPU sleep holds the dispatch back on the device until the call has returned."""
    r = ctx.routed()
    counts = r.recv_counts()
    num_worst = min(counts) - 1
    assert num_worst >= 1, f"a rank receives only {min(counts)} rows; pick another seed"
    kwargs = r.layout(ctx.buf)
    what = ctx.what(f"num_worst_tokens={num_worst} below every rank's rows {counts}")
    faults.cycles_per_second()  # measured once, before the sleep (it synchronizes)
    faults.gpu_sleep(HOLD_S)
    start = time.perf_counter()
    try:
        out = ctx.buf.dispatch(r.x, **kwargs, topk_weights=r.topk_weights, num_worst_tokens=num_worst,
                               config=ctx.config)
    except ValueError as error:
        # Not a library fault: the hold is what failed, and the message must send the reader there.
        elapsed = time.perf_counter() - start
        raise AssertionError(f"{what}: the dispatch raised at its own end after {elapsed:.2f} s ({error}): the "
                             f"{HOLD_S} s GPU sleep before it did not keep its record from the host until the call "
                             f"returned" + (" (the call took longer than the sleep)" if elapsed >= HOLD_S else "")) \
            from error
    raised = expect_error(ValueError, ["num_worst_tokens"], lambda: out, host_wait=False,
                          next_call=ctx.layout_call(r), outputs=dispatch_outputs, what=what)
    return r, raised.result, num_worst


def step_failed_handle(ctx: Ctx) -> faults.Raised:
    """Every rank's num_worst_tokens is too small; the combine of that handle (it never reads past
    its x) fails naming the handle, at its end or at the next call; its outputs are checked for
    poison only on a rank where it returned (the combine has no GPU sleep before it)."""
    r, out, num_worst = _overflowed_dispatch(ctx)
    y = torch.randn(num_worst, r.case.hidden, device="cuda").to(torch.bfloat16)
    return expect_error(ValueError, ["handle"],
                        lambda: ctx.buf.combine(y, out[4], topk_weights=out[2], config=ctx.combine_config),
                        host_wait=False, next_call=ctx.layout_call(r), outputs=combine_outputs, in_call_ok=True,
                        what=ctx.what("combine with the failed dispatch's handle"))


def step_rejected_among_failed_handles(ctx: Ctx) -> faults.Raised:
    """Every rank's dispatch overflows num_worst_tokens (its handle is failed), then the odd rank's
    combine input is refused on the host while the others' handles fail on the device: nobody's
    verdict is Ok, and the others raise the odd rank's rejection (it is the lowest rank that
    objects) at the combine's end or the next call, while the odd rank's next call returns."""
    r, out, num_worst = _overflowed_dispatch(ctx)
    y = torch.randn(num_worst - (1 if ctx.odd else 0), r.case.hidden, device="cuda").to(torch.bfloat16)
    return _rejected(ctx, lambda: ctx.buf.combine(y, out[4], topk_weights=out[2], config=ctx.combine_config),
                     ValueError, ["x"], False, ctx.layout_call(r), combine_outputs,
                     "combine with a wrong-shaped x where every handle is failed")


STEPS = (step_operation, step_config_num_sms, step_config_chunk, step_combine_config, step_hidden, step_dtype,
         step_topk, step_num_experts, step_handle_cached, step_handle_combine, step_seen_at_different_calls,
         step_second_error_while_pending, step_rejected_dispatch,
         step_rejected_combine, step_rejected_type, step_rejected_then_collective, step_unreadable_dispatch,
         step_unreadable_cached, step_unreadable_combine,
         step_rejected_among_failed_handles, step_bad_expert_high, step_bad_expert_low,
         step_worst_one_rank, step_failed_handle)


def _value_errors(rank, num_ranks, seed):
    config, combine_config = common.make_configs(num_ranks, common.num_sms_for(num_ranks))
    configs = (config, combine_config, *variant_configs(config, combine_config))
    buf = common.make_buffer(num_ranks, configs, (HIDDEN, OTHER_HIDDEN))
    base = BASE.resolved(num_ranks)
    for i, step in enumerate(STEPS):
        ctx = Ctx(buf, rank, num_ranks, seed + 10 * i, config, combine_config)
        dist.barrier()
        start = time.perf_counter()
        raised = step(ctx)
        elapsed = time.perf_counter() - start
        assert elapsed < LIMIT_S, (f"rank {rank}: {step.__name__} took {elapsed:.1f} s; an error must not wait "
                                   f"for a timeout (MOELINK_TIMEOUT_S={TIMEOUT_S})")
        del ctx
        # Value errors leave the Buffer usable: a full round must be exact.
        run_case(buf, rank, num_ranks, base, seed + 10 * i + 9, config, combine_config)
        common.log(rank, f"[R={num_ranks}] {step.__name__}: {type(raised.error).__name__} at the {raised.where} "
                         f"after {elapsed:.2f} s ({raised.error}); the next round is exact")
    buf.destroy()


@pytest.mark.parametrize("num_ranks", (2, 4))
def test_value_errors(num_ranks):
    launcher.run_ranks(num_ranks, _value_errors, 11000 * num_ranks, timeout_s=240,
                       env={"MOELINK_TIMEOUT_S": str(TIMEOUT_S)})
