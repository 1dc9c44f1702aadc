"""The MemoryPolicy controller.

- An index keeps the MemoryPolicies of each namespace in memory.
- A MemoryPolicy is reconciled on create, update and resume, and then by a timer
  every ``resync_interval`` seconds: level-triggered, it compares what each
  selected scheduler runs with what the policy wants and fixes the difference.
- Deleting a MemoryPolicy restores every scheduler it had configured before kopf
  removes its finalizer.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf

from dask_memory_operator.api.memorypolicy import InvalidPolicy, index_body, parse_spec
from dask_memory_operator.api.scaling import parse_scaling
from dask_memory_operator.api.selection import PolicyInfo, selects
from dask_memory_operator.controllers import savings as savings_module, workergroup
from dask_memory_operator.controllers.assignment import ASSIGNMENTS, policy_clusters
from dask_memory_operator.controllers.config import OperatorConfig
from dask_memory_operator.controllers.daskcluster import RESTORE_TIMEOUT_CALLS
from dask_memory_operator.controllers.scaling import RETIREPAUSED, autoscalers_of
from dask_memory_operator.controllers.status import cluster_entry, invalid_status, policy_status
from dask_memory_operator.observability import metrics
from dask_memory_operator.observability.events import dask_cluster_ref, post, post_outcome
from dask_memory_operator.schedulers.converge import (
    ClusterReconciler,
    Outcome,
    PendingRestore,
    log_failed_restore,
    owner_tag,
)

logger = logging.getLogger(__name__)

#: Schedulers one policy talks to at once
CONCURRENT_CLUSTERS = 8


def memorypolicies_by_namespace(
    body: kopf.Body, namespace: str, memo: kopf.Memo, **_: Any
) -> dict[str, Any]:
    """Every policy not being deleted, marked valid or not. Only valid ones may govern
    clusters (an invalid policy must not hold a cluster away from a valid one), but
    all are known: the scheduler an invalid policy configured keeps what it runs."""
    if body.metadata.get("deletionTimestamp"):
        return {}
    valid = _valid(body.get("spec") or {}, memo.config)
    # held for every policy: not its annotations or managed fields, and the spec only
    # when valid (so bounded by parse_spec)
    return {namespace: PolicyInfo.from_body(index_body(body, valid), valid=valid)}


def _valid(spec: Mapping[str, Any], config: OperatorConfig) -> bool:
    try:
        parse_spec(spec, config.allowed_policy_classes)
    except InvalidPolicy:
        return False
    return True


def _clusters(index: kopf.Index, namespace: str) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in index.get(namespace, [])}


# --- reconcile -----------------------------------------------------------------


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
    """One lock per policy; ``memo.policy_locks`` is a WeakValueDictionary, so a lock
    no pass holds or waits for goes by itself."""
    lock = memo.policy_locks.get(uid)
    if lock is None:
        lock = memo.policy_locks[uid] = asyncio.Lock()
    return lock


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
    daskautoscalers_by_cluster: kopf.Index | None = None,
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
        message = f"spec.{e}" if e.field != "spec" and not e.field.startswith("spec.") else str(e)
        if previous.get("observedGeneration") != generation or not _is_invalid(previous):
            post(body, "Invalid", message, "Warning")
        _patch_status(patch, previous, invalid_status(generation, message, previous))
        return

    clusters, mine = policy_clusters(body, uid, namespace, daskclusters_by_namespace,
                                     memorypolicies_by_namespace)
    governed = [c for c, a in mine.items() if a.governor.uid == uid]
    limit = asyncio.Semaphore(CONCURRENT_CLUSTERS)
    saved = {e.get("name"): e.get("savings") for e in previous.get("clusters") or ()
             if isinstance(e, dict) and isinstance(e.get("savings"), dict)}

    async def converge(cluster: str) -> Outcome:
        async with limit:
            return await reconciler.converge(
                namespace, cluster, wanted, owner,
                functools.partial(savings_module.wants_departures, saved.get(cluster)))

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
        post_outcome(body, clusters[cluster], outcome, previous)
        metrics.observe(namespace, name, outcome)
        entry = cluster_entry(outcome, name)
        try:
            entry["savings"] = await _savings(memo, namespace, name, spec, clusters[cluster], outcome,
                                              saved.get(cluster))
        except Exception:  # a bug must not stop the pass (nor lose what was counted)
            logger.exception("Could not count the savings of DaskCluster %s/%s", namespace, cluster)
            if saved.get(cluster) is not None:
                entry["savings"] = saved[cluster]
        others = [p.name for p in a.contenders if p.uid != uid]
        if others:
            entry["conflictMessage"] = (
                f"{cluster} is also selected by MemoryPolicy {', '.join(others)}; "
                f"this policy governs it (created earlier)"
            )
        autoscalers = autoscalers_of(daskautoscalers_by_cluster, namespace, cluster)
        if autoscalers and spec.get("adaptive") is not None:
            entry["autoscalerConflict"] = (
                f"{cluster} is also scaled by DaskAutoscaler {', '.join(autoscalers)}: "
                f"spec.adaptive is not applied to it"
            )
        entries.append(entry)

    await _release_unselected(body, namespace, uid, previous, entries, clusters, reconciler, memo)
    _patch_status(patch, previous, policy_status(generation, entries, previous))


async def _savings(
    memo: kopf.Memo, namespace: str, policy: str, spec: Mapping[str, Any], cluster: Mapping[str, Any],
    outcome: Outcome, previous: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The cluster's new ``savings`` (controllers/savings.py), its Events (an OOM kill,
    a preStop hook's retirement) and metrics. The pods are the cache's; read from the
    API only when the cache cannot vouch for them."""
    name = cluster["name"]
    now = time.time()
    try:
        adaptive = parse_scaling(spec).adaptive
    except InvalidPolicy:
        adaptive = None
    group = adaptive.group(name) if adaptive is not None else None
    watches = getattr(memo, "watches", None)
    pods = watches.of_cluster("pods", namespace, name) if watches is not None else None
    if pods is None:
        try:
            pods = await workergroup.worker_pods(namespace, name)
        except Exception as e:  # the API at fault: the pods are looked at next pass
            logger.info("Could not read the worker pods of %s/%s: %s", namespace, name, e)
    ws = (previous or {}).get("workerSeconds")
    since = savings_module.epoch(ws.get("asOf") if isinstance(ws, Mapping) else None) or now
    gone = watches.gone("pods", namespace, name, min(since, now - savings_module.MATCH_WINDOW)) \
        if watches is not None else []
    seen = savings_module.Seen(
        now=now, report=outcome.savings, departures=outcome.departures, scheduler_now=outcome.scheduler_now,
        pods=pods, gone=gone, group=group, maximum=adaptive.maximum if adaptive is not None else None)
    result = savings_module.update(previous, seen)
    ref = dask_cluster_ref(namespace, name, cluster["uid"])
    floor_group = group if adaptive is not None and adaptive.memory_floor else None
    for kill in result.kills:
        post(ref, "OOMKilled", savings_module.kill_message(kill, floor_group), "Warning")
        logger.warning("DaskCluster %s/%s: %s", namespace, name, savings_module.kill_message(kill, floor_group))
    for dep in result.hook_departures:
        reason, message, warning = savings_module.hook_message(dep)
        post(ref, reason, message, "Warning" if warning else "Normal")
    metrics.observe_savings(namespace, policy, name, result.savings, result.worker_seconds)
    return result.savings


