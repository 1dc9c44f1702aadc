"""Graceful retirement of workers before their pods go: a non-blocking engine that
copies away what only a retiring worker holds, through an Active Memory Manager of
its own, and tells the caller (the dask-memory-operator, or a pod's preStop hook)
when the pod may go.

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
workers in service through the work-stealing protocol (the worker itself confirms it
has not started them; a private, never-balancing ``WorkStealing`` serves when the
scheduler runs without work stealing); with ``drain`` the tasks it is running finish
first. A :class:`RetireSafely` policy copies every key that is not *safe* (a copy on
a worker in service: amm_core.departures) to workers in service with room
(:mod:`amm_core._room`, counting the copies still in flight). The record goes
``draining`` (tasks still running) -> ``moving`` (unsafe keys left) -> ``done``.

**Two callers, two promises.**

- The operator (``keep_out=True``) *proposes* a retirement: if it cannot finish
  without losing something (the limit passes; no worker in service has room; the
  worker holds actors or runs a ``long_running`` (seceded) task; a scheduler plugin
  vetoes its downscaling, as P2P shuffles do) it is ``aborted`` and the engine puts
  back exactly what it changed (the status it set, and only if it set it), and the
  operator keeps the pod.
- A preStop hook (``keep_out=False``) *announces* that the pod is going, whatever
  happens. Its worker is leaving from the call on (amm_core.departures): it is never
  put back in service, and what would abort an operator's retirement only
  ``blocked`` it: the engine keeps moving what can be moved until the worker leaves.

**``done`` is a commit.** The cycle that finds nothing running and nothing unsafe
marks the record ``done`` and its worker leaving in one event-loop step: from then
on the worker is out of every recipient and task set, its safe copies cannot be
dropped (the departures' drop guard), a veto that appears later changes nothing, and
``amm_core_cancel_retirement`` refuses it. Whatever lands on the worker later (a
task that ran without drain) is still copied away while it lives.

**Who is kept out.** A process registering under the name of a record the engine
keeps out is set ``closing_gracefully`` at once (:meth:`RetirementEngine.worker_joined`),
before the scheduler gives it anything: for the operator's retirements any process
of that name (its Deployment is going); for a hook's, only a process of the same pod
(same nanny, or same host without one): a nanny restarting the worker inside the
dying pod is kept out, the Deployment's next pod is welcome. A name the operator
asked to retire that is not connected yet is *barred* for :data:`BAR_SECONDS`: a
worker registering under it in the gap before its Deployment is deleted is kept out
too.

**Bounded.** Records end when their worker has left (or their retirement aborted)
and are dropped :data:`RECORD_TTL` seconds later; at most :data:`MAX_RECORDS` are
kept, the oldest ended ones going first.

The policy runs in an AMM of the engine's own (like the ad-hoc one of
``retire_workers`` when the main AMM is off), so that retirements go on whether the
main AMM runs or not and whatever configs the operator applies to it.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import dask
from distributed.active_memory_manager import (
    ActiveMemoryManagerExtension,
    ActiveMemoryManagerPolicy,
    Suggestion,
    SuggestionGenerator,
)
from distributed.core import Status
from distributed.metrics import time
from distributed.stealing import WorkStealing

from amm_core._room import pause_fraction, room
from amm_core.departures import Departures, out_of_service, set_status

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler, TaskState, WorkerState

logger = logging.getLogger(__name__)

#: Seconds between cycles of the engine's AMM. Short, because the caller waits on the
#: retirement to delete a pod and copies start only at a cycle; not shorter, because
#: every cycle walks the keys of every retiring worker on the scheduler's event loop.
RETIREMENT_INTERVAL = 0.5
#: Seconds after which a copy asked for and not landed is asked for again (its
#: recipient may have been slow, or died without the scheduler knowing yet), plus the
#: time its bytes take at the slowest transfer rate expected
COPY_TIMEOUT = 10.0
#: Bytes per second a copy is expected to move at, at the least
SLOWEST_TRANSFER_RATE = 20e6
#: Workers listed by ``amm_core_scaling`` (bounded: the caller refuses larger answers)
MAX_SCALING_WORKERS = 1000
#: Records kept at most (and reported at most); the oldest ended ones go first
MAX_RECORDS = 500
#: Seconds an ended record (aborted, or its worker left) is kept for its caller to read
RECORD_TTL = 600.0
#: Seconds a name the operator retires before its worker connected stays barred
BAR_SECONDS = 300.0

State = Literal["draining", "moving", "done", "aborted"]
#: States in which the engine still watches the worker
ACTIVE: frozenset[str] = frozenset({"draining", "moving", "done"})


def retiring_workers(scheduler: Scheduler) -> set[WorkerState]:
    """Workers whose copies go with them (not in service: amm_core.departures)."""
    return out_of_service(scheduler)


def is_safe(ts: TaskState, retiring: set[WorkerState]) -> bool:
    """The safe-key rule: a key on a retiring worker is safe only if a copy sits on a
    worker in service (``retiring``: :func:`retiring_workers`). Copies on other
    retiring or leaving workers do not count: they go too."""
    return any(ws not in retiring for ws in ts.who_has or ())


def unsafe_keys(ws: WorkerState, retiring: set[WorkerState]) -> list[TaskState]:
    """The keys ``ws`` holds that would be lost if it went now, with ``retiring``
    (whether or not ``ws`` is retiring yet)."""
    leaving = retiring | {ws}
    return [ts for ts in ws.has_what if not is_safe(ts, leaving)]


def process_of(ws: WorkerState) -> str:
    """What tells one pod's processes from another's: the nanny's address (it
    survives a worker restart inside the pod), else the host (the pod's IP)."""
    return ws.nanny or ws.host


def _some(tasks: Iterable[TaskState], most: int = 5) -> str:
    """A few keys for a message (messages are bounded: the operator reads them)."""
    keys = sorted(str(ts.key)[:100] for ts in tasks)
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return f"{keys[:most]}{more}"


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
    #: Why a leaving worker's retirement cannot finish now ("" otherwise): what would
    #: abort a proposed retirement
    blocked: str
    #: Seconds from ``started`` after which an unfinished retirement is aborted
    limit: float
    #: Let running tasks finish before ``done`` (else they are rescheduled when the
    #: worker leaves, and counted in ``wasted_tasks``)
    drain: bool
    #: The status the engine changed the worker from (None: it did not change it),
    #: put back when a proposed retirement aborts
    set_from: Status | None
    #: Scheduler time the retirement started, and reached done/aborted (None: not yet)
    started: float
    ended: float | None
    #: Scheduler time its worker left (None: not yet); with ``ended``, what the
    #: record's time to live counts from
    left_at: float | None
    #: As of the latest cycle: unsafe keys and their bytes, tasks processing there
    keys_left: int
    bytes_left: int
    tasks_running: int
    #: Copies that landed on a recipient, and their bytes
    keys_moved: int
    bytes_moved: int
    #: Tasks lost to the worker leaving (or, with drain=False, that will be)
    wasted_tasks: int
    #: Keys, and their bytes, the scheduler lost when the worker left (its own
    #: accounting: the remove-worker event's lost computed and scattered keys)
    keys_lost: int
    bytes_lost: int
    #: The worker left the cluster
    left: bool
    #: Times a process of this name registered again and was kept out
    rejoined: int
    #: Who asked: the operator (True: any process of the name is kept out while the
    #: record lives) or a preStop hook (False: the pod is going whatever happens; only
    #: a process of the same pod is kept out)
    keep_out: bool
    #: The worker's pod is going: never put back in service (amm_core.departures)
    leaving: bool
    #: :func:`process_of` the retired worker
    process: str
    #: Copies asked for and not landed yet: key -> (recipient address, bytes, when)
    copies: dict[Any, tuple[str, int, float]]
    #: Keys of tasks already offered to other workers (each is offered once: a task
    #: the worker refuses to give up is executing, and will finish)
    offered: set[Any]

    def __init__(
        self, ws: WorkerState, limit: float, drain: bool, requested: str, keep_out: bool = True
    ) -> None:
        self.ws = ws
        self.keep_out = keep_out
        self.leaving = not keep_out
        self.process = process_of(ws)
        self.name = str(ws.name)
        self.state = "draining" if drain else "moving"
        self.requested = requested
        self.abort_reason = self.blocked = ""
        self.limit = limit
        self.drain = drain
        self.set_from = None
        self.started = time()
        self.ended = self.left_at = None
        self.keys_left = self.bytes_left = self.tasks_running = 0
        self.keys_moved = self.bytes_moved = self.wasted_tasks = 0
        self.keys_lost = self.bytes_lost = 0
        self.left = False
        self.rejoined = 0
        self.copies = {}
        self.offered = set()

    def __repr__(self) -> str:
        return f"<Retirement {self.name} ({self.ws.address}): {self.state}>"

    @property
    def watched(self) -> bool:
        """The engine still acts for this worker (moves its keys, keeps it out)."""
        return not self.left and self.state in ACTIVE

    def ended_before(self, when: float) -> bool:
        """The record is over (its worker left, or its retirement aborted) since
        before ``when``."""
        if not (self.left or self.state == "aborted"):
            return False
        return max(self.ended or 0, self.left_at or 0) < when

    def report(self) -> dict[str, Any]:
        """Plain data (msgpack-able)."""
        end = self.ended if self.ended is not None else time()
        return {
            "worker": self.name,
            "address": self.ws.address,
            "state": self.state,
            "reason": self.abort_reason or self.requested,
            "requested": self.requested,
            "blocked": self.blocked,
            "keys_left": self.keys_left,
            "bytes_left": self.bytes_left,
            "tasks_running": self.tasks_running,
            "keys_moved": self.keys_moved,
            "bytes_moved": self.bytes_moved,
            "wasted_tasks": self.wasted_tasks,
            "keys_lost": self.keys_lost,
            "bytes_lost": self.bytes_lost,
            "started": self.started,
            "seconds": end - self.started,
            "limit": self.limit,
            "drain": self.drain,
            "left": self.left,
            "rejoined": self.rejoined,
            "keep_out": self.keep_out,
            "leaving": self.leaving,
        }


class RetireSafely(ActiveMemoryManagerPolicy):
    """Copy the unsafe keys of every retirement of ``engine`` still watched to workers
    in service with room; update the records first (state, aborts)."""

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
        unsafe_by_record = [
            (rt, engine.step(rt, retiring, recipients)) for rt in engine.in_progress()
        ]
        rooms = self._rooms(engine, recipients)
        now = time()
        for rt, unsafe in unsafe_by_record:
            if not rt.watched:
                continue
            for ts in unsafe:
                asked = rt.copies.get(ts.key)
                if asked is not None and now - asked[2] < engine.copy_timeout(asked[1]):
                    continue
                best = rooms.best(ts.nbytes)
                if best is None:
                    engine.cannot_finish(rt, engine.no_room(ts, recipients))
                    break
                choice = yield Suggestion("replicate", ts, {best})
                if choice is not None:
                    rooms.take(choice, ts.nbytes)
                    rt.copies[ts.key] = (choice.address, ts.nbytes, now)
        if not engine.in_progress():
            self.manager.stop()

    def _rooms(self, engine: RetirementEngine, recipients: set[WorkerState]) -> Rooms:
        """The room of each recipient, once for this cycle, less the copies asked for
        in earlier cycles and not landed: without them, retirements started in
        successive cycles (one per hook in a drain) could each fill the same
        recipient."""
        in_flight = engine.bytes_in_flight()
        memory = self.manager.workers_memory
        pause_at = pause_fraction() or 1.0
        return Rooms(
            (ws, room(ws, memory, self.manager.measure, pause_at) - in_flight.get(ws.address, 0))
            for ws in recipients
        )


class Rooms:
    """Recipients by the room they have left in this cycle, most first: picking one
    for a key is O(log n), not a walk of every recipient per key."""

    #: (-room, address, worker): a heap; an entry is stale when its room changed
    _heap: list[tuple[float, str, WorkerState]]
    _room: dict[WorkerState, float]

    def __init__(self, rooms: Iterable[tuple[WorkerState, float]]):
        self._room = dict(rooms)
        self._heap = [(-r, ws.address, ws) for ws, r in self._room.items()]
        heapq.heapify(self._heap)

    def best(self, nbytes: int) -> WorkerState | None:
        """The recipient with the most room, if it has room for ``nbytes``."""
        while self._heap:
            neg, _, ws = self._heap[0]
            if -neg != self._room[ws]:  # stale
                heapq.heappop(self._heap)
                continue
            return ws if -neg >= nbytes else None
        return None

    def take(self, ws: WorkerState, nbytes: int) -> None:
        self._room[ws] = self._room.get(ws, 0.0) - nbytes
        heapq.heappush(self._heap, (-self._room[ws], ws.address, ws))


class RetirementEngine:
    """The retirements of one scheduler, served by the scheduler plugin's handlers
    (see amm_core.plugin for the message shapes)."""

    scheduler: Scheduler
    #: The scheduler plugin (not asked whether a worker may go)
    plugin: object
    #: Records by worker name
    records: dict[str, Retirement]
    #: Names retired before their worker connected: name -> (until, limit, drain, reason)
    bars: dict[str, tuple[float, float, bool, str]]
    #: What the scheduler said a worker's removal lost, until worker_left reads it:
    #: address -> (keys, bytes, tasks that were processing)
    _removals: dict[str, tuple[int, int, int]]
    #: The leaving workers and the guards that follow from them
    departures: Departures
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
        self.bars = {}
        self._removals = {}
        self.departures = Departures.of(scheduler) or Departures(scheduler)
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

    def in_progress(self) -> list[Retirement]:
        """Records whose worker is still watched (draining, moving, done)."""
        return [rt for rt in self.records.values() if rt.watched]

    def reports(self) -> list[dict[str, Any]]:
        """Every record's report by name; at most MAX_RECORDS, those still watched
        first."""
        kept = sorted(self.records.values(), key=lambda rt: not rt.watched)[:MAX_RECORDS]
        return [rt.report() for rt in sorted(kept, key=lambda rt: rt.name)]

    def bytes_in_flight(self) -> dict[str, int]:
        """Bytes of copies asked for and not landed yet, by recipient address."""
        out: defaultdict[str, int] = defaultdict(int)
        for rt in self.in_progress():
            for address, nbytes, _ in rt.copies.values():
                out[address] += nbytes
        return out

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
        ``keep_out=False`` (a preStop hook) the pod is going whatever happens: see
        the module docstring. With ``keep_out=True`` a name not connected is barred."""
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
            if rt is not None and rt.watched and rt.ws is ws:
                if not keep_out and not rt.leaving:
                    self._make_leaving(rt, "its pod is going (preStop)")
                continue  # idempotent: already retiring or retired
            self._start(Retirement(ws, float(limit), drain, reason, keep_out))
        if keep_out:
            until = time() + BAR_SECONDS
            for name in unknown[: max(0, MAX_RECORDS - len(self.bars))]:
                self.bars[name] = (until, float(limit), drain, reason)
        self._prune()
        if self.in_progress():
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

    def _start(self, rt: Retirement) -> None:
        ws = rt.ws
        self.records[rt.name] = rt
        self.bars.pop(rt.name, None)
        veto = self.veto(ws)
        if veto and not rt.leaving:
            self.abort(rt, veto)  # nothing changed yet: nothing to put back
            return
        if ws.status in (Status.running, Status.paused):
            rt.set_from = ws.status
            set_status(self.scheduler, ws, Status.closing_gracefully)
        if rt.leaving:
            self.departures.add(ws, rt.requested or "retired by its preStop hook")
        logger.info(
            "Retiring %s (%s) within %.0fs%s: %s",
            rt.name,
            ws.address,
            rt.limit,
            ", letting its tasks finish" if rt.drain else "",
            rt.requested or "no reason given",
        )

    def cancel(self, workers: list[str]) -> dict[str, Any]:
        """Put workers whose retirement is in progress back in service; a done one,
        or one whose pod is going, is kept (listed with why)."""
        cancelled, kept = [], []
        for name in self._names(workers):
            rt = self._record(name)
            if rt is None or not rt.watched:
                continue
            if rt.leaving:
                why = "it is done: its worker is committed to leave" if rt.state == "done" \
                    else "its pod is going (preStop)"
                kept.append({"worker": rt.name, "reason": why})
                continue
            self.abort(rt, "cancelled")
            cancelled.append(rt.name)
        return {"cancelled": cancelled, "kept": kept, "retirements": self.reports()}

    def forget(self, workers: list[str]) -> dict[str, Any]:
        """Drop the records of ended retirements (the pod is gone) and bars. A record
        whose worker is still connected and watched is kept."""
        forgotten, kept = [], []
        for name in self._names(workers):
            if self.bars.pop(name, None) is not None:
                forgotten.append(name)
            rt = self._record(name)
            if rt is None:
                continue
            if rt.state in ("draining", "moving") and not rt.left:
                kept.append({"worker": rt.name, "reason": f"retirement is {rt.state}"})
            elif rt.state == "done" and not rt.left:
                kept.append(
                    {
                        "worker": rt.name,
                        "reason": "the worker is still connected; it is committed to "
                        "leave and kept out until it has",
                    }
                )
            else:
                del self.records[rt.name]
                if rt.name not in forgotten:
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
            if rt is not None and rt.watched:
                why_not = f"already retiring ({rt.state})"
            elif ws in self.departures.leaving:
                why_not = "its pod is going"
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
        """A worker registered (called before the scheduler gives it anything): keep
        it out if its name is barred, or its pod is going (see the module
        docstring)."""
        ws = self.scheduler.workers.get(address)
        if ws is None:
            return
        name = str(ws.name)
        rt = self.records.get(name)
        if rt is not None and rt.ws is ws:
            return
        if rt is None or not self._keeps_out(rt, ws):
            if rt is not None and rt.left and not rt.keep_out:
                del self.records[name]  # the Deployment's next pod: welcome
            self._join_barred(ws)
            return
        rt.ws = ws
        rt.left, rt.left_at = False, None
        rt.rejoined += 1
        rt.copies.clear()
        rt.offered.clear()
        if rt.state == "aborted":  # a hook's retirement whose process died: go on
            rt.state, rt.abort_reason, rt.ended = "moving", "", None
        if rt.leaving:
            self.departures.add(ws, "a process of a leaving pod registered again")
        set_status(self.scheduler, ws, Status.closing_gracefully)
        logger.info(
            "Worker %s (%s) registered again while its retirement is %s: keeping it "
            "closing_gracefully until its pod is gone",
            rt.name,
            address,
            rt.state,
        )
        self.amm.start()

    def _keeps_out(self, rt: Retirement, ws: WorkerState) -> bool:
        if rt.keep_out:
            return rt.state in ACTIVE
        return process_of(ws) == rt.process

    def _join_barred(self, ws: WorkerState) -> None:
        bar = self.bars.pop(str(ws.name), None)
        if bar is None or bar[0] < time():
            return
        _, limit, drain, reason = bar
        rt = Retirement(ws, limit, drain, reason, keep_out=True)
        rt.leaving = True
        logger.info("Worker %s registered under a barred name: retiring it", rt.name)
        self._start(rt)
        self.amm.start()

    def status_changed(self, address: str, event: dict[str, Any]) -> None:
        """A worker's status changed (``handle_worker_status_change`` logs it, then
        acts on it). A leaving worker is kept out (amm_core.departures). A worker
        under a proposed retirement reporting itself running is a process that
        registered again and finished starting up (it registers as init, then says
        running): set it back to closing_gracefully before the scheduler, which reads
        the status again after logging, gives it tasks. Changes by anyone else are
        seen at the next cycle and abort the retirement."""
        self.departures.status_changed(address, event)
        if event.get("status") != Status.running.name or not str(
            event.get("stimulus_id", "")
        ).startswith("worker-status-change"):
            return
        ws = self.scheduler.workers.get(address)
        rt = self.records.get(str(ws.name)) if ws is not None else None
        if ws is not None and rt is not None and rt.ws is ws and rt.watched and not rt.leaving:
            rt.set_from = Status.running  # the engine set it now: its to put back
            set_status(self.scheduler, ws, Status.closing_gracefully)

    def worker_removed(self, address: str, event: dict[str, Any]) -> None:
        """The scheduler's ``remove-worker`` event (logged before plugins hear of the
        removal): what it lost, for :meth:`worker_left`."""
        if not any(rt.ws.address == address for rt in self.records.values()):
            return
        lost = [*event.get("lost-computed-tasks", ()), *event.get("lost-scattered-tasks", ())]
        tasks = self.scheduler.tasks
        nbytes = sum(tasks[k].nbytes for k in lost if k in tasks)
        self._removals[address] = (len(lost), nbytes, len(event.get("processing-tasks", ())))

    def worker_left(self, address: str) -> None:
        """The worker left: its records end. One not done yet ends ``done`` if the
        scheduler lost nothing with it and it ran nothing, else ``aborted``."""
        self.departures.worker_left(address)
        keys_lost, bytes_lost, processing = self._removals.pop(address, (None, 0, 0))
        now = time()
        for rt in self.records.values():
            if rt.ws.address != address or rt.left:
                continue
            was_watched = rt.watched
            rt.left, rt.left_at = True, now
            if not was_watched:
                continue  # an aborted record: only its worker's leaving is news
            rt.wasted_tasks = max(rt.wasted_tasks, processing, rt.tasks_running)
            if keys_lost is not None:
                rt.keys_lost, rt.bytes_lost = keys_lost, bytes_lost
            if rt.state == "done":
                continue
            if keys_lost == 0 and rt.wasted_tasks == 0:
                rt.state, rt.ended = "done", now  # nothing went with it
                continue
            rt.state = "aborted"
            rt.ended = now
            rt.abort_reason = (
                "the worker left the cluster mid-retirement (its process died or its "
                f"pod went) with {rt.keys_left if keys_lost is None else keys_lost} "
                f"unsafe key(s) ({rt.bytes_left if keys_lost is None else bytes_lost} "
                f"bytes) and {rt.wasted_tasks} task(s) running"
            )
            logger.warning("Retirement of %s: %s", rt.name, rt.abort_reason)
        self._prune()

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

    def _prune(self) -> None:
        """Drop ended records past their TTL, then the oldest ended ones over
        MAX_RECORDS; and expired bars."""
        now = time()
        for name in [n for n, rt in self.records.items() if rt.ended_before(now - RECORD_TTL)]:
            del self.records[name]
        excess = len(self.records) - MAX_RECORDS
        if excess > 0:
            ended = sorted(
                (rt for rt in self.records.values() if rt.ended_before(now)),
                key=lambda rt: rt.ended or 0,
            )
            for rt in ended[:excess]:
                del self.records[rt.name]
        for name in [n for n, bar in self.bars.items() if bar[0] < now]:
            del self.bars[name]

    def _make_leaving(self, rt: Retirement, why: str) -> None:
        rt.leaving = True
        self.departures.add(rt.ws, why)

    def veto(self, ws: WorkerState) -> str:
        return downscaling_veto(self.scheduler, ws, skip=self.plugin)

    def no_room(self, ts: TaskState, recipients: set[WorkerState]) -> str:
        if not recipients:
            return "no worker in service is left to take its unsafe keys"
        return (
            f"no worker in service has room for key {ts.key!r} "
            f"({ts.nbytes} bytes) below its pause threshold"
        )

    def cannot_finish(self, rt: Retirement, why: str) -> None:
        """A proposed retirement aborts; a leaving worker's is only blocked (the
        engine keeps moving what it can until the worker leaves); a done one is
        committed and stays so."""
        if rt.state == "done":
            return
        if rt.leaving:
            if rt.blocked != why:
                logger.info("Retirement of %s blocked: %s", rt.name, why)
            rt.blocked = why
        else:
            self.abort(rt, why)

    def abort(self, rt: Retirement, why: str) -> None:
        """End a proposed retirement, putting back exactly what the engine changed:
        the worker's status, if the engine set it closing_gracefully and it still is."""
        rt.state = "aborted"
        rt.abort_reason = why
        rt.ended = time()
        ws = rt.ws
        if (
            rt.set_from is not None
            and self.scheduler.workers.get(ws.address) is ws
            and ws.status == Status.closing_gracefully
        ):
            set_status(self.scheduler, ws, rt.set_from)
        logger.warning("Retirement of %s (%s) aborted: %s", rt.name, ws.address, why)

    def step(
        self, rt: Retirement, retiring: set[WorkerState], recipients: set[WorkerState]
    ) -> list[TaskState]:
        """Update ``rt`` at an AMM cycle; return the worker's unsafe keys."""
        ws = rt.ws
        if self.scheduler.workers.get(ws.address) is not ws:
            self.worker_left(ws.address)
            return []
        if not rt.leaving and ws.status != Status.closing_gracefully:
            rt.set_from = None  # not the engine's to put back any more
            self.abort(rt, f"someone else set the worker {ws.status.name}")
            return []
        self._count_landed(rt)
        self._offer_queued(rt, recipients)
        unsafe = unsafe_keys(ws, retiring)
        rt.keys_left = len(unsafe)
        rt.bytes_left = sum(ts.nbytes for ts in unsafe)
        rt.tasks_running = len(ws.processing)
        if not rt.drain:
            rt.wasted_tasks = rt.tasks_running
        if rt.state == "done":
            return unsafe  # committed: move what lands on it late, nothing else
        blocker = self.veto(ws)
        if not blocker and time() - rt.started > rt.limit:
            blocker = (
                f"the limit of {rt.limit:g}s passed with {rt.keys_left} unsafe key(s) "
                f"({rt.bytes_left} bytes) and {rt.tasks_running} task(s) running"
            )
        if blocker:
            self.cannot_finish(rt, blocker)
            if not rt.watched:
                return []
        else:
            rt.blocked = ""
        if rt.drain and ws.processing:
            state: State = "draining"
        elif unsafe or blocker:
            state = "moving"
        else:
            state = "done"
        if state != rt.state:
            logger.info("Retirement of %s: %s -> %s", rt.name, rt.state, state)
        rt.state = state
        if state == "done":
            # The commit, in this same step: the worker is out of every recipient and
            # task set, and the drop guard pins its safe copies until it has left
            rt.ended = time()
            self._make_leaving(rt, f"retirement done ({rt.requested or 'no reason'})")
        return unsafe

    def _count_landed(self, rt: Retirement) -> None:
        now = time()
        for key, (address, nbytes, asked) in list(rt.copies.items()):
            ts = self.scheduler.tasks.get(key)
            if ts is None or ts.state != "memory":
                del rt.copies[key]
            elif any(ws.address == address for ws in ts.who_has or ()):
                del rt.copies[key]
                rt.keys_moved += 1
                rt.bytes_moved += ts.nbytes
            elif now - asked >= self.copy_timeout(nbytes):
                del rt.copies[key]

    @staticmethod
    def copy_timeout(nbytes: int) -> float:
        """Seconds to wait for a copy of ``nbytes`` before asking for it again."""
        return COPY_TIMEOUT + nbytes / SLOWEST_TRANSFER_RATE

    def _offer_queued(self, rt: Retirement, recipients: set[WorkerState]) -> None:
        hand_back_queued(self.scheduler, rt.ws, rt.offered, recipients)


