"""Graceful retirement of workers before their pods go: a non-blocking engine that
copies away what only a retiring worker holds, in a cycle of its own on the
scheduler's event loop, and tells the caller (the dask-memory-operator, or a pod's preStop hook)
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
first. The engine's cycle (:class:`RetireSafely`) copies every key that is not
*safe* (a copy on a worker in service: amm_core.departures) to workers in service
with room
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

**Counted.** When a worker leaves, what the engine moved off it is *rescued* and
what the scheduler lost with it is *lost*, with why (amm_core.savings); retirements
started, done and aborted are marked in the memory history (amm_core.history).

**Bounded.** Records end when their worker has left (or their retirement aborted)
and are dropped :data:`RECORD_TTL` seconds later; at most :data:`MAX_RECORDS` are
kept, the oldest ended ones going first.

The cycle is the engine's own, not a policy of the main AMM, so that retirements go
on whether the main AMM runs or not and whatever configs the operator applies to it
(as ``retire_workers`` runs an ad-hoc AMM when the main one is off). It asks for the
copies as an AMM does (``Scheduler.request_acquire_replicas``), without an AMM's
per-suggestion bookkeeping, which would cost more than the rest of the cycle.

**What a cycle costs.** It runs every :data:`RETIREMENT_INTERVAL` on the
scheduler's event loop, so it is bounded: it walks the keys of the retiring workers
(is each still unsafe?), asks each scheduler plugin once whether the workers may go,
ranks the recipients once, and asks for at most :data:`MAX_COPIES_PER_CYCLE` copies
(or for :data:`SLICE_SECONDS`); the unsafe keys beyond are found again and asked for
by the next cycles, the next one coming soon (:data:`CONTINUE_AFTER`). A copy in
flight (:class:`InFlight`) is asked for again only once its time is up
(:data:`COPY_TIMEOUT` plus its bytes at :data:`SLOWEST_TRANSFER_RATE`), by no
retirement, also not by another one that holds the same key. What lands, and what
leaves memory, is heard as it happens (amm_core.totals), not looked for.

Message shapes (plain data; each handler returns at once, the caller polls)::

    amm_core_retire(workers: [name | address, ...], limit: seconds,
                    drain: bool = True, reason: str = "", keep_out: bool = True)
        -> {"retirements": [retirement, ...], "unknown": [name, ...]}
        # idempotent: a worker already retiring or retired keeps its record;
        # a refused one (actors, long-running tasks, a plugin's veto) comes back
        # "aborted" with the reason
    amm_core_retirements() -> [retirement, ...]
    amm_core_cancel_retirement(workers) -> {"cancelled": [name, ...],
                                            "kept": [{"worker", "reason"}, ...],
                                            # done, or its pod is going
                                            "retirements": [retirement, ...]}
    amm_core_forget_retirement(workers) -> {"forgotten": [name, ...],
                                            "kept": [{"worker", "reason"}, ...]}

    retirement = {
        "worker": name, "address": str,
        "state": "draining" | "moving" | "done" | "aborted",
        "reason": str,                   # why aborted, else the caller's reason
        "requested": str,                # the caller's reason
        "blocked": str,                  # why a leaving worker's retirement cannot
                                         # finish now ("" if it can)
        "keys_left": int, "bytes_left": int,   # keys only it holds (not safe)
        "tasks_running": int, "keys_moved": int, "bytes_moved": int,
        "wasted_tasks": int,             # tasks lost (or to be lost, drain=False)
        "keys_lost": int, "bytes_lost": int,   # what the scheduler lost when the
                                         # worker left (its remove-worker event)
        "started": scheduler time, "seconds": float, "limit": float,
        "drain": bool,
        "left": bool,                    # the worker left the cluster
        "rejoined": int,                 # re-registrations kept closing_gracefully
        "keep_out": bool,                # False (a preStop hook): only a process of
                                         # the same pod is kept out
        "leaving": bool,                 # its pod is going: never back in service
    }

``amm_core_status`` (amm_core.status) also carries ``"retirements": [retirement, ...]``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from operator import attrgetter
from time import perf_counter
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from dask.typing import Key
from distributed.core import Status
from distributed.metrics import time
from distributed.stealing import WorkStealing

from amm_core._cycle import Cycle
from amm_core._room import pause_fraction, room
from amm_core._workers import find_workers, worker_names
from amm_core.departures import Departures, downscaling_vetoes, out_of_service, set_status
from amm_core.rescue import AtRisk
from amm_core.totals import HeldData

if TYPE_CHECKING:
    from amm_core.history import Markers
    from amm_core.savings import Savings, Why

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler, TaskState, WorkerState

logger = logging.getLogger(__name__)

#: Seconds between the engine's cycles. Short, because the caller waits on the
#: retirement to delete a pod and copies start only at a cycle; not shorter, because
#: every cycle walks the keys of every retiring worker on the scheduler's event loop.
RETIREMENT_INTERVAL = 0.5
#: Copies asked for in one cycle at most, and seconds a cycle spends asking at most
#: (a copy costs the event loop 5-10 us: choosing its recipient, and the scheduler's
#: message to it); a cycle with more unsafe keys leaves the others to the next
#: cycles, the next one coming after :data:`CONTINUE_AFTER`
MAX_COPIES_PER_CYCLE = 2000
SLICE_SECONDS = 0.02
#: Seconds between a cycle cut short and the next one (the event loop serves others
#: in between)
CONTINUE_AFTER = 0.05
#: Seconds after which a copy asked for and not landed is asked for again (its
#: recipient may have been slow, or died without the scheduler knowing yet), plus the
#: time its bytes take at the slowest transfer rate expected
COPY_TIMEOUT = 10.0
#: Bytes per second a copy is expected to move at, at the least
SLOWEST_TRANSFER_RATE = 20e6
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
    (whether or not ``ws`` is retiring yet), in the order ``ws`` got them."""
    leaving = retiring | {ws}
    # is_safe, inlined: this runs for every key of every retiring worker each cycle
    return [
        ts
        for ts in ws.has_what
        if ts.who_has is None or len(ts.who_has) == 1 or ts.who_has <= leaving
    ]


