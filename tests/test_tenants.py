"""One tenant degrades only itself: the shared operator's work per tick, its Events
and its owed restores, each against what a busy or hostile namespace can do.

- The assignment of policies to clusters is computed once per namespace per change
  (kopf's real index, the real index functions), not once per policy tick.
- A scheduler that reports many retirement records and ignores
  ``amm_core_forget_retirement`` (a real distributed Scheduler with the real plugin,
  its two handlers replaced) makes the scaling pass post Events on transitions only,
  capped per cluster, with one summary; counted in the emulated API server.
- One tenant's hung schedulers (TCP servers that accept and never answer) do not
  delay another tenant's owed restore (a real scheduler).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dask_kubernetes
import kopf
import kr8s
import kr8s.asyncio
import pytest
from distributed import Client, Scheduler
from kopf._core.engines.indexing import OperatorIndexer

from amm_core.plugin import PLUGIN_NAME, MemoryPolicyPlugin
from dask_memory_operator.api import selection
from dask_memory_operator.api.memorypolicy import AMMConfig, parse_spec
from dask_memory_operator.api.scaling import RetirementSpec, ScalingSpec
from dask_memory_operator.controllers.config import OperatorConfig
from dask_memory_operator.controllers.daskcluster import _settle_once, daskclusters_by_namespace
from dask_memory_operator.controllers.memorypolicy import memorypolicies_by_namespace, policy_clusters
from dask_memory_operator.controllers.scaling import TAG, ClusterScaling, ScalingController
from dmo_devstack.apiserver import ApiServer
from dask_memory_operator.observability import events
from dask_memory_operator.schedulers import rpc
from dask_memory_operator.schedulers.converge import ClusterReconciler, PendingRestore
from test_scheduler_rpc import Locator  # each cluster's scheduler at an address of the test's choosing

DASK_CRDS = Path(dask_kubernetes.__file__).parent / "operator/deployment/helm/dask-kubernetes-operator/crds"
NS = "default"


async def eventually(cond: Any, what: str, timeout: float) -> Any:
    """Wait for an async condition (polled every 20 ms), or fail saying what."""
    deadline = time.monotonic() + timeout
    while not (out := await cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return out


# --- one assignment per namespace per change ----------------------------------------


def policy_body(i: int, selector: dict[str, Any]) -> kopf.Body:
    return kopf.Body({
        "apiVersion": "amm.dask.org/v1alpha1", "kind": "MemoryPolicy",
        "metadata": {"name": f"p{i:03d}", "namespace": "ns", "uid": f"up{i}",
                     "creationTimestamp": f"2024-01-01T00:00:{i:02d}Z"},
        "spec": {"clusterSelector": selector, "activeMemoryManager": {}},
    })


class Namespace:
    """kopf's real indexes of one namespace, filled by the operator's index functions."""

    def __init__(self) -> None:
        self.policies = OperatorIndexer()
        self.clusters = OperatorIndexer()
        self.memo = kopf.Memo(config=OperatorConfig())

    def policy(self, body: kopf.Body) -> None:
        meta = body["metadata"]
        self.policies.replace(("ns", meta["name"], meta["uid"]),
                              memorypolicies_by_namespace(body=body, namespace="ns", memo=self.memo))

    def cluster(self, name: str, labels: dict[str, str]) -> None:
        self.clusters.replace(("ns", name, f"uc-{name}"), daskclusters_by_namespace(
            name=name, namespace="ns", labels=labels, annotations={}, uid=f"uc-{name}"))

    def mine(self, body: kopf.Body) -> dict[str, str]:
        _, mine = policy_clusters(body, body["metadata"]["uid"], "ns", self.clusters.index, self.policies.index)
        return {c: a.governor.name for c, a in mine.items()}


def test_the_assignment_is_computed_once_per_namespace_per_change(monkeypatch):
    n_policies, n_clusters = 40, 20
    ns = Namespace()
    # each policy selects a team's clusters; the five teams overlap in pairs
    bodies = [policy_body(i, {"matchExpressions": [{"key": "team", "operator": "In",
                                                   "values": [str(i % 5), str((i + 1) % 5)]}]})
              for i in range(n_policies)]
    for body in bodies:
        ns.policy(body)
    for j in range(n_clusters):
        ns.cluster(f"c{j:02d}", {"team": str(j % 5)})

    def expected() -> dict[str, dict[str, str]]:
        infos = [selection.PolicyInfo.from_body(b) for b in bodies]
        clusters = {c["name"]: c["labels"] for c in ns.clusters.index["ns"]}
        full = selection.assign(infos, clusters)
        return {b["metadata"]["name"]: {c: a.governor.name for c, a in sorted(full.items())
                                        if any(p.uid == b["metadata"]["uid"] for p in a.contenders)}
                for b in bodies}

    want = expected()
    calls = 0
    real_selects = selection.selects

    def counted(*args: Any) -> bool:
        nonlocal calls
        calls += 1
        return real_selects(*args)

    monkeypatch.setattr(selection, "selects", counted)
    one_assignment = n_policies * n_clusters

    # Five ticks of every policy, nothing changing: one assignment in all
    for _ in range(5):
        assert {b["metadata"]["name"]: ns.mine(b) for b in bodies} == want
    assert calls <= one_assignment, f"{calls} selector evaluations for 5 ticks of {n_policies} policies"

    # A status write re-indexes equal values: still nothing to compute
    calls = 0
    ns.policy(bodies[3])
    ns.cluster("c07", {"team": "2"})
    assert {b["metadata"]["name"]: ns.mine(b) for b in bodies} == want
    assert calls == 0

    # A relabelled cluster: computed again, once, and the answer follows
    ns.cluster("c07", {"team": "4"})
    want = expected()
    calls = 0
    for _ in range(3):
        assert {b["metadata"]["name"]: ns.mine(b) for b in bodies} == want
    assert 0 < calls <= one_assignment
    assert ns.mine(bodies[4])["c07"] == "p003"  # teams 3 and 4: the oldest of p003, p004, ...

    # A policy whose body is ahead of the index (an update not indexed yet) counts as
    # its body says, at the cost of its namespace's clusters, not a new assignment
    changed = policy_body(0, {"matchLabels": {"team": "4"}})
    calls = 0
    got = ns.mine(changed)
    assert calls <= n_clusters
    assert set(got) == {c["name"] for c in ns.clusters.index["ns"] if c["labels"] == {"team": "4"}}
    assert all(governor == "p000" for governor in got.values())  # the oldest of all


# --- Events on transitions, deduplicated and capped -------------------------------------


@pytest.fixture(autouse=True)
def fresh_gate(monkeypatch) -> None:
    """A gate of each test's own: the operator's counts every Event of the process."""
    monkeypatch.setattr(events, "GATE", events.EventGate())


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer(crd_dirs=[DASK_CRDS]) as server:
        # the default kr8s client of this loop, which the operator's Events use
        client = await kr8s.asyncio.api(url=server.url)
        assert await kr8s.asyncio.api() is client
        yield server
        del client


async def cluster_events(cluster_uid: str) -> list[dict[str, Any]]:
    client = await kr8s.asyncio.api()
    return [e.raw async for e in client.async_get("events", namespace=NS)
            if e.raw["involvedObject"].get("uid") == cluster_uid]


def aborted(i: int, started: float) -> dict[str, Any]:
    """A record of the plugin's shape: a retirement this operator asked for, aborted."""
    return {"worker": f"g-worker-{i:04d}", "address": f"tcp://10.0.0.1:{4000 + i}", "state": "aborted",
            "reason": "no running worker that is not retiring has room", "requested": f"{TAG}: g from 9 to 8",
            "blocked": "", "keys_left": 0, "bytes_left": 0, "tasks_running": 0, "keys_moved": 0,
            "bytes_moved": 0, "wasted_tasks": 0, "keys_lost": 0, "bytes_lost": 0, "started": started,
            "seconds": 1.5, "limit": 60.0, "drain": True, "left": False, "rejoined": 0,
            "keep_out": True, "leaving": False}


