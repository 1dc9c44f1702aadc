"""What every amm_core policy shares: choosing recipients that have room, and
counting what the policy did.

Upstream's ``_find_recipient`` picks the running worker with the least memory and
never asks whether the copy fits. Every amm_core policy first narrows its candidates
with :func:`workers_with_room`, so that a copy never pushes a worker past its memory
limit or its pause threshold, counting what is already pending in this AMM cycle
(``manager.workers_memory`` is kept up to date by the extension as suggestions are
accepted).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import dask
from distributed.active_memory_manager import ActiveMemoryManagerPolicy
from distributed.core import Status

if TYPE_CHECKING:
    from distributed.scheduler import WorkerState


def pause_fraction() -> float | None:
    """The workers' pause threshold as a fraction of memory_limit (dask config).

    The scheduler cannot see each worker's own setting; it assumes the cluster's
    workers share the scheduler's config, as they do in a dask-kubernetes cluster.
    """
    value = dask.config.get("distributed.worker.memory.pause")
    return float(value) if value else None


def room(ws: WorkerState, workers_memory: dict[WorkerState, int]) -> float:
    """Bytes ``ws`` can still take before it reaches its pause threshold (or its
    memory limit when pausing is off). Unlimited workers have infinite room."""
    if not ws.memory_limit:
        return float("inf")
    fraction = pause_fraction() or 1.0
    return ws.memory_limit * fraction - workers_memory.get(ws, 0)


def workers_with_room(
    nbytes: int,
    workers_memory: dict[WorkerState, int],
    candidates: set[WorkerState] | None = None,
) -> set[WorkerState]:
    """Running workers among ``candidates`` (default: all in ``workers_memory``)
    that can take ``nbytes`` more without crossing their pause threshold."""
    pool = workers_memory.keys() if candidates is None else candidates
    return {
        ws
        for ws in pool
        if ws.status == Status.running and room(ws, workers_memory) >= nbytes
    }


class CountingPolicy(ActiveMemoryManagerPolicy):
    """An AMM policy that counts what it did, for the scheduler plugin's report.

    Subclasses call ``self.count("replicas_copied")`` etc. when a suggestion is
    accepted (``yield`` returned a worker), and may extend :meth:`report`.
    """

    #: What this policy did since it was created, e.g. replicas_copied, replicas_dropped
    counters: Counter[str]

    def __init__(self) -> None:
        self.counters = Counter()

    def count(self, what: str, n: int = 1) -> None:
        self.counters[what] += n

    def report(self) -> dict[str, Any]:
        """Plain data (msgpack-able) about this policy's state and activity."""
        return {"class": type(self).__name__, "counters": dict(self.counters)}
