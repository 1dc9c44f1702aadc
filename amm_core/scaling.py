"""The questions a caller that scales the cluster (the dask-memory-operator) asks the
scheduler: how big should the cluster be, and which workers may go first. Served by
the scheduler plugin's handlers ``amm_core_scaling`` (every adaptive look, every
second or so) and ``amm_core_retirement_candidates`` (every scale-down).

Both cost what the workers cost, never a walk of every key: the bytes in memory and
what each worker alone holds are running totals (:mod:`amm_core.totals`); the keys
of the workers out of service (retiring, leaving: few, while they go) are the only
keys walked, because a copy on them does not count as safe; a scheduler plugin's
veto (P2P) is asked once for all the workers, not once per worker.

Message shapes (plain data; answers bounded: at most :data:`MAX_SCALING_WORKERS`
workers, at most ``n`` candidates)::

    amm_core_scaling()
        -> {"target": int,               # Scheduler.adaptive_target()
            "data_bytes": int,           # keys in memory, each counted once
            "pause_fraction": float | None,   # distributed.worker.memory.pause
            "worker_states": [{"name", "address", "status", "memory_limit",
                               "nbytes", "processing"}, ...]}

    amm_core_retirement_candidates(workers: [name | address, ...], n: int)
        -> {"candidates": [{"worker", "address", "unique_bytes", "unique_keys",
                            "tasks_running", "why"}, ...],   # best first, at most n
            "excluded": [{"worker", "reason"}, ...]}
        # unique: the keys that would be lost if the worker went now (no copy on a
        # worker in service: amm_core.departures)
"""

from __future__ import annotations

from collections import defaultdict
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import dask
from distributed.core import Status

from amm_core._workers import find_workers, worker_names
from amm_core.departures import downscaling_vetoes, out_of_service
from amm_core.totals import HeldData

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler, WorkerState

    from amm_core.retirement import RetirementEngine

#: Workers listed by ``amm_core_scaling`` (bounded: the caller refuses larger answers)
MAX_SCALING_WORKERS = 1000


class Scaling:
    """The scaling questions of one scheduler."""

    scheduler: Scheduler
    #: The retirements in progress (their workers are not candidates)
    engine: RetirementEngine
    #: What the workers hold, kept up to date
    held: HeldData
    #: The scheduler plugin (not asked whether a worker may go)
    plugin: object

    def __init__(self, engine: RetirementEngine, held: HeldData, plugin: object):
        self.scheduler = engine.scheduler
        self.engine = engine
        self.held = held
        self.plugin = plugin

    def handlers(self) -> dict[str, Any]:
        return {
            "amm_core_scaling": self.scaling,
            "amm_core_retirement_candidates": self.candidates,
        }

    def scaling(self) -> dict[str, Any]:
        """What a caller that scales the cluster needs, in one answer: the
        scheduler's ``adaptive_target``, the bytes of every key in memory counted
        once, the pause threshold (this scheduler's config: workers of one image
        share it), and each worker (at most MAX_SCALING_WORKERS)."""
        pause = dask.config.get("distributed.worker.memory.pause")
        # dict.values: the scheduler's SortedDict iterates its own views in Python
        named = sorted(
            ((str(ws.name), ws) for ws in dict.values(self.scheduler.workers)),
            key=itemgetter(0),
        )
        return {
            "target": int(self.scheduler.adaptive_target()),
            "data_bytes": self.held.data_bytes,
            "pause_fraction": float(pause) if pause else None,
            "worker_states": [
                {
                    "name": name,
                    "address": ws.address,
                    "status": ws.status.name,
                    "memory_limit": int(ws.memory_limit or 0),
                    "nbytes": int(ws.nbytes),
                    "processing": len(ws.processing),
                }
                for name, ws in named[:MAX_SCALING_WORKERS]
            ],
        }

    def candidates(self, workers: list[str], n: int) -> dict[str, Any]:
        """The ``n`` workers among ``workers`` best retired now: the fewest unsafe
        bytes, then the fewest tasks processing; the others, and why not."""
        names = worker_names(workers)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        found, unknown = find_workers(self.scheduler, names)
        excluded = [
            {"worker": name, "reason": "not connected to the scheduler"} for name in unknown
        ]
        why_not = {ws: self._busy(ws) for ws in found}
        vetoes = downscaling_vetoes(
            self.scheduler, [ws for ws in found if not why_not[ws]], skip=self.plugin
        )
        unsafe = self.unsafe_beyond_sole()
        ranked = []
        for ws in found:
            name = str(ws.name)
            reason = why_not[ws] or vetoes.get(ws, "")
            if reason:
                excluded.append({"worker": name, "reason": reason})
                continue
            extra_bytes, extra_keys = unsafe.get(ws, (0, 0))
            ranked.append(
                (
                    self.held.sole_bytes(ws) + extra_bytes,
                    len(ws.processing),
                    name,
                    self.held.sole_keys(ws) + extra_keys,
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

    def _busy(self, ws: WorkerState) -> str:
        """Why ``ws`` is no candidate, besides a veto ("" if it is one)."""
        rt = self.engine.records.get(str(ws.name))
        if rt is not None and rt.watched:
            return f"already retiring ({rt.state})"
        if ws in self.engine.departures.leaving:
            return "its pod is going"
        if ws.status != Status.running:
            return f"status is {ws.status.name}"
        return ""

    def unsafe_beyond_sole(self) -> dict[WorkerState, tuple[int, int]]:
        """Per worker in service: the (bytes, keys) it holds that would be lost with
        it although others hold them too, because every other holder is out of
        service (their copies go with them). Walks only the keys of the workers out of
        service."""
        out_of = out_of_service(self.scheduler)
        seen: set[int] = set()
        extra: defaultdict[WorkerState, list[int]] = defaultdict(lambda: [0, 0])
        for gone in out_of:
            for ts in gone.has_what:
                holders = ts.who_has
                if not holders or len(holders) < 2 or id(ts) in seen:
                    continue
                seen.add(id(ts))
                serving = [ws for ws in holders if ws not in out_of]
                if len(serving) == 1:
                    entry = extra[serving[0]]
                    entry[0] += ts.get_nbytes()
                    entry[1] += 1
        return {ws: (b, k) for ws, (b, k) in extra.items()}
