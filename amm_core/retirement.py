"""Graceful retirement of workers before their pods go: a non-blocking engine that
copies away what only a retiring worker holds, through an Active Memory Manager of
its own, and tells the caller (the dask-memory-operator) when the pod may be deleted.

Why not ``Scheduler.retire_workers``:

- it blocks until every worker is retired and has no time limit
  (dask/distributed#6252): a caller that gives up leaves the worker
  ``closing_gracefully`` with no one watching it;
- it does not wait for the tasks the worker is running: they are rescheduled when it
  leaves and their progress is lost (dask/distributed#8202);
- its ``RetireWorker`` counts a copy on another retiring worker as safe: two workers
  holding each other's only copies, retired together, each think the other keeps the
  key, and the key is lost when both go;
- a retired worker whose process restarts before its pod is deleted re-registers and
  gets tasks again (dask-kubernetes#855).

Here a retirement is a record, started by the scheduler handler ``amm_core_retire``
and polled by the caller. The worker goes ``closing_gracefully`` (no new tasks, not a
recipient of copies); tasks assigned to it that have not started are handed to
running workers through the work-stealing protocol (the worker itself confirms it has
not started them); with ``drain`` the tasks it is running finish first. A
:class:`RetireSafely` policy copies every key that is not *safe* (:func:`is_safe`) to
running, non-retiring workers with room (:mod:`amm_core._room`). The record goes
``draining`` (tasks still running) -> ``moving`` (unsafe keys left) -> ``done``
(nothing running, nothing unsafe: the pod may go), and back to ``moving`` if a key
becomes unsafe again. It is ``aborted``, and the worker put back to the status it had,
when it cannot be retired without losing anything: the limit passes; no running
non-retiring worker has room for a key; the worker holds actors or runs a
``long_running`` (seceded) task; a scheduler plugin vetoes its downscaling
(``SchedulerPlugin.valid_workers_downscaling``, as P2P shuffles do). A worker that
leaves mid-retirement (its process died) is recorded as such.

The policy runs in an AMM of the engine's own (like the ad-hoc one of
``retire_workers`` when the main AMM is off), so that retirements go on whether the
main AMM runs or not and whatever configs the operator applies to it. A ``done``
record keeps its worker out: if a worker of the same name registers again, it is set
``closing_gracefully`` at once (:meth:`RetirementEngine.worker_joined`), until the
caller forgets the record after the pod is gone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import dask
from distributed.active_memory_manager import (
    ActiveMemoryManagerExtension,
    ActiveMemoryManagerPolicy,
    Suggestion,
    SuggestionGenerator,
)
from distributed.comm.core import CommClosedError
from distributed.core import Status
from distributed.metrics import time

from amm_core._room import workers_with_room

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler, TaskState, WorkerState

logger = logging.getLogger(__name__)

#: Seconds between cycles of the engine's AMM. Short, because the caller waits on the
#: retirement to delete a pod and copies start only at a cycle; not shorter, because
#: every cycle walks the keys of every retiring worker on the scheduler's event loop.
RETIREMENT_INTERVAL = 0.5
#: Seconds after which a copy asked for and not landed is asked for again (its
#: recipient may have been slow, or died without the scheduler knowing yet)
COPY_TIMEOUT = 10.0
#: Workers listed by ``amm_core_scaling`` (bounded: the caller refuses larger answers)
MAX_SCALING_WORKERS = 1000

State = Literal["draining", "moving", "done", "aborted"]
#: States in which the engine still watches the worker
ACTIVE: frozenset[str] = frozenset({"draining", "moving", "done"})


def retiring_workers(scheduler: Scheduler) -> set[WorkerState]:
    """Workers on their way out: neither running nor paused (closing_gracefully or
    closing). Copies they hold go with them."""
    return {
        ws
        for ws in scheduler.workers.values()
        if ws.status not in (Status.running, Status.paused)
    }


def is_safe(ts: TaskState, retiring: set[WorkerState]) -> bool:
    """The safe-key rule: a key on a retiring worker is safe only if a copy sits on a
    worker that is not itself retiring (``retiring``: :func:`retiring_workers`).
    Copies on other retiring workers do not count: they go too."""
    return any(ws not in retiring for ws in ts.who_has or ())


def unsafe_keys(ws: WorkerState, retiring: set[WorkerState]) -> list[TaskState]:
    """The keys ``ws`` holds that would be lost if it went now, with ``retiring``
    (whether or not ``ws`` is retiring yet)."""
    leaving = retiring | {ws}
    return [ts for ts in ws.has_what if not is_safe(ts, leaving)]


def set_status(
    scheduler: Scheduler, ws: WorkerState, status: Status, prefix: str = "amm-core"
) -> None:
    """Change a worker's status as Scheduler.retire_workers does: on the scheduler at
    once, so that no task or copy lands on the worker meanwhile, and tell the worker."""
    stimulus_id = f"{prefix}-{time()}"
    scheduler.handle_worker_status_change(status, ws, stimulus_id)
    comm = scheduler.stream_comms.get(ws.address)
    if comm is None:
        return  # the worker is gone
    try:
        comm.send(
            {
                "op": "worker-status-change",
                "status": status.name,
                "stimulus_id": stimulus_id,
            }
        )
    except CommClosedError:
        logger.info("Could not tell %s its status is %s: comm closed", ws.address, status)


class Retirement:
    """The record of one worker's retirement."""

    #: The worker as the scheduler knows it (the latest process under this name)
    ws: WorkerState
    #: Its name, as a string (the Kubernetes Deployment name for the operator)
    name: str
    state: State
    #: Why the caller retires it
    requested: str
    #: Why it is aborted ("" otherwise)
    abort_reason: str
    #: Seconds from ``started`` after which an unfinished retirement is aborted
    limit: float
    #: Let running tasks finish before ``done`` (else they are rescheduled when the
    #: worker leaves, and counted in ``wasted_tasks``)
    drain: bool
    #: Status the worker had before, put back when the retirement is aborted
    prev_status: Status
    #: Scheduler time the retirement started, and reached done/aborted (None: not yet)
    started: float
    ended: float | None
    #: As of the latest cycle: unsafe keys and their bytes, tasks processing there
    keys_left: int
    bytes_left: int
    tasks_running: int
    #: Copies that landed on a recipient, and their bytes
    keys_moved: int
    bytes_moved: int
    #: Tasks lost to the worker leaving (or, with drain=False, that will be)
    wasted_tasks: int
    #: The worker left the cluster
    left: bool
    #: Times a process of this name registered again and was kept out
    rejoined: int
    #: Keep a new process of the same name out while the record lives (the pod goes:
    #: the operator's retirements); False when the pod alone is deleted and its
    #: Deployment starts a new one (a preStop hook's), which is welcome
    keep_out: bool
    #: Copies asked for and not landed yet: key -> (recipient address, when asked)
    copies: dict[Any, tuple[str, float]]
    #: Keys of tasks already offered to other workers (each is offered once: a task
    #: the worker refuses to give up is executing, and will finish)
    offered: set[Any]

    def __init__(
        self, ws: WorkerState, limit: float, drain: bool, requested: str, keep_out: bool = True
    ) -> None:
        self.ws = ws
        self.keep_out = keep_out
        self.name = str(ws.name)
        self.state = "draining" if drain else "moving"
        self.requested = requested
        self.abort_reason = ""
        self.limit = limit
        self.drain = drain
        self.prev_status = ws.status
        self.started = time()
        self.ended = None
        self.keys_left = self.bytes_left = self.tasks_running = 0
        self.keys_moved = self.bytes_moved = self.wasted_tasks = 0
        self.left = False
        self.rejoined = 0
        self.copies = {}
        self.offered = set()

    def __repr__(self) -> str:
        return f"<Retirement {self.name} ({self.ws.address}): {self.state}>"

    def report(self) -> dict[str, Any]:
        """Plain data (msgpack-able)."""
        end = self.ended if self.ended is not None else time()
        return {
            "worker": self.name,
            "address": self.ws.address,
            "state": self.state,
            "reason": self.abort_reason or self.requested,
            "requested": self.requested,
            "keys_left": self.keys_left,
            "bytes_left": self.bytes_left,
            "tasks_running": self.tasks_running,
            "keys_moved": self.keys_moved,
            "bytes_moved": self.bytes_moved,
            "wasted_tasks": self.wasted_tasks,
            "started": self.started,
            "seconds": end - self.started,
            "limit": self.limit,
            "drain": self.drain,
            "left": self.left,
            "rejoined": self.rejoined,
            "keep_out": self.keep_out,
        }


