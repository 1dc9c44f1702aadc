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
2. Polls ``amm_core_retirements`` until the record is ``done``, ``aborted`` or its
   worker ``left``, or the deadline passes; then exits.
3. A scheduler without the plugin answers an unknown op with ``None`` (distributed
   2026.8 ``Server.handle_comm``: it logs "No handler ... found" and replies None; no
   error is raised to the caller). Then it falls back to distributed's own
   ``retire_workers(names=[name], close_workers=False, remove=False)``, cut off at
   the same deadline (that call has no time limit of its own, dask/distributed#6252;
   cut off, it goes on on the scheduler until the worker closes).
4. An unreachable scheduler (nothing listens, no DNS, no answer) is given up after
   ``--connect-timeout`` seconds.

It always exits with code 0 and never raises: whatever happens, the pod's deletion
goes on, and a failing hook would only add a FailedPreStopHook event. Its messages go
to stderr (a kubelet shows a preStop hook's output in the pod's events only when the
hook fails, so they are for ``kubectl logs``-less debugging by hand); the last line
says the outcome: done (keys and bytes moved, seconds), aborted (why), the fallback
used, timed out, or why nothing was done.

**The deadline.** The hook must be gone before the pod's
``terminationGracePeriodSeconds`` (``--grace``) runs out, which counts from the
deletion, Python's start-up included, and the worker still needs a moment to close
after its SIGTERM. So it waits at most ``min(limit + ENGINE_SLACK, grace - margin)``
seconds from the start of its process (``ENGINE_SLACK``: the engine aborts at its
first cycle after the limit; waiting that long lets the log say why). A watchdog
thread ends the process at ``grace - margin / 2`` should anything hang (a DNS lookup
in a thread, a stuck event loop).

**Nothing is cancelled from here.** When the record is ``done``, the worker stays
``closing_gracefully`` (no new tasks, not a recipient of copies) until the SIGTERM
that follows closes it; the engine keeps it so, even if its process restarts. When
the deadline passes while the record is still ``draining`` or ``moving``, the hook
exits and leaves it to the engine: copies go on while the worker closes, and if the
engine's own limit passes first, the record aborts and the worker is put back in
service until the SIGTERM.
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
#: Seconds past the limit the hook waits for the engine's own abort (its cycle is
#: 0.5 s: amm_core.retirement.RETIREMENT_INTERVAL)
ENGINE_SLACK = 1.0
#: Seconds between polls of the record
POLL_INTERVAL = 0.25


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


def _record(retirements: Any, name: str) -> dict[str, Any] | None:
    for r in retirements or ():
        if isinstance(r, dict) and name in (r.get("worker"), r.get("address")):
            return r
    return None


def _mib(nbytes: Any) -> str:
    return f"{(nbytes or 0) / 2**20:.1f} MiB"


def _outcome(r: dict[str, Any], name: str) -> str | None:
    """The outcome line for a finished record; None while it is in progress."""
    state = r.get("state")
    if state == "done":
        return (
            f"done: worker {name} retired, {r.get('keys_moved', 0)} key(s) "
            f"({_mib(r.get('bytes_moved'))}) moved in {r.get('seconds', 0):.1f}s"
        )
    if state == "aborted":
        return f"aborted: retirement of worker {name}: {r.get('reason', '')}"
    if r.get("left"):
        return f"worker {name} left the cluster during its retirement ({state})"
    return None


async def retire(
    address: str,
    name: str,
    limit: float,
    drain: bool,
    deadline: float,
    connect_timeout: float,
) -> str:
    """Retire ``name`` as the module docstring says, until ``deadline``
    (time.monotonic()); return the outcome line. Raises only on a bug."""
    from distributed.core import rpc

    def left() -> float:
        return max(0.0, deadline - time.monotonic())

    start = time.monotonic()
    async with rpc(address, timeout=max(0.1, min(connect_timeout, left()))) as r:
        try:
            reply = await asyncio.wait_for(
                r.amm_core_retire(workers=[name], limit=limit, drain=drain, reason=REASON,
                                  keep_out=False),  # the Deployment's next pod is welcome
                timeout=max(0.1, left()),
            )
        except (TimeoutError, OSError) as e:
            return f"not retired: scheduler {address} unreachable: {type(e).__name__}: {e}"
        except Exception as e:  # raised by the handler on the scheduler
            return f"not retired: amm_core_retire failed: {type(e).__name__}: {e}"

        if reply is None:
            return await _fallback(r, address, name, left, start)
        if not isinstance(reply, dict):
            return f"not retired: amm_core_retire answered {reply!r}"
        if name in (reply.get("unknown") or ()):
            return f"not retired: scheduler {address} knows no worker named {name!r}"
        record = _record(reply.get("retirements"), name)
        while True:
            if record is None:
                return f"not retired: the scheduler has no retirement record for {name}"
            outcome = _outcome(record, name)
            if outcome is not None:
                return outcome
            if left() <= 0:
                return _timed_out(record, name, time.monotonic() - start)
            await asyncio.sleep(min(POLL_INTERVAL, left()))
            try:
                records = await asyncio.wait_for(
                    r.amm_core_retirements(), timeout=max(0.1, left())
                )
            except TimeoutError:
                return _timed_out(record, name, time.monotonic() - start)
            except Exception as e:  # the connection lost, or the handler failed
                return (
                    f"lost track of the retirement of {name} ({record.get('state')}): "
                    f"{type(e).__name__}: {e}"
                )
            record = _record(records, name)


def _timed_out(record: dict[str, Any], name: str, seconds: float) -> str:
    return (
        f"timed out after {seconds:.1f}s: retirement of worker {name} still "
        f"{record.get('state')} ({record.get('keys_left', 0)} unsafe key(s), "
        f"{_mib(record.get('bytes_left'))}, {record.get('tasks_running', 0)} task(s) "
        "running); left to the scheduler's engine and its limit"
    )


async def _fallback(r: Any, address: str, name: str, left: Any, start: float) -> str:
    """distributed's own retire_workers, cut off at the deadline."""
    log(f"scheduler {address} has no amm_core plugin; using retire_workers")
    try:
        retired = await asyncio.wait_for(
            r.retire_workers(names=[name], close_workers=False, remove=False),
            timeout=max(0.1, left()),
        )
    except TimeoutError:
        return (
            f"fallback retire_workers timed out after {time.monotonic() - start:.1f}s; "
            f"it goes on on the scheduler until worker {name} closes"
        )
    except Exception as e:
        return f"fallback retire_workers failed: {type(e).__name__}: {e}"
    seconds = time.monotonic() - start
    if retired:
        return f"fallback retire_workers: worker {name} retired in {seconds:.1f}s"
    return (
        f"fallback retire_workers: worker {name} not retired after {seconds:.1f}s "
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
        age = process_age()
        budget = min(limit + ENGINE_SLACK, grace - margin - age)
        if watchdog:
            timer = _watchdog(max(0.0, grace - margin / 2 - age))
        if budget <= 0:
            log(
                f"not retired: no time left ({age:.1f}s since start, grace {grace:g}s, "
                f"margin {margin:g}s)"
            )
            return 0
        log(
            f"retiring worker {args.name} at {args.scheduler} within {budget:.1f}s "
            f"(limit {limit:g}s, grace {grace:g}s{', draining' if args.drain else ''})"
        )
        deadline = time.monotonic() + budget
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
