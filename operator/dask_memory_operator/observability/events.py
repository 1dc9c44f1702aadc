"""Kubernetes Events about what the operator did to a scheduler, posted on both the
MemoryPolicy and the DaskCluster (``kubectl describe`` on either shows them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from dask_memory_operator.api.memorypolicy import DASK_GROUP, DASK_VERSION
from dask_memory_operator.schedulers.converge import Outcome


def dask_cluster_ref(namespace: str, name: str, uid: str) -> dict[str, Any]:
    """A body kopf can post an Event about."""
    return {
        "apiVersion": f"{DASK_GROUP}/{DASK_VERSION}",
        "kind": "DaskCluster",
        "metadata": {"namespace": namespace, "name": name, "uid": uid},
    }


def post_outcome(
    policy: kopf.Body,
    cluster: Mapping[str, Any],
    outcome: Outcome,
    previous: Mapping[str, Any],
) -> None:
    """Events on the policy and the cluster: every change, and each new degradation."""
    ref = post_actions(policy, cluster, outcome)
    was = next((e for e in previous.get("clusters") or () if e.get("name") == cluster["name"]), {})
    if outcome.state == "Degraded" and (was.get("state") != "Degraded" or was.get("message") != outcome.message):
        kopf.warn(policy, reason="Degraded", message=f"DaskCluster {cluster['name']}: {outcome.message}")
        kopf.warn(ref, reason="MemoryPolicyDegraded", message=outcome.message)


def post_actions(
    policy: Mapping[str, Any], cluster: Mapping[str, Any], outcome: Outcome
) -> dict[str, Any]:
    """An Event on the policy and one on the cluster for each change made; returns
    the cluster's reference for further Events."""
    meta = policy["metadata"]
    ref = dask_cluster_ref(meta["namespace"], cluster["name"], cluster["uid"])
    for action in outcome.actions:
        kopf.info(policy, reason="Applied", message=f"DaskCluster {cluster['name']}: {action}")
        kopf.info(ref, reason="MemoryPolicyApplied", message=f"MemoryPolicy {meta['name']}: {action}")
    return ref