class NeverForgets:
    """A real scheduler with the real plugin whose retirement records are ``records``
    and whose forget handler forgets nothing: what a hostile or broken tenant's image
    can run."""

    def __init__(self, records: list[dict[str, Any]]):
        self.records = records
        self.forget_asked = 0

    async def __aenter__(self) -> str:
        self.scheduler = await Scheduler(dashboard_address=":0", port=0, host="127.0.0.1").__aenter__()
        async with Client(self.scheduler.address, asynchronous=True) as c:
            await c.register_plugin(MemoryPolicyPlugin())
        plugin = self.scheduler.plugins[PLUGIN_NAME]
        plugin.retirement.reports = lambda: list(self.records)

        def forget(workers: list[str]) -> dict[str, Any]:
            self.forget_asked += 1
            return {"forgotten": [], "kept": []}

        self.scheduler.handlers["amm_core_forget_retirement"] = forget
        return self.scheduler.address

    async def __aexit__(self, *exc: Any) -> None:
        await self.scheduler.__aexit__(*exc)


NO_AMM = AMMConfig(enabled=False, interval=1.0, measure="optimistic", policies=())


async def passes(controller: ScalingController, state: ClusterScaling, cluster_uid: str, n: int) -> dict:
    entry: dict[str, Any] = {}
    for _ in range(n):
        entry = await controller.reconcile(NS, "c", cluster_uid, ScalingSpec(RetirementSpec(), None),
                                           NO_AMM, [], state)
    return entry


