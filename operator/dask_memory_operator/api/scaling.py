"""The MemoryPolicy's scaling API: ``spec.retirement`` and ``spec.adaptive``, and the
rules that turn what a scheduler reports into a number of workers.

``retirement`` says how a worker leaves: every worker the operator removes is first
retired by the scheduler plugin's engine (amm_core.retirement), within a time limit,
a few at a time per cluster, letting its running tasks finish (``drain``) or not.

``adaptive`` makes the operator scale one worker group of each governed cluster
between ``minimum`` and ``maximum``: up at once, down after the scheduler's
``adaptive_target`` has asked for fewer workers ``waitCount`` checks in a row (as
distributed's ``Adaptive`` does with ``distributed.adaptive.wait-count``), and never
below the memory floor (:func:`memory_floor`), nor, for 10 minutes after an OOM kill
of one of its workers, below the size it was killed at
(dask_memory_operator.controllers.savings.OOM_FLOOR_SECONDS). Lowering ``maximum`` under the current
size scales down at once, without waiting.

The CRD (``crds/memorypolicy.yaml``) holds the same limits as its schema; a test keeps
the two in step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dask.utils import parse_timedelta

from dask_memory_operator.api.errors import InvalidPolicy

#: Limits of spec.retirement.maxConcurrent and spec.adaptive.{minimum,maximum}
MAX_CONCURRENT_RETIREMENTS = 64
MAX_WORKERS = 1000
#: Bounds of spec.retirement.timeLimit, in seconds
MIN_TIME_LIMIT = 1.0
MAX_TIME_LIMIT = 24 * 3600.0
#: Bounds of spec.adaptive.interval, in seconds
MIN_ADAPTIVE_INTERVAL = 0.5
MAX_ADAPTIVE_INTERVAL = 3600.0
MAX_WAIT_COUNT = 1000


@dataclass(frozen=True)
class RetirementSpec:
    """How a worker is retired before its Deployment is deleted."""

    #: Seconds after which an unfinished retirement is aborted and the worker kept
    time_limit: float = 600.0
    #: Workers of one cluster retiring at once
    max_concurrent: int = 4
    #: Let the tasks a retiring worker runs finish first (else they are rescheduled)
    drain: bool = True


@dataclass(frozen=True)
class AdaptiveSpec:
    """Bounds and pace of the operator's own scaling of one worker group."""

    minimum: int
    maximum: int
    #: The DaskWorkerGroup scaled; "" is the cluster's default group
    worker_group: str = ""
    #: Seconds between looks at the scheduler's adaptive target
    interval: float = 1.0
    #: Consecutive looks asking for fewer workers before scaling down
    wait_count: int = 3
    #: Never scale below what holds the cluster's data under the pause threshold
    memory_floor: bool = True

    def group(self, cluster: str) -> str:
        return self.worker_group or f"{cluster}-default"


@dataclass(frozen=True)
class ScalingSpec:
    retirement: RetirementSpec
    #: None: the operator does not scale the cluster (paused workers are still replaced)
    adaptive: AdaptiveSpec | None


def _duration(value: Any, where: str, low: float, high: float) -> float:
    try:
        seconds = parse_timedelta(value)
    except (ValueError, KeyError, TypeError, AttributeError):  # AttributeError: a list, a map
        seconds = None
    if seconds is None or not low <= seconds <= high:
        raise InvalidPolicy(where, f"{value!r} is not a duration between {low:g}s and {high:g}s")
    return float(seconds)


def _integer(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidPolicy(where, f"{value!r} is not an integer between {low} and {high}")
    return value


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidPolicy(where, f"{value!r} is not true or false")
    return value


def parse_scaling(spec: Mapping[str, Any]) -> ScalingSpec:
    """``spec.retirement`` and ``spec.adaptive``, checked; raises InvalidPolicy."""
    r = spec.get("retirement")
    if r is None:
        r = {}
    if not isinstance(r, Mapping):
        raise InvalidPolicy("spec.retirement", "must be an object")
    defaults = RetirementSpec()
    retirement = RetirementSpec(
        time_limit=_duration(r.get("timeLimit", "10m"), "spec.retirement.timeLimit",
                             MIN_TIME_LIMIT, MAX_TIME_LIMIT),
        max_concurrent=_integer(r.get("maxConcurrent", defaults.max_concurrent),
                                "spec.retirement.maxConcurrent", 1, MAX_CONCURRENT_RETIREMENTS),
        drain=_boolean(r.get("drain", True), "spec.retirement.drain"),
    )
    a = spec.get("adaptive")
    if a is None:
        return ScalingSpec(retirement, None)
    if not isinstance(a, Mapping):
        raise InvalidPolicy("spec.adaptive", "must be an object")
    for key in ("minimum", "maximum"):
        if key not in a:
            raise InvalidPolicy(f"spec.adaptive.{key}", "required")
    minimum = _integer(a["minimum"], "spec.adaptive.minimum", 0, MAX_WORKERS)
    maximum = _integer(a["maximum"], "spec.adaptive.maximum", 0, MAX_WORKERS)
    if maximum < minimum:
        raise InvalidPolicy("spec.adaptive.maximum", f"{maximum} is below minimum ({minimum})")
    group = a.get("workerGroup", "")
    if not isinstance(group, str) or len(group) > 253:
        raise InvalidPolicy("spec.adaptive.workerGroup", "must be a DaskWorkerGroup name")
    adaptive = AdaptiveSpec(
        minimum=minimum,
        maximum=maximum,
        worker_group=group,
        interval=_duration(a.get("interval", "1s"), "spec.adaptive.interval",
                           MIN_ADAPTIVE_INTERVAL, MAX_ADAPTIVE_INTERVAL),
        wait_count=_integer(a.get("waitCount", 3), "spec.adaptive.waitCount", 1, MAX_WAIT_COUNT),
        memory_floor=_boolean(a.get("memoryFloor", True), "spec.adaptive.memoryFloor"),
    )
    return ScalingSpec(retirement, adaptive)


# --- the rules ------------------------------------------------------------------


def memory_floor(data_bytes: int, memory_limit: int, pause_fraction: float | None) -> int:
    """Workers needed to hold ``data_bytes`` (every key in memory, counted once) with
    each worker under its pause threshold (``memory_limit`` x ``pause_fraction``).
    0 when workers have no memory limit or never pause: nothing to hold them to."""
    if data_bytes <= 0 or memory_limit <= 0 or not pause_fraction:
        return 0
    return math.ceil(data_bytes / (memory_limit * pause_fraction))


@dataclass(frozen=True)
class Target:
    """What the operator wants a worker group to be, and why."""

    #: Workers wanted
    workers: int
    #: Why this number: Target (the scheduler asked), Minimum, Maximum, MemoryFloor
    reason: str
    #: Scale down now (maximum lowered under the current size): no wait count
    urgent: bool = False


def wanted_workers(adaptive: AdaptiveSpec, target: int, floor: int, current: int) -> Target:
    """The one rule of the size of a worker group: the scheduler's ``target``, held
    up to the memory ``floor``, within [minimum, maximum]. The floor does not lift it
    past maximum: lowering maximum is a user's explicit order (a retirement that
    finds no room aborts and keeps its worker, so no data is lost)."""
    workers, reason = target, "Target"
    if adaptive.memory_floor and floor > workers:
        workers, reason = floor, "MemoryFloor"
    if workers < adaptive.minimum:
        workers, reason = adaptive.minimum, "Minimum"
    if workers > adaptive.maximum:
        workers, reason = adaptive.maximum, "Maximum"
    return Target(workers, reason, urgent=current > adaptive.maximum)
