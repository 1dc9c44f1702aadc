"""The scaling controller: workers leave a governed cluster only through the
scheduler's retirement engine, and an ``adaptive`` policy sizes the cluster itself.

One reconcile per cluster (:meth:`ScalingController.reconcile`), level-triggered: it
reads what the scheduler reports (the plugin's retirement records, RetirePaused's
workers to replace, the adaptive target) and what the API holds (the worker group,
its Deployments, its ledger: :mod:`.workergroup`), and makes the next step of each
thing under way:

1. **Finish retirements.** A record this operator started (its reason starts with
   :data:`TAG`) that is ``done`` gets its Deployment deleted and its replica taken
   off (the protocol of :mod:`.workergroup`), then forgotten once its worker left.
   One ``aborted`` is reported and forgotten: its worker is back in service and
   nothing is deleted; new scale-downs wait (:data:`ABORT_HOLD`, doubling).
2. **Replace paused workers.** A worker RetirePaused lists gets a replacement replica
   first (a paused worker can hand its data only to workers with room); once it is
   ``retired`` its Deployment goes by the same protocol.
3. **Adaptive.** The size :func:`~dask_memory_operator.api.scaling.wanted_workers`
   gives: more at once (cancelling retirements under way first, then raising
   replicas), fewer after ``waitCount`` looks (at once when ``maximum`` was
   lowered): pending workers (a Deployment whose worker has not connected) first,
   then the engine's candidates, at most ``maxConcurrent`` retiring at once. With
   ``memoryFloor``, an OOM kill of a worker of the group (counted in the policy's
   status, :mod:`.savings`) is pressure too: the group is not scaled below the size it
   was killed at for :data:`~.savings.OOM_FLOOR_SECONDS` (``HeldByOOMKill``).

Because every fact lives in the scheduler or the API, an operator restarted at any
point carries on where the last one stopped, and deletes nothing twice.

The reconcile runs in a task of its own per cluster (:meth:`ScalingController.kick`),
started by the policy's scaling timer, so that one slow scheduler holds up only its
own cluster; the timer writes each cluster's entry into ``status.scaling``.

What the API holds is read from the operator's watch-backed caches
(:mod:`dask_memory_operator.watches`): a pass of a cluster with nothing to do asks the
API nothing. What a cache cannot vouch for (not synced; an object the controller wrote
and whose write the watch has not shown yet) is read from the API: the pass after a
replicas patch must not count the replicas of before.

The operator is shared by tenants, so a tick costs what changed: the timer reads the
namespace's assignment as computed once per change (:mod:`.assignment`), writes the
status only when it changed, and a retirement record is reported (Event, metric,
abort hold) once per transition, not on every pass that sees it again (a scheduler
that never forgets its records would otherwise flood the API with Events).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dask_memory_operator.api.memorypolicy import AMMConfig, InvalidPolicy, parse_spec
from dask_memory_operator.api.scaling import (
    AdaptiveSpec,
    RetirementSpec,
    ScalingSpec,
    memory_floor,
    parse_scaling,
    wanted_workers,
)
from dask_memory_operator.controllers import workergroup
from dask_memory_operator.controllers.assignment import policy_clusters
from dask_memory_operator.controllers.savings import oom_floor
from dask_memory_operator.controllers.workergroup import Ledger, WorkerGroup
from dask_memory_operator.observability import metrics
from dask_memory_operator.observability.events import dask_cluster_ref, post_from_background
from dask_memory_operator.schedulers import rpc
from dask_memory_operator.schedulers.converge import ClusterReconciler, PASS_TIMEOUT_CALLS, error_outcome
from dask_memory_operator.watches import Watches

logger = logging.getLogger(__name__)

#: Reason prefix of the retirements this operator starts: the records it finishes
TAG = "dask-memory-operator"
#: Seconds new scale-downs of a cluster wait after a retirement aborted (doubling
#: while they keep aborting, up to ABORT_HOLD_CAP)
ABORT_HOLD = 15.0
ABORT_HOLD_CAP = 300.0
#: Seconds between passes of a cluster while retirements or replacements are under way
BUSY_INTERVAL = 0.5
#: Seconds between passes of a cluster whose last pass could not see it all (no
#: plugin yet, a scheduler or API error)
RETRY_INTERVAL = 5.0
#: Most seconds between passes of a cluster whose passes keep failing: a broken or
#: hostile scheduler costs the shared operator less and less, never nothing
DEGRADED_INTERVAL_CAP = 60.0
#: The policy class whose workers get replaced
RETIREPAUSED = "amm_core.retire_paused.RetirePaused"
#: The reason of a record the engine aborted because it was asked to cancel it
#: (amm_core.retirement.RetirementEngine.cancel): reported when cancelled, not an abort
CANCELLED = "cancelled"


def is_ours(record: Mapping[str, Any]) -> bool:
    return str(record.get("requested", record.get("reason", ""))).startswith(TAG)


@dataclass
class ClusterScaling:
    """What the controller remembers of one cluster between passes: only pacing.
    Everything that must survive a restart is in the scheduler or the API."""

    #: Consecutive looks at which the target asked for fewer workers
    down_looks: int = 0
    #: Monotonic time of the next adaptive look
    next_look: float = 0.0
    #: No new scale-down before this monotonic time (after an abort)
    hold_until: float = 0.0
    hold: float = 0.0
    #: The cluster's entry of status.scaling, as of the latest pass
    entry: dict[str, Any] = field(default_factory=dict)
    #: The pass under way, if any
    task: asyncio.Task[None] | None = None
    #: Monotonic time of the latest pass's start
    last_pass: float = 0.0
    #: Passes in a row that ended Degraded (backs the next one off)
    degraded_passes: int = 0
    #: The transitions (see :func:`_transition`) of the records the latest pass read:
    #: those already reported
    reported: set[tuple[Any, ...]] = field(default_factory=set)
    #: (workers, worker, until wall time) of the OOM kill in the adaptive group whose
    #: hold runs (controllers/savings.py: read from the policy's status at each tick)
    oom_floor: tuple[int, str, float] | None = None

    @property
    def busy(self) -> bool:
        return bool(self.entry.get("retiring") or self.entry.get("replacing"))


@dataclass
class Pass:
    """What one pass read and what it decided; becomes the status entry."""

    namespace: str
    cluster: str
    cluster_uid: str
    address: str
    status: dict[str, Any]
    deployments: dict[str, tuple[str, str]]  # name -> (group, uid)
    groups: dict[str, WorkerGroup]
    entry: dict[str, Any]

    def ref(self) -> dict[str, Any]:
        return dask_cluster_ref(self.namespace, self.cluster, self.cluster_uid)

    async def event(self, reason: str, message: str, warning: bool = False) -> None:
        await post_from_background(self.ref(), reason, message, "Warning" if warning else "Normal")


class ScalingController:
    """Scaling passes of every governed cluster (see the module docstring)."""

    reconciler: ClusterReconciler
    clusters: dict[tuple[str, str], ClusterScaling]
    #: Monotonic time of each policy's latest status.scaling write, by uid
    status_written: dict[str, float]

    def __init__(self, reconciler: ClusterReconciler, check_hooks: bool = False, watches: Watches | None = None):
        self.reconciler = reconciler
        #: The webhook is served: report worker pods without its hook
        self.check_hooks = check_hooks
        #: The caches passes read (what they cannot vouch for is read from the API)
        self.watches = watches
        self.clusters = {}
        self.status_written = {}

    def state(self, namespace: str, cluster: str) -> ClusterScaling:
        return self.clusters.setdefault((namespace, cluster), ClusterScaling())

    def knows(self, namespace: str, cluster: str) -> bool:
        """Whether passes of this cluster ran since the operator started."""
        return (namespace, cluster) in self.clusters

    def forget(self, namespace: str, cluster: str) -> None:
        state = self.clusters.pop((namespace, cluster), None)
        if state and state.task and not state.task.done():
            state.task.cancel()

    def kick(
        self, namespace: str, cluster: str, cluster_uid: str, spec: ScalingSpec,
        amm: AMMConfig, autoscalers: list[str], every: float,
    ) -> None:
        """Start a pass unless one runs or the last one started less than ``every``
        seconds ago (the adaptive interval; the resync interval when nothing is under
        way and nothing is scaled)."""
        state = self.state(namespace, cluster)
        if state.task is not None and not state.task.done():
            return
        now = time.monotonic()
        if now - state.last_pass < every:
            return
        state.last_pass = now
        state.task = asyncio.create_task(
            self._pass(namespace, cluster, cluster_uid, spec, amm, autoscalers, state),
            name=f"scaling {namespace}/{cluster}",
        )

    async def _pass(
        self, namespace: str, cluster: str, cluster_uid: str, spec: ScalingSpec,
        amm: AMMConfig, autoscalers: list[str], state: ClusterScaling,
    ) -> None:
        try:
            async with asyncio.timeout(4 * PASS_TIMEOUT_CALLS * self.reconciler.rpc_timeout):
                state.entry = await self.reconcile(namespace, cluster, cluster_uid, spec, amm,
                                                   autoscalers, state)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            state.entry = {**state.entry, "cluster": cluster, "reason": "Degraded",
                           "message": "a scaling pass took too long; retried"}
        except Exception as e:  # one cluster's failure is its own entry
            outcome = error_outcome(cluster, e)
            logger.warning("Scaling %s/%s: %s", namespace, cluster, outcome.message)
            state.entry = {**state.entry, "cluster": cluster, "reason": "Degraded",
                           "message": outcome.message}
        finally:
            degraded = state.entry.get("reason") == "Degraded"
            state.degraded_passes = state.degraded_passes + 1 if degraded else 0

    async def wind_down(self, namespace: str, cluster: str, cluster_uid: str) -> None:
        """The cluster is no longer governed (its policy deleted or changed): finish
        the retirements that are done (their Deployments go, as promised) and cancel
        the others, so that no worker is left closing_gracefully with no one to
        finish it."""
        state = self.clusters.pop((namespace, cluster), None)
        if state and state.task and not state.task.done():
            state.task.cancel()
            await asyncio.gather(state.task, return_exceptions=True)
        p = await self._read(namespace, cluster, cluster_uid, ScalingSpec(RetirementSpec(), None))
        if p is None:
            return
        await self._finish_retirements(p, ClusterScaling())
        left = [r["worker"] for r in p.status.get("retirements") or ()
                if is_ours(r) and r["state"] in ("draining", "moving") and not r.get("left")]
        if left:
            await rpc.cancel_retirement(p.address, left, timeout=self.reconciler.rpc_timeout)
            for name in left:
                metrics.observe_retirement(namespace, cluster, "cancelled", 0)
                await p.event("RetirementCancelled", f"Worker {name} kept: the cluster is no longer scaled by a MemoryPolicy")

    async def _read(self, namespace: str, cluster: str, cluster_uid: str, spec: ScalingSpec) -> Pass | None:
        """What a pass starts from; None when the scheduler has no plugin."""
        address = await self.reconciler.address(namespace, cluster, "scale")
        try:
            status = await rpc.get_status(address, timeout=self.reconciler.rpc_timeout)
        except rpc.PluginMissing:
            return None
        deployments = await self._deployments(namespace, cluster)
        groups: dict[str, WorkerGroup] = {}
        names = {spec.adaptive.group(cluster)} if spec.adaptive else set()
        for name in sorted(names | {g for g, _ in deployments.values()}):
            group = await self._group(namespace, name)
            if group is not None:
                groups[name] = group
        return Pass(namespace, cluster, cluster_uid, address, status, deployments, groups,
                    {"cluster": cluster})

    # --- reads: the caches, or the API for what they cannot vouch for ----------------------

    async def _deployments(self, namespace: str, cluster: str) -> dict[str, tuple[str, str]]:
        records = self.watches.of_cluster("deployments", namespace, cluster) if self.watches else None
        if records is None:
            return await workergroup.cluster_deployments(namespace, cluster)
        return workergroup.worker_deployments(records)

    async def _group(self, namespace: str, name: str) -> WorkerGroup | None:
        if self.watches is not None:
            vouched, group = self.watches.get("daskworkergroups", namespace, name)
            if vouched:
                return workergroup.copy_of(group) if group is not None else None
        return await workergroup.read_group(namespace, name)

    async def _unhooked(self, namespace: str, cluster: str) -> list[str]:
        records = self.watches.of_cluster("pods", namespace, cluster) if self.watches else None
        if records is None:
            return await workergroup.workers_without_hook(namespace, cluster)
        return workergroup.unhooked_workers(records)

    # --- writes: the caches are told, so that the next pass does not read what was before

    # (told also when the write raised: a timeout or a lost connection may have
    # written, and the cache must not vouch for the state before it)

    async def _set_replicas(self, group: WorkerGroup, replicas: int, ledger: Ledger) -> bool:
        written: bool | None = None  # None: unknown
        try:
            written = await workergroup.set_replicas(group, replicas, ledger)
            return written
        finally:
            if self.watches is not None and written is not False:
                self.watches.wrote("daskworkergroups", group.namespace, group.name,
                                   group.resource_version if written else None)

    async def _delete(self, namespace: str, name: str, uid: str) -> bool:
        try:
            return await workergroup.delete_deployment(namespace, name, uid)
        finally:
            # whatever the answer, no object with that uid is (or soon will be) there
            if self.watches is not None:
                self.watches.deleted("deployments", namespace, name, uid)

    # --- one pass -----------------------------------------------------------------

    async def reconcile(
        self, namespace: str, cluster: str, cluster_uid: str, spec: ScalingSpec,
        amm: AMMConfig, autoscalers: list[str], state: ClusterScaling,
    ) -> dict[str, Any]:
        """One level-triggered pass; returns the cluster's status entry."""
        hooks = await self._hooks(namespace, cluster, cluster_uid, state) if self.check_hooks else {}
        p = await self._read(namespace, cluster, cluster_uid, spec)
        if p is None:
            return {"cluster": cluster, "reason": "Waiting",
                    "message": "the scheduler has no amm_core plugin yet", **hooks}
        p.entry.update(hooks)
        await self._finish_retirements(p, state)
        for group in p.groups.values():
            await self._settle_deletions(p, group)
        await self._replace_paused(p, amm)
        if spec.adaptive is None:
            p.entry.setdefault("reason", "Retiring" if p.entry.get("retiring") else "Steady")
        elif autoscalers:
            p.entry.update(reason="Conflict", message=(
                f"DaskAutoscaler {', '.join(autoscalers)} also scales this cluster: "
                f"spec.adaptive is not applied to it; delete one of the two"))
        else:
            await self._adapt(p, state, spec, spec.adaptive)
        return {k: v for k, v in p.entry.items() if v not in (None, [])}

    async def _hooks(self, namespace: str, cluster: str, cluster_uid: str,
                     state: ClusterScaling) -> dict[str, Any]:
        """With the webhook served: how many worker pods lack the retirement hook (an
        Event when more do than before); a question of the pods cache only."""
        missing = await self._unhooked(namespace, cluster)
        if len(missing) > state.entry.get("workersWithoutRetirementHook", 0):
            await post_from_background(dask_cluster_ref(namespace, cluster, cluster_uid),
                "WorkersWithoutRetirementHook", (
                f"{len(missing)} worker pod(s) have no preStop retirement hook (created while the "
                f"operator's webhook was down, or before a policy governed the cluster): deleted "
                f"from outside, they lose what only they hold. {', '.join(missing[:10])}"), "Warning")
        return {"workersWithoutRetirementHook": len(missing)} if missing else {}

    async def _finish_retirements(self, p: Pass, state: ClusterScaling) -> None:
        records = [r for r in p.status.get("retirements") or () if is_ours(r)]
        removed: dict[str, list[str]] = {}   # group -> Deployments to take off its replicas
        forget: list[str] = []
        retiring: list[str] = []
        for r in records:
            name = r["worker"]
            group_name, uid = p.deployments.get(name, (None, None))
            if r["state"] in ("draining", "moving") and not r.get("left"):
                retiring.append(name)
            elif r["state"] == "done":
                if uid is not None:
                    retiring.append(name)
                    if await self._delete(p.namespace, name, uid):
                        metrics.observe_retirement(p.namespace, p.cluster, "done", r.get("seconds", 0))
                        await p.event("WorkerRetired", (
                            f"Worker {name} retired in {r.get('seconds', 0):.1f}s: "
                            f"{r.get('keys_moved', 0)} keys ({_bytes(r.get('bytes_moved', 0))}) "
                            f"moved, {r.get('wasted_tasks', 0)} running tasks lost; "
                            f"Deployment deleted"))
                        removed.setdefault(group_name, []).append(name)
                        del p.deployments[name]
                else:
                    group_name = _group_of_removed(p, name)
                    if group_name is None:
                        forget.append(name)  # its replica is accounted for
                    else:
                        removed.setdefault(group_name, []).append(name)
            elif r.get("left") and r["state"] != "done":
                # (the engine marks a worker that left mid-retirement aborted)
                if _transition(r) not in state.reported:
                    metrics.observe_retirement(p.namespace, p.cluster, "lost", r.get("seconds", 0))
                    lost = (f"{r['keys_lost']} keys ({_bytes(r.get('bytes_lost', 0))}) lost, by the "
                            "scheduler's account") if "keys_lost" in r else f"{r.get('keys_left', 0)} keys may be lost"
                    await p.event("RetiringWorkerLost", (
                        f"Worker {name} left the cluster while it was {r['state']} (its pod went "
                        f"from outside the operator): {lost}"), warning=True)
                forget.append(name)
            elif r["state"] == "aborted" and r.get("reason") == CANCELLED:
                forget.append(name)  # the canceller reported it (RetirementCancelled)
            elif r["state"] == "aborted":
                if _transition(r) not in state.reported:
                    metrics.observe_retirement(p.namespace, p.cluster, "aborted", r.get("seconds", 0))
                    await p.event("RetirementAborted", (
                        f"Retirement of worker {name} aborted after {r.get('seconds', 0):.1f}s, "
                        f"the worker is kept and back in service: {r.get('reason', '')}"), warning=True)
                    state.hold = min(ABORT_HOLD_CAP, state.hold * 2 or ABORT_HOLD)
                    state.hold_until = time.monotonic() + state.hold
                p.entry.update(reason="RetirementAborted",
                               message=f"retiring {name} aborted: {r.get('reason', '')}")
                forget.append(name)
        for group_name, names in removed.items():
            group = p.groups.get(group_name)
            if group is None:
                continue
            ledger = Ledger([*group.ledger.removed, *names],
                            [n for n in group.ledger.replacing if n not in names], group.ledger.deleting)
            if await self._set_replicas(group, _without(p, group, names), ledger):
                forget.extend(names)
                retiring = [n for n in retiring if n not in names]  # no longer counted
        # Reported once per transition: a record the scheduler reports again (it did
        # not forget it yet, or never does) is not news. Only what it reports now is
        # remembered, so this stays as small as its (bounded) list of records.
        state.reported = {_transition(r) for r in records}
        if forget:
            await rpc.forget_retirement(p.address, forget, timeout=self.reconciler.rpc_timeout)
        p.entry["retiring"] = sorted(retiring)
        if not any(r["state"] == "aborted" and r.get("reason") != CANCELLED for r in records) and not retiring:
            state.hold = 0.0 if time.monotonic() > state.hold_until else state.hold

    async def _replace_paused(self, p: Pass, amm: AMMConfig) -> None:
        """A replacement replica for each worker RetirePaused lists, then its
        Deployment once it is retired."""
        if not any(pol.cls == RETIREPAUSED for pol in amm.policies):
            return
        listed = {e["name"]: e for e in p.status.get("replace") or () if e.get("name")}
        replacing = []
        for group in p.groups.values():
            mine = [n for n, (g, _) in p.deployments.items() if g == group.name]
            add = [n for n in mine if n in listed and n not in group.ledger.replacing]
            retired = [n for n in mine if listed.get(n, {}).get("retired") and n in group.ledger.replacing]
            stale = [n for n in group.ledger.replacing if n not in mine]
            # no longer listed (unpaused, or its retirement aborted): its replacement
            # stays as any worker (adaptive may scale it away), the name is dropped
            dropped = [n for n in group.ledger.replacing if n in mine and n not in listed]
            gone = []
            for name in retired:
                if await self._delete(p.namespace, name, p.deployments[name][1]):
                    gone.append(name)
                    del p.deployments[name]
                    await p.event("PausedWorkerReplaced", (
                        f"Worker {name} stayed paused; its replacement runs and its data "
                        f"moved: Deployment deleted"))
            if not (add or gone or stale or dropped):
                replacing += [n for n in group.ledger.replacing if n in mine]
                continue
            keep = [n for n in group.ledger.replacing if n not in gone + stale + dropped]
            # stale: deleted by an earlier pass whose replicas patch did not land
            # (or by someone else: _without does not take that replica off twice)
            ledger = Ledger([*group.ledger.removed, *gone, *stale], keep + add, group.ledger.deleting)
            if await self._set_replicas(group, _without(p, group, gone + stale) + len(add), ledger):
                for name in add:
                    await p.event("ReplacingPausedWorker", (
                        f"Worker {name} stayed paused: a replacement worker is added to "
                        f"{group.name}, then {name} retires"))
            replacing += [n for n in group.ledger.replacing if n in mine and n not in gone + dropped]
        p.entry["replacing"] = sorted(replacing)

    async def _adapt(self, p: Pass, state: ClusterScaling, spec: ScalingSpec, adaptive: AdaptiveSpec) -> None:
        group = p.groups.get(adaptive.group(p.cluster))
        p.entry["workerGroup"] = adaptive.group(p.cluster)
        if group is None:
            p.entry.update(reason="Waiting", message=f"DaskWorkerGroup {adaptive.group(p.cluster)} not found")
            return
        timeout = self.reconciler.rpc_timeout
        info = await rpc.scaling(p.address, timeout=timeout)
        connected = {w["name"]: w for w in info.get("worker_states") or ()}
        members = [n for n, (g, _) in p.deployments.items() if g == group.name]
        unnamed = sorted(n for n in connected if not _deployment_named(p, n))
        limits = [connected[n]["memory_limit"] for n in members if n in connected]
        floor = memory_floor(info.get("data_bytes", 0), int(statistics.median(limits)) if limits else 0,
                             info.get("pause_fraction"))
        # the target and the floor are of the whole cluster: the other groups' workers
        # count towards them
        others = sum(1 for g, _ in p.deployments.values() if g != group.name)
        target = max(0, int(info.get("target", 0)) - others)
        floor = max(0, floor - others)
        retiring = [n for n in p.entry.get("retiring", []) if n in members]
        replacing = [n for n in p.entry.get("replacing", []) if n in members]
        effective = group.replicas - len(retiring) - len(replacing)
        # a recent OOM kill in the group: not below the size it was killed at, a while
        oom = state.oom_floor if adaptive.memory_floor and state.oom_floor \
            and state.oom_floor[2] > time.time() else None
        held_by_oom = oom is not None and oom[0] > floor
        want = wanted_workers(adaptive, target, max(floor, oom[0]) if oom else floor, group.replicas)
        p.entry.update(replicas=group.replicas, target=target, desired=want.workers, memoryFloor=floor)
        if oom is not None:
            p.entry["oomFloor"] = oom[0]
        now = time.monotonic()
        # passes run faster while retirements go on; the wait count counts looks
        look = now >= state.next_look
        if look:
            state.next_look = now + adaptive.interval
        if want.workers > effective:
            state.down_looks = 0
            await self._scale_up(p, group, want.workers - effective, retiring)
        elif want.workers < effective:
            state.down_looks += look
            if unnamed:
                # a worker named after no Deployment cannot be told from a pod that never
                # connected: deleting "pending" Deployments could delete busy workers
                p.entry.update(reason="Degraded", message=(
                    f"workers not named after their Deployment ({', '.join(unnamed[:5])}): start "
                    f"them with --name $(DASK_WORKER_NAME); not scaled down"))
            elif not want.urgent and state.down_looks < adaptive.wait_count:
                p.entry.setdefault("reason", "Waiting")
                p.entry.setdefault("message", f"the target asks for {want.workers} workers; "
                                   f"waiting for {adaptive.wait_count} looks in a row")
            elif now < state.hold_until:
                p.entry.setdefault("reason", "RetirementAborted")
            else:
                state.down_looks = 0
                free = spec.retirement.max_concurrent - len(p.entry.get("retiring", []))
                await self._scale_down(p, group, min(effective - want.workers, free), members,
                                       connected, spec, want.workers)
        else:
            state.down_looks = 0
            held = {"MemoryFloor": "HeldByOOMKill" if held_by_oom else "HeldByMemoryFloor",
                    "Minimum": "HeldByMinimum"}.get(want.reason)
            p.entry.setdefault("reason", "Retiring" if retiring else held or "Steady")
            if held == "HeldByMemoryFloor" and "message" not in p.entry:
                p.entry["message"] = (f"the data in memory needs {floor} workers under the pause "
                                      f"threshold; the target asks for {info.get('target', 0)}")
            elif held == "HeldByOOMKill" and oom is not None and "message" not in p.entry:
                until = time.strftime("%H:%M:%S UTC", time.gmtime(oom[2]))
                p.entry["message"] = (f"worker {oom[1]} was OOM-killed at {oom[0]} workers: not scaled "
                                      f"below {oom[0]} until {until}; the target asks for {info.get('target', 0)}")

    async def _settle_deletions(self, p: Pass, group: WorkerGroup) -> None:
        """Take the replicas of the ledger's ``deleting`` Deployments that are gone off
        the group (a restart finds them there if the last operator died between the
        deletion and this patch); those still there were not deleted: dropped."""
        if not group.ledger.deleting:
            return
        gone = [n for n in group.ledger.deleting if n not in p.deployments]
        ledger = Ledger([*group.ledger.removed, *gone], group.ledger.replacing, [])
        await self._set_replicas(group, _without(p, group, gone), ledger)

    async def _scale_up(self, p: Pass, group: WorkerGroup, more: int, retiring: list[str]) -> None:
        """Cancel retirements under way first (their workers have their data), then
        raise replicas by what is still missing."""
        cancellable = [r["worker"] for r in p.status.get("retirements") or ()
                       if is_ours(r) and r["worker"] in retiring and r["state"] in ("draining", "moving")]
        cancel = cancellable[:more]
        if cancel:
            await rpc.cancel_retirement(p.address, cancel, timeout=self.reconciler.rpc_timeout)
            for name in cancel:
                metrics.observe_retirement(p.namespace, p.cluster, "cancelled", 0)
                await p.event("RetirementCancelled", f"Worker {name} is needed again: kept")
            p.entry["retiring"] = [n for n in p.entry.get("retiring", []) if n not in cancel]
        more -= len(cancel)
        if more > 0:
            new = group.replicas + more
            if await self._set_replicas(group, new, group.ledger):
                await p.event("ScaledUp", f"{group.name}: replicas {new - more} -> {new}")
        p.entry.update(reason="ScalingUp", replicas=group.replicas)

    async def _scale_down(
        self, p: Pass, group: WorkerGroup, n: int, members: list[str],
        connected: Mapping[str, Any], spec: ScalingSpec, to: int,
    ) -> None:
        if n <= 0:
            p.entry.setdefault("reason", "Retiring")
            return
        timeout = self.reconciler.rpc_timeout
        retirement = spec.retirement
        reason = f"{TAG}: {group.name} from {group.replicas} to {to} workers"
        busy = set(p.entry.get("retiring", [])) | set(p.entry.get("replacing", []))
        pending = [m for m in members if m not in connected and m not in busy][:n]
        gone = []
        if pending:
            # asked of the scheduler once more: one that connected meanwhile retires
            answer = await rpc.retire(p.address, pending, retirement.time_limit,
                                      drain=retirement.drain, reason=reason, timeout=timeout)
            unknown = [n for n in answer.get("unknown", []) if n in p.deployments]
            intent = Ledger(group.ledger.removed, group.ledger.replacing, [*group.ledger.deleting, *unknown])
            if unknown and await self._set_replicas(group, group.replicas, intent):
                for name in unknown:
                    if await self._delete(p.namespace, name, p.deployments[name][1]):
                        gone.append(name)
                        del p.deployments[name]
                await self._settle_deletions(p, group)
                if gone:
                    await p.event("PendingWorkersRemoved", (
                        f"{group.name}: {len(gone)} worker(s) that had not connected yet removed "
                        f"({', '.join(gone)}); replicas now {group.replicas}"))
            n -= len(pending)
        started = [r["worker"] for r in answer.get("retirements", []) if r["state"] != "aborted"] if pending else []
        if n > 0:
            choice = await rpc.retirement_candidates(
                p.address, [m for m in members if m in connected and m not in busy], n, timeout=timeout)
            names = [c["worker"] for c in choice.get("candidates", [])]
            if names:
                answer = await rpc.retire(p.address, names, retirement.time_limit,
                                          drain=retirement.drain, reason=reason, timeout=timeout)
                started += [r["worker"] for r in answer.get("retirements", []) if r["state"] != "aborted"]
        for name in started:
            await p.event("RetirementStarted", (
                f"Retiring worker {name} ({reason.split(': ', 1)[1]}), within "
                f"{retirement.time_limit:g}s{', letting its tasks finish' if retirement.drain else ''}"))
        p.entry["retiring"] = sorted({*p.entry.get("retiring", []), *started})
        p.entry.update(reason="ScalingDown", replicas=group.replicas,
                       message=f"retiring {len(p.entry['retiring'])}, removed {len(gone)} pending")