class RetireSafely(ActiveMemoryManagerPolicy):
    """Copy the unsafe keys of every retirement of ``engine`` in progress to running,
    non-retiring workers with room; update the records first (state, aborts)."""

    #: The engine whose retirements this policy serves
    engine: RetirementEngine

    def __init__(self, engine: RetirementEngine):
        self.engine = engine

    def __repr__(self) -> str:
        return "RetireSafely()"

    def run(self) -> SuggestionGenerator:
        engine = self.engine
        retiring = retiring_workers(engine.scheduler)
        recipients = engine.scheduler.running - retiring
        for rt in engine.in_progress():
            unsafe = engine.step(rt, retiring, recipients)
            now = time()
            for ts in unsafe if rt.state in ("draining", "moving") else ():
                asked = rt.copies.get(ts.key)
                if asked is not None and now - asked[1] < COPY_TIMEOUT:
                    continue
                pool = workers_with_room(
                    ts.nbytes,
                    self.manager.workers_memory,
                    recipients,
                    measure=self.manager.measure,
                )
                if not pool:
                    engine.abort(rt, engine.no_room(ts, recipients))
                    break
                choice = yield Suggestion("replicate", ts, pool)
                if choice is not None:
                    rt.copies[ts.key] = (choice.address, now)
        if not any(True for _ in engine.in_progress()):
            self.manager.stop()