def downscaling_veto(scheduler: Scheduler, ws: WorkerState, skip: object = None) -> str:
    """Why ``ws`` cannot go without losing something ("" if it can): actors,
    long-running tasks, or a scheduler plugin's valid_workers_downscaling (called
    as Scheduler.workers_to_close does; ``skip``: the asking plugin)."""
    if ws.actors:
        return f"the worker holds actor(s) {_some(ws.actors)}, which cannot be moved"
    if ws.long_running:
        return (
            f"the worker runs long-running (seceded) task(s) "
            f"{_some(ws.long_running)}, which would be lost"
        )
    for name, plugin in list(scheduler.plugins.items()):
        if plugin is skip:
            continue
        # Third-party code: whatever it raises must not break the handler or
        # the AMM cycle; it counts as a veto.
        try:
            valid = plugin.valid_workers_downscaling(scheduler, [ws])
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


def _stealing(scheduler: Scheduler) -> WorkStealing:
    """The scheduler's work stealing, or, when it runs without it, one that never
    balances (its start() is never called): only its request/confirm protocol is
    used. One per scheduler: it owns the ``steal-response`` stream handler."""
    for plugin in scheduler.plugins.values():
        if isinstance(plugin, WorkStealing):
            return plugin
    return WorkStealing(scheduler)  # registers itself as a plugin


