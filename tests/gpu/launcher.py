"""Runs fn(rank, num_ranks, *args) in num_ranks spawned processes joined by a gloo process group.

Several ranks share one GPU here (MPS), so rank r uses device r % device_count. The parent never
hangs: a rank that raises is reported with its traceback, a rank that dies without reporting is
reported with its exit code, and whatever is still running at timeout_s (or shortly after the first
failure, since its peers are then usually stuck waiting for it) is killed.

Peer-loss tests end a rank on purpose: `expect_killed={r}` accepts rank r dying by SIGKILL (and
`expect_exit={r: code}` rank r ending the process itself, e.g. os._exit(0)) without a report; such a
rank's result is None, and it fails the run only if it exits otherwise or returns.

MOELINK_TEST_TIMEOUT_SCALE (default 1) multiplies every run's timeout_s: tools that slow the
kernels down (scripts/sanitize.sh) raise it instead of editing each test.
"""

from __future__ import annotations

import importlib
import importlib.util
import multiprocessing
import os
import queue
import shlex
import signal
import socket
import stat
import sys
import tempfile
import time
import traceback
from datetime import timedelta

DEFAULT_TIMEOUT_S = 300.0
FAILURE_GRACE_S = 5.0   # lets peers of a failed rank report their own errors before they are killed
EXIT_WAIT_S = 60.0     # teardown (CUDA context, IPC unmapping) after a rank reported
DEFAULT_MOELINK_TIMEOUT_S = "20"


def timeout_scale() -> float:
    """MOELINK_TEST_TIMEOUT_SCALE: how much longer than usual every wait of a test may take."""
    value = os.environ.get("MOELINK_TEST_TIMEOUT_SCALE", "1")
    try:
        scale = float(value)
    except ValueError:
        raise ValueError(f"MOELINK_TEST_TIMEOUT_SCALE must be a number, got {value!r}") from None
    if scale <= 0:
        raise ValueError(f"MOELINK_TEST_TIMEOUT_SCALE must be > 0, got {value!r}")
    return scale


def _rank_executable():
    """MOELINK_TEST_RANK_PREFIX: a command every rank's interpreter runs under, e.g. a
    compute-sanitizer invocation, so that each rank is that tool's own child (a tool wrapped around
    the parent process does not follow the ranks multiprocessing spawns). None when unset."""
    prefix = os.environ.get("MOELINK_TEST_RANK_PREFIX", "").strip()
    if not prefix:
        return None
    words = shlex.split(prefix) + [sys.executable]
    fd, path = tempfile.mkstemp(prefix="moelink-rank-", suffix=".sh")
    with os.fdopen(fd, "w") as script:
        script.write("#!/bin/sh\nexec " + " ".join(shlex.quote(w) for w in words) + ' "$@"\n')
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


