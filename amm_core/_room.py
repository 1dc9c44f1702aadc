"""What every amm_core policy shares: choosing recipients that have room, counting
what the policy did, and remembering keys without keeping them alive.

Upstream's ``_find_recipient`` picks the running worker with the least memory and
never asks whether the copy fits. Every amm_core policy first narrows its candidates
with :func:`workers_with_room`, so that a copy never pushes a worker past its memory
limit or its pause threshold, counting what is already pending in this AMM cycle
(``manager.workers_memory`` is kept up to date by the extension as suggestions are
accepted).

Workers pause on their *process* memory (RSS), not on the AMM's measure. With the
measure "managed", a worker whose process holds 70% of its limit in unmanaged memory
(a leak, a big import, a running task's temporaries) would look nearly empty, and
copies sent to it would pause it. So room is computed from process memory plus this
cycle's pending changes, which are the difference between ``workers_memory`` and the
measure it started from: pass the AMM's ``measure`` (``manager.measure``).

Policies that remember keys across cycles (Replicate's wanted counts, Rebalance's
moves and cool-downs) hold the key and a weak reference to its ``TaskState``, never
the ``TaskState`` itself: they clean up in ``run()``, which does not come while the
AMM is stopped, and a ``TaskState`` holds its dependencies, dependents and group, so
that one strong reference would keep a released graph alive. :func:`live_task` tells
whether a remembered key is still the same task.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import TYPE_CHECKING, Any

import dask
from dask.typing import Key
from distributed.active_memory_manager import ActiveMemoryManagerPolicy
from distributed.core import Status

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler, TaskState, WorkerState


#: Drop suggestions a reducer makes in one AMM cycle at most; the others wait for the
#: next cycle. A drop costs the scheduler's event loop 10-30 us (the AMM's
#: bookkeeping, the drop guard, the message to the worker): the 8,000 copies four
#: retirements land would otherwise be dropped in one block of 100 ms and more.
MAX_DROPS_PER_CYCLE = 1000


def pause_fraction() -> float | None:
    """The workers' pause threshold as a fraction of memory_limit (dask config).

    The scheduler cannot see each worker's own setting; it assumes the cluster's
    workers share the scheduler's config, as they do in a dask-kubernetes cluster.
    """
    value = dask.config.get("distributed.worker.memory.pause")
    return float(value) if value else None


def expected_process_memory(
    ws: WorkerState, workers_memory: dict[WorkerState, int], measure: str
) -> int:
    """The process memory ``ws`` will have once this cycle's pending copies and drops
    are done: its process memory at the last heartbeat, plus the keys that landed
    on it since (the scheduler learns of them at once, of RSS only with the next
    heartbeat: without this, copies made in the previous cycle would be invisible),
    plus the change ``workers_memory`` has accumulated since the AMM read
    ``measure`` at the start of this cycle.

    Keys released since the heartbeat are not subtracted: RSS seldom shrinks as
    fast. A worker left out of ``workers_memory`` has no change pending.
    """
    landed = max(0, ws.nbytes - ws.metrics.get("managed_bytes", ws.nbytes))
    # MemoryState.process, without building a MemoryState (once per worker and cycle)
    process = ws.metrics["memory"]
    current = workers_memory.get(ws)
    if current is None:
        return process + landed  # no change pending in this cycle
    return process + landed + (current - getattr(ws.memory, measure))


def room(
    ws: WorkerState,
    workers_memory: dict[WorkerState, int],
    measure: str,
    pause_at: float | None = None,
) -> float:
    """Bytes ``ws`` can still take before its process memory reaches its pause
    threshold (or its memory limit when pausing is off). Unlimited workers have
    infinite room. ``measure`` is the AMM's (``manager.measure``): see
    :func:`expected_process_memory`. ``pause_at``: the fraction of the limit to stop
    at, when the caller read :func:`pause_fraction` once for many workers."""
    if not ws.memory_limit:
        return float("inf")
    fraction = pause_at if pause_at is not None else pause_fraction() or 1.0
    return ws.memory_limit * fraction - expected_process_memory(
        ws, workers_memory, measure
    )


def workers_with_room(
    nbytes: int,
    workers_memory: dict[WorkerState, int],
    candidates: set[WorkerState] | None = None,
    *,
    measure: str,
) -> set[WorkerState]:
    """Running workers among ``candidates`` (default: all in ``workers_memory``)
    that can take ``nbytes`` more without crossing their pause threshold.
    Pass ``measure=manager.measure``: see :func:`room`."""
    pool = workers_memory.keys() if candidates is None else candidates
    return {
        ws
        for ws in pool
        if ws.status == Status.running and room(ws, workers_memory, measure) >= nbytes
    }


def live_task(
    scheduler: Scheduler, key: Key, ref: weakref.ref[TaskState]
) -> TaskState | None:
    """The TaskState ``ref`` points to while it is still the scheduler's task for
    ``key``; None once the key was released (its TaskState forgotten) or recreated
    (a new TaskState under the same key)."""
    ts = ref()
    return ts if ts is not None and scheduler.tasks.get(key) is ts else None


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
