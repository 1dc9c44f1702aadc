"""Unit tests for the operator's pure parts: spec parsing, selection, status."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from amm_core.config import MIN_INTERVAL
from dask_memory_operator import manifests
from dask_memory_operator.api.conditions import condition
from dask_memory_operator.api.memorypolicy import InvalidPolicy, parse_spec
from dask_memory_operator.api.selection import PolicyInfo, assign, matches_selector, selects
from dask_memory_operator.controllers.status import cluster_entry, invalid_status, policy_status
from dask_memory_operator.observability import metrics
from dask_memory_operator.schedulers import rpc
from dask_memory_operator.schedulers.converge import (
    LIVE_COUNTERS,
    ClusterReconciler,
    Outcome,
    describe_change,
    drift,
    error_outcome,
)


def spec(**amm):
    return {"clusterSelector": {}, "activeMemoryManager": amm}


def test_parse_spec_defaults_and_short_names():
    cfg = parse_spec(spec(policies=[{"class": "ReduceReplicas"}, {"class": "Rebalance", "args": {"threshold": 0.1}}]))
    assert cfg.enabled is True and cfg.interval == 2.0 and cfg.measure == "optimistic"
    assert cfg.to_dask_config() == {
        "start": True,
        "interval": 2.0,
        "measure": "optimistic",
        "policies": [
            {"class": "amm_core.replicate.ReduceReplicas"},
            {"class": "amm_core.rebalance.Rebalance", "threshold": 0.1},
        ],
    }


@pytest.mark.parametrize(
    "amm, field, words",
    [
        ({"interval": "soon"}, "spec.activeMemoryManager.interval", "positive duration"),
        ({"interval": "0s"}, "spec.activeMemoryManager.interval", "positive duration"),
        ({"interval": ["2s"]}, "spec.activeMemoryManager.interval", "positive duration"),
        ({"measure": "rss"}, "spec.activeMemoryManager.measure", "unsupported value"),
        ({"policies": [{"class": "NoSuchPolicy"}]}, "spec.activeMemoryManager.policies[0].class", "unknown policy"),
        ({"policies": [{"class": "os.system"}]}, "spec.activeMemoryManager.policies[0].class", "not allowed"),
        ({"policies": [{"class": "ReduceReplicas", "args": [1]}]}, "spec.activeMemoryManager.policies[0].args", "object"),
        ({"policies": [{"class": "Rebalance", "args": {"nope": 1}}]}, "spec.activeMemoryManager.policies[0].args", "nope"),
        ({"policies": [{"class": "ReduceReplicas", "args": {"class": "os.system"}}]},
         "spec.activeMemoryManager.policies[0].args", "may not contain the key 'class'"),
    ],
)
def test_parse_spec_rejects(amm, field, words):
    with pytest.raises(InvalidPolicy) as e:
        parse_spec(spec(**amm))
    assert e.value.field == field
    assert words in str(e.value)


def test_replicate_needs_a_reducer_that_honours_it():
    upstream = "distributed.active_memory_manager.ReduceReplicas"
    with pytest.raises(InvalidPolicy, match="Replicate does not work with"):
        parse_spec(spec(policies=[{"class": "Replicate"}, {"class": upstream}]), allowed=[upstream])
    parse_spec(spec(policies=[{"class": "Replicate"}, {"class": "ReduceReplicas"}]))


@pytest.mark.parametrize("expr, words", [
    ({"key": "a", "operator": "In"}, "must be specified"),
    ({"key": "a", "operator": "Exists", "values": ["x"]}, "may not be specified"),
])
def test_selector_checked_like_the_api_server(expr, words):
    with pytest.raises(InvalidPolicy, match=words) as e:
        parse_spec({"clusterSelector": {"matchExpressions": [expr]}, "activeMemoryManager": {}})
    assert e.value.field == "spec.clusterSelector.matchExpressions[0].values"


def test_allowlist_globs():
    cfg = parse_spec(spec(policies=[{"class": "mycorp.amm.Keep"}]), allowed=["mycorp.amm.*"])
    assert cfg.policies[0].cls == "mycorp.amm.Keep"
    with pytest.raises(InvalidPolicy):
        parse_spec(spec(policies=[{"class": "mycorp.other.Keep"}]), allowed=["mycorp.amm.*"])


@pytest.mark.parametrize(
    "selector, labels, expected",
    [
        ({}, {}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "1"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": ""}, False),
    ],
)
def test_label_selector(selector, labels, expected):
    assert matches_selector(selector, labels) is expected


def policy(name, created, selector=None, names=None):
    return PolicyInfo(name, f"uid-{name}", created, selector, tuple(names) if names else None)


def test_selects_needs_selector_or_names():
    assert not selects(policy("p", "t"), "c", {})
    assert selects(policy("p", "t", names=["c"]), "c", {})
    assert not selects(policy("p", "t", selector={"matchLabels": {"x": "y"}}, names=["c"]), "c", {})


def test_conflict_goes_to_oldest_then_name_whatever_the_order():
    a = policy("b-old", "2026-01-01T00:00:00Z", selector={})
    b = policy("a-new", "2026-02-01T00:00:00Z", selector={})
    c = policy("a-old", "2026-01-01T00:00:00Z", names=["one"])
    clusters = {"one": {}, "two": {}}
    for order in ([a, b, c], [c, b, a], [b, a, c]):
        result = assign(order, clusters)
        assert result["one"].governor.name == "a-old"
        assert [p.name for p in result["one"].contenders] == ["a-old", "b-old", "a-new"]
        assert result["two"].governor.name == "b-old"


def test_unselected_clusters_are_absent():
    assert assign([policy("p", "t", names=["x"])], {"y": {}}) == {}


def test_condition_keeps_transition_time_while_status_holds():
    first = condition("Ready", True, "Applied", "", 1)
    old = [dict(first, lastTransitionTime="2020-01-01T00:00:00Z")]
    assert condition("Ready", True, "Applied", "x", 2, old)["lastTransitionTime"] == "2020-01-01T00:00:00Z"
    assert condition("Ready", False, "Degraded", "x", 2, old)["lastTransitionTime"] != "2020-01-01T00:00:00Z"


def conds(status):
    return {c["type"]: c for c in status["conditions"]}


def test_policy_status_ready_degraded_conflict():
    applied = cluster_entry(Outcome("a", "Applied", applied_generation=3, plugin_source="live"), "p")
    down = cluster_entry(Outcome("b", "Degraded", "scheduler unreachable: timeout"), "p")
    other = cluster_entry(Outcome("c", "Conflict", "c is governed by MemoryPolicy q"), "q")
    status = policy_status(3, [applied, down, other], {})
    c = conds(status)
    assert status["observedGeneration"] == 3
    assert (status["matchedClusters"], status["appliedClusters"]) == (3, 1)
    assert c["Ready"]["status"] == "False" and c["Ready"]["reason"] == "Degraded"
    assert c["Degraded"]["status"] == "True" and "b: scheduler unreachable" in c["Degraded"]["message"]
    assert c["Conflict"]["status"] == "True" and "governed by MemoryPolicy q" in c["Conflict"]["message"]
    assert c["Invalid"]["status"] == "False"

    ok = policy_status(3, [applied], {})
    assert conds(ok)["Ready"]["status"] == "True"
    assert conds(ok)["Degraded"]["status"] == "False"


def test_policy_governing_nothing_is_not_ready():
    other = cluster_entry(Outcome("c", "Conflict", "c is governed by MemoryPolicy q"), "q")
    c = conds(policy_status(1, [other], {}))
    assert c["Ready"]["status"] == "False" and c["Ready"]["reason"] == "Conflict"


def test_invalid_status_keeps_clusters():
    prev = policy_status(1, [cluster_entry(Outcome("a", "Applied"), "p")], {})
    status = invalid_status(2, "spec.activeMemoryManager.measure: unsupported", prev)
    c = conds(status)
    assert c["Invalid"]["status"] == "True" and "measure" in c["Invalid"]["message"]
    assert c["Ready"]["status"] == "False" and c["Ready"]["reason"] == "Invalid"
    assert status["clusters"] == prev["clusters"] and status["observedGeneration"] == 2


def test_drift_detects_each_difference():
    cfg = parse_spec(spec(interval="1s", measure="managed", policies=[{"class": "ReduceReplicas"}]))
    amm = {
        "running": True, "interval": 1.0, "measure": "managed",
        "policies": [
            {"class": "amm_core.replicate.ReduceReplicas"},
            {"class": "distributed.active_memory_manager.RetireWorker", "role": "retirement"},
        ],
    }
    assert drift(cfg, {"amm": amm}) is None
    assert "running" in drift(cfg, {"amm": dict(amm, running=False)})
    assert "interval" in drift(cfg, {"amm": dict(amm, interval=2.0)})
    assert "measure" in drift(cfg, {"amm": dict(amm, measure="process")})
    assert "policies" in drift(cfg, {"amm": dict(amm, policies=[])})


class FixedLocator:
    """A locator that always answers one address, counting the lookups."""

    def __init__(self, address):
        self.addr = address
        self.calls = 0

    async def address(self, namespace, cluster):
        self.calls += 1
        return self.addr

    async def forget(self, namespace, cluster):
        pass


OWNER = {"uid": "u", "namespace": "ns", "name": "p", "generation": 1}


def test_refused_scheduler_is_pending_and_retried_every_time():
    import asyncio

    from dask_memory_operator.schedulers.converge import ClusterReconciler

    locator = FixedLocator("tcp://127.0.0.1:1")  # nothing listens there
    reconciler = ClusterReconciler(locator, rpc_timeout=0.5, backoff_base=60)

    async def twice():
        return [await reconciler.converge("ns", "c", parse_spec(spec()), OWNER) for _ in range(2)]

    assert [o.state for o in asyncio.run(twice())] == ["Pending", "Pending"]
    assert locator.calls == 2


def test_silent_scheduler_is_degraded_and_backed_off_until_a_new_generation():
    import asyncio

    from dask_memory_operator.schedulers.converge import ClusterReconciler

    async def scenario():
        # accepts connections and never answers, like a stopped scheduler
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        locator = FixedLocator(f"tcp://127.0.0.1:{port}")
        reconciler = ClusterReconciler(locator, rpc_timeout=0.5, backoff_base=60)
        wanted = parse_spec(spec())
        first = await reconciler.converge("ns", "c", wanted, OWNER)
        first.actions.append("something done")
        second = await reconciler.converge("ns", "c", wanted, OWNER)
        calls_in_backoff = locator.calls
        await reconciler.converge("ns", "c", wanted, dict(OWNER, generation=2))
        server.close()
        return first, second, calls_in_backoff, locator.calls

    first, second, calls_in_backoff, calls = asyncio.run(scenario())
    assert first.state == second.state == "Degraded"
    assert "unreachable" in first.message
    assert second.actions == []  # a replayed outcome did nothing this time
    assert calls_in_backoff == 1  # the second pass did not ask the scheduler
    assert calls == 2  # a new generation is tried at once


def test_amm_summary_reports_workers_to_replace():
    from dask_memory_operator.schedulers.converge import amm_summary

    status = {
        "workers": 3,
        "amm": {"running": True, "interval": 2.0, "measure": "managed",
                "policies": [{"class": "amm_core.retire_paused.RetirePaused", "role": "configured"}],
                "cycles": 7, "replicas_copied": 2, "replicas_dropped": 1, "memory_bytes": 10},
        "replace": [{"address": "tcp://10.0.0.1:1", "name": "w-1", "paused_since": 1.0,
                     "retiring_since": 2.0, "retired": True}],
    }
    assert amm_summary(status) == {
        "running": True, "interval": "2s", "measure": "managed",
        "policies": ["amm_core.retire_paused.RetirePaused"], "cycles": 7,
        "replicasCopied": 2, "replicasDropped": 1, "memoryBytes": 10, "workers": 3,
        "workersToReplace": [{"name": "w-1", "address": "tcp://10.0.0.1:1", "retired": True}],
    }


# --- hardening ----------------------------------------------------------------

def _crd_interval_pattern() -> str:
    crd = yaml.safe_load(Path(str(manifests.MEMORYPOLICY_CRD)).read_text())
    amm = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "activeMemoryManager"]
    return amm["properties"]["interval"]["pattern"]


@pytest.mark.parametrize("text", ["1ms", "50ms", "99ms", "99.9ms", "0.05s", "0.09s", "0.001m", "0s", "0ms"])
def test_interval_below_the_floor_is_invalid_in_the_parser_and_the_crd(text):
    with pytest.raises(InvalidPolicy, match="interval") as e:
        parse_spec(spec(interval=text))
    assert "minimum of 100ms" in str(e.value) or "positive duration" in str(e.value)
    assert re.fullmatch(_crd_interval_pattern(), text) is None


@pytest.mark.parametrize("text", ["100ms", "150ms", "100.5ms", "0.1s", "0.15s", "2s", "10s", "1.5m", "0.01m", "1h"])
def test_interval_at_or_above_the_floor_is_valid_in_the_parser_and_the_crd(text):
    assert parse_spec(spec(interval=text)).interval >= MIN_INTERVAL
    assert re.fullmatch(_crd_interval_pattern(), text) is not None


def _status(running=True, interval=2.0, measure="optimistic", policies=("a.b.ReduceReplicas",)):
    return {"amm": {"running": running, "interval": interval, "measure": measure,
                    "policies": [{"class": c, "role": "configured"} for c in policies]
                    + [{"class": "distributed.active_memory_manager.RetireWorker", "role": "retirement"}]}}


def test_describe_change_says_what_changed_from_what_to_what():
    before = _status(running=False)
    after = _status(interval=0.5, measure="managed", policies=("x.PressureReduceReplicas", "y.Rebalance"))
    assert describe_change(before, after) == (
        "started; interval 2s → 0.5s; measure optimistic → managed; "
        "policies [ReduceReplicas] → [PressureReduceReplicas, Rebalance]"
    )
    assert describe_change(after, after) == ""
    same_names = _status(policies=("amm_core.replicate.ReduceReplicas",))
    assert describe_change(before, same_names).endswith(
        "policies [a.b.ReduceReplicas] → [amm_core.replicate.ReduceReplicas]")
    assert describe_change(after, _status(running=False, interval=0.5, measure="managed",
                                          policies=("x.PressureReduceReplicas", "y.Rebalance"))) == "stopped"


def test_unexpected_errors_are_the_clusters_own_degraded_outcome():
    outcome = error_outcome("c", KeyError("amm"))
    assert outcome.state == "Degraded" and "unexpected error: KeyError" in outcome.message
    protocol = error_outcome("c", rpc.SchedulerRPCError("scheduler sent a pickle; refused"))
    assert protocol.state == "Degraded" and "pickle" in protocol.message


def test_a_scheduler_answering_nonsense_degrades_only_its_cluster():
    """One cluster whose pass raises something unforeseen does not stop the others:
    converge() never raises."""
    import asyncio

    class Locator(FixedLocator):
        async def address(self, namespace, cluster):
            self.calls += 1
            if cluster == "bad":
                raise TypeError("not a mapping")  # anything no one foresaw
            return self.addr

    async def scenario():
        reconciler = ClusterReconciler(Locator("tcp://127.0.0.1:1"), rpc_timeout=0.5)
        wanted = parse_spec(spec())
        return await asyncio.gather(*(reconciler.converge("ns", c, wanted, OWNER) for c in ("bad", "good")))

    bad, good = asyncio.run(scenario())
    assert bad.state == "Degraded" and "TypeError" in bad.message
    assert good.state == "Pending"  # nothing listens there: its own, separate outcome


def test_status_leaves_live_counters_to_metrics():
    amm = {"running": True, "interval": "2s", "measure": "managed", "policies": [], "workers": 2,
           "workersToReplace": [], "cycles": 5, "replicasCopied": 1, "replicasDropped": 2, "memoryBytes": 3}
    entry = cluster_entry(Outcome("c", "Applied", amm=amm, plugin_warning="old amm_core"), "p")
    assert not set(LIVE_COUNTERS) & set(entry["amm"])
    assert entry["amm"]["workers"] == 2 and entry["pluginWarning"] == "old amm_core"
    # two passes that differ only in counters give the same status
    again = cluster_entry(Outcome("c", "Applied", amm=dict(amm, cycles=99, memoryBytes=7)), "p")
    assert policy_status(1, [entry], {})["clusters"][0]["amm"] == policy_status(1, [again], {})["clusters"][0]["amm"]


def test_unchanged_status_is_not_patched():
    from dask_memory_operator.controllers.memorypolicy import _patch_status

    class Patch:
        def __init__(self):
            self.status = {}

    entry = cluster_entry(Outcome("c", "Applied", applied_generation=1), "p")
    first = policy_status(1, [entry], {})
    patch = Patch()
    _patch_status(patch, first, policy_status(1, [entry], first))
    assert patch.status == {}
    _patch_status(patch, first, policy_status(1, [cluster_entry(Outcome("c", "Degraded", "x"), "p")], first))
    assert patch.status["clusters"][0]["state"] == "Degraded"


def _samples(name):
    return [s for f in REGISTRY.collect() for s in f.samples if s.name.startswith(name)]


def test_metrics_of_deleted_clusters_and_policies_end():
    amm = {"cycles": 1, "replicasCopied": 0, "replicasDropped": 0, "memoryBytes": 1}
    for policy, cluster in (("p1", "a"), ("p1", "b"), ("p2", "c")):
        metrics.observe("metrics-ns", policy, Outcome(cluster, "Applied", amm=amm, actions=["x"]))
    metrics.SCHEDULER_CONTACTS.labels("metrics-ns", "a", "converge").inc()

    def clusters():
        return {s.labels["cluster"] for s in _samples("dask_memory_operator_")
                if s.labels.get("namespace") == "metrics-ns"}

    assert clusters() == {"a", "b", "c"}
    metrics.forget("metrics-ns", cluster="a")  # the DaskCluster was deleted
    assert clusters() == {"b", "c"}
    metrics.forget("metrics-ns", policy="p1")  # the MemoryPolicy was deleted
    assert clusters() == {"c"}


def test_an_invalid_policy_governs_nothing_but_is_known():
    valid = PolicyInfo("young", "u2", "2024-01-02", {}, None)
    invalid = PolicyInfo("old", "u1", "2024-01-01", {}, None, valid=False)
    assert assign([invalid, valid], {"c": {}})["c"].governor.name == "young"
    assert assign([invalid], {"c": {}}) == {}


def test_a_clusters_lock_lives_while_a_pass_holds_it_and_goes_after():
    import asyncio
    import gc

    async def scenario():
        reconciler = ClusterReconciler(FixedLocator("tcp://127.0.0.1:1"))
        async with reconciler._lock(("ns", "c")):
            await reconciler.forget_cluster("ns", "c")
            gc.collect()
            assert reconciler._lock(("ns", "c")).locked()  # still the one held
        gc.collect()
        assert ("ns", "c") not in reconciler._locks  # no pass holds it: gone, no leak

    asyncio.run(scenario())


def test_no_scheduler_is_contacted_in_a_namespace_without_a_memorypolicy():
    """DaskCluster events come from every namespace; only those with a MemoryPolicy
    are the operator's business (the orphan check asks a scheduler only there)."""
    import asyncio

    import kopf

    from dask_memory_operator.controllers.config import OperatorConfig
    from dask_memory_operator.controllers.daskcluster import converge_changed_cluster

    locator = FixedLocator("tcp://127.0.0.1:1")
    memo = kopf.Memo(config=OperatorConfig(), reconciler=ClusterReconciler(locator, rpc_timeout=0.5),
                     cluster_labels={})
    elsewhere = PolicyInfo("p", "u1", "2024-01-01", None, ("not-this-one",))

    async def event(namespace, index):
        body = kopf.Body({"apiVersion": "kubernetes.dask.org/v1", "kind": "DaskCluster",
                          "metadata": {"name": "c", "namespace": namespace, "uid": "c1"}})
        await converge_changed_cluster(event={"type": "MODIFIED"}, body=body, name="c", namespace=namespace,
                                       labels={}, memo=memo, memorypolicies_by_namespace=index)

    asyncio.run(event("lonely", {"other": [elsewhere]}))
    assert locator.calls == 0
    asyncio.run(event("other", {"other": [elsewhere]}))  # a policy here, governing nothing
    assert locator.calls == 1
    asyncio.run(event("other", {"other": [elsewhere]}))  # same labels: a status write, say
    assert locator.calls == 1


