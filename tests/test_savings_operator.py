"""The operator's side of the savings (controllers/savings.py), each part on its own:
the base/source arithmetic that keeps totals from going backwards across restarts of
the scheduler's plugin and of the operator, the departures handled once each by their
seq (a preStop hook's retirement told, a killed worker matched with its pod's OOM
kill), OOM kills counted once from the pod records the cache keeps, the floor they
hold, the worker-seconds, and the bounds of what is read from a scheduler.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from test_scheduler_rpc import FakeScheduler, message

from dask_memory_operator.controllers import savings as sv
from dask_memory_operator.controllers.savings import Seen, update
from dask_memory_operator.schedulers import rpc
from dask_memory_operator.schedulers.rpc import SchedulerProtocolError
from dask_memory_operator.watches import parse_quantity, pod_record

T0 = 1_800_000_000.0  # a wall time


def counters(pid: str, seq: int = 0, *, op: tuple[int, int] = (0, 0), hook: tuple[int, int] = (0, 0),
             killed: tuple[int, int] = (0, 0), aborted: tuple[int, int] = (0, 0),
             dropped: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """The plugin's counters as amm_core.savings sends them (workers = 1 per nonzero)."""
    def c(kb: tuple[int, int]) -> dict[str, int]:
        return {"workers": int(kb[0] > 0), "keys": kb[0], "bytes": kb[1]}

    return {"id": pid, "started": T0, "seq": seq,
            "rescued": {"operator": c(op), "hook": c(hook)},
            "lost": {"killed": c(killed), "retirementAborted": c(aborted), "retired": c((0, 0))},
            "duplicates_dropped": {"replicas": dropped[0], "bytes": dropped[1]}}


def departure(seq: int, worker: str, *, why: str = "killed", at: float = T0, keys: int = 0, nbytes: int = 0,
              retirement: str | None = None, address: str = "tcp://10.0.0.9:4000", moved: tuple[int, int] = (0, 0)):
    return {"seq": seq, "worker": worker, "address": address, "at": at, "keys": keys, "bytes": nbytes,
            "moved_keys": moved[0], "moved_bytes": moved[1], "why": why, "retirement": retirement}


def worker_pod(name: str, *, worker: str, ip: str = "10.0.0.9", created: str = "2027-01-15T08:00:00Z",
               oom_at: str | None = None, restarts: int = 0, group: str = "c-default", limit: str = "400Mi",
               ended: bool = False, uid: str | None = None) -> Any:
    """A worker pod as the API holds it, through the cache's record."""
    terminated = {"reason": "OOMKilled", "exitCode": 137, "finishedAt": oom_at, "startedAt": created}
    status: dict[str, Any] = {"phase": "Failed" if ended else "Running", "podIP": ip, "containerStatuses": [{
        "name": "worker", "restartCount": restarts,
        "state": {"terminated": terminated} if ended else {"running": {"startedAt": created}},
        "lastState": {"terminated": terminated} if oom_at and not ended else {}}]}
    return pod_record({
        "metadata": {"name": name, "namespace": "ns", "uid": uid or f"uid-{name}", "creationTimestamp": created,
                     "labels": {"dask.org/cluster-name": "c", "dask.org/component": "worker",
                                "dask.org/workergroup-name": group, "pod-template-hash": "abc"},
                     "ownerReferences": [{"kind": "ReplicaSet", "apiVersion": "apps/v1", "name": f"{worker}-abc",
                                          "uid": "rs", "controller": True}]},
        "spec": {"containers": [{"name": "worker", "env": [{"name": "DASK_WORKER_NAME", "value": worker}],
                                 "resources": {"limits": {"memory": limit}}}]},
        "status": status,
    })


def at(seconds: float) -> str:
    return sv.iso(T0 + seconds)


# --- base and source ----------------------------------------------------------------


def test_the_same_answer_read_twice_counts_once():
    first = update(None, Seen(T0, counters("a", op=(3, 300), dropped=(2, 20)))).savings
    again = update(first, Seen(T0 + 10, counters("a", op=(3, 300), dropped=(2, 20)))).savings
    assert again == first
    assert again["rescued"] == {"keys": 3, "bytes": 300, "operator": {"workers": 1, "keys": 3, "bytes": 300},
                                "hook": {"workers": 0, "keys": 0, "bytes": 0}}
    assert again["duplicatesDropped"] == {"replicas": 2, "bytes": 20}


