"""Bring one DaskCluster's scheduler to the wanted AMM configuration, or back to its own.

Level-triggered: every call asks the scheduler (through the amm_core plugin) what is
in force and acts only on the difference, so a restarted scheduler, a lost event or
a hand-made change all end in the wanted state on the next pass. One cluster's
failure never touches another: an unreachable scheduler gives that cluster a
``Degraded`` outcome and an exponential backoff before it is asked again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from dask_memory_operator.schedulers import rpc as scheduler_rpc
from dask_memory_operator.schedulers.locator import SchedulerAccessError, SchedulerLocator, SchedulerServiceMissing
from dask_memory_operator.api.memorypolicy import AMMConfig

logger = logging.getLogger(__name__)

ClusterStateName = Literal["Applied", "Pending", "Degraded", "Conflict"]


@dataclass
class Outcome:
    """What one reconcile pass found and did for one cluster."""

    cluster: str
    state: ClusterStateName
    message: str = ""
    plugin_source: str | None = None
    applied_generation: int | None = None
    #: The scheduler's report of its AMM, in status form
    amm: dict[str, Any] | None = None
    #: Changes made to the scheduler in this pass, each a short sentence for Events
    actions: list[str] = field(default_factory=list)


@dataclass
class Backoff:
    """Exponential retry delay for one cluster's scheduler."""

    failures: int = 0
    not_before: float = 0.0
    last: Outcome | None = None
    #: (uid, generation) of the policy that failed; a new generation is tried at once
    tag: tuple[str, int] | None = None

    def fail(self, outcome: Outcome, tag: tuple[str, int], base: float, cap: float) -> None:
        self.failures += 1
        self.tag = tag
        self.not_before = time.monotonic() + min(cap, base * 2 ** (self.failures - 1))
        self.last = outcome

    @property
    def waiting(self) -> bool:
        return time.monotonic() < self.not_before


def owner_tag(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "uid": meta["uid"],
        "namespace": meta["namespace"],
        "name": meta["name"],
        "generation": meta.get("generation", 1),
    }


def amm_summary(status: Mapping[str, Any]) -> dict[str, Any]:
    """The plugin's status, in the shape of ``status.clusters[].amm``."""
    amm = status.get("amm") or {}
    return {
        "running": bool(amm.get("running")),
        "interval": f"{amm.get('interval', 0):g}s",
        "measure": amm.get("measure", ""),
        "policies": [p["class"] for p in amm.get("policies") or ()],
        "cycles": int(amm.get("cycles", 0)),
        "replicasCopied": int(amm.get("replicas_copied", 0)),
        "replicasDropped": int(amm.get("replicas_dropped", 0)),
        "memoryBytes": int(amm.get("memory_bytes", 0)),
        "workers": int(status.get("workers", 0)),
        # marked by RetirePaused: retired (or retiring) and waiting to be replaced
        "workersToReplace": [
            {"name": str(w.get("name") or w.get("address")), "address": str(w.get("address", "")),
             "retired": bool(w.get("retired"))}
            for w in status.get("replace") or ()
        ],
    }


def drift(wanted: AMMConfig, status: Mapping[str, Any]) -> str | None:
    """Why the scheduler's AMM differs from ``wanted``, or None when it does not."""
    amm = status.get("amm") or {}
    if status.get("in_force") is False:
        return "changed on the scheduler since it was applied"
    if bool(amm.get("running")) != wanted.enabled:
        return f"AMM running={amm.get('running')}, wanted {wanted.enabled}"
    if not math.isclose(float(amm.get("interval", 0)), wanted.interval, rel_tol=1e-6):
        return f"interval {amm.get('interval')}s, wanted {wanted.interval}s"
    if amm.get("measure") != wanted.measure:
        return f"measure {amm.get('measure')}, wanted {wanted.measure}"
    # Only the policies the plugin configured: retirements in progress (RetireWorker
    # and its subclasses) and policies others added are not ours to compare.
    actual = Counter(
        p["class"] for p in amm.get("policies") or () if p.get("role", "configured") == "configured"
    )
    if actual != Counter(p.cls for p in wanted.policies):
        return f"policies {sorted(actual)}, wanted {sorted(p.cls for p in wanted.policies)}"
    return None


