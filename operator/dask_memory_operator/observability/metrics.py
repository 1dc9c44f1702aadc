"""Prometheus metrics: what each governed scheduler's AMM reports, per cluster.

Served by ``dask-memory-operator run --metrics-port``. The gauges mirror the
scheduler's own counters as of the last reconcile.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from dask_memory_operator.schedulers.converge import Outcome

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

STATES = ("Applied", "Pending", "Degraded", "Conflict")


def observe(namespace: str, policy: str, outcome: Outcome) -> None:
    labels = (namespace, policy, outcome.cluster)
    for state in STATES:
        CLUSTER_STATE.labels(*labels, state).set(1 if outcome.state == state else 0)
    if outcome.amm:
        AMM_CYCLES.labels(*labels).set(outcome.amm["cycles"])
        REPLICAS_COPIED.labels(*labels).set(outcome.amm["replicasCopied"])
        REPLICAS_DROPPED.labels(*labels).set(outcome.amm["replicasDropped"])
        CLUSTER_MEMORY.labels(*labels).set(outcome.amm["memoryBytes"])
    if outcome.actions:
        SCHEDULER_CHANGES.labels(*labels).inc(len(outcome.actions))
