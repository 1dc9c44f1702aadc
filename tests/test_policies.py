"""The Rebalance, Replicate and RetirePaused AMM policies on real LocalClusters
(worker processes, one thread each).

The scheduler of a LocalCluster runs in this process: the scheduler-side config
(AMM measure, the pause fraction that workers_with_room reads) is set here with
dask.config.set, while worker processes take their config when they are spawned.
AMM cycles are driven with client.amm.run_once(), or by a short interval where real
time matters; conditions are polled with a deadline.
"""

from __future__ import annotations

import gc
import weakref
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import dask
import pytest
from distributed import Client, Event, Scheduler, wait
from distributed import active_memory_manager as amm_module
from distributed.core import rpc

from amm_core.rebalance import Rebalance
from amm_core.replicate import ReduceReplicas, Replicate, replicate, scatter
from amm_core.retire_paused import RetirePaused
from amm_testing import (
    MB,
    add_policies,
    assert_never_lost,
    blob,
    cluster,
    holders,
    reports,
    wait_for,
)


def scheduler_keys(dask_scheduler: Scheduler) -> set:
    return set(dask_scheduler.tasks)


def _worker_view(dask_worker: Any) -> tuple[set, bool]:
    tasks = dask_worker.state.tasks.values()
    busy = any(ts.state in ("fetch", "flight") for ts in tasks)
    return set(dask_worker.data), busy


def quiet(c: Client) -> None:
    """Wait until the copies and drops the AMM asked for have landed: no worker is
    fetching a key, and the scheduler's view of who holds what matches the workers'.

    Used between AMM cycles instead of a fixed sleep; a request still in the
    batched stream is not seen, but the policies track their own requests.
    """

    def settled() -> bool:
        views = c.run(_worker_view)
        if any(busy for _, busy in views.values()):
            return False
        has_what = c.has_what()
        return all(set(has_what[w]) == keys for w, (keys, _) in views.items())

    wait_for(settled, what="copies and drops landed")


def cycle(c: Client, n: int = 1) -> None:
    """Run ``n`` AMM cycles, each once what the previous one asked for has landed."""
    for _ in range(n):
        c.amm.run_once()
        quiet(c)


def _process_memory(dask_scheduler: Scheduler) -> dict[str, int]:
    return {w: ws.memory.process for w, ws in dask_scheduler.workers.items()}


def process_memory(c: Client) -> dict[str, int]:
    """Each worker's process memory (RSS) at its last heartbeat, as the scheduler
    sees it."""
    return c.run_on_scheduler(_process_memory)


def block(x: bytes, ev: Event) -> int:
    ev.wait()
    return len(x)


# --- Rebalance ---------------------------------------------------------------------


