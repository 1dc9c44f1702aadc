"""What the plugin saved, and what the cluster lost anyway, counted on the scheduler
as it happens: the answer to ``amm_core_savings``.

Why here and not in the operator: the operator restarts, and its memory goes with
it; the scheduler saw every copy land and every worker leave, with the keys the
worker took with it (its own ``remove-worker`` event). The counters are cumulative
since the plugin started; ``id`` and ``started`` change when the scheduler (or the
plugin) restarts, so that a reader keeping its own totals adds the new counters to
them instead of taking a drop for a negative saving.

- *rescued*: keys and bytes only a retiring worker held during its retirement (as
  the engine (amm_core.retirement) saw them) that another worker holds when it
  leaves the cluster: the data a plain deletion would have lost. Most are the
  engine's copies; a key a task fetched while the worker stayed counts too. Counted
  when the worker leaves (a copy off a worker that stays saved nothing yet), by who
  asked: ``operator`` (``keep_out=True``) or ``hook`` (a preStop hook,
  ``keep_out=False``). A worker whose process registered again and left again is
  counted again for what was at risk since.
- *lost*: keys and bytes the scheduler lost when a worker left (lost computed and
  lost scattered keys of its ``remove-worker`` event), by why:
  ``retirementAborted`` (its retirement was aborted or blocked when it left),
  ``killed`` (it left without any retirement: killed, crashed, OOM-killed, deleted
  from outside), ``retired`` (its retirement was done, and keys that landed on it
  afterwards were not copied yet: rare).
- *duplicates dropped*: extra copies the main AMM's policies dropped, and their
  bytes, counted where the AMM enacts its drops (amm_core.control): the cost follows
  the drops, never the keys.
- *departures*: the last :data:`MAX_DEPARTURES` workers that left, each with what
  the scheduler lost with it and why, and what was moved off it (``moved_keys``,
  ``moved_bytes``: what it rescued), numbered by a ``seq`` that only grows:
  the operator attributes a ``killed`` one to an OOM kill it saw on the pod, posts an
  Event for a preStop hook's retirement, and handles each record once (a gap in
  ``seq`` says records were missed).

The counters without the departures (:meth:`Savings.counters`, a few dozen numbers)
are also part of every ``amm_core_status`` answer, so that the operator, which asks
for the status on every pass anyway, reads ``amm_core_savings`` only when ``seq``
says a worker left since it last looked.

Both messages of this module and of amm_core.history stay far inside the
operator's wire bounds (dask_memory_operator.schedulers.wire: a few thousand values).

Every worker that leaves costs O(keys it lost) (their bytes are summed from the
event, once); nothing here walks the cluster.

Message shape (plain data)::

    amm_core_savings() -> {
        "id": str,                       # changes when the plugin (re)starts
        "started": scheduler time,       # when the counters started
        "now": scheduler time,
        "rescued": {"operator": counts, "hook": counts},
        "lost": {"retirementAborted": counts, "killed": counts, "retired": counts},
        "duplicates_dropped": {"replicas": int, "bytes": int},
        "departures": [departure, ...],  # oldest first, at most MAX_DEPARTURES
        "seq": int,                      # the seq of the latest departure (0: none)
    }
    counts = {"workers": int, "keys": int, "bytes": int}
        # rescued: workers that left with copies moved off them; lost: workers that
        # left for that reason, whether they lost anything or not (zero shown as zero)
    departure = {"seq": int, "worker": name, "address": str, "at": scheduler time,
                 "keys": int, "bytes": int,   # lost with it
                 "moved_keys": int, "moved_bytes": int,   # rescued from it
                 "why": "retired" | "retirementAborted" | "killed",
                 "retirement": "operator" | "hook" | None}

    amm_core_status()["savings"] = the answer above without "departures" and "now"
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, Literal

from distributed.metrics import time

if TYPE_CHECKING:
    from amm_core.retirement import Retirement

#: Departures kept (and reported) at most, the oldest going first
MAX_DEPARTURES = 64

Why = Literal["retired", "retirementAborted", "killed"]
WHYS: tuple[Why, ...] = ("retired", "retirementAborted", "killed")
WHO: tuple[str, ...] = ("operator", "hook")


class Counts:
    """Workers, keys and bytes, summed."""

    workers: int
    keys: int
    bytes: int

    def __init__(self) -> None:
        self.workers = self.keys = self.bytes = 0

    def add(self, keys: int, nbytes: int) -> None:
        self.workers += 1
        self.keys += keys
        self.bytes += nbytes

    def report(self) -> dict[str, int]:
        return {"workers": self.workers, "keys": self.keys, "bytes": self.bytes}


class Savings:
    """The counters of one plugin, fed by the retirement engine (departures and what
    was moved off them) and by the AMM control (drops)."""

    #: Tells this plugin's counters from those of a plugin before a restart
    id: str
    #: Scheduler time the counters started
    started: float
    #: Moved off workers that then left, by who asked ("operator", "hook")
    rescued: dict[str, Counts]
    #: Lost with workers that left, by why
    lost: dict[str, Counts]
    #: The latest departures, oldest first
    departures: deque[dict[str, Any]]
    #: The seq of the latest departure
    seq: int

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex
        self.started = time()
        self.rescued = {who: Counts() for who in WHO}
        self.lost = {why: Counts() for why in WHYS}
        self.departures = deque(maxlen=MAX_DEPARTURES)
        self.seq = 0

    def rescue(self, rt: Retirement, keys: int, nbytes: int, deferred: bool = False) -> None:
        """``rt``'s worker left, having rescued ``keys`` (``nbytes``) and, if
        ``deferred``, left more for another retiring worker to count
        (amm_core.rescue): a worker counts if it had a share in a rescue."""
        if keys or deferred:
            self.rescued["operator" if rt.keep_out else "hook"].add(keys, nbytes)

    def departed(
        self,
        name: str,
        address: str,
        keys: int,
        nbytes: int,
        why: Why,
        rt: Retirement | None,
    ) -> None:
        """A worker left; the scheduler lost ``keys`` (``nbytes``) with it; ``rt``: the
        retirement watching it (what it moved is in the record)."""
        self.lost[why].add(keys, nbytes)
        self.seq += 1
        self.departures.append(
            {
                "seq": self.seq,
                "worker": name,
                "address": address,
                "at": time(),
                "keys": keys,
                "bytes": nbytes,
                "moved_keys": 0 if rt is None else rt.rescued_keys,
                "moved_bytes": 0 if rt is None else rt.rescued_bytes,
                "why": why,
                "retirement": None if rt is None else ("operator" if rt.keep_out else "hook"),
            }
        )

    def counters(self, replicas_dropped: int, bytes_dropped: int) -> dict[str, Any]:
        """The counters alone (no departures): a fixed few dozen numbers, part of every
        ``amm_core_status`` answer."""
        return {
            "id": self.id,
            "started": self.started,
            "rescued": {who: c.report() for who, c in self.rescued.items()},
            "lost": {why: c.report() for why, c in self.lost.items()},
            "duplicates_dropped": {
                "replicas": replicas_dropped,
                "bytes": bytes_dropped,
            },
            "seq": self.seq,
        }

    def report(self, replicas_dropped: int, bytes_dropped: int) -> dict[str, Any]:
        """The answer to ``amm_core_savings`` (plain data, bounded), with the drops
        counted by the AMM control."""
        return {
            **self.counters(replicas_dropped, bytes_dropped),
            "now": time(),
            "departures": [dict(d) for d in self.departures],
        }