def process_of(ws: WorkerState) -> str:
    """What tells one pod's processes from another's: the nanny's address (it
    survives a worker restart inside the pod), else the host (the pod's IP)."""
    return ws.nanny or ws.host


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
    #: Keys at risk with this worker (amm_core.rescue: only leaving workers hold them)
    at_risk: set[Any]
    #: What it rescued when its worker last left (amm_core.rescue)
    rescued_keys: int
    rescued_bytes: int
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
        self.at_risk = set()
        self.rescued_keys = self.rescued_bytes = 0
        self.left = False
        self.rejoined = 0
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


class RetireSafely:
    """One cycle of the engine: update the records (state, aborts), then ask workers
    in service with room for copies of the unsafe keys of every retirement still
    watched.

    A cycle costs the keys of the retiring workers (each is asked whether it is still
    unsafe) and at most :data:`MAX_COPIES_PER_CYCLE` copies (or
    :data:`SLICE_SECONDS` of asking): the unsafe keys beyond are asked for by the next
    cycles, oldest retirement first. A key whose copy is in flight (:class:`InFlight`)
    is not asked for again, by any retirement, before its time is up. The recipients
    are ranked once per cycle, and only in a cycle that asks for a copy.

    The copies are asked for as an AMM asks for them (``Scheduler.
    request_acquire_replicas``, one message per recipient), without an AMM's
    bookkeeping of every suggestion: each key asked for is known to be in memory and
    held by no worker in service (unsafe), each recipient to be running, in service
    and to have room, and no copy of the key to be pending (:class:`InFlight`)."""

    #: The engine whose retirements this cycle serves
    engine: RetirementEngine

    def __init__(self, engine: RetirementEngine):
        self.engine = engine

    def __repr__(self) -> str:
        return "RetireSafely()"

    def run(self) -> None:
        engine = self.engine
        scheduler = engine.scheduler
        now = time()
        retiring = retiring_workers(scheduler)
        recipients = scheduler.running - retiring
        engine.count_landed(now)
        records = engine.in_progress()
        # One question to each scheduler plugin for every retirement, not one each
        vetoes = engine.vetoes(
            [
                rt.ws
                for rt in records
                if rt.state != "done" and scheduler.workers.get(rt.ws.address) is rt.ws
            ]
        )
        unsafe_by_record = [
            (rt, engine.step(rt, retiring, recipients, vetoes.get(rt.ws, "")))
            for rt in records
        ]
        in_flight = engine.in_flight
        copies = in_flight.copies
        rooms: Rooms | None = None
        asks: defaultdict[WorkerState, list[Key]] = defaultdict(list)
        budget = MAX_COPIES_PER_CYCLE
        until = perf_counter() + SLICE_SECONDS
        for rt, unsafe in unsafe_by_record:
            if not rt.watched:
                continue
            for ts in unsafe:
                copy = copies.get(ts.key)
                if copy is not None and now < copy.deadline and copy.recipient in recipients:
                    continue  # in flight to a worker still in service, its time not up
                if ts.actor or ts.state != "memory":
                    continue  # an actor is never copied (the AMM refuses it too)
                if not budget or perf_counter() > until:
                    budget = 0
                    break  # the next cycle goes on from here
                if rooms is None:
                    rooms = self._rooms(engine, recipients)
                nbytes = ts.get_nbytes()
                best = rooms.best(nbytes)
                if best is None:
                    engine.cannot_finish(rt, engine.no_room(ts, recipients))
                    break
                budget -= 1
                rooms.take(best, nbytes)
                in_flight.add(ts, best, now, rt.name, rt.ws)
                asks[best].append(ts.key)
        stimulus_id = f"amm-core-retirement-{now}"
        for ws, keys in asks.items():
            scheduler.request_acquire_replicas(ws.address, keys, stimulus_id=stimulus_id)
        if not engine.in_progress():
            in_flight.clear()  # nothing left to wait for: no worker kept referenced
            engine.cycle.stop()
        elif not budget:
            engine.continue_soon()

    def _rooms(self, engine: RetirementEngine, recipients: set[WorkerState]) -> Rooms:
        """The room of each recipient, once for this cycle, less the copies asked for
        in earlier cycles and not landed: without them, retirements started in
        successive cycles (one per hook in a drain) could each fill the same
        recipient."""
        in_flight = engine.in_flight.bytes_by_recipient()
        pause_at = pause_fraction() or 1.0
        measure = engine.measure()
        # No change of this cycle is pending in any AMM's workers_memory: an empty one
        # says so (and spares building every worker's MemoryState)
        return Rooms(
            (ws, room(ws, {}, measure, pause_at) - in_flight.get(ws, 0))
            for ws in recipients
        )