def test_rebalance_moves_data_off_heavy_worker_and_settles() -> None:
    with cluster(3) as (lc, c):
        a, b, w3 = sorted(c.scheduler_info()["workers"])
        futs = [
            c.submit(blob, i, 10 * MB, workers=[a], pure=False) for i in range(12)
        ]
        # A key needed by a task running on the sender must stay there.
        needed = c.submit(blob, 99, 10 * MB, workers=[a], pure=False)
        wait(futs + [needed])
        ev = Event()
        blocker = c.submit(block, needed, ev, workers=[a])
        wait_for(
            lambda: c.processing()[a] == (blocker.key,),
            what="blocker running on the sender",
        )
        add_policies(c, Rebalance(threshold=0.02), ReduceReplicas())

        # Keys move off a, never lose their last copy, `needed` stays, each key
        # moves at most once (no ping-pong with itself or with ReduceReplicas), and
        # the moves stop once the workers are inside the dead band.
        copied: dict[Any, int] = defaultdict(int)
        prev = holders(c, futs + [needed])

        def step() -> dict[str, Any]:
            nonlocal prev
            cycle(c)
            now = holders(c, futs + [needed])
            for k, ws in now.items():
                assert ws, f"{k} lost its last copy"
                if ws - prev[k]:
                    copied[k] += 1
            prev = now
            return c.run_on_scheduler(reports)["Rebalance"]

        def converged() -> bool:
            before = step()
            after = step()
            return (
                after["moves_in_flight"] == 0
                and before["counters"] == after["counters"]
            )

        wait_for(converged, timeout=60, what="a cycle with nothing left to move")
        settled = step()["counters"]
        for _ in range(10):
            assert step()["counters"] == settled, "moves still happening after settling"
        per_worker = {w: sum(w in ws for ws in prev.values()) for w in (a, b, w3)}
        assert per_worker[b] >= 3 and per_worker[w3] >= 3, per_worker

        assert needed.key not in copied
        assert all(len(ws) == 1 for ws in prev.values()), prev
        # The policies run in no fixed order (the AMM's policies are a set): when
        # ReduceReplicas runs first, it may drop the recipient's fresh copy rather
        # than the sender's ("undone"). Every copy is accounted for, and each key
        # that left a did so once.
        outcomes = sum(
            settled.get(f"moves_{o}", 0) for o in ("completed", "undone", "abandoned")
        )
        assert settled["replicas_copied"] == outcomes, settled
        moved_off = sum(a not in ws for ws in prev.values())
        assert settled["moves_completed"] == moved_off, (settled, prev)
        # The right data moved, and none of it was lost and recomputed on the way
        assert c.gather(futs) == [blob(i, 10 * MB) for i in range(12)]
        assert_never_lost(c, futs + [needed])
        ev.set()
        assert blocker.result() == 10 * MB


def test_rebalance_never_copies_onto_worker_without_room() -> None:
    # The measure "process": room is process memory against the pause threshold
    # whatever the measure (see amm_core._room.room), and this test does not depend
    # on how Rebalance passes the measure on.
    with cluster(
        2, **{"distributed.scheduler.active-memory-manager.measure": "process"}
    ) as (lc, c):
        a, b = sorted(c.scheduler_info()["workers"])
        futs = [c.submit(blob, i, 10 * MB, workers=[a], pure=False) for i in range(8)]
        wait(futs)
        wait_for(
            lambda: process_memory(c)[a] > process_memory(c)[b] + 50 * MB,
            what="a's heartbeat reporting its 80 MB",
        )
        add_policies(c, Rebalance(threshold=0.02))
        limit = 1e9

        # Scheduler side only: b's pause threshold is 2 MB above its process memory,
        # so no 10 MB key fits; the workers keep their own (0.8) threshold.
        proc_b = process_memory(c)[b]
        with dask.config.set(
            {"distributed.worker.memory.pause": (proc_b + 2 * MB) / limit}
        ):
            cycle(c, 5)
        rep = c.run_on_scheduler(reports)["Rebalance"]
        assert rep["counters"].get("replicas_copied", 0) == 0
        assert rep["counters"]["no_room"] == 5
        assert all(ws == {a} for ws in holders(c, futs).values())

        # With room for one key (16 MB), exactly one key moves. Between cycles, wait
        # for b's heartbeat to report what landed, so that the outcome does not depend
        # on whether the room check sees keys that landed since the last heartbeat.
        proc_b = process_memory(c)[b]
        with dask.config.set(
            {"distributed.worker.memory.pause": (proc_b + 16 * MB) / limit}
        ):
            for _ in range(3):
                cycle(c)
                on_b = sum(b in ws for ws in holders(c, futs).values())
                wait_for(
                    lambda: process_memory(c)[b] >= proc_b + on_b * 10 * MB - MB,
                    what="b's heartbeat reporting the keys it received",
                )
        assert sum(b in ws for ws in holders(c, futs).values()) == 1
        rep = c.run_on_scheduler(reports)["Rebalance"]
        assert rep["counters"]["replicas_copied"] == 1


# --- Replicate -----------------------------------------------------------------------


