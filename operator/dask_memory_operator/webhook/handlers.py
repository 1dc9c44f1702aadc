"""The webhook's kopf handlers: Pod CREATE in a namespace, answered from what the
operator knows of the namespace's MemoryPolicies and of the pod's DaskCluster.

Anything unexpected in the pod or the policy is logged and the pod is admitted
unchanged: the webhook never blocks or breaks a pod, and never crashes the operator.
The server in front (webhook/server.py) passes on only Pod CREATE reviews whose
namespace is the object's own (from the API server itself, with a client CA), and
answers with nothing but the pod's patch: no warning, no message.
Its configuration has ``failurePolicy: Ignore``, so pods are created (ungoverned) when
the operator is down.

Where that knowledge comes from depends on how the operator runs:

- **One replica** (standalone, :func:`mutate_pod`): kopf's indexes, in memory. It
  answers at once: no API call, no scheduler contact.
- **Several replicas** (a kopf peering, :func:`mutate_pod_among_peers`): the webhook
  Service reaches every replica, but kopf keeps the watches of all but the active one
  paused, so a standby's indexes are empty (it never listed) or stale (it was active
  once). Answered from them, a worker pod would be born without the retirement hook,
  and its deletion later lose data. kopf does not tell a handler whether its replica
  is paused, so every replica among peers reads what it needs from the API for each
  admission instead: the namespace's MemoryPolicies (one LIST of at most
  :data:`MAX_POLICIES`) and the pod's DaskCluster (a LIST by name), within
  :data:`API_TIMEOUT`. The active replica, a standby, and one changing roles right now
  all give the same patch, from the same objects. Only Dask pods reach the handler
  (the configuration's objectSelector), so it costs two small reads per Dask pod.
  When the API does not answer in time, the indexes answer: right on the active
  replica; on a standby the pod goes unchanged, and the active replica reports it
  (``workersWithoutRetirementHook``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from dask_memory_operator import kubeclient
from dask_memory_operator.api.memorypolicy import (
    DASK_GROUP,
    DASK_VERSION,
    GROUP,
    PLURAL,
    VERSION,
    InvalidPolicy,
    parse_spec,
)
from dask_memory_operator.api.scaling import parse_scaling
from dask_memory_operator.api.selection import PolicyInfo, assign
from dask_memory_operator.controllers.daskcluster import daskclusters_by_namespace
from dask_memory_operator.controllers.memorypolicy import memorypolicies_by_namespace
from dask_memory_operator.webhook.mutation import scheduler_containers, worker_pod

logger = logging.getLogger(__name__)

#: kopf serves the handler at this path (its id)
HANDLER_ID = "govern-pods"
CLUSTER_LABEL = "dask.org/cluster-name"
COMPONENT_LABEL = "dask.org/component"


#: Seconds a replica among peers waits for the API's answers for one admission (the
#: webhook's own timeout is 5 s in the chart; the pod is created unchanged past it)
API_TIMEOUT = 2.0
#: MemoryPolicies of one namespace read for an admission; a namespace with more is
#: answered from the indexes (a partial list could pick the wrong policy)
MAX_POLICIES = 100

#: What an admission is answered from: the namespace's policies, and its DaskClusters
#: by name (as the indexes hold them)
Known = tuple[list[PolicyInfo], dict[str, dict[str, Any]]]


def mutate_pod(
    body: kopf.Body, patch: kopf.Patch, namespace: str | None, memo: kopf.Memo,
    daskclusters_by_namespace: kopf.Index, memorypolicies_by_namespace: kopf.Index, **_: Any,
) -> None:
    """The patch for a pod of a cluster a valid MemoryPolicy governs; nothing else.
    From the indexes (one replica)."""
    ns = namespace or body.metadata.get("namespace") or ""
    known = _from_indexes(ns, daskclusters_by_namespace, memorypolicies_by_namespace)
    _admit(body, patch, ns, memo, known)


async def mutate_pod_among_peers(
    body: kopf.Body, patch: kopf.Patch, namespace: str | None, memo: kopf.Memo,
    daskclusters_by_namespace: kopf.Index, memorypolicies_by_namespace: kopf.Index, **_: Any,
) -> None:
    """:func:`mutate_pod` for a replica among peers: from the API (module docstring)."""
    ns = namespace or body.metadata.get("namespace") or ""
    cluster = _dask_pod_cluster(body)
    if cluster is None:
        return
    try:
        async with asyncio.timeout(API_TIMEOUT):
            known = await _from_api(ns, cluster, memo)
    except Exception as e:  # slow, refused, too many policies: what this replica knows
        logger.warning("Admission of a pod of DaskCluster %s/%s: the API could not be read "
                       "(%s: %s); answered from this replica's indexes", ns, cluster,
                       type(e).__name__, e)
        known = _from_indexes(ns, daskclusters_by_namespace, memorypolicies_by_namespace)
    _admit(body, patch, ns, memo, known)


def _admit(body: kopf.Body, patch: kopf.Patch, namespace: str, memo: kopf.Memo,
           known: Known) -> None:
    try:
        _mutate(body, patch, namespace, memo, known)
    except Exception:  # a foreign or malformed object: admitted as it is
        logger.exception("Admission of pod %s/%s: left unchanged",
                         namespace, (body.get("metadata") or {}).get("name") or "(generated name)")
        patch.clear()


def _dask_pod_cluster(body: Mapping[str, Any]) -> str | None:
    """The DaskCluster of a Dask scheduler or worker pod; None for any other pod."""
    labels = (body.get("metadata") or {}).get("labels") or {}
    cluster, component = labels.get(CLUSTER_LABEL), labels.get(COMPONENT_LABEL)
    if not isinstance(cluster, str) or component not in ("scheduler", "worker"):
        return None
    return cluster


def _from_indexes(namespace: str, clusters_index: kopf.Index, policies_index: kopf.Index) -> Known:
    return (list(policies_index.get(namespace, [])),
            {c["name"]: c for c in clusters_index.get(namespace, [])})


async def _from_api(namespace: str, cluster: str, memo: kopf.Memo) -> Known:
    """The namespace's policies and the pod's DaskCluster, read now, made into what
    the indexes would hold (by the index functions themselves)."""
    api = await kubeclient.client()
    bodies = await _list(api, f"{GROUP}/{VERSION}", namespace, PLURAL, {"limit": MAX_POLICIES})
    policies = [info for b in bodies
                for info in memorypolicies_by_namespace(body=kopf.Body(b), namespace=namespace,
                                                        memo=memo).values()]
    if not policies:
        return [], {}  # nothing governs the namespace: no need to read the cluster
    found = await _list(api, f"{DASK_GROUP}/{DASK_VERSION}", namespace, "daskclusters",
                        {"fieldSelector": f"metadata.name={cluster}", "limit": 1})
    clusters = {}
    for c in found:
        meta = c.get("metadata") or {}
        if meta.get("name") == cluster:
            entry = daskclusters_by_namespace(
                name=cluster, namespace=namespace, labels=meta.get("labels") or {},
                annotations=meta.get("annotations") or {}, uid=meta.get("uid", ""))
            clusters[cluster] = entry[namespace]
    return policies, clusters


async def _list(api: Any, version: str, namespace: str, plural: str,
                params: dict[str, Any]) -> list[dict[str, Any]]:
    """One page of a namespaced LIST; more than ``params["limit"]`` is an error."""
    async with api.call_api("GET", version=version, base="/apis", namespace=namespace,
                            url=plural, params=params) as response:
        data = response.json()
    if (data.get("metadata") or {}).get("continue"):
        raise ValueError(f"more than {params['limit']} {plural} in namespace {namespace}")
    return [item for item in data.get("items") or () if isinstance(item, dict)]


def _mutate(body: kopf.Body, patch: kopf.Patch, namespace: str, memo: kopf.Memo,
            known: Known) -> None:
    cluster = _dask_pod_cluster(body)
    if cluster is None:
        return
    component = body.metadata.labels[COMPONENT_LABEL]
    policies, clusters = known
    if not policies:
        return
    info = clusters.get(cluster)
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
    containers = scheduler_containers(body, amm, preload=bool(info.get("preload")),
                                      allowed=memo.config.allowed_policy_classes)
    if containers is not None:
        patch.spec["containers"] = containers
        logger.info("Pod %s/%s: AMM settings of MemoryPolicy %s injected%s", namespace,
                    body.metadata.get("name") or body.metadata.get("generateName", ""),
                    governor.governor.name, ", plugin preloaded" if info.get("preload") else "")