class RankFailure(AssertionError):
    """One or more ranks failed; the message names each with its traceback or exit status."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _function_ref(fn) -> tuple[str, str, str]:
    # A (module, qualname, path) tuple names a function the parent never imports (the benchmark's
    # parent stays free of torch); the child imports it.
    if isinstance(fn, tuple):
        return fn
    return fn.__module__, fn.__qualname__, os.path.abspath(sys.modules[fn.__module__].__file__)


def _resolve(module_name: str, qualname: str, path: str):
    """fn by module name, or from its file when the parent imported it under a name the child
    cannot import (pytest's importlib mode, a script run as __main__)."""
    try:
        module = importlib.import_module(module_name) if module_name != "__main__" else None
    except ImportError:
        module = None
    if module is None or not hasattr(module, qualname.split(".")[0]):
        spec = importlib.util.spec_from_file_location(f"_rank_fn_{os.path.basename(path)[:-3]}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    fn = module
    for part in qualname.split("."):
        fn = getattr(fn, part)
    return fn


def _child(rank, num_ranks, port, timeout_s, fn_ref, args, env, results):
    os.environ.update(env)
    try:
        fn = _resolve(*fn_ref)
        import torch
        import torch.distributed as dist

        torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=num_ranks,
                                timeout=timedelta(seconds=timeout_s))
        try:
            value = fn(rank, num_ranks, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - everything, SystemExit included, goes to the parent
        results.put((rank, False, traceback.format_exc()))
    sys.stdout.flush()
    sys.stderr.flush()


def run_ranks(num_ranks: int, fn, *args, timeout_s: float = DEFAULT_TIMEOUT_S, env: dict | None = None,
              expect_killed=(), expect_exit: dict | None = None) -> list:
    """Returns [fn's return value on rank r for r in range(num_ranks)]; raises RankFailure otherwise.
    fn must be a module-level function, or a (module, qualname, path) tuple naming one; args and
    return values must be picklable.

    expect_killed: ranks that end by SIGKILL on purpose (a lost peer); expect_exit: {rank: exit code}
    for ranks that end the process themselves. Their result is None; the run does not wait for their
    report, and fails if one of them returns, raises, or exits any other way."""
    timeout_s *= timeout_scale()
    departures = {r: -signal.SIGKILL for r in expect_killed}
    departures.update(expect_exit or {})
    for r in departures:
        if not 0 <= r < num_ranks:
            raise ValueError(f"expected departure of rank {r}, but there are {num_ranks} ranks")
    child_env = {"MOELINK_TIMEOUT_S": os.environ.get("MOELINK_TIMEOUT_S", DEFAULT_MOELINK_TIMEOUT_S)}
    child_env.update({k: str(v) for k, v in (env or {}).items()})
    ctx = multiprocessing.get_context("spawn")
    wrapper = _rank_executable()
    if wrapper is not None:
        ctx.set_executable(wrapper)
    results = ctx.Queue()
    port = free_port()
    fn_ref = _function_ref(fn)
    procs = [ctx.Process(target=_child, args=(r, num_ranks, port, timeout_s, fn_ref, args, child_env, results),
                         name=f"rank{r}", daemon=True) for r in range(num_ranks)]
    # Set before start so the children see it from their first import on, not just from _child on.
    saved_env = dict(os.environ)
    os.environ.update(child_env)
    try:
        for proc in procs:
            proc.start()
    finally:
        os.environ.clear()
        os.environ.update(saved_env)

    values, errors, order, departed = {}, {}, [], set()
    deadline = time.monotonic() + timeout_s

    def record(rank, ok, payload):
        if ok and rank in departures:
            ok, payload = False, (f"returned {payload!r}, but it was expected to end with exit code "
                                  f"{departures[rank]}")
        if ok:
            values[rank] = payload
        else:
            errors[rank] = payload
            order.append(rank)

    def exited(rank):
        """A rank whose process ended without a report: an expected departure or a failure."""
        code = procs[rank].exitcode
        if rank in departures and code == departures[rank]:
            departed.add(rank)
        elif rank in departures:
            record(rank, False, f"exited with code {code}, expected {departures[rank]}")
        else:
            record(rank, False, f"exited with code {code} without reporting")

    def settled(rank):
        return rank in values or rank in errors or rank in departed

    def drain(block_s):
        try:
            record(*results.get(timeout=block_s))
            while True:
                record(*results.get_nowait())
        except queue.Empty:
            pass

    try:
        while sum(settled(r) for r in range(num_ranks)) < num_ranks and time.monotonic() < deadline:
            drain(0.2)
            silent = [r for r, p in enumerate(procs) if p.exitcode is not None and not settled(r)]
            if silent:
                drain(1.0)  # a report can still be in the pipe right after the process exited
                for r in silent:
                    if not settled(r):
                        exited(r)
            if errors:
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        # Ranks that reported still have to exit cleanly: a crash in teardown is a failure too.
        for r, proc in enumerate(procs):
            if r in departed:
                continue
            proc.join(timeout=0.5 if errors else min(EXIT_WAIT_S, max(0.0, deadline - time.monotonic())))
            if r in values and proc.exitcode not in (0, None):
                record(r, False, f"reported success but exited with code {proc.exitcode}")
            elif not settled(r) and proc.exitcode is not None:
                exited(r)
    finally:
        stuck = [r for r, p in enumerate(procs) if p.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        results.close()

    if errors or stuck:
        lines = [f"--- rank {r} failed:\n{errors[r]}" for r in order]
        for r in stuck:
            if r in values:
                lines.append(f"--- rank {r} reported but did not exit (killed)")
            elif r in departures and r not in errors:
                lines.append(f"--- rank {r} was expected to end itself but was still running (killed)")
            elif r not in errors:
                why = f"after rank {order[0]} failed" if order else f"at the {timeout_s:.0f} s timeout"
                lines.append(f"--- rank {r} was still running {why} (killed)")
        head = f"rank {order[0]} failed first" if order else f"timed out after {timeout_s:.0f} s"
        # fn may be a (module, qualname, path) reference (the bench passes those): name it by its ref.
        raise RankFailure(f"{fn_ref[1]} on {num_ranks} ranks: {head}\n" + "\n".join(lines))
    return [values.get(r) for r in range(num_ranks)]