def test_replicate_keeps_copies_and_respects_room() -> None:
    with cluster(3) as (lc, c):
        a, b, w3 = sorted(c.scheduler_info()["workers"])
        # The default config's reducer, which would undo every copy: replicate()
        # adds the Replicate policy and swaps the reducer for amm_core's.
        add_policies(c, amm_module.ReduceReplicas())
        two = c.submit(blob, 1, 1 * MB, workers=[a], pure=False)
        every = c.submit(blob, 2, 1 * MB, workers=[a], pure=False)
        wait([two, every])
        assert replicate(c, two, 2) == {
            "tracked": 1,
            "unknown": 0,
            "amm_running": False,
        }
        replicate(c, every, "all")
        assert c.run_on_scheduler(
            lambda dask_scheduler: {
                type(p) for p in dask_scheduler.extensions["amm"].policies
            }
        ) == {Replicate, ReduceReplicas}

        def cycle_until(cond: Callable[[], Any]) -> None:
            def step() -> Any:
                c.amm.run_once()
                return cond()

            wait_for(step)

        cycle_until(lambda: len(holders(c, [two])[two.key]) == 2)
        cycle_until(lambda: len(holders(c, [every])[every.key]) == 3)
        # ReduceReplicas honours the wanted counts: nothing is undone.
        cycle(c, 10)
        assert len(holders(c, [two])[two.key]) == 2
        assert len(holders(c, [every])[every.key]) == 3

        # scatter(broadcast=True) stays broadcast.
        [sc] = scatter(c, [b"s" * 1000], broadcast=True)
        cycle(c, 5)
        assert len(holders(c, [sc])[sc.key]) == 3

        # No room: w3 holds 40 MB more than b, and the (scheduler-side) pause
        # threshold is 70 MB above b's process memory: a 50 MB key wanted
        # everywhere fits on b, not on w3.
        filler = c.submit(blob, 3, 40 * MB, workers=[w3], pure=False)
        big = c.submit(blob, 4, 50 * MB, workers=[a], pure=False)
        wait([filler, big])
        wait_for(
            lambda: process_memory(c)[w3] > process_memory(c)[b] + 30 * MB,
            what="w3's heartbeat reporting the filler",
        )
        threshold = (process_memory(c)[b] + 70 * MB) / 1e9
        replicate(c, big, "all")
        no_room = c.run_on_scheduler(reports)["Replicate"]["counters"].get("no_room", 0)
        with dask.config.set({"distributed.worker.memory.pause": threshold}):
            cycle_until(lambda: holders(c, [big])[big.key] == {a, b})
            cycle(c, 5)
        assert holders(c, [big])[big.key] == {a, b}
        rep = c.run_on_scheduler(reports)["Replicate"]
        assert rep["counters"]["no_room"] >= no_room + 5
        assert rep["tracked_keys"] == 4
        assert_never_lost(c, [two, every, sc, filler, big])

        # A released key is forgotten.
        key = two.key
        del two
        wait_for(lambda: key not in c.run_on_scheduler(scheduler_keys))

        def forgotten() -> bool:
            c.amm.run_once()
            rep = c.run_on_scheduler(reports)["Replicate"]
            return rep["tracked_keys"] == 3 and rep["counters"]["keys_forgotten"] == 1

        wait_for(forgotten)


def test_replicate_recreates_lost_copies_and_fills_new_workers() -> None:
    # Policies from plain dask config, the AMM running every 200 ms.
    config = {
        "distributed.scheduler.active-memory-manager.start": True,
        "distributed.scheduler.active-memory-manager.interval": "200ms",
        "distributed.scheduler.active-memory-manager.policies": [
            {"class": "amm_core.replicate.Replicate"},
            {"class": "amm_core.replicate.ReduceReplicas"},
        ],
    }
    with cluster(3, **config) as (lc, c):
        a = sorted(c.scheduler_info()["workers"])[0]
        two = c.submit(blob, 1, 1 * MB, workers=[a], pure=False)
        every = c.submit(blob, 2, 1 * MB, workers=[a], pure=False)
        wait([two, every])
        assert replicate(c, two, 2)["amm_running"] is True
        replicate(c, every, "all")
        wait_for(lambda: len(holders(c, [two])[two.key]) == 2)
        wait_for(lambda: len(holders(c, [every])[every.key]) == 3)

        # a holds both; it leaves (its process is restarted: a new worker joins).
        c.restart_workers([a])

        def settled() -> bool:
            workers = set(c.scheduler_info()["workers"])
            h = holders(c, [two, every])
            return (
                len(workers) == 3
                and a not in workers
                and len(h[two.key]) == 2
                and h[every.key] == workers
            )

        wait_for(settled, what="copies recreated and the new worker filled")
        # From the copies on the other workers, not recomputed
        assert_never_lost(c, [two, every])
        assert c.gather([two, every]) == [blob(1, MB), blob(2, MB)]

        # A worker that joins later gets the "all" key too.
        lc.scale(4)
        c.wait_for_workers(4)
        wait_for(
            lambda: holders(c, [every])[every.key] == set(c.scheduler_info()["workers"])
        )