def test_a_cluster_taken_over_and_not_restorable_yet_is_listed_once():
    """A cluster this policy configured, now governed by an older one (Conflict), whose
    scheduler cannot be asked: one entry, not a second "restore pending" one (the
    CRD's list-map on name would refuse the whole status)."""
    import asyncio

    import kopf

    from dask_memory_operator.controllers.memorypolicy import _release_unselected

    policy = kopf.Body({"apiVersion": "amm.dask.org/v1alpha1", "kind": "MemoryPolicy",
                        "metadata": {"name": "young", "namespace": "ns", "uid": "u2"}})
    entries = [cluster_entry(Outcome("c", "Conflict", "c is governed by MemoryPolicy old"), "old")]
    previous = {"clusters": [{"name": "c", "state": "Applied"}, {"name": "d", "state": "Applied"}]}
    clusters = {"c": {"name": "c", "uid": "c1", "labels": {}}, "d": {"name": "d", "uid": "d1", "labels": {}}}
    reconciler = ClusterReconciler(FixedLocator("tcp://127.0.0.1:1"), rpc_timeout=0.5)  # refused
    asyncio.run(_release_unselected(policy, "ns", "u2", previous, entries, clusters, reconciler, kopf.Memo()))
    assert [(e["name"], e["state"]) for e in entries] == [("c", "Conflict"), ("d", "Degraded")]
    assert "restore pending" in entries[1]["message"]
    # `c`'s new governor applies its own config: no restore was even tried for it
    assert reconciler.locator.calls == 1


