"""The webhook's kopf handler: Pod CREATE in a namespace, answered from the indexes.

It answers at once from memory (the indexes of DaskClusters and MemoryPolicies): no
API call, no scheduler contact. Anything unexpected in the pod or the policy is
logged and the pod is admitted unchanged: the webhook never blocks or breaks a pod,
and never crashes the operator. Its configuration has ``failurePolicy: Ignore``, so
pods are created (ungoverned) when the operator is down.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from dask_memory_operator.api.memorypolicy import InvalidPolicy, parse_spec
from dask_memory_operator.api.selection import assign
from dask_memory_operator.api.scaling import parse_scaling
from dask_memory_operator.webhook.mutation import scheduler_containers, worker_pod

logger = logging.getLogger(__name__)

#: kopf serves the handler at this path (its id)
HANDLER_ID = "govern-pods"
CLUSTER_LABEL = "dask.org/cluster-name"
COMPONENT_LABEL = "dask.org/component"


def mutate_pod(
    body: kopf.Body, patch: kopf.Patch, namespace: str | None, memo: kopf.Memo,
    daskclusters_by_namespace: kopf.Index, memorypolicies_by_namespace: kopf.Index, **_: Any,
) -> None:
    """The patch for a pod of a cluster a valid MemoryPolicy governs; nothing else."""
    try:
        _mutate(body, patch, namespace or body.metadata.get("namespace") or "", memo,
                daskclusters_by_namespace, memorypolicies_by_namespace)
    except Exception:  # a foreign or malformed object: admitted as it is
        logger.exception("Admission of pod %s/%s: left unchanged",
                         namespace, (body.get("metadata") or {}).get("name") or "(generated name)")
        patch.clear()


def _mutate(
    body: kopf.Body, patch: kopf.Patch, namespace: str, memo: kopf.Memo,
    clusters_index: kopf.Index, policies_index: kopf.Index,
) -> None:
    labels = body.metadata.labels or {}
    cluster, component = labels.get(CLUSTER_LABEL), labels.get(COMPONENT_LABEL)
    if not isinstance(cluster, str) or component not in ("scheduler", "worker"):
        return
    policies = list(policies_index.get(namespace, []))
    if not policies:
        return
    known = {c["name"]: c for c in clusters_index.get(namespace, [])}
    info = known.get(cluster)
    if info is None:
        return  # the DaskCluster is not known (yet): the live install configures it
    governor = assign(policies, {cluster: info["labels"]}).get(cluster)
    if governor is None:
        return
    try:
        amm = parse_spec(governor.governor.body["spec"], memo.config.allowed_policy_classes)
        retirement = parse_scaling(governor.governor.body["spec"]).retirement
    except InvalidPolicy:
        return
    if component == "worker":
        changes = worker_pod(body, retirement)
        if changes is not None:
            patch.spec.update(changes)
        return
    containers = scheduler_containers(body, amm, preload=bool(info.get("preload")))
    if containers is not None:
        patch.spec["containers"] = containers
        logger.info("Pod %s/%s: AMM settings of MemoryPolicy %s injected%s", namespace,
                    body.metadata.get("name") or body.metadata.get("generateName", ""),
                    governor.governor.name, ", plugin preloaded" if info.get("preload") else "")
