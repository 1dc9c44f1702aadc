"""Savings (amm_core.savings) and the memory history (amm_core.history) on a real
in-process Scheduler with real Workers (threads, one each, real TCP comms), as in
test_retirement: the handlers are called over RPC with plain msgpack, and what they
count is checked against the scheduler's own numbers (the sizes it records of the
keys, and what its remove-worker event says was lost). The history's ring buffer is
driven with given times.
"""

from __future__ import annotations

import time
from typing import Any

import dask

from amm_core.history import MAX_ROWS, TIERS, MemoryHistory
from amm_core.plugin import PLUGIN_NAME
from amm_testing import MB, blob, until
from test_retirement import AMM, call, cluster, records, scatter_to


def lost_events(s: Any, address: str) -> list[dict[str, Any]]:
    return [
        msg
        for _, msg in s.get_events(address)
        if isinstance(msg, dict) and msg.get("action") == "remove-worker"
    ]


async def test_a_scripted_retirement_counts_what_it_moved_as_rescued() -> None:
    async with cluster(3) as (s, ws, c):
        before = await call(s, "amm_core_savings")
        futs = await scatter_to(c, ws[0], 3, 2 * MB, 0)
        moved = sum(s.tasks[f.key].nbytes for f in futs)
        await call(s, "amm_core_retire", workers=["w0"], limit=30)
        await until(lambda: records(s)["w0"]["state"] == "done", "w0 done")
        # Moved but not gone yet: nothing rescued so far
        assert (await call(s, "amm_core_savings"))["rescued"] == before["rescued"]
        await ws[0].close()
        await until(lambda: len(s.workers) == 2, "w0 gone")

        out = await call(s, "amm_core_savings")
        assert out["id"] == before["id"] and out["started"] == before["started"]
        assert out["rescued"]["operator"] == {"workers": 1, "keys": 3, "bytes": moved}
        assert records(s)["w0"]["bytes_moved"] == moved
        assert out["rescued"]["hook"] == {"workers": 0, "keys": 0, "bytes": 0}
        [dep] = out["departures"]
        assert dep["worker"] == "w0" and dep["why"] == "retired"
        assert dep["keys"] == dep["bytes"] == 0 and dep["retirement"] == "operator"
        assert out["lost"]["killed"]["workers"] == 0
        assert await c.gather(futs) == [blob(i, 2 * MB) for i in range(3)]
        history = await call(s, "amm_core_memory_history")
        kinds = [(m["kind"], m["worker"]) for m in history["markers"]]
        assert ("retirement-started", "w0") in kinds
        assert ("retirement-done", "w0") in kinds
        assert kinds[-1] == ("worker-removed", "w0")

        # A preStop hook's retirement counts apart
        futs = await scatter_to(c, ws[1], 2, MB, 10)
        moved = sum(s.tasks[f.key].nbytes for f in futs)
        await call(s, "amm_core_retire", workers=["w1"], limit=30, keep_out=False)
        await until(lambda: records(s)["w1"]["state"] == "done", "w1 done")
        await ws[1].close()
        await until(lambda: len(s.workers) == 1, "w1 gone")
        out = await call(s, "amm_core_savings")
        assert out["rescued"]["hook"] == {"workers": 1, "keys": 2, "bytes": moved}
        assert out["rescued"]["operator"]["bytes"] == records(s)["w0"]["bytes_moved"]
        assert [d["retirement"] for d in out["departures"]] == ["operator", "hook"]
        assert [d["seq"] for d in out["departures"]] == [1, 2]


async def test_a_key_at_risk_that_a_task_fetched_counts_as_rescued() -> None:
    """Rescued is what only the retiring worker held and another holds when it leaves,
    whoever made the copy: here the engine has no room to copy into, and a task on w1
    fetches the key while w0 stays for its retirement. A plain deletion of w0 at the
    start would have lost it; the engine's own copies alone would count nothing."""
    async with cluster(2) as (s, ws, c):
        [x] = await scatter_to(c, ws[0], 1, MB, 0)
        nbytes = s.tasks[x.key].nbytes
        with dask.config.set({"distributed.worker.memory.pause": 1e-6}):  # the scheduler's room check only
            await call(s, "amm_core_retire", workers=["w0"], limit=30, keep_out=False)
            await until(lambda: records(s)["w0"]["blocked"], "blocked: no room")
            y = c.submit(len, x, workers=[ws[1].address], pure=False)
            assert await y == MB
            await until(lambda: len(s.tasks[x.key].who_has or ()) == 2, "w1 holding x")
            assert records(s)["w0"]["keys_moved"] == 0
            await ws[0].close()
            await until(lambda: len(s.workers) == 1, "w0 gone")
        out = await call(s, "amm_core_savings")
        assert out["rescued"]["hook"] == {"workers": 1, "keys": 1, "bytes": nbytes}
        [dep] = out["departures"]
        assert dep["keys"] == 0 and (dep["moved_keys"], dep["moved_bytes"]) == (1, nbytes)
        assert await c.gather(x) == blob(0, MB)


