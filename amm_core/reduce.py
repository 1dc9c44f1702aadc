"""Replica reduction that keeps only the copies about to be used.

Upstream's ``ReduceReplicas`` keeps ``max(1, n)`` copies of a key, where ``n`` counts
the distinct workers its dependents are processing on *plus every dependent not yet
assigned to a worker*. With scheduler-side queuing most dependents are unassigned
until they become runnable, so a key with more than a few dependents keeps every copy
it ever made. On the AMM announcement's dot product (``benchmarks/seed_dot_product.py``)
about 0.5-0.7 GiB of the ~1.6 GiB held at upstream's peak are copies that no processing
task needs; nearly all of them are kept for matmul chunks that wait on a ``random``
chunk still queued as a root task.

Yet a copy only saves something if a task will run on *that* worker before the copy
would be dropped anyway; otherwise it costs memory for nothing. The scheduler tells
which ones will:

- a dependent already processing on the worker needs the copy there (upstream's
  ``_find_dropper`` refuses those drops too): it stays;
- a dependent that is not assigned yet but whose missing dependencies are all being
  computed right now ("imminent") will almost surely be assigned where they finish:
  ``decide_worker`` prefers the worker holding the most of its inputs. A copy on such
  a worker stays, unless the worker is under memory pressure;
- dependents queued as root-ish tasks go to whichever worker frees a thread first, so
  their location cannot be predicted: up to one copy per queued dependent stays (on the
  least loaded holders), unless they are under pressure. Without this, a small key
  shared by many queued tasks would be dropped and fetched again every cycle;
- every other copy (kept by upstream "for a dependent not yet assigned") is dropped,
  down to the count :func:`amm_core.replicate.wanted_replicas` asks for (1 for
  untracked keys). Such a dependent waits on a task that has not started (often a
  queued root task, which lands on whichever worker frees up first), so where it will
  run is unknown. The last copy is never dropped (the AMM extension also refuses it).

The trade-off: a dropped copy may have to be fetched again when a dependent later lands
on that worker. On the dot product (4 workers, 8000^2, 2 s AMM interval) workers fetch
5-10% more bytes from each other than with upstream's policy, for 30-40% less peak
cluster managed memory (25-35% less process memory), with the same worker CPU time
and no measurable change in wall time. Transfers on one host are cheap; on a
network-bound cluster whose workers have plenty of room, set ``idle_below``: a worker
whose memory is below that fraction of its pause threshold keeps copies for dependents
not assigned yet too, as upstream does; and raise ``pressure`` towards 1 to keep the
imminent and queued copies longer.

A worker is under pressure when its memory (``manager.workers_memory``, the AMM's
measure adjusted for this cycle's pending drops and copies) is above ``pressure`` times
its pause threshold (see :func:`amm_core._room.room`), or above the mean of the running
workers by more than ``imbalance`` times that mean; paused and retiring workers are
always under pressure. On such a worker only the copies a processing task needs stay.

Configure it in place of upstream's policy::

    distributed:
      scheduler:
        active-memory-manager:
          policies:
          - class: amm_core.reduce.PressureReduceReplicas
            pressure: 0.5
"""

from __future__ import annotations

import logging
from collections import Counter
from itertools import islice
from typing import TYPE_CHECKING, Any

from distributed.active_memory_manager import Suggestion, SuggestionGenerator
from distributed.core import Status

from amm_core import _room
from amm_core._room import CountingPolicy, pause_fraction
from amm_core.replicate import Replicate, find_policy

if TYPE_CHECKING:
    from distributed.scheduler import TaskState, WorkerState

# Main logger. Terse at DEBUG level: one line per AMM cycle.
logger = logging.getLogger(__name__)
# Per-key logging. Verbose at DEBUG level.
task_logger = logging.getLogger(__name__ + ".tasks")


