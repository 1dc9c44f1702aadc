"""The cluster's memory over time, sampled on the scheduler: the data of the
operator's report (a plot of managed, unmanaged and spilled memory, as
distributed's ``MemorySampler`` draws it, with the worker count and markers of what
happened), served by ``amm_core_memory_history``.

Why on the scheduler: the scheduler already has every worker's memory from their
heartbeats, and it outlives the operator's restarts; the operator asks for the
history only when it builds a report, and gets a bounded message.

**Bounded, whatever the age of the cluster.** A sample every :data:`INTERVAL`
seconds (``amm-core.history.interval`` in the dask config) is kept as it is for
:data:`RAW_SECONDS`; older ones survive only as averages over :data:`TIERS` (30 s
buckets for 6 hours, 15 min buckets for 7 days): at most :data:`MAX_ROWS` rows in
all. A sample costs one look at each worker's memory (O(workers), never a key); each
bucket is summed as its samples arrive and closed once, so aggregation costs O(1)
per sample.

**Markers**: the last :data:`MAX_MARKERS` things the scheduler saw happen (workers
added and removed, retirements started, done, aborted), with their times.

Message shape (plain data, bounded)::

    amm_core_memory_history() -> {
        "interval": seconds,             # between samples
        "columns": ["at", "workers", "managed", "unmanaged", "spilled", "fullest",
                    "seconds"],
        "rows": [[at, workers, managed, unmanaged, spilled, fullest, seconds], ...],
                                         # oldest first, at most MAX_ROWS
        "markers": [{"at": scheduler time, "kind": str, "worker": name}, ...],
                                         # oldest first, at most MAX_MARKERS
    }

A row: ``at`` the scheduler time of the sample (of an average: the start of its
bucket), ``seconds`` the time it stands for (the interval, or the bucket's length);
``workers`` the workers connected; ``managed``, ``unmanaged``, ``spilled`` bytes
summed over the workers (distributed's ``WorkerState.memory``); ``fullest`` the
highest process memory / memory limit of a worker (0 without limits). An average
row holds the means of its samples, except ``fullest``: the highest of them (a peak
must not be averaged away). ``kind`` is one of ``worker-added``,
``worker-removed``, ``retirement-started``, ``retirement-done``,
``retirement-aborted``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any

import dask
from dask.utils import parse_timedelta
from distributed.metrics import time
from distributed.utils import log_errors
from amm_core._cycle import Cycle

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler

#: Seconds between samples, unless ``amm-core.history.interval`` says otherwise
INTERVAL = 2.0
#: Seconds for which every sample is kept
RAW_SECONDS = 600.0
#: Samples kept at most (a short interval is not kept for all of RAW_SECONDS)
MAX_RAW = 600
#: The averaged tiers, finest first: (bucket seconds, seconds kept)
TIERS: tuple[tuple[float, float], ...] = ((30.0, 6 * 3600.0), (900.0, 7 * 86400.0))
#: Rows reported at most
MAX_ROWS = MAX_RAW + sum(int(keep // step) for step, keep in TIERS)
#: Markers kept at most
MAX_MARKERS = 200
COLUMNS = ["at", "workers", "managed", "unmanaged", "spilled", "fullest", "seconds"]

Row = list[float]


def configured_interval() -> float:
    value = dask.config.get("amm-core.history.interval", default=None)
    interval = parse_timedelta(value) if value is not None else INTERVAL
    if not interval or interval <= 0 or not math.isfinite(interval):
        raise ValueError(f"amm-core.history.interval must be positive, got {value!r}")
    return float(interval)


class Tier:
    """Averages over buckets of ``step`` seconds, the latest ``maxlen`` kept; the
    bucket being filled is summed as its samples arrive."""

    step: float
    #: Closed buckets, oldest first, each with the samples it averages
    rows: deque[tuple[Row, int]]
    #: Start of the bucket being filled (None: none yet)
    _bucket: float | None
    #: Samples in it, sums of workers/managed/unmanaged/spilled, highest fullest
    _n: int
    _sums: list[float]
    _fullest: float

    def __init__(self, step: float, keep: float):
        self.step = step
        self.rows = deque(maxlen=int(keep // step))
        self._bucket = None
        self._n = 0
        self._sums = [0.0, 0.0, 0.0, 0.0]
        self._fullest = 0.0

    def add(self, row: Row, n: int = 1) -> tuple[Row, int] | None:
        """Add ``row`` (standing for ``n`` samples); return the bucket it closed."""
        bucket = math.floor(row[0] / self.step) * self.step
        closed = None
        if self._bucket is not None and bucket != self._bucket:
            closed = self._close()
        if self._bucket is None:
            self._bucket = bucket
        self._n += n
        sums = self._sums
        for i in range(4):
            sums[i] += row[i + 1] * n
        self._fullest = max(self._fullest, row[5])
        return closed

    def _close(self) -> tuple[Row, int]:
        assert self._bucket is not None
        n = self._n
        workers, managed, unmanaged, spilled = (v / n for v in self._sums)
        row = [
            self._bucket,
            round(workers, 2),
            round(managed),
            round(unmanaged),
            round(spilled),
            self._fullest,
            self.step,
        ]
        self.rows.append((row, n))
        self._bucket, self._n, self._sums, self._fullest = None, 0, [0.0] * 4, 0.0
        return row, n


class Markers:
    """The latest things that happened, with their times."""

    #: Oldest first
    items: deque[dict[str, Any]]

    def __init__(self) -> None:
        self.items = deque(maxlen=MAX_MARKERS)

    def add(self, kind: str, worker: str, at: float | None = None) -> None:
        self.items.append({"at": time() if at is None else at, "kind": kind, "worker": worker})

    def report(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self.items]


class MemoryHistory:
    """The sampler and its ring buffers."""

    scheduler: Scheduler
    #: Seconds between samples
    interval: float
    #: Every sample of the last RAW_SECONDS (at most MAX_RAW), oldest first
    raw: deque[Row]
    #: The averaged tiers, finest first
    tiers: list[Tier]
    markers: Markers
    #: Samples every ``interval``
    cycle: Cycle

    def __init__(self, scheduler: Scheduler, interval: float | None = None):
        self.scheduler = scheduler
        self.interval = configured_interval() if interval is None else float(interval)
        self.raw = deque(maxlen=min(MAX_RAW, math.ceil(RAW_SECONDS / self.interval)))
        self.tiers = [Tier(step, keep) for step, keep in TIERS]
        self.markers = Markers()
        self.cycle = Cycle(scheduler, self.sample, self.interval, "amm-core-memory-history")

    def handlers(self) -> dict[str, Any]:
        return {"amm_core_memory_history": self.report}

    def start(self) -> None:
        self.cycle.start()

    def stop(self) -> None:
        self.cycle.stop()

    @log_errors
    def sample(self, at: float | None = None) -> Row:
        """Sample the workers now (one look at each: O(workers)) and keep it."""
        managed = unmanaged = spilled = 0
        fullest = 0.0
        # dict.values: the SortedDict iterates its own views in Python
        workers = dict.values(self.scheduler.workers)
        for ws in workers:
            # WorkerState.memory, inlined (building a MemoryState for every worker
            # would cost twice the sample): the same sums, checked by the tests
            metrics = ws.metrics
            process = metrics["memory"]
            spilled_bytes = metrics["spilled_bytes"]
            worker_managed = min(process, max(0, ws.nbytes - spilled_bytes["memory"]))
            managed += worker_managed
            unmanaged += process - worker_managed
            spilled += spilled_bytes["disk"]
            limit = ws.memory_limit
            if limit and process > fullest * limit:
                fullest = process / limit
        row = [time() if at is None else at, len(workers), managed, unmanaged, spilled,
               round(fullest, 4), self.interval]
        self.add(row)
        return row

    def add(self, row: Row) -> None:
        """Keep a sample; close the buckets it ends (each feeds the next tier)."""
        self.raw.append(row)
        carry: tuple[Row, int] | None = (row, 1)
        for tier in self.tiers:
            assert carry is not None
            carry = tier.add(*carry)
            if carry is None:
                break

    def rows(self) -> list[Row]:
        """Every tier's rows, oldest first, a coarser row only where no finer one
        covers its time."""
        out: list[Row] = list(self.raw)
        start = out[0][0] if out else math.inf
        for tier in self.tiers:
            older = [row for row, _ in tier.rows if row[0] + tier.step <= start]
            if tier.rows:
                start = min(start, tier.rows[0][0][0])
            out[:0] = older
        return out[-MAX_ROWS:]

    def report(self) -> dict[str, Any]:
        """The answer to ``amm_core_memory_history`` (plain data, bounded)."""
        return {
            "interval": self.interval,
            "columns": list(COLUMNS),
            "rows": [list(r) for r in self.rows()],
            "markers": self.markers.report(),
        }
