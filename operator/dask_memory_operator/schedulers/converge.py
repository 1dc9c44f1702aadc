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
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dask_memory_operator.observability import metrics
from dask_memory_operator.schedulers import install, rpc as scheduler_rpc
from dask_memory_operator.schedulers.locator import SchedulerAccessError, SchedulerLocator, SchedulerServiceMissing
from dask_memory_operator.api.memorypolicy import AMMConfig
from dask_memory_operator.schedulers.outcome import Outcome

logger = logging.getLogger(__name__)


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
    """The plugin's status, in the shape of ``status.clusters[].amm`` plus the live
    counters (``LIVE_COUNTERS``), which go to metrics and not to the policy's status."""
    amm = status.get("amm") or {}
    return {
        "running": bool(amm.get("running")),
        "interval": f"{amm.get('interval', 0):g}s",
        "measure": amm.get("measure", ""),
        "policies": [p["class"] for p in amm.get("policies") or ()],
        "workers": int(status.get("workers", 0)),
        # marked by RetirePaused: retired (or retiring) and waiting to be replaced
        "workersToReplace": [
            {"name": str(w.get("name") or w.get("address")), "address": str(w.get("address", "")),
             "retired": bool(w.get("retired"))}
            for w in status.get("replace") or ()
        ],
        "cycles": int(amm.get("cycles", 0)),
        "replicasCopied": int(amm.get("replicas_copied", 0)),
        "replicasDropped": int(amm.get("replicas_dropped", 0)),
        "memoryBytes": int(amm.get("memory_bytes", 0)),
    }


#: Fields of amm_summary() that change on every AMM cycle: metrics, not status (a
#: status patch on every resync would wake every watcher of the policy)
LIVE_COUNTERS = ("cycles", "replicasCopied", "replicasDropped", "memoryBytes")


def _configured(amm: Mapping[str, Any]) -> list[str]:
    """The class paths of the configured policies (not retirements, not foreign)."""
    return [p["class"] for p in amm.get("policies") or () if p.get("role", "configured") == "configured"]


def _policy_names(before: list[str], after: list[str]) -> tuple[str, str]:
    """Both lists as a person reads them: class names, or whole paths where the
    names alone would read the same (distributed's and amm_core's ReduceReplicas)."""
    def short(paths: list[str]) -> list[str]:
        return [p.rsplit(".", 1)[-1] for p in paths]

    if short(before) == short(after):
        return ", ".join(before), ", ".join(after)
    return ", ".join(short(before)), ", ".join(short(after))


