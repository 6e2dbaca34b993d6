"""What the failure-contract and Runtime v2 tests share (test_failures.py, test_peer_loss.py,
test_graphs.py, test_runtime_v2.py): poisoned-output checks, errors that come at the call or at
the next call, GPU sleeps of a given length, a dying rank, and one rank's view of a round with
its reference (built on checks.py and tests/reference, which stay the only statement of the
semantics).

The error contract these helpers encode (docs/TESTING.md lists it in full): an operation that
waits on the host (uncached dispatch with num_worst_tokens == 0) raises at the call; one that does
not (combine, cached dispatch, dispatch with num_worst_tokens > 0) returns outputs whose every byte
is 0xFF, and the next call on the Buffer raises. A data error is raised at the end of the first
call whose host sees its record (a collective raises it after its launches), so that may also be
the failing call itself, whose outputs are then lost.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

import checks
from checks import Case
from reference import moe_reference as ref

POISON_BYTE = 0xFF
STEP_WORDS = ("barrier", "dispatch", "combine", "notify")  # a TimeoutError names the step it gave up in


# ---- poisoned outputs ----------------------------------------------------------------------------

def dispatch_outputs(out, cached: bool = False) -> dict:
    """The data outputs of a dispatch tuple by name. A cached dispatch returns only recv_x (its
    handle is the earlier dispatch's, whose recv_src_idx is not this call's output)."""
    recv_x, recv_topk_idx, recv_topk_weights, _, handle, _ = out
    named = dict(zip(("recv_x", "recv_x_scales"), recv_x)) if isinstance(recv_x, tuple) else {"recv_x": recv_x}
    if not cached:
        named.update(recv_topk_idx=recv_topk_idx, recv_topk_weights=recv_topk_weights, recv_src_idx=handle[3])
    return named


def cached_outputs(out) -> dict:
    return dispatch_outputs(out, cached=True)


def combine_outputs(out) -> dict:
    return {"combined_x": out[0], "combined_topk_weights": out[1]}


def assert_poisoned(named: dict, what: str) -> None:
    """Every byte of every named tensor is 0xFF (NaN for bf16, float32 and fp8 e4m3fn; -1 for
    int32/int64), so nothing a failed operation leaves can pass as data. None and empty pass."""
    for name, tensor in named.items():
        if tensor is None or tensor.numel() == 0:
            continue
        raw = tensor.detach().reshape(-1).view(torch.uint8)  # reshape copies a non-contiguous view
        good = raw == POISON_BYTE
        if not bool(good.all()):
            bad = torch.nonzero(~good).flatten()
            first = int(bad[0].item())
            raise AssertionError(f"{what}: {name} is not poisoned: {bad.numel()} of {raw.numel()} bytes are not "
                                 f"0xFF (first at byte {first}: 0x{int(raw[first].item()):02x})")


# ---- errors at the call or at the next call -------------------------------------------------------

def _word_pattern(word: str) -> str:
    pattern = re.escape(word)
    if word[-1].isdigit():
        pattern += r"(?!\d)"  # "rank 1" must not match "rank 12"
    if len(word) == 1:
        pattern = rf"(?<![A-Za-z0-9_]){pattern}(?![A-Za-z0-9_])"  # "x", not the x of "x_scales"
    return pattern


def check_message(error: BaseException, words: Sequence[str], what: str) -> None:
    message = str(error)
    missing = [w for w in words if not re.search(_word_pattern(w), message, re.IGNORECASE)]
    if missing:
        raise AssertionError(f"{what}: the {type(error).__name__} does not name {missing}: {message!r}")


def _naming(words: Sequence[str]) -> str:
    return f" naming {list(words)}" if words else ""


def expect_raises(kind: type, words: Sequence[str], call: Callable, what: str) -> BaseException:
    """call() must raise `kind` whose message names every word (case-insensitive)."""
    try:
        call()
    except kind as error:
        check_message(error, words, what)
        return error
    except Exception as error:  # noqa: BLE001 - reported as the wrong kind
        raise AssertionError(f"{what}: expected {kind.__name__}{_naming(words)}, got "
                             f"{type(error).__name__}: {error}") from error
    raise AssertionError(f"{what}: expected {kind.__name__}{_naming(words)}, nothing was raised")


@dataclass
class Raised:
    error: BaseException
    where: str              # "call" or "next call"
    result: object = None   # what the call returned when the error came at the next call


def expect_error(kind: type, words: Sequence[str], call: Callable, *, what: str, host_wait: bool,
                 next_call: Optional[Callable] = None, outputs: Optional[Callable] = None,
                 in_call_ok: bool = False, next_is_collective: bool = False) -> Raised:
    """One failing operation, checked against where the contract says its error surfaces.

    host_wait: the operation waits on the host, so call() itself must raise. Otherwise call() must
    return (or may raise, with in_call_ok: a data error comes out at the end of the first call
    whose host sees the record, which may be this one), every output named by outputs(result) must
    be poisoned once the device is idle, and next_call() must raise. next_is_collective: next_call
    opens a collective, which every rank must make whatever its call did; where call() raised, it
    must then return (the error was raised once)."""
    try:
        result = call()
    except kind as error:
        if not (host_wait or in_call_ok):
            raise AssertionError(f"{what}: the call raised {type(error).__name__} ({error}), but it does not "
                                 f"wait on the host: it must return poisoned outputs and the next call "
                                 f"raise") from error
        check_message(error, words, what)
        if next_is_collective and next_call is not None:
            torch.cuda.synchronize()
            try:
                next_call()
            except Exception as again:  # noqa: BLE001 - reported as raised twice
                raise AssertionError(f"{what}: the next call raised {type(again).__name__} ({again}) after the "
                                     f"call had raised the error already") from again
        return Raised(error, "call")
    except Exception as error:  # noqa: BLE001 - reported as the wrong kind
        raise AssertionError(f"{what}: expected {kind.__name__}{_naming(words)}, got "
                             f"{type(error).__name__}: {error}") from error
    if host_wait:
        raise AssertionError(f"{what}: the call waits on the host, so it must raise {kind.__name__}"
                             f"{_naming(words)} itself; it returned")
    torch.cuda.synchronize()
    if outputs is not None:
        assert_poisoned(outputs(result), f"{what}: the outputs of the failed call")
    error = expect_raises(kind, words, next_call, f"{what}: the next call")
    return Raised(error, "next call", result)


# ---- time on the GPU and on the host --------------------------------------------------------------

_cycles_per_second: Optional[float] = None


def cycles_per_second() -> float:
    """torch.cuda._sleep cycles per second on this GPU, measured once with CUDA events."""
    global _cycles_per_second
    if _cycles_per_second is None:
        probe = int(2e7)
        torch.cuda._sleep(probe)  # warm-up: the first launch loads the kernel
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(5 * probe)
        end.record()
        end.synchronize()
        _cycles_per_second = 5 * probe / (start.elapsed_time(end) / 1e3)
    return _cycles_per_second


def gpu_sleep(seconds: float) -> None:
    """Keeps the current stream busy for about `seconds` (the host does not wait)."""
    torch.cuda._sleep(int(seconds * cycles_per_second()))


def die() -> None:
    """Ends this rank the way a crashed peer ends: SIGKILL, no cleanup, no report."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not reached