def test_a_restarted_plugin_adds_to_the_totals_and_they_never_go_backwards():
    s = update(None, Seen(T0, counters("a", op=(3, 300), killed=(1, 10)))).savings
    s = update(s, Seen(T0 + 1, counters("a", op=(5, 500), killed=(1, 10)))).savings
    # the scheduler restarted: its plugin counts from zero under a new id
    s = update(s, Seen(T0 + 2, counters("b"))).savings
    assert s["rescued"]["keys"] == 5 and s["rescued"]["bytes"] == 500
    assert s["base"]["rescued"]["operator"] == {"workers": 1, "keys": 5, "bytes": 500}
    assert s["source"] == {"id": "b", "seq": 0, "counters": sv.from_scheduler(counters("b"))}
    s = update(s, Seen(T0 + 3, counters("b", hook=(2, 40), killed=(4, 400)))).savings
    assert s["rescued"] == {"keys": 7, "bytes": 540, "operator": {"workers": 1, "keys": 5, "bytes": 500},
                            "hook": {"workers": 1, "keys": 2, "bytes": 40}}
    assert s["lost"]["keys"] == 5 and s["lost"]["byReason"]["killed"] == {"workers": 2, "keys": 5, "bytes": 410}
    # and again: a third plugin; the second's last read is carried over
    s = update(s, Seen(T0 + 4, counters("c", op=(1, 1)))).savings
    assert s["rescued"]["keys"] == 8 and s["lost"]["keys"] == 5
    # a late answer of a plugin already counted (an older read) changes nothing backwards
    late = update(s, Seen(T0 + 5, counters("c"))).savings
    assert late["rescued"] == s["rescued"]


def test_an_operator_restart_starts_from_the_status_alone():
    """Everything is in the status: a new operator (no memory) reading the status as
    the API returns it (a JSON round trip) carries on."""
    import json

    s = update(None, Seen(T0, counters("a", op=(3, 300)))).savings
    s = update(s, Seen(T0 + 1, counters("b", op=(1, 7)))).savings
    restored = json.loads(json.dumps(s))
    after = update(restored, Seen(T0 + 100, counters("b", op=(1, 7)))).savings
    assert after == s
    after = update(restored, Seen(T0 + 100, counters("c"))).savings  # and the scheduler too
    assert after["rescued"]["keys"] == 4 and after["rescued"]["bytes"] == 307


def test_no_report_keeps_what_was_counted():
    s = update(None, Seen(T0, counters("a", op=(3, 300)))).savings
    assert update(s, Seen(T0 + 5)).savings == s  # the scheduler unreachable this pass


def test_a_status_someone_broke_is_read_as_far_as_it_goes():
    broken = {"since": "yesterday", "base": {"rescued": "x"}, "source": {"id": "a", "counters": [1]},
              "oomKills": {"recent": ["no"], "count": -3}, "lost": None}
    s = update(broken, Seen(T0, counters("a", op=(1, 2)))).savings
    assert s["rescued"]["keys"] == 1 and s["oomKills"] == {"count": 0, "recent": []}


# --- departures --------------------------------------------------------------------------


def test_wants_departures_only_when_seq_moved():
    s = update(None, Seen(T0, counters("a", seq=4))).savings
    assert s["source"]["seq"] == 0  # first sight: its departures are news
    assert sv.wants_departures(s, counters("a", seq=4))
    deps = [departure(i, f"w{i}", why="retired", retirement="hook", at=T0 - 1200 + 300 * i) for i in (1, 2, 3, 4)]
    r = update(s, Seen(T0 + 1, counters("a", seq=4), departures=deps, scheduler_now=T0))
    # handled, and told only when recent (not the history of before the operator looked)
    assert r.savings["source"]["seq"] == 4 and [d["seq"] for d in r.hook_departures] == [2, 3, 4]
    s = r.savings
    assert not sv.wants_departures(s, counters("a", seq=4))
    assert sv.wants_departures(s, counters("a", seq=5))
    assert not sv.wants_departures(s, counters("b", seq=0))
    assert sv.wants_departures(s, counters("b", seq=1))
    assert sv.wants_departures(None, counters("a", seq=9)) and not sv.wants_departures(None, counters("a"))


