"""A worker pod's preStop hook: retire this worker through its scheduler before the
pod's SIGTERM, so that the keys only it holds are copied to other workers first.

Meant for ``preStop: exec: command: [python, -m, amm_core.prestop, --limit, 60]``
in a dask-kubernetes worker pod: it needs only Python and distributed in the image.
The scheduler address and worker name come from ``DASK_SCHEDULER_ADDRESS`` and
``DASK_WORKER_NAME``, as dask-kubernetes sets them (the worker must be started with
``--name $(DASK_WORKER_NAME)`` for the scheduler to know it by that name)::

    python -m amm_core.prestop [--scheduler ADDRESS] [--name NAME]
        [--limit SECONDS] [--drain | --no-drain] [--grace SECONDS]
        [--margin SECONDS] [--connect-timeout SECONDS]

What it does:

1. Calls the amm_core plugin's ``amm_core_retire(workers=[name], limit, drain,
   reason="preStop: pod deleted")`` (see amm_core.retirement). The plugin's engine
   counts a copy on another retiring worker as unsafe, so several pods deleted at
   once do not rely on each other's copies.
2. Polls ``amm_core_retirements`` until the record is ``done`` or its worker ``left``,
   or the deadline passes; then exits. An ``aborted`` record is not the end while
   the worker is still there: a worker whose pod goes stays out of service whatever
   its retirement's outcome, and the engine keeps moving what it can until the pod
   goes (the record's ``blocked`` says why it cannot finish), so the hook gives it
   all the time it has.
3. A scheduler without the plugin answers an unknown op with ``None`` (distributed
   2026.8 ``Server.handle_comm``: it logs "No handler ... found" and replies None; no
   error is raised to the caller). Then it falls back to distributed's own
   ``retire_workers(names=[name], close_workers=False, remove=False)``, cut off at
   the same deadline (that call has no time limit of its own, dask/distributed#6252;
   cut off, it goes on on the scheduler until the worker closes).
4. An unreachable scheduler (nothing listens, no DNS, no answer to the handshake) is
   given up after ``--connect-timeout`` seconds: without a scheduler there is
   nothing to wait for.

**Transient errors do not end the wait.** Once the scheduler was reached, a
connection it closes (``CommClosedError``), a refused connection while it restarts,
or a call with no answer within ``CALL_TIMEOUT`` is tried again on a new connection
after a short backoff (``RETRY_FIRST`` doubling to ``RETRY_MAX`` seconds), until the
deadline: the pod would otherwise die mid-retirement with most of its budget left.
The last record seen stands meanwhile (the timed-out line reports it). The first
``amm_core_retire`` is retried the same way (the engine keeps a retirement in
progress as it is, so asking twice is harmless). An error raised by a handler on
the scheduler is not a connection problem: it ends the wait.

It always exits with code 0 and never raises: whatever happens, the pod's deletion
goes on, and a failing hook would only add a FailedPreStopHook event. Its messages go
to stderr (a kubelet shows a preStop hook's output in the pod's events only when the
hook fails, so they are for ``kubectl logs``-less debugging by hand); the last line
says the outcome: done (keys and bytes moved, seconds), the worker left (and why, if
its retirement aborted), the fallback used, timed out (and what blocked the
retirement, if the record says), or why nothing was done.

**The deadline.** The hook must be gone before the pod's
``terminationGracePeriodSeconds`` (``--grace``) runs out, which counts from the
deletion, Python's start-up included, and the worker still needs a moment to close
after its SIGTERM. So it waits until ``limit + ENGINE_SLACK`` seconds after the
scheduler started the retirement (the engine's limit counts from then), and never
past ``grace - margin`` seconds from the start of its process (``ENGINE_SLACK``: the
engine marks the record at its first cycle after the limit, ``blocked`` or
``aborted``; waiting that long lets the last line say why). A watchdog
thread ends the process at ``grace - margin / 2`` should anything hang (a DNS lookup
in a thread, a stuck event loop).

**Nothing is cancelled from here.** When the record is ``done``, the worker stays
``closing_gracefully`` (no new tasks, not a recipient of copies) until the SIGTERM
that follows closes it; the engine keeps it so, even if its process restarts. When
the deadline passes first (the record still ``draining`` or ``moving``, or
``blocked``), the hook exits and leaves it to the engine: the worker stays out of
service, and copies go on while it closes.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

#: Why the worker is retired, as the engine records it
REASON = "preStop: pod deleted"
#: The retirement time limit when none is given
DEFAULT_LIMIT = 30.0
#: Grace period when none is given: the limit plus this
DEFAULT_GRACE_EXTRA = 5.0
#: Seconds before the end of the grace period by which the hook has exited
DEFAULT_MARGIN = 2.0
#: Seconds to give up connecting to the scheduler
DEFAULT_CONNECT_TIMEOUT = 2.0
#: Seconds past the limit the hook waits for the engine to say why the limit passed
#: (its cycle is 0.5 s, amm_core.retirement.RETIREMENT_INTERVAL, and a busy scheduler
#: runs it late)
ENGINE_SLACK = 2.0
#: Seconds between polls of the record
POLL_INTERVAL = 0.25
#: Seconds one call to the scheduler may take before it is given up and tried again
#: on a new connection (a scheduler whose event loop is busy answers late, not never)
CALL_TIMEOUT = 5.0
#: Backoff between tries after a transient error: the first wait, doubling up to the
#: last (short: the budget is a minute or so, and the scheduler is usually back fast)
RETRY_FIRST = 0.1
RETRY_MAX = 1.0


def log(message: str) -> None:
    print(f"amm_core.prestop: {message}", file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    """Bad arguments must not make the hook exit non-zero: raised, then reported."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m amm_core.prestop",
        description="Retire this Dask worker through its scheduler (a preStop hook).",
    )
    p.add_argument(
        "--scheduler",
        default=environ.get("DASK_SCHEDULER_ADDRESS", ""),
        help="scheduler address (default: $DASK_SCHEDULER_ADDRESS)",
    )
    p.add_argument(
        "--name",
        default=environ.get("DASK_WORKER_NAME", ""),
        help="this worker's name at the scheduler (default: $DASK_WORKER_NAME)",
    )
    p.add_argument(
        "--limit",
        type=float,
        default=DEFAULT_LIMIT,
        help="retirement time limit in seconds (the policy's); default %(default)s",
    )
    p.add_argument(
        "--drain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let the tasks the worker runs finish first (default: yes)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=None,
        help="the pod's terminationGracePeriodSeconds (default: limit + "
        f"{DEFAULT_GRACE_EXTRA:g})",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help="exit this many seconds before the grace period ends "
        "(default %(default)s)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT,
        help="seconds to give up reaching the scheduler (default %(default)s)",
    )
    return p


