"""Prometheus metrics: what each governed scheduler's AMM reports, per cluster.

Served by ``dask-memory-operator run --metrics-port``. The gauges mirror the
scheduler's own counters as of the last reconcile (the policy's status leaves them
out: they change on every cycle), and each cluster's savings (rescued, lost by
reason, duplicates dropped, OOM kills, worker-seconds under ``adaptive``) as its
policy's status holds them. The series of a cluster end when its policy stops
governing it, the cluster is deleted or the policy is deleted (:func:`forget`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from dask_memory_operator.schedulers.outcome import Outcome

_LABELS = ("namespace", "policy", "cluster")

CLUSTER_STATE = Gauge(
    "dask_memory_operator_cluster_state",
    "1 for the state a governed DaskCluster is in, 0 for the others",
    _LABELS + ("state",),
)
AMM_CYCLES = Gauge("dask_memory_operator_amm_cycles", "AMM cycles run on the scheduler", _LABELS)
REPLICAS_COPIED = Gauge(
    "dask_memory_operator_amm_replicas_copied", "Replicas the AMM created", _LABELS
)
REPLICAS_DROPPED = Gauge(
    "dask_memory_operator_amm_replicas_dropped", "Replicas the AMM dropped", _LABELS
)
CLUSTER_MEMORY = Gauge(
    "dask_memory_operator_cluster_memory_bytes",
    "Cluster memory by the AMM's measure",
    _LABELS,
)
SCHEDULER_CHANGES = Counter(
    "dask_memory_operator_scheduler_changes",
    "Changes the operator made to schedulers (apply, restore, plugin install)",
    _LABELS,
)
CONTACT_PURPOSES = ("converge", "release", "orphan-check", "scale", "savings")
SCHEDULER_CONTACTS = Counter(
    "dask_memory_operator_scheduler_contacts",
    "Times the operator set out to ask a scheduler something, by purpose "
    f"({', '.join(CONTACT_PURPOSES)})",
    ("namespace", "cluster", "purpose"),
)

#: How a retirement the operator started ended: done (Deployment deleted), aborted
#: (worker kept), cancelled (needed again), lost (its pod went from outside)
RETIREMENT_OUTCOMES = ("done", "aborted", "cancelled", "lost")
RETIREMENTS = Counter(
    "dask_memory_operator_retirements",
    "Worker retirements the operator started, by how they ended",
    ("namespace", "cluster", "outcome"),
)
RETIREMENT_DURATION = Histogram(
    "dask_memory_operator_retirement_duration_seconds",
    "Seconds from the start of a worker's retirement to its end, by outcome",
    ("outcome",),
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
)

# The savings (controllers/savings.py): totals since the operator started counting for
# the cluster, as the policy's status holds them (they survive restarts of the
# operator and of the scheduler): gauges of cumulative values, read with increase()
RESCUED_BYTES = Gauge(
    "dask_memory_operator_rescued_bytes",
    "Bytes moved off workers before their pods went (what a plain deletion would have lost), "
    "by who retired them (operator, hook)", _LABELS + ("by",))
RESCUED_KEYS = Gauge(
    "dask_memory_operator_rescued_keys", "Keys moved off workers before their pods went, by who retired them",
    _LABELS + ("by",))
LOST_BYTES = Gauge(
    "dask_memory_operator_lost_bytes",
    "Bytes the scheduler lost when a governed worker left, by reason (killed, oomKilled, "
    "retirementAborted, retired)", _LABELS + ("reason",))
LOST_KEYS = Gauge(
    "dask_memory_operator_lost_keys", "Keys the scheduler lost when a governed worker left, by reason",
    _LABELS + ("reason",))
DUPLICATES_DROPPED_BYTES = Gauge(
    "dask_memory_operator_duplicates_dropped_bytes", "Bytes of extra copies of keys the AMM's policies dropped",
    _LABELS)
OOM_KILLS = Gauge(
    "dask_memory_operator_oom_kills", "Worker containers of the cluster OOM-killed at their memory limit",
    _LABELS)
WORKER_SECONDS = Gauge(
    "dask_memory_operator_worker_seconds",
    "Seconds of worker pods of the group adaptive scales (run: what ran; at_maximum: what "
    "its maximum would have run over the same time)", _LABELS + ("run",))
SAVINGS_BY = ("operator", "hook")
SAVINGS_REASONS = ("killed", "oomKilled", "retirementAborted", "retired")
WORKER_SECONDS_RUNS = ("adaptive", "at_maximum")

STATES = ("Applied", "Pending", "Degraded", "Conflict")
_PER_CLUSTER = (AMM_CYCLES, REPLICAS_COPIED, REPLICAS_DROPPED, CLUSTER_MEMORY, SCHEDULER_CHANGES,
                DUPLICATES_DROPPED_BYTES, OOM_KILLS)
#: Per cluster, with one more label, and its values
_PER_CLUSTER_BY = ((RESCUED_BYTES, SAVINGS_BY), (RESCUED_KEYS, SAVINGS_BY), (LOST_BYTES, SAVINGS_REASONS),
                   (LOST_KEYS, SAVINGS_REASONS), (WORKER_SECONDS, WORKER_SECONDS_RUNS))

#: Label values of every (namespace, policy, cluster) with series, for forget()
_series: set[tuple[str, str, str]] = set()


def observe(namespace: str, policy: str, outcome: Outcome) -> None:
    labels = (namespace, policy, outcome.cluster)
    _series.add(labels)
    for state in STATES:
        CLUSTER_STATE.labels(*labels, state).set(1 if outcome.state == state else 0)
    if outcome.amm:
        AMM_CYCLES.labels(*labels).set(outcome.amm["cycles"])
        REPLICAS_COPIED.labels(*labels).set(outcome.amm["replicasCopied"])
        REPLICAS_DROPPED.labels(*labels).set(outcome.amm["replicasDropped"])
        CLUSTER_MEMORY.labels(*labels).set(outcome.amm["memoryBytes"])
    if outcome.actions:
        SCHEDULER_CHANGES.labels(*labels).inc(len(outcome.actions))


def observe_savings(namespace: str, policy: str, cluster: str, savings: Mapping[str, Any],
                    worker_seconds: tuple[float, float] | None) -> None:
    """The cluster's savings, as its status entry holds them, and its worker-seconds
    as of now (None: no adaptive)."""
    labels = (namespace, policy, cluster)
    _series.add(labels)
    rescued = savings.get("rescued") or {}
    for by in SAVINGS_BY:
        RESCUED_BYTES.labels(*labels, by).set((rescued.get(by) or {}).get("bytes", 0))
        RESCUED_KEYS.labels(*labels, by).set((rescued.get(by) or {}).get("keys", 0))
    reasons = (savings.get("lost") or {}).get("byReason") or {}
    for reason in SAVINGS_REASONS:
        LOST_BYTES.labels(*labels, reason).set((reasons.get(reason) or {}).get("bytes", 0))
        LOST_KEYS.labels(*labels, reason).set((reasons.get(reason) or {}).get("keys", 0))
    DUPLICATES_DROPPED_BYTES.labels(*labels).set((savings.get("duplicatesDropped") or {}).get("bytes", 0))
    OOM_KILLS.labels(*labels).set((savings.get("oomKills") or {}).get("count", 0))
    if worker_seconds is not None:
        for run, value in zip(WORKER_SECONDS_RUNS, worker_seconds):
            WORKER_SECONDS.labels(*labels, run).set(value)
    else:
        for run in WORKER_SECONDS_RUNS:
            _remove(WORKER_SECONDS, *labels, run)


def observe_retirement(namespace: str, cluster: str, outcome: str, seconds: float) -> None:
    RETIREMENTS.labels(namespace, cluster, outcome).inc()
    if outcome != "cancelled":
        RETIREMENT_DURATION.labels(outcome).observe(seconds)


def forget(namespace: str, policy: str | None = None, cluster: str | None = None) -> None:
    """End the series of a cluster (every policy's, when ``policy`` is None) or of a
    policy (every cluster's, when ``cluster`` is None)."""
    for labels in [s for s in _series if s[0] == namespace and policy in (None, s[1]) and cluster in (None, s[2])]:
        _series.discard(labels)
        for state in STATES:
            _remove(CLUSTER_STATE, *labels, state)
        for metric in _PER_CLUSTER:
            _remove(metric, *labels)
        for metric, values in _PER_CLUSTER_BY:
            for value in values:
                _remove(metric, *labels, value)
    if policy is None and cluster is not None:
        for purpose in CONTACT_PURPOSES:
            _remove(SCHEDULER_CONTACTS, namespace, cluster, purpose)
        for outcome in RETIREMENT_OUTCOMES:
            _remove(RETIREMENTS, namespace, cluster, outcome)


def _remove(metric: Gauge | Counter, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:  # that series was never set (e.g. no amm report yet)
        pass