class RetirementEngine:
    """The retirements of one scheduler, served by the scheduler plugin's handlers
    (see amm_core.plugin for the message shapes)."""

    scheduler: Scheduler
    #: The scheduler plugin (not asked whether a worker may go)
    plugin: object
    #: Records by worker name
    records: dict[str, Retirement]
    #: The memory measure of the main AMM, for room checks
    measure: Callable[[], str]
    #: The engine's own AMM, running RetireSafely while retirements are in progress
    amm: ActiveMemoryManagerExtension

    def __init__(
        self, scheduler: Scheduler, plugin: object, measure: Callable[[], str]
    ):
        self.scheduler = scheduler
        self.plugin = plugin
        self.measure = measure
        self.records = {}
        self.amm = ActiveMemoryManagerExtension(
            scheduler,
            policies={RetireSafely(self)},
            measure=measure(),
            register=False,
            start=False,
            interval=RETIREMENT_INTERVAL,
        )

    def handlers(self) -> dict[str, Any]:
        return {
            "amm_core_retire": self.retire,
            "amm_core_retirements": self.reports,
            "amm_core_cancel_retirement": self.cancel,
            "amm_core_forget_retirement": self.forget,
            "amm_core_retirement_candidates": self.candidates,
            "amm_core_scaling": self.scaling,
        }

    def in_progress(self) -> Iterable[Retirement]:
        """Records whose worker is still watched (draining, moving, done)."""
        return [rt for rt in self.records.values() if rt.state in ACTIVE and not rt.left]

    def reports(self) -> list[dict[str, Any]]:
        return [rt.report() for _, rt in sorted(self.records.items())]

    # --- handlers -------------------------------------------------------------

    def retire(
        self,
        workers: list[str],
        limit: float,
        drain: bool = True,
        reason: str = "",
        keep_out: bool = True,
    ) -> dict[str, Any]:
        """Start retiring ``workers`` (names or addresses); return at once. With
        ``keep_out=False`` a new process of the same name is let in once the old one
        left (its record is dropped then)."""
        names = self._names(workers)
        if (
            isinstance(limit, bool)
            or not isinstance(limit, (int, float))
            or not math.isfinite(limit)
            or limit <= 0
        ):
            raise ValueError(f"limit must be a positive number of seconds, got {limit!r}")
        if not isinstance(drain, bool):
            raise ValueError(f"drain must be true or false, got {drain!r}")
        if not isinstance(reason, str):
            raise ValueError(f"reason must be a string, got {reason!r}")
        if not isinstance(keep_out, bool):
            raise ValueError(f"keep_out must be true or false, got {keep_out!r}")
        self.amm.measure = self.measure()
        found, unknown = self._lookup(names)
        for ws in found:
            rt = self.records.get(str(ws.name))
            if rt is not None and rt.state in ACTIVE:
                continue  # idempotent: already retiring or retired
            rt = Retirement(ws, float(limit), drain, reason, keep_out)
            self.records[rt.name] = rt
            veto = self.veto(ws)
            if veto:
                rt.prev_status = ws.status
                self.abort(rt, veto, put_back=False)
                continue
            set_status(self.scheduler, ws, Status.closing_gracefully)
            logger.info(
                "Retiring %s (%s) within %.0fs%s: %s",
                rt.name,
                ws.address,
                limit,
                ", letting its tasks finish" if drain else "",
                reason or "no reason given",
            )
        if any(True for _ in self.in_progress()):
            # A first cycle now, so that the reply says where each one stands
            self.amm.run_once()
            self.amm.start()
        wanted = {str(ws.name) for ws in found}
        return {
            "retirements": [
                rt.report() for name, rt in sorted(self.records.items()) if name in wanted
            ],
            "unknown": unknown,
        }

    def cancel(self, workers: list[str]) -> dict[str, Any]:
        """Put workers whose retirement is in progress (or done) back in service."""
        cancelled = []
        for name in self._names(workers):
            rt = self._record(name)
            if rt is not None and rt.state in ACTIVE and not rt.left:
                self.abort(rt, "cancelled")
                cancelled.append(rt.name)
        return {"cancelled": cancelled, "retirements": self.reports()}

    def forget(self, workers: list[str]) -> dict[str, Any]:
        """Drop the records of done or aborted retirements (the pod is gone). A done
        record whose worker is still connected is kept: forgetting it would let the
        worker sit closing_gracefully with no one watching; cancel it instead."""
        forgotten, kept = [], []
        for name in self._names(workers):
            rt = self._record(name)
            if rt is None:
                continue
            if rt.state in ("draining", "moving"):
                kept.append({"worker": rt.name, "reason": f"retirement is {rt.state}"})
            elif rt.state == "done" and not rt.left:
                kept.append(
                    {
                        "worker": rt.name,
                        "reason": "the worker is still connected; cancel the "
                        "retirement to put it back in service",
                    }
                )
            else:
                del self.records[rt.name]
                forgotten.append(rt.name)
        return {"forgotten": forgotten, "kept": kept}

    def candidates(self, workers: list[str], n: int) -> dict[str, Any]:
        """The ``n`` workers among ``workers`` best retired now: the fewest unsafe
        bytes, then the fewest tasks processing; the others, and why not."""
        names = self._names(workers)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        found, unknown = self._lookup(names)
        excluded = [
            {"worker": name, "reason": "not connected to the scheduler"}
            for name in unknown
        ]
        retiring = retiring_workers(self.scheduler)
        ranked = []
        for ws in found:
            name = str(ws.name)
            rt = self.records.get(name)
            why_not = ""
            if rt is not None and rt.state in ACTIVE:
                why_not = f"already retiring ({rt.state})"
            elif ws.status != Status.running:
                why_not = f"status is {ws.status.name}"
            else:
                why_not = self.veto(ws)
            if why_not:
                excluded.append({"worker": name, "reason": why_not})
                continue
            unsafe = unsafe_keys(ws, retiring)
            ranked.append(
                (
                    sum(ts.nbytes for ts in unsafe),
                    len(ws.processing),
                    name,
                    len(unsafe),
                    ws.address,
                )
            )
        ranked.sort()
        out = [
            {
                "worker": name,
                "address": address,
                "unique_bytes": nbytes,
                "unique_keys": nkeys,
                "tasks_running": ntasks,
                "why": f"{nbytes} bytes only it holds ({nkeys} keys), "
                f"{ntasks} task(s) processing",
            }
            for nbytes, ntasks, name, nkeys, address in ranked[:n]
        ]
        return {"candidates": out, "excluded": excluded}

    def scaling(self) -> dict[str, Any]:
        """What a caller that scales the cluster needs, in one answer: the
        scheduler's ``adaptive_target``, the bytes of every key in memory counted
        once, the pause threshold (this scheduler's config: workers of one image
        share it), and each worker (at most MAX_SCALING_WORKERS)."""
        seen: set[Any] = set()
        data_bytes = 0
        for ws in self.scheduler.workers.values():
            for ts in ws.has_what:
                if ts.key not in seen:
                    seen.add(ts.key)
                    data_bytes += ts.nbytes
        pause = dask.config.get("distributed.worker.memory.pause")
        workers = sorted(self.scheduler.workers.values(), key=lambda ws: str(ws.name))
        return {
            "target": int(self.scheduler.adaptive_target()),
            "data_bytes": data_bytes,
            "pause_fraction": float(pause) if pause else None,
            "worker_states": [
                {
                    "name": str(ws.name),
                    "address": ws.address,
                    "status": ws.status.name,
                    "memory_limit": int(ws.memory_limit or 0),
                    "nbytes": int(ws.nbytes),
                    "processing": len(ws.processing),
                }
                for ws in workers[:MAX_SCALING_WORKERS]
            ],
        }

    # --- plugin hooks ---------------------------------------------------------

    def worker_joined(self, address: str) -> None:
        """A worker registered: if a process of the same name is being or has been
        retired, keep this one out too (its pod is still to be deleted)."""
        ws = self.scheduler.workers.get(address)
        if ws is None:
            return
        rt = self.records.get(str(ws.name))
        if rt is None or rt.ws is ws:
            return
        if not rt.keep_out and rt.left:
            del self.records[rt.name]  # a fresh pod of the same Deployment: welcome
            return
        if rt.state not in ACTIVE:
            return
        rt.ws = ws
        rt.left = False
        rt.rejoined += 1
        rt.copies.clear()
        rt.offered.clear()
        set_status(self.scheduler, ws, Status.closing_gracefully)
        logger.info(
            "Worker %s (%s) registered again while its retirement is %s: keeping it "
            "closing_gracefully until its pod is gone",
            rt.name,
            address,
            rt.state,
        )
        self.amm.start()

    def status_changed(self, address: str, event: dict[str, Any]) -> None:
        """A worker's status changed (``handle_worker_status_change`` logs it, then
        acts on it). A worker under retirement reporting itself running is a process
        that registered again and finished starting up (it registers as init, then
        says running): set it back to closing_gracefully before the scheduler, which
        reads the status again after logging, gives it tasks. Changes by anyone else
        are seen at the next cycle and abort the retirement."""
        if event.get("status") != Status.running.name or not str(
            event.get("stimulus_id", "")
        ).startswith("worker-status-change"):
            return
        ws = self.scheduler.workers.get(address)
        rt = self.records.get(str(ws.name)) if ws is not None else None
        if ws is not None and rt is not None and rt.ws is ws and rt.state in ACTIVE:
            set_status(self.scheduler, ws, Status.closing_gracefully)

    def worker_left(self, address: str) -> None:
        for rt in self.records.values():
            if rt.ws.address != address or rt.left or rt.state not in ACTIVE:
                continue
            rt.left = True
            rt.wasted_tasks = max(rt.wasted_tasks, len(rt.ws.processing), rt.tasks_running)
            if rt.state != "done":
                rt.state = "aborted"
                rt.ended = time()
                rt.abort_reason = (
                    "the worker left the cluster mid-retirement (its process died or "
                    f"was killed) with {rt.keys_left} unsafe key(s) "
                    f"({rt.bytes_left} bytes) and {rt.tasks_running} task(s) running"
                )
                logger.warning("Retirement of %s: %s", rt.name, rt.abort_reason)

    # --- mechanics ------------------------------------------------------------

    @staticmethod
    def _names(workers: Any) -> list[str]:
        if not isinstance(workers, (list, tuple)) or not all(
            isinstance(w, str) for w in workers
        ):
            raise ValueError(f"workers must be a list of names or addresses, got {workers!r}")
        return list(workers)

    def _lookup(self, names: list[str]) -> tuple[list[WorkerState], list[str]]:
        """Workers by name or address, in the given order; and the names not found."""
        by_name = {str(ws.name): ws for ws in self.scheduler.workers.values()}
        found: list[WorkerState] = []
        unknown = []
        for name in names:
            ws = self.scheduler.workers.get(name) or by_name.get(name)
            if ws is None:
                unknown.append(name)
            elif ws not in found:
                found.append(ws)
        return found, unknown

    def _record(self, name: str) -> Retirement | None:
        rt = self.records.get(name)
        if rt is None:
            rt = next((r for r in self.records.values() if r.ws.address == name), None)
        return rt

    def veto(self, ws: WorkerState) -> str:
        """Why ``ws`` cannot go without losing something ("" if it can): actors,
        long-running tasks, or a scheduler plugin's valid_workers_downscaling (called
        as Scheduler.workers_to_close does)."""
        if ws.actors:
            keys = sorted(str(ts.key) for ts in ws.actors)
            return f"the worker holds actor(s) {keys}, which cannot be moved"
        if ws.long_running:
            keys = sorted(str(ts.key) for ts in ws.long_running)
            return (
                f"the worker runs long-running (seceded) task(s) {keys}, which would "
                "be lost"
            )
        for name, plugin in list(self.scheduler.plugins.items()):
            if plugin is self.plugin:
                continue
            # Third-party code: whatever it raises must not break the handler or
            # the AMM cycle; it counts as a veto.
            try:
                valid = plugin.valid_workers_downscaling(self.scheduler, [ws])
            except Exception as e:
                logger.exception("valid_workers_downscaling of plugin %r failed", name)
                return (
                    f"scheduler plugin {name!r} failed to say whether the worker may "
                    f"go ({type(e).__name__}: {e})"
                )
            if ws not in valid:
                return (
                    f"scheduler plugin {name!r} vetoes removing the worker "
                    "(valid_workers_downscaling; e.g. a P2P shuffle in progress on it)"
                )
        return ""

    def no_room(self, ts: TaskState, recipients: set[WorkerState]) -> str:
        if not recipients:
            return (
                "no running worker that is not itself retiring is left to take its "
                "unsafe keys"
            )
        return (
            f"no running worker that is not retiring has room for key {ts.key!r} "
            f"({ts.nbytes} bytes) below its pause threshold"
        )

    def abort(self, rt: Retirement, why: str, put_back: bool = True) -> None:
        rt.state = "aborted"
        rt.abort_reason = why
        rt.ended = time()
        ws = rt.ws
        if put_back and self.scheduler.workers.get(ws.address) is ws:
            back = rt.prev_status if rt.prev_status == Status.paused else Status.running
            if ws.status == Status.closing_gracefully:
                set_status(self.scheduler, ws, back)
        logger.warning("Retirement of %s (%s) aborted: %s", rt.name, ws.address, why)

    def step(
        self, rt: Retirement, retiring: set[WorkerState], recipients: set[WorkerState]
    ) -> list[TaskState]:
        """Update ``rt`` at an AMM cycle; return the worker's unsafe keys."""
        ws = rt.ws
        if self.scheduler.workers.get(ws.address) is not ws:
            self.worker_left(ws.address)
            return []
        if ws.status != Status.closing_gracefully:
            self.abort(
                rt, f"someone else set the worker {ws.status.name}", put_back=False
            )
            return []
        veto = self.veto(ws)
        if veto:
            self.abort(rt, veto)
            return []
        self._count_landed(rt)
        self._offer_queued(rt, recipients)
        unsafe = unsafe_keys(ws, retiring)
        rt.keys_left = len(unsafe)
        rt.bytes_left = sum(ts.nbytes for ts in unsafe)
        rt.tasks_running = len(ws.processing)
        if not rt.drain:
            rt.wasted_tasks = rt.tasks_running
        if rt.drain and ws.processing:
            state: State = "draining"
        elif unsafe:
            state = "moving"
        else:
            state = "done"
        now = time()
        if state != "done" and now - rt.started > rt.limit:
            self.abort(
                rt,
                f"the limit of {rt.limit:g}s passed with {rt.keys_left} unsafe key(s) "
                f"({rt.bytes_left} bytes) and {rt.tasks_running} task(s) running",
            )
            return []
        if state != rt.state:
            logger.info("Retirement of %s: %s -> %s", rt.name, rt.state, state)
            rt.ended = now if state == "done" else None
        rt.state = state
        return unsafe

    def _count_landed(self, rt: Retirement) -> None:
        now = time()
        for key, (address, asked) in list(rt.copies.items()):
            ts = self.scheduler.tasks.get(key)
            if ts is None or ts.state != "memory":
                del rt.copies[key]
            elif any(ws.address == address for ws in ts.who_has or ()):
                del rt.copies[key]
                rt.keys_moved += 1
                rt.bytes_moved += ts.nbytes
            elif now - asked >= COPY_TIMEOUT:
                del rt.copies[key]

    def _offer_queued(self, rt: Retirement, recipients: set[WorkerState]) -> None:
        """Offer the tasks assigned to the worker to running, non-retiring workers
        through the work-stealing protocol: a closing_gracefully worker starts no
        task, and the worker gives up only those it has not started. Needs the
        work-stealing extension (on by default); without it, assigned tasks wait."""
        stealing = self.scheduler.extensions.get("stealing")
        ws = rt.ws
        if stealing is None or not recipients:
            return
        for ts in list(ws.processing):
            if ts.key in rt.offered or ts in ws.long_running or ts in stealing.in_flight:
                continue
            valid = self.scheduler.valid_workers(ts)
            pool = recipients if valid is None else recipients & valid
            if not pool:
                continue
            thief = min(pool, key=lambda w: (w.occupancy / max(w.nthreads, 1), w.address))
            rt.offered.add(ts.key)
            stealing.move_task_request(ts, ws, thief)