async def test_records_never_forgotten_post_each_transition_once(api):
    records = [aborted(i, 1000.0 + i) for i in range(3)]
    hostile = NeverForgets(records)
    async with hostile as address:
        controller = ScalingController(ClusterReconciler(Locator({"c": address}), rpc_timeout=5))
        state = ClusterScaling()
        entry = await passes(controller, state, "uid-few", 4)
        assert hostile.forget_asked == 4  # asked each pass; it never forgets
        assert entry["reason"] == "RetirementAborted"  # the status still says it
        assert len(await cluster_events("uid-few")) == 3  # one per record, not per pass

        # A new transition (a worker retired again, aborted again) is news
        records.append({**aborted(0, 2000.0), "seconds": 2.5})
        del records[0]
        await passes(controller, state, "uid-few", 2)
        reasons = [e["reason"] for e in await cluster_events("uid-few")]
        assert reasons == ["RetirementAborted"] * 4


async def test_an_event_flood_is_capped_per_cluster_with_one_summary(api, monkeypatch):
    cap = events.EVENTS_PER_WINDOW
    records = [aborted(i, 1000.0 + i) for i in range(100)]
    hostile = NeverForgets(records)
    async with hostile as address:
        controller = ScalingController(ClusterReconciler(Locator({"c": address}), rpc_timeout=5))
        state = ClusterScaling()
        await passes(controller, state, "uid-flood", 2)
        # then every record anew, other retirements of the same workers (an engine
        # that restarts them, say): transitions, each news, still capped
        for i, r in enumerate(records):
            records[i] = {**r, "started": r["started"] + 0.5, "seconds": 2.5}
        await passes(controller, state, "uid-flood", 1)
        posted = await cluster_events("uid-flood")
        assert len(posted) <= cap, f"{len(posted)} Events for one cluster in a few passes"

        # the summary is due when the window (a minute) ends: brought forward
        [window] = [w for key, w in events.GATE._windows.items() if key[3] == "uid-flood"]
        assert window.summary is not None
        window.summary.cancel()
        events.GATE._summarize(window)
        summary = await eventually(
            lambda: _summaries("uid-flood"), "the summary of the suppressed Events", timeout=30)
        assert len(summary) == 1 and summary[0]["type"] == "Warning"
        assert "more Events about DaskCluster c suppressed" in summary[0]["message"]
        assert len(await cluster_events("uid-flood")) == cap + 1

    # Another cluster's Events are not held back by the flood
    await events.post_from_background(events.dask_cluster_ref(NS, "quiet", "uid-quiet"), "Hello", "news")
    assert [e["reason"] for e in await cluster_events("uid-quiet")] == ["Hello"]


async def _summaries(cluster_uid: str) -> list[dict[str, Any]]:
    return [e for e in await cluster_events(cluster_uid) if e["reason"] == "EventsSuppressed"]


async def test_the_same_event_is_posted_once(api):
    ref = events.dask_cluster_ref(NS, "c", "uid-same")
    for _ in range(5):
        await events.post_from_background(ref, "MemoryPolicyReleased", "restored", "Normal")
    await events.post_from_background(ref, "MemoryPolicyReleased", "restored again", "Normal")
    assert sorted(e["message"] for e in await cluster_events("uid-same")) == ["restored", "restored again"]


# --- owed restores: one tenant's hung schedulers delay no one else --------------------


async def test_hung_schedulers_do_not_delay_another_tenants_owed_restore(api):
    rpc_timeout = 2.0
    # accepts connections and never answers, like a stopped scheduler
    hung = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    hung_address = f"tcp://127.0.0.1:{hung.sockets[0].getsockname()[1]}"
    async with Scheduler(dashboard_address=":0", port=0, host="127.0.0.1") as s:
        async with Client(s.address, asynchronous=True) as c:
            await c.register_plugin(MemoryPolicyPlugin())
        owner = {"uid": "u-gone", "namespace": "tenant-b", "name": "gone", "generation": 1}
        wanted = parse_spec({"clusterSelector": {}, "activeMemoryManager": {"interval": "3s"}})
        await rpc.apply(s.address, wanted.to_dask_config(), owner)
        assert (await rpc.get_status(s.address))["owner"]["uid"] == "u-gone"

        addresses = {f"stuck-{i}": hung_address for i in range(10)}
        addresses["healthy"] = s.address
        reconciler = ClusterReconciler(Locator(addresses), rpc_timeout=rpc_timeout)
        # tenant A's ten hung schedulers are owed first
        for i in range(10):
            reconciler.owe_restore(PendingRestore("tenant-a", f"stuck-{i}", f"ua{i}", "u-a", "a"))
        reconciler.owe_restore(PendingRestore("tenant-b", "healthy", "ub", "u-gone", "gone"))

        start = time.monotonic()
        settling = asyncio.create_task(_settle_once(reconciler))

        async def restored() -> bool:
            return (await rpc.get_status(s.address)).get("owner") is None

        try:
            # its usual time is a few RPCs: well under one RPC timeout of the hung ones
            await eventually(restored, "tenant B's scheduler restored", timeout=rpc_timeout / 2)
        finally:
            took = time.monotonic() - start
            await settling
            hung.close()
        assert took < rpc_timeout / 2
        assert ("tenant-b", "healthy") not in reconciler.pending_restores  # settled
        assert len(reconciler.pending_restores) == 10  # tenant A's still owed, retried later