class ClusterReconciler:
    """Converges schedulers; holds the per-cluster locks and backoffs."""

    locator: SchedulerLocator
    #: Seconds for one RPC to the scheduler
    rpc_timeout: float
    backoff_base: float
    backoff_cap: float
    _locks: dict[tuple[str, str], asyncio.Lock]
    _backoffs: dict[tuple[str, str], Backoff]

    def __init__(
        self,
        locator: SchedulerLocator,
        *,
        rpc_timeout: float = 5.0,
        backoff_base: float = 2.0,
        backoff_cap: float = 60.0,
    ):
        self.locator = locator
        self.rpc_timeout = rpc_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._locks = {}
        self._backoffs = {}

    def _lock(self, key: tuple[str, str]) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def converge(
        self, namespace: str, cluster: str, wanted: AMMConfig, owner: dict[str, Any]
    ) -> Outcome:
        """Make the cluster's scheduler run ``wanted``, tagged with ``owner``."""
        key = (namespace, cluster)
        tag = (owner["uid"], owner["generation"])
        backoff = self._backoffs.setdefault(key, Backoff())
        if backoff.waiting and backoff.last is not None and backoff.tag == tag:
            return dataclasses.replace(backoff.last, actions=[])  # nothing done this time
        async with self._lock(key):
            try:
                outcome = await self._converge(namespace, cluster, wanted, owner)
            except SchedulerServiceMissing as e:
                outcome = Outcome(cluster, "Pending", str(e))
            except scheduler_rpc.SchedulerUnreachable as e:
                if e.refused:  # starting, or restarting: no backoff, no alarm
                    outcome = Outcome(cluster, "Pending", str(e))
                else:
                    outcome = Outcome(cluster, "Degraded", f"scheduler unreachable: {e}")
            except SchedulerAccessError as e:
                outcome = Outcome(cluster, "Degraded", str(e))
            except scheduler_rpc.ApplyRejected as e:
                outcome = Outcome(cluster, "Degraded", f"scheduler rejected the configuration: {e}")
            except scheduler_rpc.SchedulerRPCError as e:
                outcome = Outcome(cluster, "Degraded", f"scheduler call failed: {e}")
            if outcome.state == "Degraded":
                backoff.fail(outcome, tag, self.backoff_base, self.backoff_cap)
                await self._forget_route(namespace, cluster)
            else:
                self._backoffs.pop(key, None)
            return outcome

    async def _converge(
        self, namespace: str, cluster: str, wanted: AMMConfig, owner: dict[str, Any]
    ) -> Outcome:
        address = await self.locator.address(namespace, cluster)
        actions = []
        status, installed = await self._status_with_plugin(address)
        if installed:
            actions.append("installed the amm_core plugin on the scheduler (live)")
        tag = status.get("owner") or {}
        same_owner = tag.get("uid") == owner["uid"] and tag.get("generation") == owner["generation"]
        reason = None if same_owner else "not configured by this policy generation"
        reason = reason or drift(wanted, status)
        if reason:
            status = await scheduler_rpc.apply(
                address, wanted.to_dask_config(), owner, timeout=self.rpc_timeout
            )
            actions.append(
                f"applied MemoryPolicy {owner['name']} generation {owner['generation']} ({reason})"
            )
            left = drift(wanted, status)
            if left:
                return Outcome(
                    cluster, "Degraded", f"configuration did not take: {left}",
                    plugin_source=status.get("source"), amm=amm_summary(status), actions=actions,
                )
        return Outcome(
            cluster,
            "Applied",
            plugin_source=status.get("source"),
            applied_generation=owner["generation"],
            amm=amm_summary(status),
            actions=actions,
        )

    async def release(self, namespace: str, cluster: str, owner_uid: str) -> Outcome | None:
        """Restore the scheduler's own configuration if ``owner_uid`` configured it.

        Returns None when there was nothing to do (not configured by that policy, no
        plugin, or no scheduler any more: a new scheduler starts with its own config).
        Raises SchedulerRPCError when a scheduler exists but cannot be asked.
        """
        async with self._lock((namespace, cluster)):
            try:
                address = await self.locator.address(namespace, cluster)
            except SchedulerServiceMissing:
                return None
            try:
                status = await scheduler_rpc.get_status(address, timeout=self.rpc_timeout)
            except scheduler_rpc.PluginMissing:
                return None
            except scheduler_rpc.SchedulerRPCError:
                await self._forget_route(namespace, cluster)
                raise
            if (status.get("owner") or {}).get("uid") != owner_uid:
                return None
            status = await scheduler_rpc.restore(address, timeout=self.rpc_timeout)
            self._backoffs.pop((namespace, cluster), None)
            return Outcome(
                cluster,
                "Applied",
                plugin_source=status.get("source"),
                amm=amm_summary(status),
                actions=["restored the scheduler's own AMM configuration"],
            )

    async def release_orphan(self, namespace: str, cluster: str, known_uids: set[str]) -> Outcome | None:
        """Restore a scheduler still configured by a policy that no longer exists
        (deleted while its scheduler was unreachable, or force-deleted)."""
        try:
            address = await self.locator.address(namespace, cluster)
            status = await scheduler_rpc.get_status(address, timeout=self.rpc_timeout)
        except (SchedulerServiceMissing, SchedulerAccessError, scheduler_rpc.SchedulerRPCError):
            return None  # no plugin, or not reachable now: the next event tries again
        owner = status.get("owner") or {}
        if not owner or owner.get("uid") in known_uids:
            return None
        return await self.release(namespace, cluster, owner["uid"])

    async def _status_with_plugin(self, address: str) -> tuple[dict[str, Any], bool]:
        try:
            return await scheduler_rpc.get_status(address, timeout=self.rpc_timeout), False
        except scheduler_rpc.PluginMissing:
            await scheduler_rpc.ensure_plugin(address, timeout=self.rpc_timeout)
            return await scheduler_rpc.get_status(address, timeout=self.rpc_timeout), True

    async def _forget_route(self, namespace: str, cluster: str) -> None:
        await self.locator.forget(namespace, cluster)

    def forget_cluster(self, namespace: str, cluster: str) -> None:
        """The DaskCluster is gone: drop its lock and backoff."""
        self._backoffs.pop((namespace, cluster), None)
        self._locks.pop((namespace, cluster), None)