def bounded_destroy(buf, limit_s: float, what: str) -> str:
    """destroy() of a Buffer whose peer is gone or that is broken: it must come back within limit_s
    and not crash; it may report the failure again as TimeoutError."""
    start = time.perf_counter()
    try:
        buf.destroy()
        outcome = "returned"
    except TimeoutError as error:
        outcome = f"raised TimeoutError ({error})"
    elapsed = time.perf_counter() - start
    assert elapsed <= limit_s, f"{what}: destroy() took {elapsed:.1f} s, limit {limit_s:.0f} s"
    return f"destroy() {outcome} after {elapsed:.1f} s"


# ---- one rank's view of a round ------------------------------------------------------------------

@dataclass
class Routed:
    """Every rank's routing and inputs for one round (each rank regenerates all of them from the
    seed) and this rank's tensors; the references come from tests/reference."""
    case: Case
    rank: int
    num_ranks: int
    routing: list
    inputs: list
    topk_idx: torch.Tensor

    @property
    def mine(self) -> ref.RankInputs:
        return self.inputs[self.rank]

    @property
    def x(self):
        return self.mine.dispatch_x(self.case.fp8)

    @property
    def topk_weights(self):
        return self.mine.topk_weights if self.case.with_weights else None

    def layout(self, buf) -> dict:
        """get_dispatch_layout's tensors (and topk_idx) as dispatch keyword arguments."""
        num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = \
            buf.get_dispatch_layout(self.topk_idx, self.case.num_experts)
        return dict(num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                    num_tokens_per_expert=num_tokens_per_expert, topk_idx=self.topk_idx)

    def want(self, inputs: Optional[list] = None) -> ref.DispatchReference:
        inputs = self.inputs if inputs is None else inputs
        weights = [inp.topk_weights for inp in inputs] if self.case.with_weights else None
        return ref.reference_dispatch(self.routing, [inp.dispatch_x(self.case.fp8) for inp in inputs], weights,
                                      self.rank, self.case.num_experts, self.num_ranks, self.case.alignment)

    def recv_counts(self) -> list:
        """Rows every rank receives in this round."""
        return [ref.dispatch_plan_np(self.routing, d, self.case.num_experts, self.num_ranks).num_recv_tokens
                for d in range(self.num_ranks)]

    def combine_input(self, want: ref.DispatchReference, num_rows: int) -> torch.Tensor:
        return checks.combine_input(self.inputs, want.plan, self.rank, num_rows, self.case.hidden)

    def want_combine(self, bias=None):
        """(combined_x, combined_topk_weights) when every rank feeds combine_input's rows."""
        mine = self.mine
        is_token_in_rank = ref.reference_layout(self.topk_idx, self.case.num_experts, self.num_ranks)[3]
        return ref.reference_combine(
            is_token_in_rank, lambda d, tokens: (mine.x[tokens].float() * checks.combine_scale(d)).to(torch.bfloat16),
            self.case.hidden, self.topk_idx, self.topk_weights, self.case.num_experts, bias)