def test_a_spec_change_reaches_the_index_a_status_write_does_not_churn_it():
    """kopf keeps an index value equal to the new one: a changed spec (a new
    generation) must make it unequal, or the webhook and new clusters get the old spec."""
    ns = Namespace()
    body = policy_body(1, {"matchLabels": {"team": "a"}})
    body["metadata"]["generation"] = 1
    ns.policy(body)
    first = ns.policies.index["ns"]
    (info,) = first
    changed = kopf.Body({**body, "metadata": {**body["metadata"], "generation": 2},
                         "spec": {**body["spec"], "activeMemoryManager": {"interval": "5s"}}})
    ns.policy(changed)
    (info2,) = ns.policies.index["ns"]
    assert info2.body["spec"]["activeMemoryManager"] == {"interval": "5s"}
    # the same generation again (a status write): the stored value stays as it was
    ns.policy(kopf.Body({**changed, "status": {"observedGeneration": 2}}))
    (info3,) = ns.policies.index["ns"]
    assert info3 is info2


async def test_a_tenant_with_many_clusters_is_capped_as_a_namespace_and_windows_end(monkeypatch):
    posted: list[str] = []

    async def create(ref: Any, reason: str, message: str, type_: str) -> None:
        posted.append(reason)

    monkeypatch.setattr(events, "_create", create)
    gate = events.EventGate()

    def cluster(ns: str, i: int) -> dict[str, Any]:
        return events.dask_cluster_ref(ns, f"c{i}", f"u-{ns}-{i}")

    admitted = sum(gate.admit(cluster("noisy", i), cluster("noisy", i), "Degraded", f"message {j}")
                   for i in range(20) for j in range(events.EVENTS_PER_WINDOW))
    assert admitted == events.EVENTS_PER_NAMESPACE  # not 20 × 30
    # another namespace is not held back by it
    assert gate.admit(cluster("quiet", 0), cluster("quiet", 0), "Degraded", "m")
    # a window whose summary was due ends like any other: the gate forgets it
    start = min(w.start for w in gate._windows.values())
    pending = [w for w in gate._windows.values() if w.summary is not None]
    assert pending
    for window in pending:
        window.summary.cancel()
        gate._summarize(window)
        assert window.summary is None
    await asyncio.sleep(0)
    assert set(posted) == {"EventsSuppressed"}
    gate._prune(start + events.EVENT_WINDOW + 1)
    assert gate._windows == {}


async def test_a_cluster_whose_passes_keep_failing_is_passed_less_and_less_often():
    """A broken or hostile scheduler (here: a port nobody listens on) costs the
    shared operator a pass every 5, 10, 20, ... 60 s, not every adaptive interval."""
    from dask_memory_operator.api.scaling import AdaptiveSpec
    from dask_memory_operator.controllers.scaling import DEGRADED_INTERVAL_CAP, pass_interval

    controller = ScalingController(ClusterReconciler(Locator({"c": "tcp://127.0.0.1:9"}), rpc_timeout=1))
    state = ClusterScaling()
    adaptive = ScalingSpec(RetirementSpec(), AdaptiveSpec(minimum=0, maximum=4, interval=0.5))
    intervals = []
    for _ in range(7):
        await controller._pass(NS, "c", "uid-broken", adaptive, NO_AMM, [], state)
        assert state.entry["reason"] == "Degraded"
        intervals.append(pass_interval(state, adaptive, True, 10.0))
    assert intervals == [0.5, 5.0, 10.0, 20.0, 40.0, DEGRADED_INTERVAL_CAP, DEGRADED_INTERVAL_CAP]
    state.entry = {"reason": "Steady"}
    state.degraded_passes = 0  # what a pass that saw the cluster again leaves
    assert pass_interval(state, adaptive, True, 10.0) == 0.5