def _positive(name: str, value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--{name} must be a positive number of seconds, got {value}")
    return value


def process_age() -> float:
    """Seconds since this process started (Python's start-up counts against the grace
    period); 0 if unknown. psutil comes with distributed."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:
        return 0.0


def _import_distributed() -> None:
    """distributed's comm and core modules, imported before the budget is counted
    from the process's age (an ImportError ends the hook as any error does)."""
    import distributed.comm  # noqa: F401
    import distributed.core  # noqa: F401


def _record(retirements: Any, name: str) -> dict[str, Any] | None:
    for r in retirements or ():
        if isinstance(r, dict) and name in (r.get("worker"), r.get("address")):
            return r
    return None


def _mib(nbytes: Any) -> str:
    return f"{(nbytes or 0) / 2**20:.1f} MiB"


def _outcome(r: dict[str, Any], name: str) -> str | None:
    """The outcome line once the hook may stop: the record is ``done`` or its worker
    left. None while the engine still works on it, ``aborted`` included: for the
    hook's retirement (``keep_out=False``) the worker stays out of service whatever
    the outcome, and the engine keeps moving what it can until the pod goes."""
    state = r.get("state")
    if state == "done":
        return (
            f"done: worker {name} retired, {r.get('keys_moved', 0)} key(s) "
            f"({_mib(r.get('bytes_moved'))}) moved in {r.get('seconds', 0):.1f}s"
        )
    if r.get("left"):
        why = f": {r.get('reason', '')}" if state == "aborted" else ""
        return f"worker {name} left the cluster during its retirement ({state}{why})"
    return None


class _GaveUp(Exception):
    """No answer from the scheduler, and no point waiting for one."""


class _Deadline(_GaveUp):
    """The deadline passed before the scheduler answered."""


class Backoff:
    """Seconds to wait before each retry: RETRY_FIRST, doubling up to RETRY_MAX."""

    def __init__(self) -> None:
        self.next = RETRY_FIRST

    def delay(self) -> float:
        delay, self.next = self.next, min(2 * self.next, RETRY_MAX)
        return delay


class Link:
    """The hook's connection to the scheduler and its deadline. A broken connection
    is opened again at the next call. ``reached``: a connection was opened once;
    from then on a connection problem is a transient one (a comm closed, the
    scheduler restarting) rather than a scheduler that is not there."""

    def __init__(self, address: str, connect_timeout: float, deadline: float) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.deadline = deadline
        self.start = time.monotonic()
        self.comm: Any = None
        self.reached = False

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def seconds(self) -> float:
        return time.monotonic() - self.start

    async def call(self, op: str, timeout: float, **kwargs: Any) -> Any:
        """One call of ``op``, connecting first if needed, cut at ``timeout``."""
        from distributed.comm import connect
        from distributed.core import send_recv

        timeout = max(0.1, timeout)

        async def connect_and_call() -> Any:
            if self.comm is None or self.comm.closed():
                self.comm = await connect(
                    self.address, timeout=min(self.connect_timeout, timeout)
                )
                self.reached = True
            # send_recv aborts the comm on a comm error or a cancellation
            return await send_recv(self.comm, op=op, **kwargs)

        return await asyncio.wait_for(connect_and_call(), timeout)

    async def close(self) -> None:
        comm, self.comm = self.comm, None
        if comm is None or comm.closed():
            return
        try:  # as distributed's rpc does: tell the scheduler first
            await asyncio.wait_for(comm.write({"op": "close", "reply": False}), 0.5)
            await asyncio.wait_for(comm.close(), 0.5)
        except Exception:
            comm.abort()


async def _call(link: Link, op: str, **kwargs: Any) -> Any:
    """``op``'s answer, each try cut at CALL_TIMEOUT. Connection problems and
    timeouts are retried after a backoff until the deadline (:class:`_Deadline`),
    once the scheduler was reached; before that, a failed connection (tried for
    the connect timeout) gives up (:class:`_GaveUp`). An error raised by the
    handler on the scheduler is raised as it is."""
    backoff = Backoff()
    failures = 0
    last_error = ""
    while True:
        try:  # tried once even at the deadline: a poll then says where it ended
            answer = await link.call(op, min(CALL_TIMEOUT, link.left()), **kwargs)
        except OSError as e:  # CommClosedError, refused, TimeoutError: all OSErrors
            error = f"{type(e).__name__}: {e}"
            if not link.reached:
                raise _GaveUp(f"scheduler {link.address} unreachable: {error}") from e
            if link.left() <= 0:
                raise _Deadline(
                    f"no answer from scheduler {link.address} by the deadline "
                    f"(last: {error})"
                ) from e
            if error != last_error:
                log(f"{op} failed ({error}); retrying until the deadline")
            last_error = error
            failures += 1
            await asyncio.sleep(min(backoff.delay(), link.left()))
            continue
        if failures:
            log(f"{op} answered after {failures} failed attempt(s)")
        return answer


async def retire(
    address: str,
    name: str,
    limit: float,
    drain: bool,
    deadline: float,
    connect_timeout: float,
) -> str:
    """Retire ``name`` as the module docstring says, until ``limit + ENGINE_SLACK``
    seconds after the scheduler started the retirement, and never past ``deadline``
    (time.monotonic(): the grace period's); return the outcome line. Raises only on
    a bug."""
    link = Link(address, connect_timeout, min(deadline, time.monotonic() + limit + ENGINE_SLACK))
    try:
        return await _retire(link, name, limit, drain, deadline)
    finally:
        await link.close()


async def _retire(link: Link, name: str, limit: float, drain: bool, deadline: float) -> str:
    try:
        reply = await _ask(link, name, limit, drain)
    except _GaveUp as e:
        return f"not retired: {e}"
    except Exception as e:  # raised by the handler on the scheduler
        return f"not retired: amm_core_retire failed: {type(e).__name__}: {e}"
    # The engine's limit counts from now (reaching it may have taken a while)
    link.deadline = min(deadline, time.monotonic() + limit + ENGINE_SLACK)
    if reply is None:
        return await _fallback(link, name)
    record, why_not = _own_record(reply, name, link.address)
    if record is None:
        return f"not retired: {why_not}"
    return await _follow(link, name, record)


async def _ask(link: Link, name: str, limit: float, drain: bool) -> Any:
    """amm_core_retire for this worker (idempotent on the scheduler: a retirement in
    progress or done is kept as it is)."""
    return await _call(
        link,
        "amm_core_retire",
        workers=[name],
        limit=limit,
        drain=drain,
        reason=REASON,
        keep_out=False,  # the Deployment's next pod is welcome
    )


def _own_record(reply: Any, name: str, address: str) -> tuple[dict[str, Any] | None, str]:
    """The worker's record in an amm_core_retire reply, or why there is none."""
    if not isinstance(reply, dict):
        return None, f"amm_core_retire answered {reply!r}"
    if name in (reply.get("unknown") or ()):
        return None, f"scheduler {address} knows no worker named {name!r}"
    record = _record(reply.get("retirements"), name)
    if record is None:
        return None, f"the scheduler has no retirement record for {name}"
    return record, ""


async def _follow(link: Link, name: str, record: dict[str, Any]) -> str:
    """Poll the record until its outcome (:func:`_outcome`) or the deadline. On a
    transient error the last record seen stands until the scheduler answers again."""
    blocked: Any = None
    while True:
        outcome = _outcome(record, name)
        if outcome is not None:
            return outcome
        if record.get("blocked") != blocked:
            blocked = record.get("blocked")
            if blocked:
                log(f"retirement of {name} blocked: {blocked}; the engine moves what it can")
        if link.left() <= 0:
            return _timed_out(record, name, link.seconds())
        await asyncio.sleep(min(POLL_INTERVAL, link.left()))
        try:
            records = await _call(link, "amm_core_retirements")
        except _Deadline:
            return _timed_out(record, name, link.seconds())
        except Exception as e:  # the handler failed on the scheduler
            return _lost_track(record, name, e)
        latest = _record(records, name)
        if latest is None:
            return (
                f"lost track of the retirement of {name}: the scheduler has no record "
                f"of it any more (last seen {record.get('state')})"
            )
        record = latest


def _lost_track(record: dict[str, Any], name: str, e: BaseException) -> str:
    return (
        f"lost track of the retirement of {name} ({record.get('state')}): "
        f"{type(e).__name__}: {e}"
    )


def _timed_out(record: dict[str, Any], name: str, seconds: float) -> str:
    state = record.get("state")
    blocked = record.get("blocked") or (record.get("reason") if state == "aborted" else "")
    return (
        f"timed out after {seconds:.1f}s: retirement of worker {name} still "
        f"{state} ({record.get('keys_left', 0)} unsafe key(s), "
        f"{_mib(record.get('bytes_left'))}, {record.get('tasks_running', 0)} task(s) "
        "running)" + (f"; blocked: {blocked}" if blocked else "")
        + "; left to the scheduler's engine until the worker goes"
    )


async def _fallback(link: Link, name: str) -> str:
    """distributed's own retire_workers, cut off at the deadline."""
    log(f"scheduler {link.address} has no amm_core plugin; using retire_workers")
    try:
        retired = await link.call(
            "retire_workers",
            link.left(),  # it blocks for the whole retirement
            names=[name],
            close_workers=False,
            remove=False,
        )
    except TimeoutError:
        return (
            f"fallback retire_workers timed out after {link.seconds():.1f}s; "
            f"it goes on on the scheduler until worker {name} closes"
        )
    except Exception as e:
        return f"fallback retire_workers failed: {type(e).__name__}: {e}"
    if retired:
        return f"fallback retire_workers: worker {name} retired in {link.seconds():.1f}s"
    return (
        f"fallback retire_workers: worker {name} not retired after {link.seconds():.1f}s "
        "(unknown name, or no other running worker could take its keys)"
    )


def _watchdog(seconds: float) -> threading.Timer:
    def stop() -> None:
        log(f"still running {seconds:.1f}s after start; exiting before the grace ends")
        os._exit(0)

    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    timer.start()
    return timer


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    watchdog: bool = False,
) -> int:
    """Run the hook; always 0. ``watchdog``: end the process (os._exit) if it is
    still running when the grace period is about to end (only when run as a
    program)."""
    timer = None
    try:
        env = os.environ if environ is None else environ
        try:
            args = parser(env).parse_args(argv)
            limit = _positive("limit", args.limit)
            grace = _positive(
                "grace", args.grace if args.grace is not None else limit + DEFAULT_GRACE_EXTRA
            )
            margin = max(0.0, args.margin)
            connect_timeout = _positive("connect-timeout", args.connect_timeout)
        except ValueError as e:
            log(f"not retired: bad arguments: {e}")
            return 0
        if not args.scheduler:
            log("not retired: no scheduler address (--scheduler, DASK_SCHEDULER_ADDRESS)")
            return 0
        if not args.name:
            log("not retired: no worker name (--name, DASK_WORKER_NAME)")
            return 0
        _import_distributed()  # start-up too: it takes seconds on a busy node
        age = process_age()
        hard_budget = grace - margin - age
        budget = min(limit + ENGINE_SLACK, hard_budget)
        if budget <= 0:
            log(
                f"not retired: no time left ({age:.1f}s since start, grace {grace:g}s, "
                f"margin {margin:g}s)"
            )
            return 0
        if watchdog:
            timer = _watchdog(max(0.0, grace - margin / 2 - age))
        log(
            f"retiring worker {args.name} at {args.scheduler} within {budget:.1f}s "
            f"(limit {limit:g}s, grace {grace:g}s{', draining' if args.drain else ''})"
        )
        deadline = time.monotonic() + hard_budget
        outcome = asyncio.run(
            retire(
                args.scheduler,
                args.name,
                limit,
                args.drain,
                deadline,
                connect_timeout,
            )
        )
        log(outcome)
    except SystemExit:  # --help
        pass
    except BaseException as e:  # never out of the hook, whatever it is
        log(f"not retired: {type(e).__name__}: {e}")
    finally:
        if timer is not None:
            timer.cancel()
    return 0


if __name__ == "__main__":
    code = main(watchdog=True)
    sys.stderr.flush()
    # Not sys.exit: interpreter shutdown would wait for a DNS lookup hung in a
    # thread, past the grace period
    os._exit(code)
