"""A MemoryPolicy's ``status``, built from what one reconcile pass found.

Conditions:

- ``Ready``: valid, and every cluster the policy governs runs its configuration.
- ``Invalid``: the spec cannot be applied; the message names the field and why.
- ``Degraded``: some governed clusters could not be configured; names them and why.
- ``Conflict``: some selected clusters are also selected by another policy (reason
  OverlappingPolicies; says which policy governs each), or an ``adaptive`` policy's
  cluster also has a DaskAutoscaler (reason DaskAutoscaler; the operator leaves its
  size to the autoscaler).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dask_memory_operator.api.conditions import condition
from dask_memory_operator.schedulers.converge import LIVE_COUNTERS
from dask_memory_operator.schedulers.outcome import Outcome
from dask_memory_operator.untrusted import describe


#: Characters of a cluster's message, and of a condition's: scheduler texts end up
#: there, and a status past etcd's size limit would not be written at all
MAX_ENTRY_MESSAGE = 1024
MAX_CONDITION_MESSAGE = 4096


def _bounded(text: str, limit: int) -> str:
    return describe(text, limit)


def cluster_entry(outcome: Outcome, governed_by: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": outcome.cluster,
        "state": outcome.state,
        "governedBy": governed_by,
    }
    if outcome.cause:
        entry["reason"] = outcome.cause
    if outcome.message:
        entry["message"] = _bounded(outcome.message, MAX_ENTRY_MESSAGE)
    if outcome.plugin_source:
        entry["pluginSource"] = outcome.plugin_source
    if outcome.applied_generation is not None:
        entry["appliedGeneration"] = outcome.applied_generation
    if outcome.plugin_warning:
        entry["pluginWarning"] = outcome.plugin_warning
    if outcome.amm is not None:
        entry["amm"] = {k: v for k, v in outcome.amm.items() if k not in LIVE_COUNTERS}
    return entry


def invalid_status(
    generation: int, message: str, previous: Mapping[str, Any]
) -> dict[str, Any]:
    """Status of a spec that cannot be applied. Clusters keep what they run."""
    old = previous.get("conditions") or ()
    return {
        "observedGeneration": generation,
        "matchedClusters": previous.get("matchedClusters", 0),
        "appliedClusters": previous.get("appliedClusters", 0),
        "clusters": previous.get("clusters", []),
        "conditions": [
            condition("Ready", False, "Invalid", message, generation, old),
            condition("Invalid", True, "InvalidSpec", message, generation, old),
            condition("Degraded", False, "Invalid", "nothing applied", generation, old),
            condition("Conflict", False, "Invalid", "", generation, old),
        ],
    }


def policy_status(
    generation: int,
    entries: Sequence[Mapping[str, Any]],
    previous: Mapping[str, Any],
) -> dict[str, Any]:
    """Status of a valid spec from its per-cluster entries."""
    old = previous.get("conditions") or ()
    governed = [e for e in entries if e["state"] != "Conflict"]
    applied = [e for e in governed if e["state"] == "Applied"]
    degraded = [e for e in governed if e["state"] == "Degraded"]
    pending = [e for e in governed if e["state"] == "Pending"]
    contested = [e for e in entries if e["state"] == "Conflict"]

    if degraded:
        ready = condition(
            "Ready", False, "Degraded",
            f"{len(applied)}/{len(governed)} clusters configured", generation, old,
        )
    elif pending:
        ready = condition(
            "Ready", False, "Pending",
            f"waiting for {', '.join(e['name'] for e in pending)}", generation, old,
        )
    elif not entries:
        ready = condition("Ready", True, "NoClustersSelected", "no DaskCluster selected", generation, old)
    elif not governed:
        ready = condition(
            "Ready", False, "Conflict",
            "every selected cluster is governed by another MemoryPolicy", generation, old,
        )
    else:
        ready = condition(
            "Ready", True, "Applied",
            f"{len(applied)}/{len(governed)} clusters configured", generation, old,
        )

    degraded_msg = _bounded("; ".join(f"{e['name']}: {e.get('message', '')}" for e in degraded),
                            MAX_CONDITION_MESSAGE)
    causes = {e.get("reason") or "Unreachable" for e in degraded}
    degraded_reason = (causes.pop() if len(causes) == 1 else "SchedulersDegraded") if degraded else "AllReachable"
    overlaps = [e["message"] for e in contested] + [
        e["conflictMessage"] for e in governed if e.get("conflictMessage")
    ]
    autoscaled = [e["autoscalerConflict"] for e in governed if e.get("autoscalerConflict")]
    conflict_msgs = overlaps + autoscaled
    conflict_reason = ("OverlappingPolicies" if overlaps else "DaskAutoscaler") if conflict_msgs else "NoOverlap"
    return {
        "observedGeneration": generation,
        "matchedClusters": len(entries),
        "appliedClusters": len(applied),
        "clusters": [{k: v for k, v in e.items() if k not in ("conflictMessage", "autoscalerConflict")}
                     for e in entries],
        "conditions": [
            ready,
            condition("Invalid", False, "Valid", "", generation, old),
            condition(
                "Degraded", bool(degraded), degraded_reason,
                degraded_msg, generation, old,
            ),
            condition(
                "Conflict", bool(conflict_msgs), conflict_reason,
                _bounded("; ".join(conflict_msgs), MAX_CONDITION_MESSAGE), generation, old,
            ),
        ],
    }
