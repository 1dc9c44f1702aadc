"""Watching DaskClusters: an index of the clusters of each namespace, and events that
converge a new or relabelled cluster at once instead of at the next resync. Nothing
here writes to the DaskCluster, so dask-kubernetes' own handlers on it (and their
diff-base annotation) are never disturbed.

Which schedulers the operator talks to: those of clusters a MemoryPolicy selects;
in a namespace that has a MemoryPolicy, a cluster no policy governs (to restore it
if a policy that is gone still configures it); and schedulers owed a restore by a
policy deleted while they were unreachable. A scheduler in a namespace without any
MemoryPolicy is never contacted.

Restores owed to schedulers of deleted policies are retried here too, each in a task
of its own with a timeout, a few per namespace at once: one tenant's hung schedulers
must not delay another tenant's restore (:class:`OwedRestores`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from dask_memory_operator.api.memorypolicy import InvalidPolicy, parse_spec
from dask_memory_operator.api.selection import assign
from dask_memory_operator.webhook.mutation import PRELOAD_ANNOTATION
from dask_memory_operator.observability import metrics
from dask_memory_operator.observability.events import dask_cluster_ref, post, post_actions, post_from_background
from dask_memory_operator.schedulers.converge import ClusterReconciler, PendingRestore, log_failed_restore, owner_tag

log = logging.getLogger(__name__)


def daskclusters_by_namespace(
    name: str, namespace: str, labels: Mapping[str, str], annotations: Mapping[str, str], uid: str, **_: Any
) -> dict[str, Any]:
    preload = annotations.get(PRELOAD_ANNOTATION) == "true"
    return {namespace: {"name": name, "labels": dict(labels), "uid": uid, "preload": preload}}


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
        await reconciler.forget_cluster(namespace, name)
        memo.scaling.forget(namespace, name)
        metrics.forget(namespace, cluster=name)
        memo.cluster_labels.pop((namespace, name), None)
        return
    policies = list(memorypolicies_by_namespace.get(namespace, []))
    if not policies:
        return  # no MemoryPolicy here: this namespace's schedulers are not ours to ask
    if not _new_or_relabelled(memo, namespace, name, event, labels):
        return  # status or annotation writes: the resync covers them, at its pace
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
    if any(p.uid == a.governor.uid for p in memorypolicies_by_namespace.get(namespace, [])):
        # (a policy deleted during the pass has ended its series: keep them ended)
        metrics.observe(namespace, a.governor.name, outcome)
    post_actions(policy_body, {"name": name, "uid": body.metadata.get("uid", "")}, outcome)


def _new_or_relabelled(
    memo: kopf.Memo, namespace: str, name: str, event: Mapping[str, Any], labels: Mapping[str, str]
) -> bool:
    """Whether this event shows a cluster first, or with other labels than last time:
    what can change which policy governs it. Anything else (a status write, an
    annotation a user sets in a loop) would make a scheduler pass for nothing."""
    seen: dict[tuple[str, str], dict[str, str]] = memo.cluster_labels
    key = (namespace, name)
    if seen.get(key) == dict(labels) and event.get("type") != "ADDED":
        return False
    seen[key] = dict(labels)
    return True


async def _release_orphan(
    body: kopf.Body, name: str, namespace: str, memo: kopf.Memo, policies_index: kopf.Index
) -> None:
    """A cluster no policy selects, still configured by a policy that is gone (it was
    deleted while the scheduler was unreachable, or its finalizer was removed by
    hand): give the scheduler its own configuration back. Every policy not being
    deleted is known, valid or not: an invalid one leaves its clusters as they are."""
    known = {p.uid for policies in policies_index.values() for p in policies}
    outcome = await memo.reconciler.release_orphan(namespace, name, known)
    if outcome is not None:
        ref = dask_cluster_ref(namespace, name, body.metadata.get("uid", ""))
        for action in outcome.actions:
            post(ref, "MemoryPolicyReleased", f"no MemoryPolicy governs it: {action}")


#: Owed restores tried at once, in all and of one namespace: one tenant's schedulers
#: that hang take at most its own share, never the others' turn
CONCURRENT_RESTORES = 16
CONCURRENT_RESTORES_PER_NAMESPACE = 4
#: A restore's calls (address, status, restore) each have the reconciler's RPC
#: timeout; the whole restore of one cluster gets this many of them
RESTORE_TIMEOUT_CALLS = 4


class OwedRestores:
    """The restores owed to schedulers of deleted policies (kept by the reconciler,
    see ClusterReconciler.owe_restore), each tried in a task of its own: one that
    hangs (a scheduler that accepts and never answers) ends at its own timeout and
    holds up no other cluster's, nor the next round."""

    def __init__(self, reconciler: ClusterReconciler):
        self.reconciler = reconciler
        self._all = asyncio.Semaphore(CONCURRENT_RESTORES)
        self._namespaces: dict[str, asyncio.Semaphore] = {}
        #: Tries under way, by (namespace, cluster)
        self.in_flight: dict[tuple[str, str], asyncio.Task[None]] = {}

    def start(self) -> list[asyncio.Task[None]]:
        """A try for every owed restore that has none under way; returns them."""
        started = []
        busy = {namespace for namespace, _ in self.in_flight}
        for namespace in [n for n in self._namespaces if n not in busy]:
            del self._namespaces[namespace]  # (a share no try holds: made anew when needed)
        for key, owed in list(self.reconciler.pending_restores.items()):
            if key in self.in_flight:
                continue
            task = asyncio.create_task(self._settle(key, owed), name=f"restore {key[0]}/{key[1]}")
            self.in_flight[key] = task
            task.add_done_callback(lambda _, key=key: self.in_flight.pop(key, None))
            started.append(task)
        return started

    async def settle_once(self) -> None:
        """Try every owed restore once, and wait for the tries."""
        await asyncio.gather(*self.start(), return_exceptions=True)

    def cancel(self) -> None:
        for task in list(self.in_flight.values()):
            task.cancel()

    async def _settle(self, key: tuple[str, str], owed: PendingRestore) -> None:
        reconciler = self.reconciler
        mine = self._namespaces.get(owed.namespace)
        if mine is None:
            mine = self._namespaces[owed.namespace] = asyncio.Semaphore(CONCURRENT_RESTORES_PER_NAMESPACE)
        try:
            # (the namespace's share first: its waiting tries hold no slot of the others)
            async with mine, self._all:
                async with asyncio.timeout(RESTORE_TIMEOUT_CALLS * reconciler.rpc_timeout):
                    outcome = await reconciler.release(owed.namespace, owed.cluster, owed.policy_uid)
        except Exception as e:  # one scheduler's failure is its own; retried next round
            log_failed_restore(*key, e, level=logging.INFO)
            return
        if reconciler.pending_restores.get(key) is owed:  # (not owed anew meanwhile)
            del reconciler.pending_restores[key]
        if outcome is None:
            return
        ref = dask_cluster_ref(owed.namespace, owed.cluster, owed.cluster_uid)
        for action in outcome.actions:
            await post_from_background(
                ref,
                reason="MemoryPolicyReleased",
                message=f"MemoryPolicy {owed.policy_name} was deleted while the scheduler "
                f"was unreachable; now {action}",
            )


async def settle_owed_restores(memo: kopf.Memo, interval: float) -> None:
    """Every ``interval`` seconds, start a try of each restore owed to a scheduler
    whose policy was deleted while it could not be reached (see
    ClusterReconciler.owe_restore) that has no try under way."""
    owed = OwedRestores(memo.reconciler)
    try:
        while True:
            await asyncio.sleep(interval)
            try:
                owed.start()
            except Exception:  # a bug here must not end the retries for good
                log.exception("Retrying the owed restores failed")
    finally:
        owed.cancel()


async def _settle_once(reconciler: ClusterReconciler) -> None:
    await OwedRestores(reconciler).settle_once()