def _ballast(dask_worker: Any, nbytes: int) -> None:
    # Unmanaged memory: held by the worker process, unknown to the scheduler's
    # managed measure (a leak, a cache, a library's buffers).
    dask_worker._test_ballast = b"u" * nbytes


def _room_by_measure(dask_scheduler: Scheduler, address: str) -> tuple[float, float]:
    """(room by managed memory alone, as before amm_core counted process memory;
    room as amm_core.room computes it under the measure "managed")."""
    from amm_core._room import pause_fraction, room

    ws = dask_scheduler.workers[address]
    threshold = ws.memory_limit * (pause_fraction() or 1.0)
    return threshold - ws.memory.managed, room(ws, {ws: ws.memory.managed}, "managed")


def test_replicate_counts_unmanaged_memory_under_managed_measure() -> None:
    """Workers pause on process memory: a worker whose process is nearly full of
    unmanaged memory gets no copy, although its managed memory is low."""
    with cluster(3) as (lc, c):
        a, b, w3 = sorted(c.scheduler_info()["workers"])
        c.run(_ballast, nbytes=400 * MB, workers=[w3])
        wait_for(
            lambda: process_memory(c)[w3] > process_memory(c)[b] + 300 * MB,
            what="w3's heartbeat reporting its unmanaged memory",
        )
        # Scheduler side only: the pause threshold is halfway between b's and w3's
        # process memory (the workers keep their own 0.8).
        mem = process_memory(c)
        threshold = (mem[b] + mem[w3]) / 2 / 1e9
        x = c.submit(blob, 1, 1 * MB, workers=[a], pure=False)
        wait(x)
        replicate(c, x, "all")
        with dask.config.set({"distributed.worker.memory.pause": threshold}):
            # By managed memory alone w3 would have room: the test means something.
            by_managed, by_process = c.run_on_scheduler(_room_by_measure, address=w3)
            assert by_managed > 100 * MB
            assert by_process < 0
            c.amm.run_once()
            wait_for(lambda: holders(c, [x])[x.key] == {a, b})
            cycle(c, 3)
        assert holders(c, [x])[x.key] == {a, b}
        counters = c.run_on_scheduler(reports)["Replicate"]["counters"]
        assert counters["replicas_copied"] == 1
        assert counters["no_room"] == 3