class PressureReduceReplicas(CountingPolicy):
    """Drop the copies of in-memory keys that no task will use soon on their worker.

    Parameters (all plain values, so that the policy can be listed in the dask config)
    ----------
    pressure
        Fraction of a worker's pause threshold (of its memory limit when pausing is
        off) above which it keeps only the copies its processing tasks need.
        0 drops every copy not needed by a processing task; 1 keeps the imminent and
        queued copies until the worker pauses.
    imbalance
        A worker whose memory exceeds the mean of the running workers by more than
        this fraction of the mean is under pressure too. ``None`` disables the check.
    keep_imminent
        Keep a copy on a worker where a not yet assigned dependent's missing
        dependencies are all being computed.
    keep_queued
        Keep up to one copy per queued (root-ish) dependent.
    idle_below
        Fraction of a worker's pause threshold below which the worker also keeps
        copies for dependents not assigned yet (at most one per such dependent, as
        upstream), trading memory it does not need for fewer transfers. 0 (the
        default) never does.
    max_scan
        Dependents examined per key (processing or not) for the rules above,
        bounding the cost of a cycle for keys with very many dependents (upstream
        stops counting at 20). Keys that hold no more than their wanted copies are
        not scanned at all.

    At most :data:`amm_core._room.MAX_DROPS_PER_CYCLE` drops are suggested per cycle;
    the others wait for the next cycles (``last_cycle["budget_spent"]``).

    Counters: ``replicas_dropped``, ``bytes_dropped`` (drops accepted by the AMM),
    ``drops_refused`` (suggestions the AMM declined), ``kept_imminent``,
    ``kept_queued`` and ``kept_idle`` (copies kept by those rules, summed over
    cycles).
    """

    #: Fraction of the pause threshold above which a worker is under pressure
    pressure: float
    #: Fraction above the mean worker memory beyond which a worker is under pressure
    imbalance: float | None
    #: Keep copies where an unassigned dependent is about to become runnable
    keep_imminent: bool
    #: Keep up to one copy per queued dependent
    keep_queued: bool
    #: Fraction of the pause threshold below which unassigned dependents keep copies
    idle_below: float
    #: Dependents examined per key by the imminent/queued rules
    max_scan: int
    #: What the latest cycle did: dropped, kept_processing, kept_imminent, ...
    last_cycle: Counter[str]

    def __init__(
        self,
        pressure: float = 0.5,
        imbalance: float | None = 0.25,
        keep_imminent: bool = True,
        keep_queued: bool = True,
        idle_below: float = 0.0,
        max_scan: int = 64,
    ) -> None:
        super().__init__()
        if not 0 <= pressure:
            raise ValueError(f"pressure must be >= 0; got {pressure!r}")
        if imbalance is not None and imbalance < 0:
            raise ValueError(f"imbalance must be >= 0 or None; got {imbalance!r}")
        if not 0 <= idle_below <= 1:
            raise ValueError(f"idle_below must be in [0, 1]; got {idle_below!r}")
        if max_scan < 0:
            raise ValueError(f"max_scan must be >= 0; got {max_scan!r}")
        self.pressure = float(pressure)
        self.imbalance = None if imbalance is None else float(imbalance)
        self.keep_imminent = bool(keep_imminent)
        self.keep_queued = bool(keep_queued)
        self.idle_below = float(idle_below)
        self.max_scan = int(max_scan)
        self.last_cycle = Counter()

    def __repr__(self) -> str:
        return (
            f"PressureReduceReplicas(pressure={self.pressure}, "
            f"imbalance={self.imbalance}, keep_imminent={self.keep_imminent}, "
            f"keep_queued={self.keep_queued}, idle_below={self.idle_below})"
        )

    def _classify_workers(self) -> tuple[set[WorkerState], set[WorkerState]]:
        """(workers that keep only the copies their processing tasks need,
        workers with so much room that they keep copies for unassigned dependents)."""
        memory = self.manager.workers_memory
        running = [ws for ws in memory if ws.status == Status.running]
        mean = sum(memory[ws] for ws in running) / len(running) if running else 0.0
        fraction = pause_fraction() or 1.0
        pressed = set()
        idle = set()
        for ws, nbytes in memory.items():
            threshold = fraction * ws.memory_limit if ws.memory_limit else None
            if ws.status != Status.running:
                pressed.add(ws)
            elif threshold and nbytes > self.pressure * threshold:
                pressed.add(ws)
            elif self.imbalance is not None and nbytes > mean * (1 + self.imbalance):
                pressed.add(ws)
            elif threshold and nbytes < self.idle_below * threshold:
                idle.add(ws)
        return pressed, idle

    def _copies_to_keep(
        self,
        ts: TaskState,
        holders: set[WorkerState],
        pressed: set[WorkerState],
        idle: set[WorkerState],
    ) -> dict[str, set[WorkerState]]:
        """The holders of ``ts`` whose copy a dependent will or may use, by reason:
        processing there, imminent there, for queued dependents, idle worker."""
        processing: set[WorkerState] = set()
        imminent: set[WorkerState] = set()
        nqueued = 0
        scanned = 0  # unassigned dependents examined
        # At most max_scan dependents in all: a key with 100k dependents costs no
        # more than one with max_scan. A processing dependent beyond them is still
        # protected: the AMM extension never drops a copy where a dependent
        # processes (ActiveMemoryManagerExtension._find_dropper).
        for waiter in islice(ts.waiters or (), self.max_scan):
            ws = waiter.processing_on
            if ws is not None:
                if ws in holders:
                    processing.add(ws)
                continue
            scanned += 1
            if waiter.state == "queued":
                nqueued += 1
            elif self.keep_imminent and waiter.waiting_on:
                # Runnable as soon as its missing inputs finish; decide_worker will
                # then favour a worker holding them, i.e. where they are computed.
                where = {dts.processing_on for dts in waiter.waiting_on}
                if None not in where:
                    imminent |= where
        relaxed = holders - pressed - processing
        imminent &= relaxed
        memory = self.manager.workers_memory
        queued: set[WorkerState] = set()
        if self.keep_queued and nqueued:
            # Queued tasks go wherever a thread frees up: keep the copies on the
            # least loaded holders, which are also the ones the AMM would keep.
            others = sorted(relaxed - imminent, key=memory.__getitem__)
            queued = set(others[: max(0, nqueued - len(imminent))])
        roomy: set[WorkerState] = set()
        if idle and scanned:
            # As upstream: a copy per unassigned dependent, where memory is plentiful
            others = sorted((relaxed & idle) - imminent - queued, key=memory.__getitem__)
            roomy = set(others[: max(0, scanned - len(imminent) - len(queued))])
        return {
            "processing": processing,
            "imminent": imminent,
            "queued": queued,
            "idle": roomy,
        }

    def run(self) -> SuggestionGenerator:
        manager = self.manager
        pressed, idle = self._classify_workers()
        cycle: Counter[str] = Counter()
        budget = _room.MAX_DROPS_PER_CYCLE
        # wanted_replicas(), with the Replicate policy looked up once per cycle
        replicate = find_policy(manager, Replicate)
        assert replicate is None or isinstance(replicate, Replicate)

        for ts in manager.scheduler.replicated_tasks:
            if budget <= 0:
                cycle["budget_spent"] += 1  # the other keys wait for the next cycle
                break
            if ts.actor:
                continue
            assert ts.who_has
            pending_repl, pending_drop = manager.pending.get(ts, (set(), set()))
            wanted = 1 if replicate is None else replicate.wanted_for(ts)
            if len(ts.who_has) - len(pending_drop) + len(pending_repl) <= wanted:
                # Nothing to drop whatever the dependents: skip scanning them (the
                # steady state of keys tracked by Replicate).
                continue
            holders = ts.who_has - pending_drop
            kept = self._copies_to_keep(ts, holders, pressed, idle)
            keep = set().union(*kept.values())
            ndrop = len(holders) + len(pending_repl) - max(wanted, len(keep))
            candidates = holders - keep
            for reason, workers in kept.items():
                cycle[f"kept_{reason}"] += len(workers)
            if ndrop <= 0 or not candidates:
                continue
            task_logger.debug(
                "PressureReduceReplicas: %s has %d copies, wants %d; keeping %s; "
                "dropping up to %d",
                ts.key,
                len(holders),
                wanted,
                {reason: len(workers) for reason, workers in kept.items()},
                ndrop,
            )
            cycle["keys"] += 1
            for _ in range(ndrop):
                if budget <= 0:
                    break
                ws = yield Suggestion("drop", ts, candidates)
                if ws is None:
                    self.count("drops_refused")
                    break
                budget -= 1  # drops made, not asked: refusals must not starve other keys
                candidates = candidates - {ws}
                cycle["dropped"] += 1
                cycle["bytes_dropped"] += ts.nbytes
                self.count("replicas_dropped")
                self.count("bytes_dropped", ts.nbytes)
                if not candidates:
                    break

        self.count("kept_imminent", cycle["kept_imminent"])
        self.count("kept_queued", cycle["kept_queued"])
        self.count("kept_idle", cycle["kept_idle"])
        self.last_cycle = cycle
        if cycle["dropped"]:
            logger.debug(
                "PressureReduceReplicas: dropping %d copies (%d bytes) of %d keys; "
                "%d workers under pressure",
                cycle["dropped"],
                cycle["bytes_dropped"],
                cycle["keys"],
                len(pressed),
            )

    def report(self) -> dict[str, Any]:
        out = super().report()
        out["config"] = {
            "pressure": self.pressure,
            "imbalance": self.imbalance,
            "keep_imminent": self.keep_imminent,
            "keep_queued": self.keep_queued,
            "idle_below": self.idle_below,
            "max_scan": self.max_scan,
        }
        out["last_cycle"] = dict(self.last_cycle)
        return out