@dataclass(slots=True)
class Copy:
    """A copy the engine asked for."""

    #: The worker asked to fetch it (the very process: one registering again at the
    #: same address is another)
    recipient: WorkerState
    nbytes: int
    #: When it is asked for again if it has not landed (scheduler time)
    deadline: float
    #: The name of the record that asked
    by: str
    #: The retiring worker it is copied from
    sender: WorkerState


class InFlight:
    """The copies the engine asked for and that have not landed yet, by key, whichever
    retirement asked: each key is asked for once until it lands, leaves memory, or its
    time is up (:meth:`timeout`: its recipient may have been slow, or died without the
    scheduler knowing yet). Two retirements holding the same unsafe key (each other's
    only copies) ask for one copy, not two.

    What lands and what leaves memory is heard from the scheduler's replica
    bookkeeping as it happens (:class:`amm_core.totals.HeldData` calls
    :meth:`copied` and :meth:`gone`), and what times out is found in a heap of
    deadlines: a cycle costs what changed, not a look at every copy in flight."""

    copies: dict[Key, Copy]
    #: Bytes in flight by recipient
    in_flight_to: defaultdict[WorkerState, int]
    #: Bytes in flight by the retiring worker they are copied from
    in_flight_from: defaultdict[WorkerState, int]
    #: Copies landed since the last cycle: (name of the record that asked, bytes)
    landed: list[tuple[str, int]]
    #: (deadline, order asked, key): a heap; an entry is stale when the key's copy
    #: has another deadline, or none (the order keeps keys, of any type, from being
    #: compared)
    _deadlines: list[tuple[float, int, Key]]
    _asked: Iterator[int]

    def __init__(self) -> None:
        self.copies = {}
        self.in_flight_to = defaultdict(int)
        self.in_flight_from = defaultdict(int)
        self.landed = []
        self._deadlines = []
        self._asked = itertools.count()

    def __len__(self) -> int:
        return len(self.copies)

    @staticmethod
    def timeout(nbytes: int) -> float:
        """Seconds to wait for ``nbytes`` to arrive before asking for them again."""
        return COPY_TIMEOUT + nbytes / SLOWEST_TRANSFER_RATE

    def add(self, ts: TaskState, recipient: WorkerState, now: float, by: str,
            sender: WorkerState) -> None:
        """A copy of ``ts`` asked of ``recipient`` from ``sender`` (the retiring
        worker): its time counts every byte queued from the same sender before it,
        which one worker sends at its own pace, so that a big retirement's later
        copies are not asked for again while they wait their turn."""
        self._pop(ts.key)
        nbytes = ts.get_nbytes()
        self.in_flight_from[sender] += nbytes
        deadline = now + self.timeout(self.in_flight_from[sender])
        self.copies[ts.key] = Copy(recipient, nbytes, deadline, by, sender)
        self.in_flight_to[recipient] += nbytes
        heapq.heappush(self._deadlines, (deadline, next(self._asked), ts.key))

    def clear(self) -> None:
        self.copies.clear()
        self.in_flight_to.clear()
        self.in_flight_from.clear()
        self.landed.clear()
        self._deadlines.clear()

    def copied(self, ts: TaskState, ws: WorkerState) -> None:
        """The scheduler learnt that ``ws`` holds ``ts``."""
        copy = self.copies.get(ts.key)
        if copy is not None and copy.recipient is ws:
            self._pop(ts.key)
            self.landed.append((copy.by, ts.get_nbytes()))

    def gone(self, ts: TaskState) -> None:
        """The last copy of ``ts`` left: nothing will land."""
        self._pop(ts.key)

    def settle(self, now: float) -> list[tuple[str, int]]:
        """Forget the copies whose time is up; return the landed ones since the last
        call, as (name of the record that asked, bytes)."""
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, _, key = heapq.heappop(heap)
            copy = self.copies.get(key)
            if copy is not None and copy.deadline == deadline:
                self._pop(key)
        landed, self.landed = self.landed, []
        return landed

    def bytes_by_recipient(self) -> dict[WorkerState, int]:
        """Bytes of the copies in flight, by recipient."""
        return self.in_flight_to

    def forget(self, by: str) -> None:
        """Forget the copies a record asked for (its worker registered again: they
        were asked from a process that is gone)."""
        for key in [k for k, copy in self.copies.items() if copy.by == by]:
            self._pop(key)

    def _pop(self, key: Key) -> None:
        copy = self.copies.pop(key, None)
        if copy is None:
            return
        for by_worker, ws in ((self.in_flight_to, copy.recipient), (self.in_flight_from, copy.sender)):
            left = by_worker[ws] - copy.nbytes
            if left > 0:
                by_worker[ws] = left
            else:
                del by_worker[ws]


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
        left = self._room[ws] = self._room.get(ws, 0.0) - nbytes
        entry = (-left, ws.address, ws)
        if self._heap and self._heap[0][2] is ws:
            heapq.heapreplace(self._heap, entry)  # the usual case: the best took it
        else:
            heapq.heappush(self._heap, entry)


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
    #: The copies asked for and not landed yet, of every retirement
    in_flight: InFlight
    #: The next cycle, called early because the last one was cut short (None: none)
    _continuation: object | None
    #: The engine's cycle (RetireSafely), running while retirements are in progress
    cycle: Cycle
    #: Where what was rescued and lost is counted (amm_core.savings; None: nowhere)
    savings: Savings | None
    #: Where retirements that end are marked (amm_core.history; None: nowhere)
    markers: Markers | None

    def __init__(
        self,
        scheduler: Scheduler,
        plugin: object,
        measure: Callable[[], str],
        held: HeldData,
        savings: Savings | None = None,
        markers: Markers | None = None,
    ):
        self.scheduler = scheduler
        self.savings = savings
        self.markers = markers
        self.plugin = plugin
        self.measure = measure
        self.records = {}
        self.bars = {}
        self._removals = {}
        self.in_flight = InFlight()
        self.at_risk = AtRisk()
        held.watcher = self  # what lands, as it lands, and what goes
        self._continuation = None
        self.departures = Departures.of(scheduler) or Departures(scheduler)
        self.cycle = Cycle(scheduler, RetireSafely(self).run, RETIREMENT_INTERVAL, "amm-core-retirements")

    def copied(self, ts: TaskState, ws: WorkerState) -> None:
        """The scheduler learnt that ``ws`` holds ``ts`` (amm_core.totals.Watcher)."""
        self.in_flight.copied(ts, ws)
        if self.records and len(ts.who_has or ()) == 1:
            # a key computed on a retiring worker is at risk at once, not from the
            # next cycle (a task elsewhere may fetch it before then)
            rt = self.records.get(str(ws.name))
            if rt is not None and rt.ws is ws and rt.watched:
                self.at_risk.add(rt, (ts,))

    def gone(self, ts: TaskState) -> None:
        """The last copy of ``ts`` went (amm_core.totals.Watcher)."""
        self.in_flight.gone(ts)
        self.at_risk.gone(ts)

    def handlers(self) -> dict[str, Any]:
        return {
            "amm_core_retire": self.retire,
            "amm_core_retirements": self.reports,
            "amm_core_cancel_retirement": self.cancel,
            "amm_core_forget_retirement": self.forget,
        }

    def in_progress(self) -> list[Retirement]:
        """Records whose worker is still watched (draining, moving, done)."""
        return [rt for rt in self.records.values() if rt.watched]

    def reports(self) -> list[dict[str, Any]]:
        """Every record's report by name; at most MAX_RECORDS, those still watched
        first."""
        kept = sorted(self.records.values(), key=lambda rt: not rt.watched)[:MAX_RECORDS]
        return [rt.report() for rt in sorted(kept, key=lambda rt: rt.name)]

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
        names = worker_names(workers)
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
        found, unknown = find_workers(self.scheduler, names)
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
            self.cycle.run_once()
            self.cycle.start()
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
        self.mark("retirement-started", rt.name)
        veto = self.vetoes([ws]).get(ws, "")
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
        for name in worker_names(workers):
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
        for name in worker_names(workers):
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
                self._delete(rt.name)
                if rt.name not in forgotten:
                    forgotten.append(rt.name)
        return {"forgotten": forgotten, "kept": kept}

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
                self._delete(name)  # the Deployment's next pod: welcome
            self._join_barred(ws)
            return
        rt.ws = ws
        rt.left, rt.left_at = False, None
        rt.rejoined += 1
        self.in_flight.forget(rt.name)
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
        self.cycle.start()

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
        self.cycle.start()

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
        removal, in the same event-loop step): what it lost, for :meth:`worker_left`
        (of every worker: the savings count what any departure lost). Costs the keys
        lost."""
        lost = [*event.get("lost-computed-tasks", ()), *event.get("lost-scattered-tasks", ())]
        tasks = self.scheduler.tasks
        nbytes = sum(tasks[k].nbytes for k in lost if k in tasks)
        self._removals[address] = (len(lost), nbytes, len(event.get("processing-tasks", ())))

    def worker_left(self, address: str, name: str | None = None) -> None:
        """The worker left: its records end. One not done yet ends ``done`` if the
        scheduler lost nothing with it and it ran nothing, else ``aborted``. ``name``:
        the worker's (the scheduler has forgotten it by now), for the savings."""
        self.departures.worker_left(address)
        keys_lost, bytes_lost, processing = self._removals.pop(address, (None, 0, 0))
        now = time()
        self.count_landed(now)  # copies that landed before it left were rescued
        name = name or address
        departed: Retirement | None = None
        for rt in self.records.values():
            if rt.ws.address != address or rt.left:
                continue
            name = rt.name
            was_watched = rt.watched
            rt.left, rt.left_at = True, now
            if not was_watched:
                continue  # an aborted record: only its worker's leaving is news
            departed = rt
            self._count_rescued(rt)
            rt.wasted_tasks = max(rt.wasted_tasks, processing, rt.tasks_running)
            if keys_lost is not None:
                rt.keys_lost, rt.bytes_lost = keys_lost, bytes_lost
            if rt.state == "done":
                continue
            if keys_lost == 0 and rt.wasted_tasks == 0:
                rt.state, rt.ended = "done", now  # nothing went with it
                self.mark("retirement-done", rt.name)
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
            self.mark("retirement-aborted", rt.name)
        if keys_lost is not None:
            self._count_departure(name, address, keys_lost, bytes_lost, departed)
        self._prune()

    def _count_rescued(self, rt: Retirement) -> None:
        """``rt``'s worker left: what it rescued (amm_core.rescue)."""
        keys, nbytes, deferred = self.at_risk.settle(rt, self.scheduler.tasks, out_of_service(self.scheduler))
        rt.rescued_keys, rt.rescued_bytes = keys, nbytes
        if self.savings is not None:
            self.savings.rescue(rt, keys, nbytes, deferred)

    def _count_departure(
        self, name: str, address: str, keys: int, nbytes: int, rt: Retirement | None
    ) -> None:
        """A worker left (its remove-worker event was heard): ``rt`` is the
        retirement watching it then (None: none; a retirement aborted before, whose
        pod the operator kept, is none either)."""
        why: Why
        if rt is None:
            why = "killed"
        elif rt.state == "done" and not rt.blocked:
            why = "retired"
        else:
            why = "retirementAborted"
        if self.savings is not None:
            self.savings.departed(name, address, keys, nbytes, why, rt)

    # --- mechanics ------------------------------------------------------------

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
            self._delete(name)
        excess = len(self.records) - MAX_RECORDS
        if excess > 0:
            ended = sorted(
                (rt for rt in self.records.values() if rt.ended_before(now)),
                key=lambda rt: rt.ended or 0,
            )
            for rt in ended[:excess]:
                self._delete(rt.name)
        for name in [n for n, bar in self.bars.items() if bar[0] < now]:
            del self.bars[name]

    def _delete(self, name: str) -> None:
        self.at_risk.drop(self.records.pop(name))

    def mark(self, kind: str, name: str) -> None:
        if self.markers is not None:
            self.markers.add(kind, name)

    def _make_leaving(self, rt: Retirement, why: str) -> None:
        rt.leaving = True
        self.departures.add(rt.ws, why)

    def vetoes(self, workers: list[WorkerState]) -> dict[WorkerState, str]:
        """Why each of ``workers`` cannot go (amm_core.departures.downscaling_vetoes;
        the plugin serving the engine is not asked)."""
        return downscaling_vetoes(self.scheduler, workers, skip=self.plugin)

    def continue_soon(self) -> None:
        """A cycle stopped at its slice: the next one comes after CONTINUE_AFTER, not
        a whole interval later (if the engine's cycle still runs then)."""
        if self._continuation is not None:
            return

        def next_slice() -> None:
            self._continuation = None
            if self.cycle.running:
                self.cycle.run_once()

        self._continuation = self.scheduler.loop.call_later(CONTINUE_AFTER, next_slice)

    def count_landed(self, now: float) -> None:
        """Credit the copies that landed since the last cycle to the records that
        asked for them."""
        for name, nbytes in self.in_flight.settle(now):
            rt = self.records.get(name)
            if rt is not None:
                rt.keys_moved += 1
                rt.bytes_moved += nbytes

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
        self.at_risk.drop(rt)  # an aborted retirement rescues nothing when its worker leaves
        self.mark("retirement-aborted", rt.name)
        ws = rt.ws
        if (
            rt.set_from is not None
            and self.scheduler.workers.get(ws.address) is ws
            and ws.status == Status.closing_gracefully
        ):
            set_status(self.scheduler, ws, rt.set_from)
        logger.warning("Retirement of %s (%s) aborted: %s", rt.name, ws.address, why)

    def step(
        self,
        rt: Retirement,
        retiring: set[WorkerState],
        recipients: set[WorkerState],
        veto: str,
    ) -> list[TaskState]:
        """Update ``rt`` at a cycle (``veto``: why its worker may not go, asked
        this cycle; "" if it may); return the worker's unsafe keys."""
        ws = rt.ws
        if self.scheduler.workers.get(ws.address) is not ws:
            self.worker_left(ws.address)
            return []
        if not rt.leaving and ws.status != Status.closing_gracefully:
            rt.set_from = None  # not the engine's to put back any more
            self.abort(rt, f"someone else set the worker {ws.status.name}")
            return []
        self._offer_queued(rt, recipients)
        unsafe = unsafe_keys(ws, retiring)
        self.at_risk.add(rt, unsafe)
        rt.keys_left = len(unsafe)
        rt.bytes_left = sum(map(attrgetter("nbytes"), unsafe))
        rt.tasks_running = len(ws.processing)
        if not rt.drain:
            rt.wasted_tasks = rt.tasks_running
        if rt.state == "done":
            return unsafe  # committed: move what lands on it late, nothing else
        blocker = veto
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
            self.mark("retirement-done", rt.name)
            self._make_leaving(rt, f"retirement done ({rt.requested or 'no reason'})")
        return unsafe

    def _offer_queued(self, rt: Retirement, recipients: set[WorkerState]) -> None:
        hand_back_queued(self.scheduler, rt.ws, rt.offered, recipients)


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