def hand_back_queued(
    scheduler: Scheduler, ws: WorkerState, offered: set[Any], recipients: set[WorkerState]
) -> None:
    """Offer the tasks assigned to ``ws`` (a worker that starts no new task:
    closing_gracefully or paused) to ``recipients`` through the work-stealing
    protocol: the worker gives up only those it has not started. ``offered``: keys
    offered already (each once: a task the worker refuses to give up is executing,
    and will finish). Each goes to the least busy allowed recipient, counting the
    offers already made (a task with loose restrictions may go anywhere, as
    upstream's stealing lets it)."""
    if not recipients or not ws.processing:
        return
    stealing = _stealing(scheduler)

    def busy(w: WorkerState) -> tuple[float, str]:
        occupancy = w.occupancy + stealing.in_flight_occupancy[w]
        return occupancy / max(w.nthreads, 1), w.address

    for ts in list(ws.processing):
        if ts.key in offered or ts in ws.long_running or ts in stealing.in_flight:
            continue
        valid = scheduler.valid_workers(ts)
        pool = recipients if valid is None else recipients & valid
        if not pool and ts.loose_restrictions:
            pool = recipients
        if not pool:
            continue
        offered.add(ts.key)
        stealing.move_task_request(ts, ws, min(pool, key=busy))
