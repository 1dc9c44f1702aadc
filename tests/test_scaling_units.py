"""The scaling controller's parts, each on its own: the parser of ``spec.retirement``
and ``spec.adaptive`` (and the CRD that must say the same), the rules that size a
worker group, the ledger annotation, the ``amm_core_scaling`` answer of a real
in-process scheduler and the operator's check of that answer's shape, and the writes
of :mod:`~dask_memory_operator.controllers.workergroup` against the emulated API
server (in this process, the dask-kubernetes CRDs loaded).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dask
import dask_kubernetes
import kr8s
import kr8s.asyncio
import pytest
import yaml
from kr8s.asyncio.objects import Deployment
from test_retirement import cluster as retirement_cluster
from test_retirement import scatter_to
from test_scheduler_rpc import FakeScheduler, message

from amm_core.scaling import MAX_SCALING_WORKERS
from amm_testing import MB, until
from dask_memory_operator import manifests
from dask_memory_operator.api import scaling
from dask_memory_operator.api.memorypolicy import InvalidPolicy, parse_spec
from dask_memory_operator.api.scaling import (
    AdaptiveSpec,
    RetirementSpec,
    memory_floor,
    parse_scaling,
    wanted_workers,
)
from dask_memory_operator.controllers import workergroup
from dask_memory_operator.controllers.workergroup import (
    LEDGER_ANNOTATION,
    MAX_LEDGER_NAMES,
    MAX_LEDGER_TEXT,
    DaskWorkerGroup,
    Ledger,
)
from dmo_devstack.apiserver import ApiServer
from dask_memory_operator.schedulers import rpc
from dask_memory_operator.schedulers.rpc import MAX_STATUS_ITEMS, SchedulerProtocolError

DASK_CRDS = Path(dask_kubernetes.__file__).parent / "operator/deployment/helm/dask-kubernetes-operator/crds"

# --- parse_scaling ---------------------------------------------------------------


def test_defaults_without_retirement_or_adaptive():
    for spec in ({}, {"retirement": None}, {"retirement": {}}):
        parsed = parse_scaling(spec)
        assert parsed.retirement == RetirementSpec(time_limit=600.0, max_concurrent=4, drain=True)
        assert parsed.adaptive is None


def test_every_field():
    parsed = parse_scaling({
        "retirement": {"timeLimit": "90s", "maxConcurrent": 2, "drain": False},
        "adaptive": {"minimum": 1, "maximum": 9, "workerGroup": "big", "interval": "500ms",
                     "waitCount": 7, "memoryFloor": False},
    })
    assert parsed.retirement == RetirementSpec(time_limit=90.0, max_concurrent=2, drain=False)
    assert parsed.adaptive == AdaptiveSpec(minimum=1, maximum=9, worker_group="big", interval=0.5,
                                           wait_count=7, memory_floor=False)
    assert parsed.adaptive.group("demo") == "big"


def test_adaptive_defaults_and_default_group():
    a = parse_scaling({"adaptive": {"minimum": 0, "maximum": 0}}).adaptive
    assert a == AdaptiveSpec(minimum=0, maximum=0, worker_group="", interval=1.0, wait_count=3,
                             memory_floor=True)
    assert a.group("demo") == "demo-default"


@pytest.mark.parametrize("spec, field", [
    ({"retirement": []}, "spec.retirement"),
    ({"retirement": "fast"}, "spec.retirement"),
    ({"retirement": {"timeLimit": "soon"}}, "spec.retirement.timeLimit"),
    ({"retirement": {"timeLimit": "500ms"}}, "spec.retirement.timeLimit"),
    ({"retirement": {"timeLimit": "25h"}}, "spec.retirement.timeLimit"),
    ({"retirement": {"timeLimit": "-5s"}}, "spec.retirement.timeLimit"),
    ({"retirement": {"timeLimit": ["1s"]}}, "spec.retirement.timeLimit"),
    ({"retirement": {"timeLimit": {"s": 1}}}, "spec.retirement.timeLimit"),
    ({"retirement": {"timeLimit": True}}, "spec.retirement.timeLimit"),
    ({"retirement": {"maxConcurrent": 0}}, "spec.retirement.maxConcurrent"),
    ({"retirement": {"maxConcurrent": 65}}, "spec.retirement.maxConcurrent"),
    ({"retirement": {"maxConcurrent": 2.0}}, "spec.retirement.maxConcurrent"),
    ({"retirement": {"maxConcurrent": "2"}}, "spec.retirement.maxConcurrent"),
    ({"retirement": {"maxConcurrent": True}}, "spec.retirement.maxConcurrent"),
    ({"retirement": {"drain": "yes"}}, "spec.retirement.drain"),
    ({"retirement": {"drain": 1}}, "spec.retirement.drain"),
    ({"adaptive": []}, "spec.adaptive"),
    ({"adaptive": 3}, "spec.adaptive"),
    ({"adaptive": {"maximum": 3}}, "spec.adaptive.minimum"),
    ({"adaptive": {"minimum": 1}}, "spec.adaptive.maximum"),
    ({"adaptive": {"minimum": -1, "maximum": 3}}, "spec.adaptive.minimum"),
    ({"adaptive": {"minimum": 0, "maximum": 1001}}, "spec.adaptive.maximum"),
    ({"adaptive": {"minimum": "1", "maximum": 3}}, "spec.adaptive.minimum"),
    ({"adaptive": {"minimum": 1, "maximum": False}}, "spec.adaptive.maximum"),
    ({"adaptive": {"minimum": 4, "maximum": 3}}, "spec.adaptive.maximum"),
    ({"adaptive": {"minimum": 1, "maximum": 3, "workerGroup": 5}}, "spec.adaptive.workerGroup"),
    ({"adaptive": {"minimum": 1, "maximum": 3, "workerGroup": "g" * 254}}, "spec.adaptive.workerGroup"),
    ({"adaptive": {"minimum": 1, "maximum": 3, "interval": "100ms"}}, "spec.adaptive.interval"),
    ({"adaptive": {"minimum": 1, "maximum": 3, "interval": "2h"}}, "spec.adaptive.interval"),
    ({"adaptive": {"minimum": 1, "maximum": 3, "interval": "often"}}, "spec.adaptive.interval"),
    ({"adaptive": {"minimum": 1, "maximum": 3, "interval": True}}, "spec.adaptive.interval"),
    ({"adaptive": {"minimum": 1, "maximum": 3, "interval": ["1s"]}}, "spec.adaptive.interval"),
    ({"adaptive": {"minimum": 1, "maximum": 3, "waitCount": 0}}, "spec.adaptive.waitCount"),
    ({"adaptive": {"minimum": 1, "maximum": 3, "waitCount": 1001}}, "spec.adaptive.waitCount"),
    ({"adaptive": {"minimum": 1, "maximum": 3, "waitCount": 1.5}}, "spec.adaptive.waitCount"),
    ({"adaptive": {"minimum": 1, "maximum": 3, "memoryFloor": "false"}}, "spec.adaptive.memoryFloor"),
])
def test_each_invalid_value_is_refused_naming_its_field(spec, field):
    with pytest.raises(InvalidPolicy) as e:
        parse_scaling(spec)
    assert e.value.field == field
    # The policy as a whole is Invalid for the same reason
    with pytest.raises(InvalidPolicy) as whole:
        parse_spec({"clusterSelector": {}, "activeMemoryManager": {}, **spec})
    assert whole.value.field == field


def test_bounds_are_inclusive():
    parsed = parse_scaling({
        "retirement": {"timeLimit": "1s", "maxConcurrent": scaling.MAX_CONCURRENT_RETIREMENTS},
        "adaptive": {"minimum": scaling.MAX_WORKERS, "maximum": scaling.MAX_WORKERS,
                     "interval": "1h", "waitCount": scaling.MAX_WAIT_COUNT},
    })
    assert parsed.retirement.time_limit == 1.0
    assert parsed.adaptive.interval == 3600.0
    assert parse_scaling({"retirement": {"timeLimit": "24h"}}).retirement.time_limit == 24 * 3600.0
    assert parse_scaling({"adaptive": {"minimum": 0, "maximum": 1, "interval": "500ms"}}).adaptive.interval == 0.5


# --- the CRD and api/scaling.py say the same ---------------------------------------


def _crd_spec() -> dict[str, Any]:
    crd = yaml.safe_load(Path(str(manifests.MEMORYPOLICY_CRD)).read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


def test_crd_limits_are_the_parsers():
    r = _crd_spec()["retirement"]["properties"]
    a = _crd_spec()["adaptive"]["properties"]
    assert (r["maxConcurrent"]["minimum"], r["maxConcurrent"]["maximum"]) == (1, scaling.MAX_CONCURRENT_RETIREMENTS)
    for key in ("minimum", "maximum"):
        assert (a[key]["minimum"], a[key]["maximum"]) == (0, scaling.MAX_WORKERS)
    assert (a["waitCount"]["minimum"], a["waitCount"]["maximum"]) == (1, scaling.MAX_WAIT_COUNT)
    assert a["workerGroup"]["maxLength"] == 253
    assert _crd_spec()["adaptive"]["required"] == ["minimum", "maximum"]


def test_crd_defaults_are_the_parsers():
    r = _crd_spec()["retirement"]["properties"]
    a = _crd_spec()["adaptive"]["properties"]
    # What the API server writes for a policy that leaves them out...
    spec = {
        "retirement": {k: r[k]["default"] for k in ("timeLimit", "maxConcurrent", "drain")},
        "adaptive": {"minimum": 0, "maximum": 1,
                     **{k: a[k]["default"] for k in ("interval", "waitCount", "memoryFloor")}},
    }
    # ... is what the parser takes when they are left out, and the dataclasses' defaults
    assert parse_scaling(spec) == parse_scaling({"adaptive": {"minimum": 0, "maximum": 1}})
    assert parse_scaling(spec).retirement == RetirementSpec()
    assert parse_scaling(spec).adaptive == AdaptiveSpec(minimum=0, maximum=1)


@pytest.mark.parametrize("text, seconds", [("1s", 1.0), ("1.5m", 90.0), ("24h", 86400.0), ("1000ms", 1.0)])
def test_crd_duration_pattern_accepts_what_the_parser_takes(text, seconds):
    pattern = _crd_spec()["retirement"]["properties"]["timeLimit"]["pattern"]
    assert re.fullmatch(pattern, text)
    assert parse_scaling({"retirement": {"timeLimit": text}}).retirement.time_limit == seconds
    assert _crd_spec()["adaptive"]["properties"]["interval"]["pattern"] == pattern


# --- the rules ----------------------------------------------------------------------

GB = 10**9


@pytest.mark.parametrize("data, limit, pause, floor", [
    (0, 4 * GB, 0.8, 0),
    (1, 4 * GB, 0.8, 1),
    (int(3.2 * GB), 4 * GB, 0.8, 1),        # exactly at the threshold of one worker
    (int(3.2 * GB) + 1, 4 * GB, 0.8, 2),
    (10 * GB, 4 * GB, 0.5, 5),
    (10 * GB, 0, 0.8, 0),                  # no memory limit: nothing to hold them to
    (10 * GB, 4 * GB, None, 0),            # workers never pause
    (10 * GB, 4 * GB, 0.0, 0),
])
def test_memory_floor(data, limit, pause, floor):
    assert memory_floor(data, limit, pause) == floor


def _adaptive(minimum=1, maximum=10, memory_floor=True):
    return AdaptiveSpec(minimum=minimum, maximum=maximum, memory_floor=memory_floor)


@pytest.mark.parametrize("spec, target, floor, current, workers, reason, urgent", [
    (_adaptive(), 5, 0, 5, 5, "Target", False),
    (_adaptive(), 3, 6, 8, 6, "MemoryFloor", False),     # floor above target
    (_adaptive(memory_floor=False), 3, 6, 8, 3, "Target", False),
    (_adaptive(maximum=4), 3, 6, 4, 4, "Maximum", False),  # the floor does not lift it past maximum
    (_adaptive(minimum=2), 0, 0, 3, 2, "Minimum", False),
    (_adaptive(minimum=2), 0, 1, 3, 2, "Minimum", False),  # a floor under the minimum
    (_adaptive(maximum=4), 20, 0, 4, 4, "Maximum", False),
    (_adaptive(maximum=4), 2, 0, 6, 2, "Target", True),   # maximum lowered under the size
    (_adaptive(maximum=4), 9, 0, 6, 4, "Maximum", True),
    (_adaptive(minimum=0, maximum=0), 3, 2, 1, 0, "Maximum", True),
])
def test_wanted_workers(spec, target, floor, current, workers, reason, urgent):
    want = wanted_workers(spec, target, floor, current)
    assert (want.workers, want.reason, want.urgent) == (workers, reason, urgent)


# --- the ledger ---------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "",
    "not json",
    "[]",
    '"removed"',
    "3",
    "null",
    '{"removed": "w-1"}',
    '{"removed": [1, 2]}',
    '{"removed": ["a"], "replacing": {"b": 1}}',
    '{"replacing": [null]}',
    json.dumps({"removed": ["w"] * (MAX_LEDGER_TEXT // 4)}),   # too long
    "[" * (MAX_LEDGER_TEXT - 1),                             # deep, within the length
    '{"removed": ' + "[" * 5000 + "]" * 5000 + "}",
])
def test_a_malformed_ledger_reads_as_empty(text):
    assert Ledger.parse({LEDGER_ANNOTATION: text}) == Ledger()


def test_no_ledger_reads_as_empty():
    assert Ledger.parse({}) == Ledger()
    assert Ledger.parse({"other": '{"removed": ["x"]}'}) == Ledger()


def test_ledger_round_trip_bounded_to_the_latest_names():
    ledger = Ledger(["a", "b"], ["c"])
    assert Ledger.parse({LEDGER_ANNOTATION: ledger.dump()}) == ledger
    long = Ledger([f"r{i}" for i in range(3 * MAX_LEDGER_NAMES)], [f"p{i}" for i in range(MAX_LEDGER_NAMES + 1)])
    back = Ledger.parse({LEDGER_ANNOTATION: long.dump()})
    assert back.removed == long.removed[-MAX_LEDGER_NAMES:]
    assert back.replacing == long.replacing[-MAX_LEDGER_NAMES:]
    assert len(long.dump()) < MAX_LEDGER_TEXT
    # One written by hand with more names than kept: the latest are kept
    by_hand = json.dumps({"removed": [f"x{i}" for i in range(MAX_LEDGER_NAMES + 5)]})
    assert Ledger.parse({LEDGER_ANNOTATION: by_hand}).removed == [f"x{i}" for i in range(5, MAX_LEDGER_NAMES + 5)]


# --- amm_core_scaling on a real scheduler --------------------------------------------


async def test_scaling_answer_of_a_real_scheduler():
    async with retirement_cluster(2) as (s, ws, c):
        info = await rpc.scaling(s.address)
        assert info["target"] == s.adaptive_target()
        assert info["data_bytes"] == 0
        assert info["pause_fraction"] == 0.8   # tests' WORKER_MEMORY
        assert [(w["name"], w["address"], w["status"], w["memory_limit"], w["nbytes"], w["processing"])
                for w in info["worker_states"]] == [
            ("w0", ws[0].address, "running", 4 * GB, 0, 0),
            ("w1", ws[1].address, "running", 4 * GB, 0, 0),
        ]

        # Each key counted once, however many replicas it has
        futures = await scatter_to(c, ws[0], 3, MB, 0)
        await c.replicate(futures, n=2)
        keys = {f.key for f in futures}
        assert all(len(s.tasks[k].who_has) == 2 for k in keys)
        info = await rpc.scaling(s.address)
        one_copy = sum(s.tasks[k].nbytes for k in keys)
        assert one_copy >= 3 * MB
        assert info["data_bytes"] == one_copy
        assert sum(w["nbytes"] for w in info["worker_states"]) == 2 * one_copy
        assert info["target"] == s.adaptive_target()

        # The pause threshold is the scheduler's config
        with dask.config.set({"distributed.worker.memory.pause": 0.6}):
            assert (await rpc.scaling(s.address))["pause_fraction"] == 0.6
        with dask.config.set({"distributed.worker.memory.pause": False}):
            assert (await rpc.scaling(s.address))["pause_fraction"] is None


async def test_scaling_target_asks_for_more_workers_when_tasks_queue():
    async with retirement_cluster(1) as (s, ws, c):
        def slow(i: int) -> int:
            time.sleep(0.5)
            return i

        with dask.config.set({"distributed.scheduler.default-task-durations": {"slow": "10s"}}):
            futures = c.map(slow, range(20), pure=False)
            await until(lambda: len(s.tasks) == 20, "the tasks on the scheduler")
            info = await rpc.scaling(s.address)
        assert info["target"] > 1
        assert info["worker_states"][0]["processing"] >= 1
        del futures


# --- hostile answers ------------------------------------------------------------------


def _state(**fields: Any) -> dict[str, Any]:
    return {"name": "w", "address": "tcp://1.2.3.4:1", "status": "running", "memory_limit": 1,
            "nbytes": 0, "processing": 0, **fields}


@pytest.mark.parametrize("answer, field", [
    ({"target": -1}, "target"),
    ({"target": "3"}, "target"),
    ({"target": True}, "target"),
    ({"target": 2.0**70}, "target"),
    ({"data_bytes": -5}, "data_bytes"),
    ({"data_bytes": [1]}, "data_bytes"),
    ({"pause_fraction": "0.8"}, "pause_fraction"),
    ({"pause_fraction": 0}, "pause_fraction"),
    ({"pause_fraction": 11}, "pause_fraction"),
    ({"worker_states": "w"}, "worker_states"),
    ({"worker_states": [{"address": "tcp://1.2.3.4:1", "status": "running"}]}, "worker_states"),
    ({"worker_states": [{"name": "w", "status": "running"}]}, "worker_states"),   # no memory_limit
    ({"worker_states": [_state(name=3)]}, "worker_states"),
    ({"worker_states": [_state(name="x" * 257)]}, "worker_states"),
    ({"worker_states": [_state(memory_limit="4GB")]}, "worker_states"),
    ({"worker_states": [_state(processing=[1])]}, "worker_states"),
    ({"candidates": [{"worker": 7}]}, "candidates"),
    ({"candidates": [{"address": "tcp://1.2.3.4:1"}]}, "candidates"),
    ({"candidates": [{"worker": "w", "unique_bytes": "many"}]}, "candidates"),
    ({"excluded": [{"worker": "w", "reason": 3}]}, "excluded"),
    ({"unknown": [None]}, "unknown"),
])
async def test_hostile_scaling_answers_are_refused(answer, field):
    async with FakeScheduler(answer=lambda msg: message(answer)) as addr:
        with pytest.raises(SchedulerProtocolError, match=f"status whose '{field}' is not"):
            await rpc.scaling(addr)
        with pytest.raises(SchedulerProtocolError, match=f"'{field}'"):
            await rpc.retirement_candidates(addr, ["w"], 1)


async def test_lists_past_their_bound_are_cut_not_refused():
    states = [_state(name=f"w{i}") for i in range(MAX_STATUS_ITEMS + 1)]
    answer = {"target": 0, "data_bytes": 0, "worker_states": states,
              "unknown": ["w"] * (MAX_STATUS_ITEMS + 1)}
    async with FakeScheduler(answer=lambda msg: message(answer)) as addr:
        info = await rpc.scaling(addr)
    assert info["worker_states"] == states[:MAX_STATUS_ITEMS]
    assert info["unknown"] == ["w"] * MAX_STATUS_ITEMS
    assert info[rpc.TRUNCATED] == {"worker_states": MAX_STATUS_ITEMS + 1,
                                   "unknown": MAX_STATUS_ITEMS + 1}


async def test_a_scaling_answer_at_its_bounds_is_taken():
    answer = {"target": 0, "data_bytes": 0, "pause_fraction": None,
              "worker_states": [_state(name=f"w{i}") for i in range(MAX_SCALING_WORKERS)]}
    assert MAX_SCALING_WORKERS <= MAX_STATUS_ITEMS  # what the plugin sends, the operator takes
    async with FakeScheduler(answer=lambda msg: message(answer)) as addr:
        assert await rpc.scaling(addr) == answer


# --- the worker group's writes, against the emulated API server ---------------------------


NS = "default"


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer(crd_dirs=[DASK_CRDS]) as server:
        # The default kr8s client of this test's event loop, what workergroup uses (kr8s
        # keeps it by a weak reference: held here while the test runs)
        client = await kr8s.asyncio.api(url=server.url)
        assert await kr8s.asyncio.api() is client
        yield server
        del client
        assert server.emulator.errors == []


async def _group(name: str, replicas: int, annotations: dict[str, str] | None = None) -> DaskWorkerGroup:
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if annotations is not None:
        meta["annotations"] = annotations
    group = await DaskWorkerGroup({
        "metadata": meta,
        "spec": {"cluster": "c", "worker": {"replicas": replicas, "spec": {"containers": [
            {"name": "worker", "image": "dask"}]}}},
    })
    await group.create()
    return group


async def _deployment(name: str, group: str = "c-default") -> Deployment:
    labels = {"dask.org/cluster-name": "c", "dask.org/component": "worker",
              "dask.org/workergroup-name": group, "app": name}
    d = await Deployment({
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "worker", "image": "dask"}]}}},
    })
    await d.create()
    return d


async def _raw(name: str) -> dict[str, Any]:
    return (await DaskWorkerGroup.get(name, namespace=NS)).raw


async def test_set_replicas_writes_the_ledger_when_annotations_are_absent(api):
    await _group("c-default", 3)
    group = await workergroup.read_group(NS, "c-default")
    assert (group.replicas, group.ledger, group.has_annotations) == (3, Ledger(), False)
    assert await workergroup.set_replicas(group, 2, Ledger(["c-default-worker-a"], []))
    raw = await _raw("c-default")
    assert raw["spec"]["worker"]["replicas"] == 2
    assert Ledger.parse(raw["metadata"]["annotations"]) == Ledger(["c-default-worker-a"], [])
    assert (group.replicas, group.has_annotations) == (2, True)

    # The next write, from what it remembers, goes into the annotations now present
    assert await workergroup.set_replicas(group, 3, Ledger(["c-default-worker-a"], ["c-default-worker-b"]))
    again = await workergroup.read_group(NS, "c-default")
    assert again.replicas == 3 and again.ledger == Ledger(["c-default-worker-a"], ["c-default-worker-b"])


async def test_set_replicas_keeps_other_annotations(api):
    await _group("c-default", 3, {"team": "analytics"})
    group = await workergroup.read_group(NS, "c-default")
    assert group.has_annotations
    assert await workergroup.set_replicas(group, 1, Ledger(["x"], []))
    annotations = (await _raw("c-default"))["metadata"]["annotations"]
    assert annotations["team"] == "analytics"
    assert json.loads(annotations[LEDGER_ANNOTATION]) == {"removed": ["x"], "replacing": [], "deleting": []}


async def test_set_replicas_refuses_when_the_replicas_changed_meanwhile(api):
    await _group("c-default", 3)
    group = await workergroup.read_group(NS, "c-default")
    # Someone else (a user, dask-kubernetes) scales the group after it was read
    await (await DaskWorkerGroup.get("c-default", namespace=NS)).patch({"spec": {"worker": {"replicas": 5}}})
    assert not await workergroup.set_replicas(group, 2, Ledger(["x"], []))
    raw = await _raw("c-default")
    assert raw["spec"]["worker"]["replicas"] == 5
    assert LEDGER_ANNOTATION not in (raw["metadata"].get("annotations") or {})  # nothing of it written
    assert group.replicas == 3  # it reads the group again next time


async def test_read_group_of_a_missing_group_is_none(api):
    assert await workergroup.read_group(NS, "nope") is None


async def test_delete_deployment_deletes_exactly_the_one_read(api):
    d = await _deployment("c-default-worker-a")
    await _deployment("c-default-worker-b")
    await _deployment("other-worker", group="c-other")
    found = await workergroup.cluster_deployments(NS, "c")
    assert found["c-default-worker-a"] == ("c-default", d.metadata["uid"])
    assert set(found) == {"c-default-worker-a", "c-default-worker-b", "other-worker"}
    old_uid = d.metadata["uid"]

    # The same name holds another object now: a stale uid deletes nothing
    await d.delete(propagation_policy="Foreground")
    await _wait_gone("c-default-worker-a")
    new = await _deployment("c-default-worker-a")
    assert not await workergroup.delete_deployment(NS, "c-default-worker-a", old_uid)
    assert await Deployment.get("c-default-worker-a", namespace=NS)

    # The right uid deletes it, and only it; once gone, deleting again is False
    assert await workergroup.delete_deployment(NS, "c-default-worker-a", new.metadata["uid"])
    await _wait_gone("c-default-worker-a")
    assert not await workergroup.delete_deployment(NS, "c-default-worker-a", new.metadata["uid"])
    assert set(await workergroup.cluster_deployments(NS, "c")) == {"c-default-worker-b", "other-worker"}


async def _wait_gone(name: str) -> None:
    for _ in range(200):
        try:
            await Deployment.get(name, namespace=NS)
        except kr8s.NotFoundError:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"Deployment {name} still there")


def test_the_autoscaler_index_keys_each_daskautoscaler_by_its_cluster():
    import kopf

    from dask_memory_operator.controllers.scaling import autoscalers_of, daskautoscalers_by_cluster

    body = kopf.Body({"metadata": {"name": "a1"}, "spec": {"cluster": "c", "minimum": 1, "maximum": 3}})
    assert daskautoscalers_by_cluster(body=body, namespace="ns") == {("ns", "c"): "a1"}
    assert daskautoscalers_by_cluster(body=kopf.Body({"metadata": {"name": "x"}, "spec": {}}), namespace="ns") == {}
    index = {("ns", "c"): ["a3", "a1"], ("ns", "other"): ["a2"]}
    assert autoscalers_of(index, "ns", "c") == ["a1", "a3"]
    assert autoscalers_of(index, "ns", "nothing") == []
    assert autoscalers_of(None, "ns", "c") == []


async def test_set_replicas_keeps_annotations_added_after_the_group_was_read(api):
    await _group("c-default", 3)
    group = await workergroup.read_group(NS, "c-default")
    assert not group.has_annotations
    await (await DaskWorkerGroup.get("c-default", namespace=NS)).patch(
        {"metadata": {"annotations": {"team": "analytics"}}})
    # Adding the annotations map would replace what was written meanwhile: refused
    assert not await workergroup.set_replicas(group, 2, Ledger(["x"], []))
    raw = await _raw("c-default")
    assert raw["metadata"]["annotations"] == {"team": "analytics"}
    assert raw["spec"]["worker"]["replicas"] == 3
    # Read again, it goes into the annotations present
    group = await workergroup.read_group(NS, "c-default")
    assert await workergroup.set_replicas(group, 2, Ledger(["x"], []))
    raw = await _raw("c-default")
    assert raw["metadata"]["annotations"]["team"] == "analytics"
    assert Ledger.parse(raw["metadata"]["annotations"]) == Ledger(["x"], [])


# --- the examples ---------------------------------------------------------------------


def _example_policies() -> list[Path]:
    examples = Path(str(manifests.EXAMPLES))
    return sorted(p for p in examples.glob("*.yaml") if yaml.safe_load(p.read_text())["kind"] == "MemoryPolicy")


@pytest.mark.parametrize("path", _example_policies(), ids=lambda p: p.name)
async def test_example_policies_are_valid_for_the_crd_and_the_parser(path, api):
    await api.apply(yaml.safe_load(Path(str(manifests.MEMORYPOLICY_CRD)).read_text()))
    doc = yaml.safe_load(path.read_text())
    created = await api.apply({**doc, "metadata": {**doc["metadata"], "namespace": NS}})
    # The schema took it whole (it prunes unknown fields: nothing was)
    assert set(created["spec"]) == set(doc["spec"])
    for key in ("retirement", "adaptive"):
        assert doc["spec"].get(key, {}).items() <= created["spec"].get(key, {}).items()
    parse_spec(created["spec"])
    scaled = parse_scaling(created["spec"])
    if path.name == "adaptive.yaml":
        assert scaled.adaptive == AdaptiveSpec(minimum=2, maximum=8)
        assert scaled.retirement == RetirementSpec(max_concurrent=2)


def _pass(deployments, groups):
    from dask_memory_operator.controllers.scaling import Pass
    from dask_memory_operator.controllers.workergroup import Ledger, WorkerGroup

    return Pass("ns", "c", "uid", "tcp://x:1", {}, dict(deployments),
                {g: WorkerGroup("ns", g, r, Ledger(), False) for g, r in groups.items()}, {})


def test_replicas_taken_off_never_below_the_deployments_left_nor_above_now():
    from dask_memory_operator.controllers.scaling import _without

    # two deleted of four: 2
    p = _pass({"c-default-worker-a": ("c-default", "1"), "c-default-worker-b": ("c-default", "2")}, {"c-default": 4})
    assert _without(p, p.groups["c-default"], ["x", "y"]) == 2
    # someone took a replica off already (replicas == Deployments): not taken off twice
    p = _pass({"c-default-worker-a": ("c-default", "1")}, {"c-default": 1})
    assert _without(p, p.groups["c-default"], ["x"]) == 1
    # their scale-down still under way (more Deployments than replicas): not undone
    p = _pass({f"c-default-worker-{i}": ("c-default", str(i)) for i in range(5)}, {"c-default": 4})
    assert _without(p, p.groups["c-default"], ["x"]) == 4


def test_a_worker_is_known_by_its_deployment_name_or_its_groups_naming():
    from dask_memory_operator.controllers.scaling import _deployment_named

    p = _pass({"c-default-worker-a": ("c-default", "1")}, {"c-default": 1, "c-big": 0})
    assert _deployment_named(p, "c-default-worker-a")
    assert _deployment_named(p, "c-default-worker-gone")  # deleted a moment ago
    assert _deployment_named(p, "c-big-worker-0123456789")
    assert not _deployment_named(p, "tcp://127.0.0.1:4000")  # dask worker without --name
    assert not _deployment_named(p, "0")
