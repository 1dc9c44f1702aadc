"""What retirements rescued: the data a plain deletion of their workers would have lost.

A key is *at risk* for a retirement while only leaving workers hold it (the engine's
unsafe keys, each cycle) or when it lands first on the retiring worker (a task it
ran). When the worker leaves, a key at risk that a worker in service holds is
rescued, whoever made that copy: the engine, or a task that fetched it while the
worker stayed. A key at risk for several retirements counts once: it is left to a
committed one (``leaving``: it cannot be cancelled) still to leave; otherwise the
first to leave counts it and takes it off the others. A key whose last copy goes
is at risk no more (a key recomputed under the same name later is not a rescue).

Cost: a cycle's unsafe keys, which the engine walks anyway; O(1) per copy and per
key gone; the keys at risk of a worker once, when it leaves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed.scheduler import TaskState, WorkerState

    from amm_core.retirement import Retirement


class AtRisk:
    """The keys at risk, by retirement (``Retirement.at_risk``) and by key."""

    #: Key -> the retirements it is at risk for
    by_key: dict[Any, set[Retirement]]

    def __init__(self) -> None:
        self.by_key = {}

    def add(self, rt: Retirement, keys: Iterable[TaskState]) -> None:
        for ts in keys:
            if ts.key not in rt.at_risk:
                rt.at_risk.add(ts.key)
                self.by_key.setdefault(ts.key, set()).add(rt)

    def gone(self, ts: TaskState) -> None:
        """The last copy of ``ts`` went: nothing of it can be rescued any more."""
        for rt in self.by_key.pop(ts.key, ()):
            rt.at_risk.discard(ts.key)

    def drop(self, rt: Retirement) -> None:
        """``rt`` ends without rescuing anything (aborted, or its record forgotten)."""
        for key in rt.at_risk:
            self._unlink(key, rt)
        rt.at_risk.clear()

    def settle(self, rt: Retirement, tasks: Mapping[Any, TaskState],
               out_of_service: set[WorkerState]) -> tuple[int, int, bool]:
        """``rt``'s worker left (the scheduler has dropped its copies): the keys and
        bytes it rescued, and whether it left some to a retirement still to leave."""
        keys = nbytes = 0
        deferred = False
        for key in rt.at_risk:
            others = self._unlink(key, rt)
            if any(o.leaving for o in others):
                deferred = True
                continue  # the last committed one to leave counts it
            ts = tasks.get(key)
            if ts is None or ts.state != "memory" or all(ws in out_of_service for ws in ts.who_has or ()):
                continue  # not saved (yet): the others may still see it saved
            keys += 1
            nbytes += ts.get_nbytes()
            for other in others:
                other.at_risk.discard(key)
            self.by_key.pop(key, None)
        rt.at_risk.clear()
        return keys, nbytes, deferred

    def _unlink(self, key: Any, rt: Retirement) -> set[Retirement]:
        """Take ``rt`` off ``key``; the other retirements it is at risk for."""
        others = self.by_key.get(key)
        if others is None:
            return set()
        others.discard(rt)
        if not others:
            del self.by_key[key]
        return others