def _transition(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes a record's report news: its worker, the state it reached, whether
    the worker left, and which retirement it is (its start)."""
    started = record.get("started")
    return (record.get("worker"), record.get("state"), bool(record.get("left")),
            started if isinstance(started, (int, float, str)) else None,  # (unchecked: any shape)
            hash(str(record.get("reason"))))


def _without(p: Pass, group: WorkerGroup, names: list[str]) -> int:
    """The group's replicas with the Deployments ``names`` taken off, never fewer
    than the Deployments it still has (a replica someone else took off already, by a
    user's or dask-kubernetes' own scale-down, is not taken off twice), and never more
    than now (a scale-down of theirs still under way is not undone)."""
    left = sum(1 for g, _ in p.deployments.values() if g == group.name)
    return min(group.replicas, max(left, group.replicas - len(names)))


def _deployment_named(p: Pass, worker: str) -> bool:
    """Whether a worker's name is a Deployment name of one of the cluster's groups
    (``<group>-worker-<hex>``, dask-kubernetes' naming), as ``--name
    $(DASK_WORKER_NAME)`` makes it."""
    groups = set(p.groups) | {g for g, _ in p.deployments.values()}
    return worker in p.deployments or any(worker.startswith(f"{g}-worker-") for g in groups)


def _group_of_removed(p: Pass, name: str) -> str | None:
    """The group whose replicas still count the deleted Deployment ``name``: a group
    of the cluster whose ledger does not list it. None when every ledger does (or no
    group is known), i.e. nothing is left to take off."""
    for group in p.groups.values():
        if name.startswith(f"{group.name}-worker-") and name not in group.ledger.removed:
            return group.name
    return None


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# --- kopf handlers -----------------------------------------------------------------


def daskautoscalers_by_cluster(body: Any, namespace: str, **_: Any) -> dict[tuple[str, str], str]:
    """Index: (namespace, cluster) -> names of the DaskAutoscalers that scale it."""
    cluster = (body.get("spec") or {}).get("cluster")
    return {(namespace, cluster): body.metadata["name"]} if isinstance(cluster, str) else {}


def autoscalers_of(index: Any, namespace: str, cluster: str) -> list[str]:
    """The DaskAutoscalers of a cluster, from the index (None: no index, none)."""
    return sorted(index.get((namespace, cluster), [])) if index is not None else []


async def scale_policy_clusters(
    body: Any, spec: Any, status: Any, namespace: str, uid: str, patch: Any, memo: Any,
    daskclusters_by_namespace: Any, memorypolicies_by_namespace: Any,
    daskautoscalers_by_cluster: Any, **_: Any,
) -> None:
    """The policy's scaling timer: start a pass for each cluster it governs that is
    due one, and write the entries of the latest passes into ``status.scaling``."""
    if body.metadata.get("deletionTimestamp"):
        return
    try:
        amm = parse_spec(spec, memo.config.allowed_policy_classes)
        scaling = parse_scaling(spec)
    except InvalidPolicy:
        # the policy's reconcile reports it; what is under way is still finished (done
        # retirements' Deployments go), nothing new is started
        amm = AMMConfig(enabled=False, interval=1.0, measure="optimistic", policies=())
        scaling = ScalingSpec(RetirementSpec(), None)
    controller: ScalingController = memo.scaling
    clusters, mine = policy_clusters(body, uid, namespace, daskclusters_by_namespace,
                                     memorypolicies_by_namespace)
    governed = [c for c, a in mine.items() if a.governor.uid == uid]
    active = scaling.adaptive is not None or any(p.cls == RETIREPAUSED for p in amm.policies)
    savings = {e.get("name"): e.get("savings") for e in status.get("clusters") or ()
               if isinstance(e, Mapping) and isinstance(e.get("savings"), Mapping)}
    for cluster in governed:
        state = controller.state(namespace, cluster)
        state.oom_floor = oom_floor(savings.get(cluster), scaling.adaptive.group(cluster)) \
            if scaling.adaptive is not None else None
        every = pass_interval(state, scaling, active, memo.config.resync_interval)
        autoscalers = autoscalers_of(daskautoscalers_by_cluster, namespace, cluster)
        controller.kick(namespace, cluster, clusters[cluster]["uid"], scaling, amm,
                        autoscalers if scaling.adaptive else [], every)
    # a cluster whose first pass since a restart has not finished keeps its entry
    previous = {e.get("cluster"): e for e in status.get("scaling") or ()}
    entries = [controller.state(namespace, c).entry or previous.get(c, {}) for c in governed]
    entries = [e for e in entries if e and (active or e.get("retiring") or e.get("replacing")
                                            or e.get("workersWithoutRetirementHook")
                                            or e.get("reason") not in ("Steady", "Waiting"))]
    new = {
        "scaling": entries,
        "retiringWorkers": sum(len(e.get("retiring", [])) for e in entries),
    }
    if _worth_writing(status, new, controller.status_written.get(uid, 0.0), memo.config.resync_interval):
        controller.status_written[uid] = time.monotonic()
        patch.status.update(new)


def pass_interval(state: ClusterScaling, scaling: ScalingSpec, active: bool, resync: float) -> float:
    """Seconds between two passes of a cluster."""
    every = scaling.adaptive.interval if scaling.adaptive else 1.0
    if state.busy:
        return min(every, BUSY_INTERVAL)  # a done retirement's pod is paid for until deleted
    if state.degraded_passes > 1:
        return min(RETRY_INTERVAL * 2 ** (state.degraded_passes - 2), DEGRADED_INTERVAL_CAP)
    if state.entry.get("reason") in ("Waiting", "Degraded"):
        return min(every, RETRY_INTERVAL)
    if not active:
        return resync  # only to settle what is left over
    return every


#: Fields of a status.scaling entry that follow the load from moment to moment:
#: written at most every resync interval, unless something else changed too
VOLATILE = ("target", "memoryFloor", "message")


def _worth_writing(status: Mapping[str, Any], new: Mapping[str, Any], last: float, every: float) -> bool:
    if status.get("retiringWorkers") == new["retiringWorkers"] and status.get("scaling") == new["scaling"]:
        return False  # the usual tick: nothing changed, nothing copied, nothing written

    def stable(entries: Any) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k not in VOLATILE} for e in entries or ()]

    if status.get("retiringWorkers") != new["retiringWorkers"] or stable(status.get("scaling")) != stable(new["scaling"]):
        return True
    return status.get("scaling") != new["scaling"] and time.monotonic() - last >= every
