"""kopf handlers: one concern each, wired into a registry by :func:`build_registry`.

- Two indexes keep the DaskClusters and MemoryPolicies of each namespace in memory.
  Index and event handlers write nothing to the DaskCluster, so dask-kubernetes'
  own handlers on it (and their diff-base annotation) are never disturbed.
- A MemoryPolicy is reconciled on create, update and resume, and then by a timer
  every ``resync_interval`` seconds: level-triggered, it compares what each
  selected scheduler runs with what the policy wants and fixes the difference.
- A DaskCluster event (new cluster, relabelled cluster) converges that one
  cluster at once instead of waiting for the next resync.
- Deleting a MemoryPolicy restores every scheduler it had configured before kopf
  removes its finalizer.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from dask_memory_operator import metrics
from dask_memory_operator.api import (
    DASK_GROUP,
    DASK_VERSION,
    GROUP,
    PLURAL,
    VERSION,
    InvalidPolicy,
    parse_spec,
)
from dask_memory_operator.access import SchedulerAccessError
from dask_memory_operator.reconcile import ClusterReconciler, Outcome, owner_tag
from dask_memory_operator.scheduler_rpc import SchedulerRPCError
from dask_memory_operator.selection import PolicyInfo, assign, selects
from dask_memory_operator.status import cluster_entry, invalid_status, policy_status


# Logs that are not Events (kopf's per-object `logger` posts its warnings as Events)
log = logging.getLogger(__name__)

#: Schedulers one policy talks to at once
CONCURRENT_CLUSTERS = 8


@dataclass
class OperatorConfig:
    """What `dask-memory-operator run` was told."""

    #: Dotted paths or glob patterns of policy classes a MemoryPolicy may name
    allowed_policy_classes: tuple[str, ...] = ()
    #: Seconds between level-triggered resyncs of every MemoryPolicy
    resync_interval: float = 10.0
    #: Seconds for one scheduler RPC
    rpc_timeout: float = 5.0
    #: How deletion handles an unreachable scheduler: retries before giving up
    delete_retries: int = 3


def dask_cluster_ref(namespace: str, name: str, uid: str) -> dict[str, Any]:
    """A body kopf can post an Event about."""
    return {
        "apiVersion": f"{DASK_GROUP}/{DASK_VERSION}",
        "kind": "DaskCluster",
        "metadata": {"namespace": namespace, "name": name, "uid": uid},
    }


# --- indexes -------------------------------------------------------------------


def daskclusters_by_namespace(
    name: str, namespace: str, labels: Mapping[str, str], uid: str, **_: Any
) -> dict[str, Any]:
    return {namespace: {"name": name, "labels": dict(labels), "uid": uid}}


def memorypolicies_by_namespace(
    body: kopf.Body, namespace: str, memo: kopf.Memo, **_: Any
) -> dict[str, Any]:
    """Policies that can govern clusters: not being deleted, and valid (an invalid
    policy must not hold a cluster away from a valid one)."""
    if body.metadata.get("deletionTimestamp"):
        return {}
    try:
        parse_spec(body.get("spec") or {}, memo.config.allowed_policy_classes)
    except InvalidPolicy:
        return {}
    return {namespace: PolicyInfo.from_body(body)}


def _clusters(index: kopf.Index, namespace: str) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in index.get(namespace, [])}


# --- MemoryPolicy reconcile ----------------------------------------------------


async def reconcile_policy(body: kopf.Body, uid: str, memo: kopf.Memo, **kwargs: Any) -> None:
    """Converge every cluster this policy selects and write its status.

    One pass at a time per policy (timer and change handlers run concurrently in
    kopf), and everything read from the live ``body`` is read once, up front, so a
    pass never applies one generation's spec under another's tag.
    """
    async with _policy_lock(memo, uid):
        if body.metadata.get("deletionTimestamp"):
            return  # restore_on_delete owns it now
        await _reconcile_policy(body=body, uid=uid, memo=memo, **kwargs)


def _policy_lock(memo: kopf.Memo, uid: str) -> asyncio.Lock:
    return memo.policy_locks.setdefault(uid, asyncio.Lock())


async def _reconcile_policy(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    namespace: str,
    name: str,
    uid: str,
    patch: kopf.Patch,
    memo: kopf.Memo,
    daskclusters_by_namespace: kopf.Index,
    memorypolicies_by_namespace: kopf.Index,
    **_: Any,
) -> None:
    config: OperatorConfig = memo.config
    reconciler: ClusterReconciler = memo.reconciler
    generation = body.metadata.get("generation", 1)
    owner = owner_tag(body)
    previous = copy.deepcopy(dict(status))

    try:
        wanted = parse_spec(spec, config.allowed_policy_classes)
    except InvalidPolicy as e:
        message = f"spec.{e}" if not str(e).startswith("spec.") else str(e)
        if previous.get("observedGeneration") != generation or not _is_invalid(previous):
            kopf.warn(body, reason="Invalid", message=message)
        patch.status.update(invalid_status(generation, message, previous))
        return

    clusters = _clusters(daskclusters_by_namespace, namespace)
    # this policy as its body says now (the index may lag by an event)
    policies = [p for p in memorypolicies_by_namespace.get(namespace, []) if p.uid != uid]
    policies.append(PolicyInfo.from_body(body))
    assignment = assign(policies, {n: c["labels"] for n, c in clusters.items()})

    mine = {c: a for c, a in sorted(assignment.items()) if any(p.uid == uid for p in a.contenders)}
    governed = [c for c, a in mine.items() if a.governor.uid == uid]
    limit = asyncio.Semaphore(CONCURRENT_CLUSTERS)

    async def converge(cluster: str) -> Outcome:
        async with limit:
            return await reconciler.converge(namespace, cluster, wanted, owner)

    outcomes = dict(zip(governed, await asyncio.gather(*map(converge, governed))))
    entries = []
    for cluster, a in mine.items():
        if a.governor.uid != uid:
            outcome = Outcome(
                cluster, "Conflict",
                f"{cluster} is governed by MemoryPolicy {a.governor.name} (created earlier); "
                f"this policy does not apply to it",
            )
            entries.append(cluster_entry(outcome, a.governor.name))
            continue
        outcome = outcomes[cluster]
        _post_outcome(body, clusters[cluster], outcome, previous)
        metrics.observe(namespace, name, outcome)
        entry = cluster_entry(outcome, name)
        others = [p.name for p in a.contenders if p.uid != uid]
        if others:
            entry["conflictMessage"] = (
                f"{cluster} is also selected by MemoryPolicy {', '.join(others)}; "
                f"this policy governs it (created earlier)"
            )
        entries.append(entry)

    await _release_unselected(body, namespace, uid, previous, entries, clusters, reconciler)
    patch.status.update(policy_status(generation, entries, previous))


def _is_invalid(status: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Invalid" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )


def _post_outcome(
    policy: kopf.Body,
    cluster: Mapping[str, Any],
    outcome: Outcome,
    previous: Mapping[str, Any],
) -> None:
    """Events on the policy and the cluster: every change, and each new degradation."""
    ref = _post_actions(policy, cluster, outcome)
    was = next((e for e in previous.get("clusters") or () if e.get("name") == cluster["name"]), {})
    if outcome.state == "Degraded" and (was.get("state") != "Degraded" or was.get("message") != outcome.message):
        kopf.warn(policy, reason="Degraded", message=f"DaskCluster {cluster['name']}: {outcome.message}")
        kopf.warn(ref, reason="MemoryPolicyDegraded", message=outcome.message)


def _post_actions(
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


async def _release_unselected(
    policy: kopf.Body,
    namespace: str,
    uid: str,
    previous: Mapping[str, Any],
    entries: list[dict[str, Any]],
    clusters: Mapping[str, Mapping[str, Any]],
    reconciler: ClusterReconciler,
) -> None:
    """Clusters this policy configured before but no longer governs get their own
    configuration back (relabelled, renamed out, or taken over by an older policy)."""
    governed_now = {e["name"] for e in entries if e["state"] != "Conflict"}
    for old in previous.get("clusters") or ():
        cluster = old.get("name")
        if cluster in governed_now or old.get("state") == "Conflict":
            continue
        if cluster not in clusters:
            reconciler.forget_cluster(namespace, cluster)
            continue
        try:
            outcome = await reconciler.release(namespace, cluster, uid)
        except (SchedulerRPCError, SchedulerAccessError) as e:
            log.warning("Could not restore DaskCluster %s yet: %s", cluster, e)
            entries.append(cluster_entry(Outcome(cluster, "Degraded", f"restore pending: {e}"), policy.metadata["name"]))
            continue
        if outcome is not None:
            _post_outcome(policy, clusters[cluster], outcome, previous)


# --- MemoryPolicy deletion -----------------------------------------------------


async def restore_on_delete(body: kopf.Body, uid: str, memo: kopf.Memo, **kwargs: Any) -> None:
    """Give every cluster this policy configured its own configuration back.

    Candidates are the clusters its status lists and those it selects now (the
    status may lag); each scheduler's plugin then says whether this policy owns it.
    """
    async with _policy_lock(memo, uid):  # let a resync in flight finish first
        await _restore_all(body=body, uid=uid, memo=memo, **kwargs)
    memo.policy_locks.pop(uid, None)


async def _restore_all(
    body: kopf.Body,
    status: kopf.Status,
    namespace: str,
    uid: str,
    memo: kopf.Memo,
    retry: int,
    daskclusters_by_namespace: kopf.Index,
    **_: Any,
) -> None:
    config: OperatorConfig = memo.config
    reconciler: ClusterReconciler = memo.reconciler
    clusters = _clusters(daskclusters_by_namespace, namespace)
    me = PolicyInfo.from_body(body)
    candidates = {e["name"] for e in status.get("clusters") or () if e.get("state") != "Conflict"}
    candidates |= {name for name, c in clusters.items() if selects(me, name, c["labels"])}
    unreachable = []
    for cluster in (clusters[name] for name in sorted(candidates) if name in clusters):
        try:
            outcome = await reconciler.release(namespace, cluster["name"], uid)
        except (SchedulerRPCError, SchedulerAccessError) as e:
            unreachable.append(f"{cluster['name']} ({e})")
            continue
        if outcome is not None:
            _post_outcome(body, cluster, outcome, {})
    if not unreachable:
        return
    message = "could not restore " + ", ".join(unreachable)
    if retry + 1 < config.delete_retries:
        raise kopf.TemporaryError(message, delay=config.resync_interval)
    # A scheduler that comes back after a restart starts with its own configuration;
    # holding the deletion forever would not help it.
    kopf.warn(body, reason="RestoreFailed", message=f"{message}; giving up after {retry + 1} attempts")


# --- DaskCluster events --------------------------------------------------------


async def converge_changed_cluster(
    event: Mapping[str, Any],
    body: kopf.Body,
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    memo: kopf.Memo,
    memorypolicies_by_namespace: kopf.Index,
    **_: Any,
) -> None:
    """A new or relabelled DaskCluster is configured now, not at the next resync."""
    reconciler: ClusterReconciler = memo.reconciler
    if event.get("type") == "DELETED" or body.metadata.get("deletionTimestamp"):
        reconciler.forget_cluster(namespace, name)
        return
    policies = list(memorypolicies_by_namespace.get(namespace, []))
    a = assign(policies, {name: labels}).get(name)
    if a is None:
        await _release_orphan(body, name, namespace, memo, memorypolicies_by_namespace)
        return
    policy_body = a.governor.body
    try:
        wanted = parse_spec(policy_body["spec"], memo.config.allowed_policy_classes)
    except InvalidPolicy:
        return  # the policy's own reconcile reports it
    outcome = await reconciler.converge(namespace, name, wanted, owner_tag(policy_body))
    metrics.observe(namespace, a.governor.name, outcome)
    _post_actions(policy_body, {"name": name, "uid": body.metadata.get("uid", "")}, outcome)


async def _release_orphan(
    body: kopf.Body, name: str, namespace: str, memo: kopf.Memo, policies_index: kopf.Index
) -> None:
    """A cluster no policy selects, still configured by a policy that is gone (it was
    deleted while the scheduler was unreachable, or its finalizer was removed by
    hand): give the scheduler its own configuration back."""
    known = {p.uid for policies in policies_index.values() for p in policies}
    outcome = await memo.reconciler.release_orphan(namespace, name, known)
    if outcome is not None:
        ref = dask_cluster_ref(namespace, name, body.metadata.get("uid", ""))
        for action in outcome.actions:
            kopf.info(ref, reason="MemoryPolicyReleased", message=f"no MemoryPolicy governs it: {action}")


async def close_port_forwards(memo: kopf.Memo, **_: Any) -> None:
    await memo.reconciler.locator.close()


# --- wiring --------------------------------------------------------------------


def configure_operator(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own annotation keys and finalizer: never collide with dask-kubernetes'
    # kopf.zalando.org/last-handled-configuration on shared objects.
    settings.persistence.finalizer = f"{GROUP}/restore-schedulers"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90
    settings.networking.request_timeout = 30


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod its service account, elsewhere the kubeconfig (KUBECONFIG or
    ~/.kube/config): kopf's own logins, no client library needed."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    """All handlers, with the intervals ``config`` asks for."""
    registry = kopf.OperatorRegistry()
    policy = (GROUP, VERSION, PLURAL)
    cluster = (DASK_GROUP, DASK_VERSION, "daskclusters")

    kopf.on.startup(registry=registry)(configure_operator)
    kopf.on.cleanup(registry=registry)(close_port_forwards)
    kopf.on.login(registry=registry)(login)
    kopf.index(*cluster, registry=registry)(daskclusters_by_namespace)
    kopf.index(*policy, registry=registry)(memorypolicies_by_namespace)
    kopf.on.event(*cluster, registry=registry)(converge_changed_cluster)

    for decorate in (kopf.on.create, kopf.on.update, kopf.on.resume):
        decorate(*policy, registry=registry, id=f"reconcile_on_{decorate.__name__}")(reconcile_policy)
    kopf.timer(*policy, registry=registry, interval=config.resync_interval, id="resync")(reconcile_policy)
    kopf.on.delete(*policy, registry=registry)(restore_on_delete)
    return registry