def test_each_hook_retirement_is_told_once():
    s = update(None, Seen(T0, counters("a", seq=0))).savings
    deps = [departure(1, "w1", why="retired", retirement="hook", moved=(3, 3_000_000)),
            departure(2, "w2", why="retirementAborted", retirement="hook", keys=2, nbytes=2_000, moved=(1, 10))]
    r = update(s, Seen(T0 + 1, counters("a", seq=2, hook=(4, 3_000_010), aborted=(2, 2_000)),
                       departures=deps, scheduler_now=T0 + 100))
    assert [d["seq"] for d in r.hook_departures] == [1, 2]
    assert r.savings["source"]["seq"] == 2
    reason, text, warning = sv.hook_message(r.hook_departures[0])
    assert reason == "WorkerRetiredByHook" and not warning and "3 keys (3 MB) rescued" in text
    reason, text, warning = sv.hook_message(r.hook_departures[1])
    assert reason == "WorkerLeftMidRetirement" and warning and "2 keys (2 kB) lost" in text
    # the same departures again (read again): nothing told twice
    again = update(r.savings, Seen(T0 + 2, counters("a", seq=2, hook=(4, 3_000_010), aborted=(2, 2_000)),
                                   departures=deps, scheduler_now=T0 + 101))
    assert again.hook_departures == [] and again.savings == r.savings


def test_a_killed_worker_with_an_oom_killed_pod_counts_as_oom_killed():
    s = update(None, Seen(T0, counters("a"), pods=[])).savings
    pod = worker_pod("c-default-worker-1-abc-x", worker="c-default-worker-1", oom_at=at(60), restarts=1)
    assert pod.worker == "c-default-worker-1" and pod.memory_limit == 400 * 2**20
    assert pod.last_exit == ("OOMKilled", at(60)) and pod.restarts == 1
    dep = departure(1, "c-default-worker-1", at=T0 + 60.4, keys=3, nbytes=300_000_000)
    report = counters("a", seq=1, killed=(3, 300_000_000))
    r = update(s, Seen(T0 + 62, report, departures=[dep], scheduler_now=T0 + 61, pods=[pod]))
    [kill] = r.kills
    assert kill.matched and kill.keys == 3 and kill.bytes == 300_000_000 and kill.workers == 1
    by = r.savings["lost"]["byReason"]
    assert by["oomKilled"] == {"workers": 1, "keys": 3, "bytes": 300_000_000}
    assert by["killed"] == {"workers": 0, "keys": 0, "bytes": 0}
    assert r.savings["lost"]["keys"] == 3
    assert r.savings["oomKills"]["count"] == 1
    assert r.savings["oomKills"]["recent"][0]["memoryLimit"] == 400 * 2**20
    text = sv.kill_message(kill, "c-default")
    assert "c-default-worker-1" in text and "419 MB" in text and "3 keys (300 MB)" in text
    assert "at 1 workers or more until" in text
    # next passes: the pod still shows the kill in its lastState; counted once
    again = update(r.savings, Seen(T0 + 70, report, pods=[pod]))
    assert again.kills == [] and again.savings == r.savings


def test_a_kill_and_its_departure_seen_a_pass_apart_still_meet():
    s = update(None, Seen(T0, counters("a"), pods=[])).savings
    pod = worker_pod("p1", worker="w1", oom_at=at(60), restarts=1)
    # the kill is seen first, young: it waits for its departure (nothing counted)
    r = update(s, Seen(T0 + 61, counters("a"), pods=[pod]))
    assert r.kills == [] and r.savings["oomKills"]["count"] == 0
    # then the departure (by pod IP this time), while the kill still waits: they meet
    dep = departure(1, "w1-renamed", at=T0 + 60, keys=1, nbytes=5, address="tcp://10.0.0.9:33445")
    r = update(r.savings, Seen(T0 + 63, counters("a", seq=1, killed=(1, 5)), departures=[dep],
                               scheduler_now=T0 + 63, pods=[pod]))
    [kill] = r.kills
    assert kill.matched and kill.keys == 1 and r.savings["lost"]["byReason"]["oomKilled"]["bytes"] == 5