def test_policy_args_may_not_hold_keys_the_schedulers_decoder_interprets():
    for args in ({"__Enum__": True}, {"x": [{"__Serialized__": 1}]}):
        with pytest.raises(InvalidPolicy, match="policies\\[0\\].args: may not contain the key '__"):
            parse_spec(spec(policies=[{"class": "Rebalance", "args": args}]))


def test_the_degraded_condition_says_why():
    entries = [cluster_entry(error_outcome("a", rpc.SchedulerProtocolError("pickle")), "p")]
    assert entries[0]["reason"] == "ProtocolError"
    assert conditions_of(policy_status(1, entries, {}))["Degraded"]["reason"] == "ProtocolError"
    entries.append(cluster_entry(error_outcome("b", rpc.ApplyRejected("no")), "p"))
    assert conditions_of(policy_status(1, entries, {}))["Degraded"]["reason"] == "SchedulersDegraded"
    long = cluster_entry(Outcome("c", "Degraded", "x" * 100_000), "p")
    assert len(long["message"]) == 1024
    assert len(conditions_of(policy_status(1, [long] * 10, {}))["Degraded"]["message"]) == 4096


def conditions_of(status):
    return {c["type"]: c for c in status["conditions"]}


def test_a_policy_timer_does_nothing_once_its_namespace_is_no_longer_governed():
    """kopf re-filters a timer only at its object's next event: the tick checks."""
    import asyncio

    import kopf

    from dask_memory_operator.controllers.scope import INDEX, checked_at_each_tick, register_namespace_scope

    governed = register_namespace_scope(kopf.OperatorRegistry(), ("team", "on"))
    calls = []

    async def scale(**kwargs):
        calls.append(kwargs["namespace"])

    tick = checked_at_each_tick(scale, governed)
    asyncio.run(tick(namespace="a", **{INDEX: {"a": [True], "b": [False]}}))
    asyncio.run(tick(namespace="b", **{INDEX: {"a": [True], "b": [False]}}))
    assert calls == ["a"]
    assert checked_at_each_tick(scale, None) is scale  # no selector: every namespace