def _patch_status(patch: kopf.Patch, previous: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Patch the status only when something in it changed: a resync that finds
    the same state writes nothing, so watchers of the policy are not woken."""
    if any(previous.get(k) != v for k, v in new.items()):
        patch.status.update(new)


def _is_invalid(status: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Invalid" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )


async def _release_unselected(
    policy: kopf.Body,
    namespace: str,
    uid: str,
    previous: Mapping[str, Any],
    entries: list[dict[str, Any]],
    clusters: Mapping[str, Mapping[str, Any]],
    reconciler: ClusterReconciler,
    memo: kopf.Memo,
) -> None:
    """Clusters this policy configured before but no longer governs get their own
    configuration back (relabelled, renamed out, or taken over by an older policy).
    A cluster that could not be restored yet stays listed (once) as Degraded."""
    name = policy.metadata["name"]
    now = {e["name"]: e["state"] for e in entries}
    for old in previous.get("clusters") or ():
        cluster = old.get("name")
        if old.get("state") == "Conflict" or now.get(cluster, "Conflict") != "Conflict":
            continue  # never configured by this policy, or still governed by it
        metrics.forget(namespace, policy=name, cluster=cluster)
        if cluster in now:
            # taken over by an older policy, whose pass applies its own configuration
            # (restoring first would flash the scheduler's own)
            continue
        if cluster not in clusters:
            await reconciler.forget_cluster(namespace, cluster)
            continue
        why = await _wind_down_scaling(memo, namespace, clusters[cluster], policy)
        if why is not None:  # listed, so that the next pass tries again
            entries.append(cluster_entry(Outcome(cluster, "Degraded", f"restore pending: {why}"), name))
            continue
        try:
            outcome = await reconciler.release(namespace, cluster, uid)
        except Exception as e:  # one cluster's failure is its own
            log_failed_restore(namespace, cluster, e)
            entries.append(cluster_entry(Outcome(cluster, "Degraded", f"restore pending: {e}"), name))
            continue
        if outcome is not None:
            post_outcome(policy, clusters[cluster], outcome, previous)


async def _wind_down_scaling(
    memo: kopf.Memo, namespace: str, cluster: Mapping[str, Any], policy: Mapping[str, Any]
) -> str | None:
    """Before a scheduler gets its own configuration back: if this policy may have
    scaled the cluster (its spec scales or replaces workers, or the controller has
    passes of it), the retirements the operator started there are finished or
    cancelled (see ScalingController.wind_down). Returns why it could not be done (the
    caller retries, as for a restore), or None."""
    spec = policy.get("spec") or {}
    scaled = spec.get("adaptive") is not None or any(
        isinstance(p, Mapping) and p.get("class") in ("RetirePaused", RETIREPAUSED)
        for p in (spec.get("activeMemoryManager") or {}).get("policies") or ())
    controller = getattr(memo, "scaling", None)
    if controller is None or not (scaled or controller.knows(namespace, cluster["name"])):
        return None
    try:
        await controller.wind_down(namespace, cluster["name"], cluster["uid"])
    except Exception as e:
        logger.warning("Could not wind down the retirements of %s/%s: %s", namespace, cluster["name"], e)
        return f"retirements not wound down: {e}"
    return None


# --- deletion ------------------------------------------------------------------


async def restore_on_delete(body: kopf.Body, uid: str, memo: kopf.Memo, **kwargs: Any) -> None:
    """Give every cluster this policy configured its own configuration back.

    Candidates are the clusters its status lists and those it selects now (the
    status may lag); each scheduler's plugin then says whether this policy owns it.
    """
    async with _policy_lock(memo, uid):  # let a resync in flight finish first
        await _restore_all(body=body, uid=uid, memo=memo, **kwargs)
    # what was kept for it goes with it (computed anew for the namespace's others)
    ASSIGNMENTS.discard(kwargs.get("namespace") or body.metadata.get("namespace", ""))
    memo.reconciler.forget_policy(uid)  # the backoffs (and last outcomes) of its failed passes
    scaling = getattr(memo, "scaling", None)
    if scaling is not None:
        scaling.status_written.pop(uid, None)


async def _restore_all(
    body: kopf.Body,
    status: kopf.Status,
    namespace: str,
    name: str,
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
    candidates |= {c for c, info in clusters.items() if selects(me, c, info["labels"])}
    unreachable: dict[str, str] = {}
    limit = asyncio.Semaphore(CONCURRENT_CLUSTERS)

    async def release(cluster: Mapping[str, Any]) -> None:
        async with limit:
            why = await _wind_down_scaling(memo, namespace, cluster, body)
            if why is not None:
                unreachable[cluster["name"]] = why
                return
            try:
                # a scheduler that accepts and never answers holds its slot this long at most
                async with asyncio.timeout(RESTORE_TIMEOUT_CALLS * reconciler.rpc_timeout):
                    outcome = await reconciler.release(namespace, cluster["name"], uid)
            except TimeoutError:
                unreachable[cluster["name"]] = "the scheduler did not answer in time"
                return
            except Exception as e:  # one cluster's failure is its own
                log_failed_restore(namespace, cluster["name"], e)
                unreachable[cluster["name"]] = str(e)
                return
        if outcome is not None:
            post_outcome(body, cluster, outcome, {})

    await asyncio.gather(*(release(clusters[c]) for c in sorted(candidates) if c in clusters))
    metrics.forget(namespace, policy=name)
    if not unreachable:
        return
    message = "could not restore " + ", ".join(f"{c} ({why})" for c, why in unreachable.items())
    if retry + 1 < config.delete_retries:
        raise kopf.TemporaryError(message, delay=config.resync_interval)
    # Holding the deletion forever would not help: the operator owes these schedulers
    # a restore and does it when they answer again (a scheduler that restarts in
    # between starts with its own configuration anyway).
    for cluster in unreachable:
        reconciler.owe_restore(
            PendingRestore(namespace, cluster, clusters[cluster]["uid"], uid, name)
        )
    post(body, "RestoreFailed",
         f"{message}; giving up after {retry + 1} attempts: restored when they answer again", "Warning")