def routed(case: Case, seed: int, rank: int, num_ranks: int) -> Routed:
    """case must be resolved for num_ranks already."""
    routing = checks.make_routing_all(case, seed, num_ranks)
    inputs = checks.make_inputs_all(case, seed, num_ranks)
    return Routed(case, rank, num_ranks, routing, inputs, torch.from_numpy(np.ascontiguousarray(routing[rank])).cuda())


def checked_dispatch(buf, r: Routed, config, num_worst: int = 0, what: str = "", **kwargs):
    """An uncached dispatch of r checked against the reference; (outputs, reference)."""
    out = buf.dispatch(r.x, **r.layout(buf), topk_weights=r.topk_weights, expert_alignment=r.case.alignment,
                       num_worst_tokens=num_worst, config=config, **kwargs)
    if kwargs.get("async_finish"):
        out[5].current_stream_wait()
    want = r.want()
    checks.check_dispatch(out, want, num_worst, r.case, what or f"rank {r.rank} {r.case.name}")
    return out, want


def checked_combine(buf, r: Routed, out, want, combine_config, num_worst: int = 0, what: str = ""):
    """The combine of checked_dispatch's outputs, checked against the reference; its outputs."""
    y = r.combine_input(want, num_worst or want.num_recv_tokens)
    combined = buf.combine(y, out[4], topk_weights=out[2], config=combine_config)
    checks.check_combine(combined[0], combined[1], *r.want_combine(), what or f"rank {r.rank} {r.case.name}")
    return combined