async def test_a_key_rescued_off_two_retiring_workers_counts_once() -> None:
    """A key only two leaving workers hold is one key saved, counted when the last of
    them leaves; the benchmark's ledger counts it so too."""
    async with cluster(3) as (s, ws, c):
        [x] = await c.scatter([blob(0, MB)], workers=[ws[0].address, ws[1].address], broadcast=True, hash=False)
        await until(lambda: len(s.tasks[x.key].who_has or ()) == 2, "x on w0 and w1")
        await call(s, "amm_core_retire", workers=["w0", "w1"], limit=30, keep_out=False)
        await until(lambda: all(records(s)[w]["state"] == "done" for w in ("w0", "w1")), "both done")
        await ws[0].close()
        await until(lambda: len(s.workers) == 2, "w0 gone")
        assert (await call(s, "amm_core_savings"))["rescued"]["hook"]["keys"] == 0  # w1 still holds it at risk
        await ws[1].close()
        await until(lambda: len(s.workers) == 1, "w1 gone")
        out = await call(s, "amm_core_savings")
        # both had a share in it
        assert out["rescued"]["hook"] == {"workers": 2, "keys": 1, "bytes": s.tasks[x.key].nbytes}
        assert await c.gather(x) == blob(0, MB)


async def test_a_key_left_to_a_retirement_that_is_then_cancelled_is_counted_by_the_first() -> None:
    """x on w0 (a preStop hook's retirement) and w1 (the operator's, still draining a
    task, so cancellable). When w0 leaves, x (copied to w2) counts at once: w1 may be
    put back in service and never leave."""
    async with cluster(3) as (s, ws, c):
        [x] = await c.scatter([blob(0, MB)], workers=[ws[0].address, ws[1].address], broadcast=True, hash=False)
        running = c.submit(time.sleep, 60, workers=[ws[1].address], pure=False)
        await until(lambda: s.workers[ws[1].address].processing, "a task running on w1")
        await call(s, "amm_core_retire", workers=["w1"], limit=60)
        await call(s, "amm_core_retire", workers=["w0"], limit=30, keep_out=False)
        await until(lambda: records(s)["w0"]["state"] == "done", "w0 done")
        assert records(s)["w1"]["state"] == "draining"
        await ws[0].close()
        await until(lambda: len(s.workers) == 2, "w0 gone")
        assert (await call(s, "amm_core_savings"))["rescued"]["hook"] == {
            "workers": 1, "keys": 1, "bytes": s.tasks[x.key].nbytes}
        assert (await call(s, "amm_core_cancel_retirement", workers=["w1"]))["cancelled"] == ["w1"]
        del running
        await ws[1].close(executor_wait=False)  # its task sleeps on
        await until(lambda: len(s.workers) == 1, "w1 gone")
        out = await call(s, "amm_core_savings")
        assert out["rescued"]["operator"]["keys"] == 0 and out["rescued"]["hook"]["keys"] == 1


async def test_a_key_released_and_computed_again_under_its_name_is_not_rescued() -> None:
    async with cluster(2) as (s, ws, c):
        x = c.submit(blob, 0, MB, key="x", workers=[ws[0].address])
        await x
        with dask.config.set({"distributed.worker.memory.pause": 1e-6}):  # the scheduler's room check only
            await call(s, "amm_core_retire", workers=["w0"], limit=30, keep_out=False)
            await until(lambda: records(s)["w0"]["blocked"], "blocked: no room")
            del x
            await until(lambda: "x" not in s.tasks, "x forgotten")
            x = c.submit(blob, 0, MB, key="x", workers=[ws[1].address])
            await x
            await ws[0].close()
            await until(lambda: len(s.workers) == 1, "w0 gone")
        assert (await call(s, "amm_core_savings"))["rescued"]["hook"]["keys"] == 0


async def test_a_blocked_hook_retirement_that_leaves_counts_as_aborted() -> None:
    async with cluster(2) as (s, ws, c):
        futs = await scatter_to(c, ws[0], 2, MB, 0)
        sizes = sum(s.tasks[f.key].nbytes for f in futs)
        # The scheduler's room check reads the pause fraction: nobody has room.
        with dask.config.set({"distributed.worker.memory.pause": 1e-6}):
            await call(s, "amm_core_retire", workers=["w0"], limit=30, keep_out=False)
            await until(lambda: records(s)["w0"]["blocked"], "blocked")
            await ws[0].close()
            await until(lambda: len(s.workers) == 1, "w0 gone")
        out = await call(s, "amm_core_savings")
        assert out["lost"]["retirementAborted"] == {"workers": 1, "keys": 2, "bytes": sizes}
        [dep] = out["departures"]
        assert dep["why"] == "retirementAborted" and dep["retirement"] == "hook"
        assert out["rescued"]["hook"]["keys"] == 0


