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
"retiring_since", "retired"}``;
``retired`` turns true once no key is held only by that worker, i.e. when the worker
can be killed without losing data.

If the unique keys cannot go anywhere (no running worker with room), the retirement
is aborted, the worker goes back to paused, and it is tried again after ``after``.
Pauses are observed at AMM cycles, so ``paused_since`` has the AMM interval's
resolution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dask.utils import parse_timedelta
from distributed.active_memory_manager import (
    RetireWorker,
    Suggestion,
    SuggestionGenerator,
)
from distributed.core import Status
from distributed.metrics import time

from amm_core._room import CountingPolicy, workers_with_room

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler, WorkerState

# Main logger. Terse at DEBUG level.
logger = logging.getLogger(__name__)
# Per-key logging. Verbose at DEBUG level.
task_logger = logging.getLogger(__name__ + ".tasks")

#: Name of the scheduler handler serving :func:`replacements`
HANDLER = "amm_replace"


class RetireWorkerWithRoom(RetireWorker):
    """Upstream's RetireWorker, but copying keys only to workers with room."""

    def run(self) -> SuggestionGenerator:
        gen = super().run()
        choice = None
        while True:
            try:
                suggestion = gen.send(choice)
            except StopIteration:
                return
            if suggestion.op == "replicate" and suggestion.candidates is None:
                ts = suggestion.ts
                candidates = workers_with_room(ts.nbytes, self.manager.workers_memory)
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


@dataclass
class Retirement:
    """A paused worker being retired by :class:`RetirePaused`."""

    #: The worker as the scheduler knows it
    ws: WorkerState
    #: When it was first seen paused (scheduler clock, seconds since the epoch)
    paused_since: float
    #: When its retirement started (scheduler clock)
    retiring_since: float
    #: The AMM policy copying its unique keys away
    policy: RetireWorkerWithRoom
    #: True once no key is held only by this worker
    retired: bool = False


class RetirePaused(CountingPolicy):
    """Retire workers that stay paused for longer than ``after``.

    Parameters
    ----------
    after:
        How long a worker may stay paused (seconds or a string such as "30s").

    Counters: ``retirements_started``, ``workers_retired``, ``retirements_aborted``,
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

    def run(self) -> SuggestionGenerator:
        scheduler = self.manager.scheduler
        install_handler(scheduler)
        now = time()

        self._track_retirements(scheduler)

        for address, ws in scheduler.workers.items():
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
                self._retire(scheduler, scheduler.workers[address])

        # This policy moves no key itself: RetireWorkerWithRoom does.
        yield from ()

    def _track_retirements(self, scheduler: Scheduler) -> None:
        for address, rt in list(self.retiring.items()):
            if scheduler.workers.get(address) is not rt.ws:
                del self.retiring[address]
                self.count("workers_left")
                logger.info("RetirePaused: retired worker %s left the cluster", address)
            elif rt.policy.no_recipients:
                del self.retiring[address]
                self.count("retirements_aborted")
                # Back to paused, as Scheduler.retire_workers does on abort; the
                # worker unpauses by itself if its memory went down meanwhile.
                self._set_status(scheduler, rt.ws, Status.paused)
                self.paused_since[address] = time()
                logger.warning(
                    "RetirePaused: could not retire %s: no running worker has room "
                    "for its unique keys; trying again in %.0fs",
                    address,
                    self.after,
                )
            elif not rt.retired and rt.policy.done():
                rt.retired = True
                self.count("workers_retired")
                logger.info(
                    "RetirePaused: %s retired; it holds no unique data and can be "
                    "replaced",
                    address,
                )

    def _retire(self, scheduler: Scheduler, ws: WorkerState) -> None:
        paused_since = self.paused_since.pop(ws.address)
        policy = RetireWorkerWithRoom(ws.address)
        self.manager.add_policy(policy)
        self._set_status(scheduler, ws, Status.closing_gracefully)
        self.retiring[ws.address] = Retirement(ws, paused_since, time(), policy)
        self.count("retirements_started")
        logger.info(
            "RetirePaused: %s paused for %.0fs; retiring it (%d keys)",
            ws.address,
            time() - paused_since,
            len(ws.has_what),
        )

    @staticmethod
    def _set_status(scheduler: Scheduler, ws: WorkerState, status: Status) -> None:
        # As Scheduler.retire_workers: set it on the scheduler at once, so that no task
        # or copy lands on the worker meanwhile, and tell the worker.
        stimulus_id = f"retire-paused-{time()}"
        scheduler.handle_worker_status_change(status, ws, stimulus_id)
        scheduler.stream_comms[ws.address].send(
            {
                "op": "worker-status-change",
                "status": status.name,
                "stimulus_id": stimulus_id,
            }
        )

    def replace(self) -> list[dict[str, Any]]:
        """Workers retired (or retiring) for having stayed paused: replace them."""
        return [
            {
                "address": address,
                "name": rt.ws.name,
                "paused_since": rt.paused_since,
                "retiring_since": rt.retiring_since,
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