def describe_change(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """What changed in a scheduler's AMM between two plugin statuses, as ``kubectl
    describe`` readers want it: "started; interval 2s → 500ms; policies
    [ReduceReplicas] → [PressureReduceReplicas]"; "" when nothing did."""
    old, new = before.get("amm") or {}, after.get("amm") or {}
    changes = []
    if bool(old.get("running")) != bool(new.get("running")):
        changes.append("started" if new.get("running") else "stopped")
    if not math.isclose(float(old.get("interval", 0)), float(new.get("interval", 0)), rel_tol=1e-6):
        changes.append(f"interval {old.get('interval', 0):g}s → {new.get('interval', 0):g}s")
    if old.get("measure") != new.get("measure"):
        changes.append(f"measure {old.get('measure')} → {new.get('measure')}")
    if _configured(old) != _configured(new):
        was, now = _policy_names(_configured(old), _configured(new))
        changes.append(f"policies [{was}] → [{now}]")
    return "; ".join(changes)


def _applied_action(owner: Mapping[str, Any], reason: str, change: str) -> str:
    who = f"MemoryPolicy {owner['name']} generation {owner['generation']}"
    if reason == "not configured by this policy generation":
        return f"AMM set by {who}: {change}" if change else f"AMM now governed by {who} (unchanged)"
    return f"AMM put back to {who} ({reason}): {change or 'policy objects rebuilt'}"


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


def error_outcome(cluster: str, error: Exception) -> Outcome:
    """The outcome of a pass that failed with ``error``: Pending while the scheduler
    is being created or restarted, Degraded otherwise. Whatever went wrong, it is
    this one cluster's outcome and never escapes to the pass over the others."""
    if isinstance(error, SchedulerServiceMissing):
        return Outcome(cluster, "Pending", str(error))
    if isinstance(error, scheduler_rpc.SchedulerUnreachable):
        if error.refused:  # starting, or restarting: no backoff, no alarm
            return Outcome(cluster, "Pending", str(error))
        return Outcome(cluster, "Degraded", f"scheduler unreachable: {error}", cause="Unreachable")
    if isinstance(error, SchedulerAccessError):
        return Outcome(cluster, "Degraded", str(error), cause="AccessDenied")
    if isinstance(error, scheduler_rpc.SchedulerProtocolError):
        return Outcome(cluster, "Degraded", f"scheduler protocol error: {error}", cause="ProtocolError")
    if isinstance(error, scheduler_rpc.ApplyRejected):
        return Outcome(cluster, "Degraded", f"scheduler rejected the configuration: {error}", cause="Rejected")
    if isinstance(error, scheduler_rpc.SchedulerRPCError):
        return Outcome(cluster, "Degraded", f"scheduler call failed: {error}", cause="CallFailed")
    # A bug, or an answer nobody foresaw: logged with its traceback, and it degrades
    # only this cluster
    logger.error("Unexpected error converging DaskCluster %s", cluster, exc_info=error)
    return Outcome(cluster, "Degraded", f"unexpected error: {type(error).__name__}: {error}", cause="Unexpected")


#: A pass over one cluster may take this many RPC timeouts in all (status, install
#: or replace: up to four calls, status, apply)
PASS_TIMEOUT_CALLS = 6


def log_failed_restore(namespace: str, cluster: str, error: Exception, level: int = logging.WARNING) -> None:
    """A restore that failed: the scheduler or the API could not be asked (one line,
    at ``level``), or anything else (with its traceback). Either way it is that one
    cluster's failure, retried later."""
    if isinstance(error, (scheduler_rpc.SchedulerRPCError, SchedulerAccessError)):
        logger.log(level, "Could not restore DaskCluster %s/%s yet: %s", namespace, cluster, error)
    else:
        logger.error("Unexpected error restoring DaskCluster %s/%s", namespace, cluster, exc_info=error)


@dataclass(frozen=True)
class PendingRestore:
    """A scheduler whose policy was deleted while it could not be reached: it still
    runs that policy's AMM, and is restored when it answers again."""

    namespace: str
    cluster: str
    cluster_uid: str
    #: uid of the deleted MemoryPolicy
    policy_uid: str
    policy_name: str


class ClusterReconciler:
    """Converges schedulers; holds the per-cluster locks, backoffs and the restores
    still owed to schedulers of deleted policies."""

    locator: SchedulerLocator
    #: Seconds for one RPC to the scheduler
    rpc_timeout: float
    backoff_base: float
    backoff_cap: float
    #: Restores owed, by (namespace, cluster); retried by :meth:`retry_pending_restores`
    pending_restores: dict[tuple[str, str], PendingRestore]
    #: Per-cluster locks; a lock no pass holds or waits for is dropped by itself
    _locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock]
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
        self.pending_restores = {}
        self._locks = weakref.WeakValueDictionary()
        self._backoffs = {}
        self._next_prune = 0.0

    def _lock(self, key: tuple[str, str]) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def converge(
        self, namespace: str, cluster: str, wanted: AMMConfig, owner: dict[str, Any],
        wants_departures: Callable[[Mapping[str, Any]], bool] | None = None,
    ) -> Outcome:
        """Make the cluster's scheduler run ``wanted``, tagged with ``owner``. Never
        raises: what goes wrong is the returned outcome. ``wants_departures``: told
        the plugin's savings counters, whether its departures hold something the
        caller has not handled (they are read only then)."""
        key = (namespace, cluster)
        tag = (owner["uid"], owner["generation"])
        self._prune_backoffs()
        backoff = self._backoffs.setdefault(key, Backoff())
        if backoff.waiting and backoff.last is not None and backoff.tag == tag:
            # nothing done (nor read) this time
            return dataclasses.replace(backoff.last, actions=[], savings=None, departures=None)
        async with self._lock(key):
            try:
                # each call has its own timeout; this bounds the whole pass
                async with asyncio.timeout(PASS_TIMEOUT_CALLS * self.rpc_timeout):
                    outcome = await self._converge(namespace, cluster, wanted, owner)
                    if outcome.savings is not None and wants_departures is not None \
                            and wants_departures(outcome.savings):
                        await self._read_departures(namespace, cluster, outcome)
            except TimeoutError:
                outcome = Outcome(cluster, "Degraded", f"scheduler too slow: a pass took over "
                                  f"{PASS_TIMEOUT_CALLS * self.rpc_timeout:g}s", cause="Unreachable")
            except Exception as e:  # one cluster's failure is its own outcome
                outcome = error_outcome(cluster, e)
            if outcome.state == "Degraded":
                backoff.fail(outcome, tag, self.backoff_base, self.backoff_cap)
                await self.locator.forget(namespace, cluster)
            else:
                self._backoffs.pop(key, None)
            return outcome

    async def _read_departures(self, namespace: str, cluster: str, outcome: Outcome) -> None:
        """The plugin's latest departures, onto ``outcome``; a failure leaves them
        unread (the counters stand; the next pass asks again)."""
        try:
            address = await self.address(namespace, cluster, "savings")
            answer = await scheduler_rpc.savings(address, timeout=self.rpc_timeout)
        except (scheduler_rpc.SchedulerRPCError, SchedulerAccessError, SchedulerServiceMissing) as e:
            logger.info("Could not read the departures of DaskCluster %s/%s: %s", namespace, cluster, e)
            return
        # the same plugin's counters, as of the departures (a restart in between: its)
        outcome.savings = answer["counters"]
        outcome.departures = answer["departures"]
        outcome.scheduler_now = answer["now"]

    async def _converge(
        self, namespace: str, cluster: str, wanted: AMMConfig, owner: dict[str, Any]
    ) -> Outcome:
        address = await self.address(namespace, cluster, "converge")
        status, actions = await install.ensure_plugin_status(address, timeout=self.rpc_timeout)
        tag = status.get("owner") or {}
        if tag.get("uid") == owner["uid"] and (tag.get("generation") or 0) > owner["generation"]:
            # a pass of an older generation, late: the newer one's pass owns the scheduler
            return Outcome(cluster, "Applied", scheduler_rpc.truncation_note(status),
                           plugin_source=status.get("source"),
                           applied_generation=tag["generation"], amm=amm_summary(status),
                           savings=status.get("savings"))
        same_owner = tag.get("uid") == owner["uid"] and tag.get("generation") == owner["generation"]
        reason = None if same_owner else "not configured by this policy generation"
        reason = reason or drift(wanted, status)
        if reason:
            before = status
            status = await scheduler_rpc.apply(
                address, wanted.to_dask_config(), owner, timeout=self.rpc_timeout
            )
            actions.append(_applied_action(owner, reason, describe_change(before, status)))
            left = drift(wanted, status)
            if left:
                return Outcome(
                    cluster, "Degraded", f"configuration did not take: {left}", cause="DidNotTake",
                    plugin_source=status.get("source"), amm=amm_summary(status), actions=actions,
                    savings=status.get("savings"),
                )
        return Outcome(
            cluster,
            "Applied",
            # a big answer read in part: said, and the pass goes on
            scheduler_rpc.truncation_note(status),
            plugin_source=status.get("source"),
            # a preloaded plugin of other code: the image owns it, the user is told
            plugin_warning=install.skew(status),
            applied_generation=owner["generation"],
            amm=amm_summary(status),
            actions=actions,
            savings=status.get("savings"),
        )

    async def release(self, namespace: str, cluster: str, owner_uid: str) -> Outcome | None:
        """Restore the scheduler's own configuration if ``owner_uid`` configured it.

        Returns None when there was nothing to do (not configured by that policy, no
        plugin, or no scheduler any more: a new scheduler starts with its own config).
        Raises SchedulerRPCError or SchedulerAccessError when a scheduler exists but
        cannot be asked.
        """
        async with self._lock((namespace, cluster)):
            try:
                address = await self.address(namespace, cluster, "release")
            except SchedulerServiceMissing:
                return None
            try:
                status = await scheduler_rpc.get_status(address, timeout=self.rpc_timeout)
            except scheduler_rpc.PluginMissing:
                return None
            except scheduler_rpc.SchedulerRPCError:
                await self.locator.forget(namespace, cluster)
                raise
            if (status.get("owner") or {}).get("uid") != owner_uid:
                return None
            restored = await scheduler_rpc.restore(address, timeout=self.rpc_timeout)
            self._backoffs.pop((namespace, cluster), None)
            change = describe_change(status, restored)
            return Outcome(
                cluster,
                "Applied",
                plugin_source=restored.get("source"),
                amm=amm_summary(restored),
                actions=[
                    "restored the scheduler's own AMM configuration"
                    + (f": {change}" if change else " (unchanged)")
                ],
            )

    async def release_orphan(self, namespace: str, cluster: str, known_uids: set[str]) -> Outcome | None:
        """Restore a scheduler still configured by a policy that no longer exists
        (deleted while its scheduler was unreachable, or force-deleted)."""
        try:
            address = await self.address(namespace, cluster, "orphan-check")
            status = await scheduler_rpc.get_status(address, timeout=self.rpc_timeout)
        except (SchedulerServiceMissing, SchedulerAccessError, scheduler_rpc.SchedulerRPCError):
            return None  # no plugin, or not reachable now: the next event tries again
        owner = status.get("owner") or {}
        if not owner or owner.get("uid") in known_uids:
            return None
        try:
            return await self.release(namespace, cluster, owner["uid"])
        except Exception as e:  # tried again at the cluster's next change
            logger.warning("Could not restore orphaned DaskCluster %s/%s: %s", namespace, cluster, e)
            return None

    def owe_restore(self, restore: PendingRestore) -> None:
        """Remember a restore that deletion could not do (the policy is gone now)."""
        self.pending_restores[(restore.namespace, restore.cluster)] = restore

    async def retry_pending_restores(self) -> list[tuple[PendingRestore, Outcome]]:
        """Try every owed restore once; returns those done, with what was done. A
        scheduler that restarted in between starts with its own configuration: then
        there is nothing to do, and the debt is settled too."""
        done = []
        for key, owed in list(self.pending_restores.items()):
            try:
                outcome = await self.release(owed.namespace, owed.cluster, owed.policy_uid)
            except Exception as e:  # one scheduler's failure is its own
                log_failed_restore(*key, e, level=logging.INFO)
                continue
            self.pending_restores.pop(key, None)
            if outcome is not None:
                done.append((owed, outcome))
        return done

    async def address(self, namespace: str, cluster: str, purpose: str) -> str:
        """Where the scheduler is, counted: every contact with a scheduler starts here."""
        metrics.SCHEDULER_CONTACTS.labels(namespace, cluster, purpose).inc()
        return await self.locator.address(namespace, cluster)

    def _prune_backoffs(self) -> None:
        """Drop the backoffs (and the last outcome each keeps) that no pass came back
        for within twice the cap: their cluster is not governed any more (its policy
        deleted or changed, its labels changed) or is gone, and no event said so.
        At most once per cap, so a pass costs O(1) on average."""
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + self.backoff_cap
        for key in [k for k, b in self._backoffs.items() if b.not_before + 2 * self.backoff_cap < now]:
            del self._backoffs[key]

    def forget_policy(self, policy_uid: str) -> None:
        """The policy is gone: drop the backoffs of the passes it failed."""
        for key in [k for k, b in self._backoffs.items() if b.tag is not None and b.tag[0] == policy_uid]:
            del self._backoffs[key]

    async def forget_cluster(self, namespace: str, cluster: str) -> None:
        """The DaskCluster is gone: drop its backoff, its owed restore and where its
        scheduler was (its lock goes by itself once no pass holds or waits for it)."""
        key = (namespace, cluster)
        self._backoffs.pop(key, None)
        self.pending_restores.pop(key, None)
        await self.locator.forget(namespace, cluster)