async def test_a_worker_killed_outright_counts_what_the_scheduler_lost() -> None:
    async with cluster(3) as (s, ws, c):
        seqs = []
        for i, w in enumerate(ws[:2]):
            futs = await scatter_to(c, w, 2 + i, MB, 10 * i)
            # the scheduler forgets lost scattered keys: their sizes, before
            sizes = {f.key: s.tasks[f.key].nbytes for f in futs}
            address = w.address
            await w.close()  # no retirement: as a kill
            await until(lambda: address not in s.workers, "worker gone")
            [event] = lost_events(s, address)
            keys = [*event["lost-computed-tasks"], *event["lost-scattered-tasks"]]
            assert sorted(keys) == sorted(f.key for f in futs)
            out = await call(s, "amm_core_savings")
            dep = out["departures"][-1]
            assert dep["worker"] == f"w{i}" and dep["address"] == address
            assert dep["why"] == "killed" and dep["retirement"] is None
            assert dep["keys"] == 2 + i
            assert dep["bytes"] == sum(sizes[k] for k in keys) >= (2 + i) * MB
            seqs.append(dep["seq"])
        assert seqs[1] == seqs[0] + 1 and out["seq"] == seqs[1]
        assert out["lost"]["killed"]["workers"] == 2
        assert out["lost"]["killed"]["keys"] == 5
        assert out["lost"]["killed"]["bytes"] == sum(d["bytes"] for d in out["departures"])
        assert out["lost"]["retirementAborted"] == {"workers": 0, "keys": 0, "bytes": 0}


async def test_duplicates_dropped_are_counted_in_bytes() -> None:
    with dask.config.set({f"{AMM}.interval": 0.1}):
        async with cluster(3) as (s, ws, c):
            [x] = await c.scatter([blob(1, 3 * MB)], broadcast=True)
            assert len(s.tasks[x.key].who_has) == 3
            nbytes = s.tasks[x.key].nbytes
            await call(
                s,
                "amm_core_apply",
                config={"start": True, "interval": 0.1, "policies": [
                    {"class": "ReduceReplicas"}]},
                owner={"uid": "u", "namespace": "n", "name": "p", "generation": 1},
            )
            await until(lambda: len(s.tasks[x.key].who_has) == 1, "two copies dropped")
            out = await call(s, "amm_core_savings")
            assert out["duplicates_dropped"] == {"replicas": 2, "bytes": 2 * nbytes}
            status = await call(s, "amm_core_status")
            assert status["amm"]["replicas_dropped"] == 2


async def test_the_samples_add_up_to_the_workers_memory() -> None:
    async with cluster(2) as (s, ws, c):
        await scatter_to(c, ws[0], 2, MB, 0)
        history = s.plugins[PLUGIN_NAME].history
        row = history.sample()
        workers = list(s.workers.values())
        assert row[1] == 2
        assert row[2] == sum(w.memory.managed for w in workers) >= 2 * MB
        assert row[3] == sum(w.memory.unmanaged for w in workers)
        assert row[4] == sum(w.memory.spilled for w in workers)
        expect = max(w.memory.process / w.memory_limit for w in workers)
        assert abs(row[5] - expect) < 1e-3
        out = await call(s, "amm_core_memory_history")
        assert out["rows"][-1] == row
        assert out["columns"][:6] == ["at", "workers", "managed", "unmanaged",
                                      "spilled", "fullest"]


def test_the_ring_buffer_degrades_with_age_and_stays_bounded() -> None:
    class NoWorkers:
        workers: dict = {}
        periodic_callbacks: dict = {}

    h = MemoryHistory(NoWorkers(), interval=2.0)  # type: ignore[arg-type]
    (step1, keep1), (step2, keep2) = TIERS
    t0 = 1_000_000 * step2  # bucket-aligned
    week = 8 * 86400
    for i in range(0, week, 2):
        # managed ramps with time, fullest peaks once per 30 s bucket
        h.add([t0 + i, 4, i, 10, 0, 0.9 if i % 30 == 0 else 0.1, 2.0])
    rows = h.rows()
    assert len(rows) <= MAX_ROWS
    assert len(h.raw) == 300
    assert len(h.tiers[0].rows) == keep1 // step1
    assert len(h.tiers[1].rows) == keep2 // step2
    ats = [r[0] for r in rows]
    assert ats == sorted(ats) and len(set(ats)) == len(ats)
    # oldest first: 15 min averages, then 30 s ones, then every sample
    spans = [r[6] for r in rows]
    assert spans == sorted(spans, reverse=True)
    assert set(spans) == {step2, step1, 2.0}
    assert rows[-1][0] == t0 + week - 2
    assert rows[0][0] >= t0 + week - keep2 - step2
    # an average is the mean of its samples, the peak is kept
    row30 = next(r for r in rows if r[6] == step1)
    start = row30[0] - t0
    assert row30[2] == round(sum(range(int(start), int(start) + 30, 2)) / 15)
    assert row30[1] == 4 and row30[3] == 10 and row30[5] == 0.9
    row900 = rows[0]
    start = row900[0] - t0
    assert row900[2] == round(sum(range(int(start), int(start) + 900, 2)) / 450)
    assert row900[5] == 0.9
