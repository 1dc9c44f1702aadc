"""Pause to retirement: a worker that stays paused for too long is retired through the
Active Memory Manager, so that whoever runs the cluster can replace it.

A worker pauses when its process memory crosses ``distributed.worker.memory.pause``.
It then runs nothing and, unless memory goes down by itself, stays paused forever:
its threads idle, its data stuck, and the cluster one worker short. The 2021 AMM
announcement promised that pause would "gracefully transition into retirement after a
timeout expires"; upstream still has it as a TODO in active_memory_manager.py.

:class:`RetirePaused` watches worker statuses at every AMM cycle. A worker seen paused
for longer than ``after`` is retired as ``Scheduler.retire_workers(...,
close_workers=False, remove=False)`` would: its status becomes closing_gracefully (no
new tasks, not a recipient) and a :class:`RetireWorkerWithRoom` policy (upstream's
RetireWorker, choosing recipients with room) copies its unique keys to running
workers. The worker itself is not closed: a fresh process is what frees its memory,
and starting one is the deployment's job (the operator replaces the pod; without an
operator the user decides). The policy lists these workers in
``report()["replace"]``, also served by the scheduler handler ``amm_replace`` (plain
msgpack data, no pickling), as ``{"address", "name", "paused_since",
"retiring_since", "retired"}``.

``retired`` says the worker can be killed now without losing data: every key it
holds has a copy on a worker that is not itself retiring (the safe-key rule of
:func:`amm_core.retirement.is_safe`: two paused workers retired together, holding
each other's only copies, are not retired until the keys sit on a third) and it is
processing nothing. It is recomputed at every cycle,
because it can turn false again: a task that was still running when the worker
paused finishes later and leaves its only copy there. Upstream's RetireWorker detaches
itself as soon as no unique key is left, and anything landing afterwards is lost when
the worker goes; a :class:`RetireWorkerWithRoom` therefore stays in the AMM until its
worker leaves the cluster, and moves such late keys too.

The retirement's state lives on its :class:`RetireWorkerWithRoom` (address, when the
worker was first seen paused, when its retirement started), not only in the
RetirePaused object that started it: the scheduler plugin rebuilds RetirePaused when
its arguments change, and keeps RetireWorker policies. A RetirePaused adopts at every
cycle the RetireWorkerWithRoom policies it does not track yet, and reports and handles
them as its own.

A retirement lives only as long as a RetirePaused is in the AMM: when a config
drops RetirePaused (or the scheduler plugin restores the scheduler's own config), its
RetireWorkerWithRoom policies put their workers back to paused (they unpause by
themselves if their memory went down) and detach at their next run, instead of
leaving them closing_gracefully with no one reporting them for replacement.

If the unique keys cannot go anywhere (no running worker with room), the retirement
is aborted: the RetireWorkerWithRoom puts the worker back to paused itself, as
``Scheduler.retire_workers`` does, and detaches; RetirePaused tries again after
``after``. Pauses are observed at AMM cycles, so ``paused_since`` has the AMM
interval's resolution.

The ``amm_replace`` handler is installed on the scheduler when a RetirePaused is added
to an AMM (``ActiveMemoryManagerExtension.add_policy``, which the dask config and the
scheduler plugin both go through).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dask.utils import parse_timedelta
from distributed.active_memory_manager import (
    ActiveMemoryManagerExtension,
    RetireWorker,
    Suggestion,
    SuggestionGenerator,
)
from distributed.core import Status
from distributed.metrics import time

from amm_core import retirement
from amm_core._room import CountingPolicy, workers_with_room
from amm_core.departures import downscaling_veto

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler, WorkerState

# Main logger. Terse at DEBUG level.
logger = logging.getLogger(__name__)
# Per-key logging. Verbose at DEBUG level.
task_logger = logging.getLogger(__name__ + ".tasks")

#: Name of the scheduler handler serving :func:`replacements`
HANDLER = "amm_replace"


def set_status(scheduler: Scheduler, ws: WorkerState, status: Status) -> None:
    """amm_core.retirement.set_status, with stimulus ids saying retire-paused."""
    retirement.set_status(scheduler, ws, status, prefix="retire-paused")


def unsafe_keys(scheduler: Scheduler, ws: WorkerState) -> int:
    """How many keys ``ws`` holds that would be lost if it went now: those with no
    copy on a worker that is not itself retiring (amm_core.retirement.is_safe)."""
    return len(retirement.unsafe_keys(ws, retirement.retiring_workers(scheduler)))


class RetireWorkerWithRoom(RetireWorker):
    """Upstream's RetireWorker, but copying keys only to workers with room, staying in
    the AMM until its worker leaves (upstream detaches once no unique key is left), and
    putting the worker back to paused when it aborts.

    Parameters
    ----------
    address:
        The worker to retire
    paused_since:
        When the worker was first seen paused (scheduler clock); default: now
    """

    #: When the worker was first seen paused (scheduler clock, seconds since the epoch)
    paused_since: float
    #: When this retirement started (scheduler clock)
    retiring_since: float

    def __init__(self, address: str, paused_since: float | None = None):
        super().__init__(address)
        self.retiring_since = time()
        self.paused_since = self.retiring_since if paused_since is None else paused_since

    def run(self) -> SuggestionGenerator:
        scheduler = self.manager.scheduler
        ws = scheduler.workers.get(self.address)
        if self not in self.manager.policies:
            return  # discarded earlier in this cycle (the AMM runs a copy of the set)
        if not self.watched():
            # RetirePaused left the config (or the scheduler was restored): no one
            # will report the worker for replacement. Back to paused (it unpauses by
            # itself if its memory went down) rather than closing_gracefully forever.
            if ws is not None and ws.status == Status.closing_gracefully:
                set_status(scheduler, ws, Status.paused)
            self.manager.policies.discard(self)
            logger.info(
                "RetireWorkerWithRoom(%s): no RetirePaused in the AMM; retirement "
                "abandoned",
                self.address,
            )
            return
        if ws is not None and not ws.has_what and not ws.actors:
            # Retired and empty. Upstream would log "no unique keys" and detach.
            return

        gen = super().run()
        choice = None
        while True:
            try:
                suggestion = gen.send(choice)
            except StopIteration:
                break
            if suggestion.op == "replicate" and suggestion.candidates is None:
                ts = suggestion.ts
                candidates = workers_with_room(
                    ts.nbytes, self.manager.workers_memory, measure=self.manager.measure
                )
                if not candidates:
                    task_logger.debug(
                        "RetireWorkerWithRoom(%s): no running worker has room for %s "
                        "(%d bytes)",
                        self.address,
                        ts.key,
                        ts.nbytes,
                    )
                suggestion = Suggestion("replicate", ts, candidates)
            choice = yield suggestion

        if ws is None or self in self.manager.policies:
            return
        if self.no_recipients:
            # Aborted (upstream has detached): back to paused, as
            # Scheduler.retire_workers does; the worker unpauses by itself if its
            # memory went down meanwhile.
            if ws.status == Status.closing_gracefully:
                set_status(scheduler, ws, Status.paused)
        else:
            # Upstream detached for want of unique keys. Stay: a task still running
            # there may yet leave its only copy on the worker.
            self.manager.policies.add(self)

    def watched(self) -> bool:
        """Whether a RetirePaused is in this policy's AMM or in the scheduler's (the
        plugin hands retirements over to an ad-hoc AMM when a config stops it)."""
        main = self.manager.scheduler.extensions.get("amm")
        pools = [self.manager.policies, main.policies if main is not None else ()]
        return any(isinstance(p, RetirePaused) for pool in pools for p in pool)

    def attached(self) -> bool:
        """Whether this policy is still in an AMM (the main one or an ad-hoc one the
        scheduler plugin handed it over to)."""
        manager = getattr(self, "manager", None)
        return manager is not None and self in manager.policies


@dataclass
class Retirement:
    """A paused worker being retired by :class:`RetirePaused`."""

    #: The worker as the scheduler knows it
    ws: WorkerState
    #: The AMM policy copying its unique keys away; holds paused_since, retiring_since
    policy: RetireWorkerWithRoom
    #: Every key it holds has a copy on a worker in service and it processes nothing
    #: (recomputed at every cycle)
    retired: bool = False
    #: Keys of the tasks assigned to it already offered to other workers
    offered: set[Any] = field(default_factory=set)


class RetirePaused(CountingPolicy):
    """Retire workers that stay paused for longer than ``after``.

    Parameters
    ----------
    after:
        How long a worker may stay paused (seconds or a string such as "30s").

    Counters: ``retirements_started``, ``retirements_adopted`` (found in the AMM,
    started by an earlier RetirePaused), ``workers_retired`` (a worker became safe to
    kill; again after ``retired_unsafe`` if keys moved off once more),
    ``retired_unsafe`` (a retired worker got a unique key or a task again),
    ``retirements_restarted`` (its RetireWorkerWithRoom was removed from the AMM by
    someone else while unique keys remained), ``retirements_cancelled`` (someone
    else changed the worker's status from closing_gracefully), ``retirements_aborted``,
    ``workers_left`` (a retiring or retired worker left the cluster: replaced).
    The keys are moved by :class:`RetireWorkerWithRoom`, which does not count.
    """

    #: Seconds a worker may stay paused before it is retired
    after: float
    #: Paused workers not (yet) retiring: address -> when first seen paused
    paused_since: dict[str, float]
    #: Workers retiring or retired and still in the cluster, by address
    retiring: dict[str, Retirement]

    def __init__(self, after: str | float = "30s"):
        super().__init__()
        self.after = parse_timedelta(after)
        if self.after < 0:
            raise ValueError(f"after must not be negative; got {after!r}")
        self.paused_since = {}
        self.retiring = {}

    def __repr__(self) -> str:
        return f"RetirePaused(after={self.after})"

    # ActiveMemoryManagerExtension.add_policy sets ``policy.manager``: the moment this
    # policy joins a scheduler, and the place to install the amm_replace handler.
    @property  # type: ignore[override]
    def manager(self) -> ActiveMemoryManagerExtension:
        return self._manager

    @manager.setter
    def manager(self, manager: ActiveMemoryManagerExtension) -> None:
        self._manager = manager
        install_handler(manager.scheduler)

    def run(self) -> SuggestionGenerator:
        scheduler = self.manager.scheduler
        install_handler(scheduler)  # in case someone removed it
        now = time()

        self._adopt(scheduler)
        self._track_retirements(scheduler)

        # dict.items: the scheduler's SortedDict iterates its own views in Python
        for address, ws in dict.items(scheduler.workers):
            if address in self.retiring:
                continue
            if ws.status == Status.paused:
                self.paused_since.setdefault(address, now)
            else:
                self.paused_since.pop(address, None)
        for address in list(self.paused_since):
            if address not in scheduler.workers:
                del self.paused_since[address]
            elif now - self.paused_since[address] >= self.after:
                # Not while a shuffle has outputs pinned to it (P2P's veto): retired,
                # it could not run them, and replaced, it would restart the shuffle.
                # It waits paused, as upstream's paused workers do; new shuffles do
                # not pin outputs to a worker out of service (amm_core.departures).
                ws = scheduler.workers[address]
                if not downscaling_veto(scheduler, ws):
                    self._retire(scheduler, ws)

        # This policy moves no key itself: RetireWorkerWithRoom does.
        yield from ()

    def _adopt(self, scheduler: Scheduler) -> None:
        """Track retirements started by an earlier RetirePaused (rebuilt or removed by
        the scheduler plugin), whose RetireWorkerWithRoom survived it."""
        for p in list(self.manager.policies):
            if not isinstance(p, RetireWorkerWithRoom) or p.address in self.retiring:
                continue
            ws = scheduler.workers.get(p.address)
            if ws is None:
                continue  # it detaches itself at its next run
            self.paused_since.pop(p.address, None)
            self.retiring[p.address] = Retirement(ws, p)
            self.count("retirements_adopted")
            logger.info("RetirePaused: tracking the retirement of %s", p.address)

    def _track_retirements(self, scheduler: Scheduler) -> None:
        for address, rt in list(self.retiring.items()):
            ws = rt.ws
            if scheduler.workers.get(address) is not ws:
                del self.retiring[address]
                self.count("workers_left")
                logger.info("RetirePaused: retired worker %s left the cluster", address)
                continue
            if rt.policy.no_recipients:
                # RetireWorkerWithRoom put the worker back to paused
                del self.retiring[address]
                self.count("retirements_aborted")
                self.paused_since[address] = time()
                logger.warning(
                    "RetirePaused: could not retire %s: no running worker has room "
                    "for its unique keys; trying again in %.0fs",
                    address,
                    self.after,
                )
                continue
            if ws.status != Status.closing_gracefully:
                # Someone else took it out of retirement (e.g. set it running again):
                # stop moving its keys and stop asking for its replacement. The worker
                # itself may have unpaused while our closing_gracefully was on its way
                # to it: tell it the status the scheduler has, or its echo of ours
                # would leave it closing_gracefully with no one retiring it.
                del self.retiring[address]
                if ws.status == Status.running:
                    set_status(scheduler, ws, Status.running)
                if rt.policy.attached():
                    rt.policy.manager.policies.discard(rt.policy)
                self.count("retirements_cancelled")
                logger.info(
                    "RetirePaused: %s is %s, no longer retiring; not replacing it",
                    address,
                    ws.status.name,
                )
                continue
            unique = unsafe_keys(scheduler, ws)
            if unique and not rt.policy.attached():
                # Someone removed it from the AMM; the keys must still go somewhere.
                old = rt.policy
                rt.policy = RetireWorkerWithRoom(address, old.paused_since)
                rt.policy.retiring_since = old.retiring_since
                self.manager.add_policy(rt.policy)
                self.count("retirements_restarted")
                logger.info(
                    "RetirePaused: %s holds %d unique key(s) again; retiring it anew",
                    address,
                    unique,
                )
            recipients = scheduler.running - retirement.retiring_workers(scheduler)
            retirement.hand_back_queued(scheduler, ws, rt.offered, recipients)
            retired = not unique and not ws.processing
            if retired and not rt.retired:
                self.count("workers_retired")
                logger.info(
                    "RetirePaused: %s retired; it holds no unique data and can be "
                    "replaced",
                    address,
                )
            elif rt.retired and not retired:
                self.count("retired_unsafe")
                logger.info(
                    "RetirePaused: retired worker %s holds %d unique key(s) and "
                    "processes %d task(s) again; not safe to kill until they move",
                    address,
                    unique,
                    len(ws.processing),
                )
            rt.retired = retired

    def _retire(self, scheduler: Scheduler, ws: WorkerState) -> None:
        paused_since = self.paused_since.pop(ws.address)
        policy = RetireWorkerWithRoom(ws.address, paused_since)
        self.manager.add_policy(policy)
        set_status(scheduler, ws, Status.closing_gracefully)
        self.retiring[ws.address] = Retirement(ws, policy)
        self.count("retirements_started")
        logger.info(
            "RetirePaused: %s paused for %.0fs; retiring it (%d keys)",
            ws.address,
            policy.retiring_since - paused_since,
            len(ws.has_what),
        )

    def replace(self) -> list[dict[str, Any]]:
        """Workers retired (or retiring) for having stayed paused: replace them."""
        return [
            {
                "address": address,
                "name": rt.ws.name,
                "paused_since": rt.policy.paused_since,
                "retiring_since": rt.policy.retiring_since,
                "retired": rt.retired,
            }
            for address, rt in self.retiring.items()
        ]

    def report(self) -> dict[str, Any]:
        out = super().report()
        out["after"] = self.after
        out["paused"] = dict(self.paused_since)
        out["replace"] = self.replace()
        return out


def replacements(dask_scheduler: Scheduler) -> list[dict[str, Any]]:
    """``replace`` entries of every RetirePaused policy on the scheduler's AMM.

    Usable with ``Client.run_on_scheduler``; served as the ``amm_replace`` handler.
    """
    amm = dask_scheduler.extensions["amm"]
    out: list[dict[str, Any]] = []
    for policy in amm.policies:
        if isinstance(policy, RetirePaused):
            out.extend(policy.replace())
    return out


def install_handler(scheduler: Scheduler) -> None:
    """Serve :func:`replacements` as the scheduler handler ``amm_replace``, e.g.
    ``await rpc(scheduler_address).amm_replace()``."""
    if HANDLER in scheduler.handlers:
        return

    def amm_replace() -> list[dict[str, Any]]:
        return replacements(scheduler)

    scheduler.handlers[HANDLER] = amm_replace