async def test_replicate_reports_upstream_reducer_alongside(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Upstream's ReduceReplicas would drop every copy Replicate makes, each cycle:
    the conflict is logged once as an error and counted every cycle."""
    config = {
        "distributed.scheduler.active-memory-manager.start": False,
        "distributed.scheduler.active-memory-manager.policies": [
            {"class": "amm_core.replicate.Replicate"},
            {"class": "distributed.active_memory_manager.ReduceReplicas"},
        ],
    }
    with dask.config.set(config), caplog.at_level("ERROR", "amm_core.replicate"):
        async with Scheduler(dashboard_address=":0", port=0) as s:
            amm = s.extensions["amm"]
            for _ in range(3):
                amm.run_once()
            assert reports(s)["Replicate"]["counters"] == {"conflicting_reducer": 3}
            [upstream] = [
                p for p in amm.policies if type(p) is amm_module.ReduceReplicas
            ]
            # amm_core's reducer in its place: no conflict any more.
            amm.policies.remove(upstream)
            amm.add_policy(ReduceReplicas())
            amm.run_once()
            assert reports(s)["Replicate"]["counters"] == {"conflicting_reducer": 3}
    errors = [r for r in caplog.records if r.name == "amm_core.replicate"]
    assert len(errors) == 1
    assert errors[0].levelname == "ERROR"
    assert "amm_core.reduce.PressureReduceReplicas" in errors[0].getMessage()


# --- policy state -------------------------------------------------------------------


def _two_cycles(dask_scheduler: Scheduler) -> None:
    # Back to back, in one go: no copy can arrive in between
    amm = dask_scheduler.extensions["amm"]
    amm.run_once()
    amm.run_once()


def test_stopped_amm_keeps_no_released_task_alive() -> None:
    """Replicate's wanted counts and Rebalance's moves and cool-downs are cleaned up
    by their run(), which never comes while the AMM is stopped: they must not hold
    the TaskStates, or a released graph would stay in the scheduler's memory."""
    with cluster(2) as (lc, c):
        a, b = sorted(c.scheduler_info()["workers"])
        futs = [c.submit(blob, i, 5 * MB, workers=[a], pure=False) for i in range(6)]
        wait(futs)
        replicate(c, futs[:2], 2)  # adds the Replicate policy
        # move_timeout=0: a move whose copy has not arrived by the next cycle is
        # abandoned, and its key cools down
        add_policies(c, Rebalance(threshold=0.005, move_timeout=0, cooldown=100))
        c.run_on_scheduler(_two_cycles)
        amm = lc.scheduler.extensions["amm"]  # the scheduler runs in this process
        (rep,) = (p for p in amm.policies if isinstance(p, Replicate))
        (reb,) = (p for p in amm.policies if isinstance(p, Rebalance))
        assert len(rep.wanted) == 2
        assert reb.moves and reb.cooling, (reb.moves, reb.cooling)
        assert not amm.running

        tasks = [weakref.ref(lc.scheduler.tasks[f.key]) for f in futs]
        keys = {f.key for f in futs}
        del futs
        wait_for(lambda: not keys & c.run_on_scheduler(scheduler_keys), what="released")

        def collected() -> bool:
            gc.collect()
            return all(ref() is None for ref in tasks)

        wait_for(collected, timeout=10, what="the released TaskStates to be collected")
        # Nothing ran: the policies still remember the keys, by key only
        assert set(rep.wanted) <= keys and len(rep.wanted) == 2
        assert reb.moves and reb.cooling

        # The next cycle forgets them
        c.amm.run_once()
        assert not rep.wanted and not reb.moves and not reb.cooling
        counters = c.run_on_scheduler(reports)
        assert counters["Replicate"]["counters"]["keys_forgotten"] == 2
        assert counters["Rebalance"]["moves_in_flight"] == 0


# --- RetirePaused --------------------------------------------------------------------


def test_paused_worker_is_retired_with_data_intact() -> None:
    config = {
        "distributed.scheduler.active-memory-manager.start": True,
        "distributed.scheduler.active-memory-manager.interval": "200ms",
        "distributed.scheduler.active-memory-manager.policies": [
            {"class": "amm_core.retire_paused.RetirePaused", "after": "2s"},
        ],
    }
    with cluster(3, memory_limit="500MB", **config) as (lc, c):
        a = sorted(c.scheduler_info()["workers"])[0]
        futs = [c.submit(blob, i, 10 * MB, workers=[a], pure=False) for i in range(6)]
        wait(futs)

        # a holds 60 MB; lowering its own pause threshold to 10% (50 MB) pauses it.
        def lower_pause(dask_worker: Any) -> None:
            dask_worker.memory_manager.memory_pause_fraction = 0.1

        c.run(lower_pause, workers=[a])
        wait_for(
            lambda: c.scheduler_info()["workers"][a]["status"] == "paused",
            what="worker paused",
        )

        def replace() -> list[dict]:
            return c.sync(lambda: _rpc_replace(c.scheduler.address))

        [entry] = wait_for(
            lambda: [e for e in replace() if e["retired"]], what="retired"
        )
        assert entry["address"] == a
        assert entry["retiring_since"] - entry["paused_since"] >= 2
        assert c.scheduler_info()["workers"][a]["status"] == "closing_gracefully"
        # Its data is on the running workers, and readable.
        for ws in holders(c, futs).values():
            assert ws and a not in ws
        assert_never_lost(c, futs)
        assert c.gather(futs) == [blob(i, 10 * MB) for i in range(6)]
        counters = c.run_on_scheduler(reports)["RetirePaused"]["counters"]
        assert counters == {"retirements_started": 1, "workers_retired": 1}


def test_paused_worker_stays_when_no_worker_has_room() -> None:
    config = {
        "distributed.scheduler.active-memory-manager.start": True,
        "distributed.scheduler.active-memory-manager.interval": "200ms",
        "distributed.scheduler.active-memory-manager.policies": [
            {"class": "amm_core.retire_paused.RetirePaused", "after": "1s"},
        ],
    }
    with cluster(2, memory_limit="500MB", **config) as (lc, c):
        a, b = sorted(c.scheduler_info()["workers"])
        futs = [c.submit(blob, i, 10 * MB, workers=[a], pure=False) for i in range(6)]
        wait(futs)

        def lower_pause(dask_worker: Any) -> None:
            dask_worker.memory_manager.memory_pause_fraction = 0.1

        def rep() -> dict:
            return c.run_on_scheduler(reports)["RetirePaused"]

        # Scheduler side only: b has 1 MB of room, no 10 MB key fits.
        with dask.config.set({"distributed.worker.memory.pause": 0.002}):
            c.run(lower_pause, workers=[a])
            wait_for(lambda: rep()["counters"].get("retirements_aborted", 0) >= 2)
            wait_for(
                lambda: c.scheduler_info()["workers"][a]["status"] == "paused",
                what="back to paused",
            )
            assert all(ws == {a} for ws in holders(c, futs).values())
        # With room, it is retired at the next attempt.
        wait_for(lambda: [e["retired"] for e in rep()["replace"]] == [True])
        assert all(ws == {b} for ws in holders(c, futs).values())
        assert_never_lost(c, futs)


async def _rpc_replace(address: str) -> list[dict]:
    # What an outside caller (the operator) does: plain msgpack over RPC.
    async with rpc(address) as r:
        return await r.amm_replace()


# --- dask config ---------------------------------------------------------------------


async def test_policies_load_from_dask_config() -> None:
    config = {
        "distributed.scheduler.active-memory-manager.start": True,
        "distributed.scheduler.active-memory-manager.policies": [
            {
                "class": "amm_core.rebalance.Rebalance",
                "threshold": 0.05,
                "max_bytes_per_cycle": "64MiB",
            },
            {"class": "amm_core.replicate.Replicate"},
            {"class": "amm_core.replicate.ReduceReplicas"},
            {"class": "amm_core.retire_paused.RetirePaused", "after": "45s"},
        ],
    }
    with dask.config.set(config):
        async with Scheduler(dashboard_address=":0", port=0) as s:
            policies = {type(p): p for p in s.extensions["amm"].policies}
            assert set(policies) == {Rebalance, Replicate, ReduceReplicas, RetirePaused}
            assert policies[Rebalance].threshold == 0.05
            assert policies[Rebalance].max_bytes_per_cycle == 64 * MB
            assert policies[RetirePaused].after == 45
            assert s.extensions["amm"].running
            assert "amm_replace" in s.handlers


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (Rebalance, {"threshold": 1.5}),
        (Rebalance, {"max_bytes_per_cycle": 0}),
        (RetirePaused, {"after": -1}),
    ],
)
def test_bad_kwargs_are_rejected(cls: type, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        cls(**kwargs)
