"""Unit tests for the operator's pure parts: spec parsing, selection, status."""

from __future__ import annotations

import pytest

from dask_memory_operator.api.memorypolicy import InvalidPolicy, parse_spec
from dask_memory_operator.api.conditions import condition
from dask_memory_operator.schedulers.converge import Outcome, drift
from dask_memory_operator.api.selection import PolicyInfo, assign, matches_selector, selects
from dask_memory_operator.controllers.status import cluster_entry, invalid_status, policy_status


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