def test_a_killed_departure_waits_for_its_kill_then_goes_on_alone():
    s = update(None, Seen(T0, counters("a"), pods=[])).savings
    deps = [departure(1, "w1", at=T0 + 10, keys=2, nbytes=20),
            departure(2, "w2", why="retired", retirement="hook")]
    report = counters("a", seq=2, killed=(2, 20), hook=(1, 1))
    r = update(s, Seen(T0 + 12, report, departures=deps, scheduler_now=T0 + 12, pods=[]))
    # young and unmatched: held, and what comes after it too (read again next pass)
    assert r.savings["source"]["seq"] == 0 and r.hook_departures == []
    assert sv.wants_departures(r.savings, report)
    r = update(r.savings, Seen(T0 + 50, report, departures=deps, scheduler_now=T0 + 50, pods=[]))
    assert r.savings["source"]["seq"] == 2 and [d["seq"] for d in r.hook_departures] == [2]
    assert r.savings["lost"]["byReason"]["killed"]["keys"] == 2
    assert not sv.wants_departures(r.savings, report)


def test_an_oom_kill_without_a_departure_is_counted_after_the_window():
    s = update(None, Seen(T0, counters("a"), pods=[])).savings
    pod = worker_pod("p1", worker="w1", oom_at=at(60), restarts=1)
    assert update(s, Seen(T0 + 70, counters("a"), pods=[pod])).kills == []
    r = update(s, Seen(T0 + 60 + sv.MATCH_WINDOW + 1, counters("a"), pods=[pod]))
    [kill] = r.kills
    assert not kill.matched and "recorded no loss" in sv.kill_message(kill, None)
    assert "adaptive" not in sv.kill_message(kill, None)


def test_kills_before_the_savings_began_are_not_counted_and_the_list_stays_bounded():
    s = update(None, Seen(T0, counters("a"), pods=[])).savings
    old = worker_pod("p0", worker="w0", oom_at=at(-600), restarts=1)
    pods = [worker_pod(f"p{i}", worker=f"w{i}", ip=f"10.0.1.{i}", oom_at=at(i), restarts=1) for i in range(1, 21)]
    r = update(s, Seen(T0 + 1000, counters("a"), pods=[old, *pods]))
    assert len(r.kills) == 20 and r.savings["oomKills"]["count"] == 20
    assert len(r.savings["oomKills"]["recent"]) == sv.MAX_KILLS
    assert {k.workers for k in r.kills} == {21}  # the group's pods when each was seen
    # the oldest are off the list, and are still not counted again
    assert update(r.savings, Seen(T0 + 2000, counters("a"), pods=[old, *pods])).kills == []
    # a pod gone since (its last record kept by the cache) with a new kill: counted
    gone = worker_pod("p99", worker="w99", oom_at=at(1500), ended=True)
    r2 = update(r.savings, Seen(T0 + 2000, counters("a"), pods=pods, gone=[(T0 + 1600, gone)]))
    assert [k.pod for k in r2.kills] == ["p99"]


def test_the_oom_floor_holds_for_its_window_in_its_group():
    s = update(None, Seen(T0, counters("a"), pods=[])).savings
    pods = [worker_pod(f"p{i}", worker=f"w{i}", ip=f"10.0.1.{i}") for i in range(3)]
    pods.append(worker_pod("p3", worker="w3", ip="10.0.1.3", oom_at=at(100), restarts=1))
    saved = update(s, Seen(T0 + 200, counters("a"), pods=pods)).savings
    floor = sv.oom_floor(saved, "c-default", now=T0 + 300)
    assert floor == (4, "w3", T0 + 100 + sv.OOM_FLOOR_SECONDS)
    assert sv.oom_floor(saved, "other", now=T0 + 300) is None
    assert sv.oom_floor(saved, "c-default", now=T0 + 100 + sv.OOM_FLOOR_SECONDS + 1) is None


# --- worker-seconds ----------------------------------------------------------------------


def test_worker_seconds_add_what_ran_since_and_are_written_on_change():
    created = at(0)
    pods = [worker_pod(f"p{i}", worker=f"w{i}", created=created) for i in range(2)]
    seen = dict(report=counters("a"), group="c-default", maximum=4)
    r = update(None, Seen(T0 + 100, pods=pods, **seen))
    assert r.worker_seconds == (0.0, 0.0)
    ws = r.savings["workerSeconds"]
    assert ws == {"adaptive": 0.0, "atMaximum": 0.0, "asOf": at(100), "maximum": 4}
    # 60 s later, nothing came or went: the metric follows, the status does not change
    r = update(r.savings, Seen(T0 + 160, pods=pods, **seen))
    assert r.worker_seconds == (120.0, 240.0)
    assert r.savings["workerSeconds"] == ws
    # a third pod came at +170 and p0 went at +190 (the cache kept its record)
    third = worker_pod("p2", worker="w2", created=at(170))
    r = update(r.savings, Seen(T0 + 200, pods=[pods[1], third], gone=[(T0 + 190, pods[0])], **seen))
    # p0: 100..190, p1: 100..200, p2: 170..200
    assert r.worker_seconds == (90 + 100 + 30, 400.0)
    assert r.savings["workerSeconds"] == {"adaptive": 220.0, "atMaximum": 400.0, "asOf": at(200), "maximum": 4}
    # a pass later in the same second adds nothing twice (asOf is in whole seconds)
    same = update(r.savings, Seen(T0 + 200.7, pods=[pods[1], third], gone=[(T0 + 190, pods[0])], **seen))
    assert same.worker_seconds == (220.0, 400.0) and same.savings == r.savings
    # written: the next pass starts from there (the gone pod is not counted again)
    r = update(r.savings, Seen(T0 + 210, pods=[pods[1], third], gone=[(T0 + 190, pods[0])], **seen))
    assert r.worker_seconds == (240.0, 440.0)
    # the refresh: written at most WORKER_SECONDS_REFRESH apart even when nothing changes
    later = T0 + 200 + sv.WORKER_SECONDS_REFRESH
    r = update(r.savings, Seen(later, pods=[pods[1], third], **seen))
    assert r.savings["workerSeconds"]["asOf"] == sv.iso(later)
    # without adaptive: none
    assert "workerSeconds" not in update(r.savings, Seen(later + 1, pods=pods, report=counters("a"))).savings


def test_memory_quantities():
    assert parse_quantity("400Mi") == 400 * 2**20
    assert parse_quantity("1.5G") == 1_500_000_000
    assert parse_quantity("1e9") == 10**9
    assert parse_quantity(1000) == 1000
    for bad in ("", "lots", None, True, "1" * 100, "-5Mi"):
        assert parse_quantity(bad) == 0


# --- what is read from a scheduler ------------------------------------------------------------


def savings_answer(**over: Any) -> dict[str, Any]:
    return {**counters("a", seq=2), "now": T0, "departures": [departure(1, "w1"), departure(2, "w2")], **over}


async def test_the_savings_answer_is_read_bounded_and_checked():
    answers = iter([savings_answer(departures=[departure(i, f"w{i}") for i in range(1, 200)]),
                    savings_answer()])
    async with FakeScheduler(answer=lambda msg: message(next(answers))) as address:
        out = await rpc.savings(address)
        assert len(out["departures"]) == rpc.MAX_DEPARTURES  # the rest stepped over
        assert out["counters"]["id"] == "a" and out["now"] == T0
        out = await rpc.savings(address)
        assert [d["worker"] for d in out["departures"]] == ["w1", "w2"]


@pytest.mark.parametrize("answer", [
    savings_answer(departures=[{**departure(1, "w"), "why": "bored"}]),
    savings_answer(departures=[{**departure(1, "w"), "keys": -1}]),
    savings_answer(departures=[{**departure(1, "w"), "worker": "w" * 300}]),
    savings_answer(departures="many"),
    savings_answer(rescued={"operator": {"keys": 1}}),
    savings_answer(seq=float("nan")),
    {k: v for k, v in savings_answer().items() if k != "lost"},
])
async def test_hostile_savings_answers_are_refused(answer):
    async with FakeScheduler(answer=lambda msg: message(answer)) as address:
        with pytest.raises(SchedulerProtocolError, match="amm_core_savings"):
            await rpc.savings(address)


def test_a_status_with_hostile_savings_counters_is_refused():
    status = {"savings": copy.deepcopy(counters("a"))}
    assert rpc.checked_status("x", "amm_core_status", status) is status
    status["savings"]["lost"]["killed"]["bytes"] = "all"
    with pytest.raises(SchedulerProtocolError, match="'savings'"):
        rpc.checked_status("x", "amm_core_status", status)
