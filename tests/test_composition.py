"""Nothing lost when the retirement engine is not alone on the scheduler: one named
regression test per case of the composition issue (other AMM policies, upstream
``retire_workers``, several preStop hooks at once, aborts, restarts, P2P), on a real
in-process Scheduler with real Workers (threads, real TCP comms).

Loss is read from the scheduler itself: :class:`Losses` collects the keys its
``remove-worker`` events say were lost ("lost-scattered-tasks", which cannot be
recovered, and "lost-computed-tasks", which would be recomputed), and
``Computes`` (test_retirement) counts how often each key went processing.

The hook's retirement is ``amm_core_retire(..., keep_out=False)``, as
amm_core.prestop calls it; the operator's is ``keep_out=True``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import dask
import dask.array as da
import pytest
from distributed import Client, Event, Worker
from distributed.active_memory_manager import (
    ActiveMemoryManagerPolicy,
    Suggestion,
    SuggestionGenerator,
)
from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.scheduler import Scheduler

from amm_core import retirement
from amm_core.plugin import PLUGIN_NAME
from amm_testing import MB, blob, until
from test_retirement import (
    call,
    cluster,
    records,
    scatter_to,
    seceding,
    wait_for_event,
)

HOOK = {"keep_out": False, "reason": "preStop: pod deleted"}


class Losses(SchedulerPlugin):
    """The keys the scheduler said it lost when a worker left, by worker address."""

    name = "losses"

    def __init__(self) -> None:
        self.scattered: dict[str, set] = {}
        self.computed: dict[str, set] = {}

    def log_event(self, topic: str, msg: Any) -> None:
        if topic == "all" and isinstance(msg, dict) and msg.get("action") == "remove-worker":
            worker = msg["worker"]
            self.scattered[worker] = set(msg.get("lost-scattered-tasks") or ())
            self.computed[worker] = set(msg.get("lost-computed-tasks") or ())

    def lost(self) -> set:
        return set().union(*self.scattered.values(), *self.computed.values())


def losses(s: Scheduler) -> Losses:
    if "losses" not in s.plugins:
        s.add_plugin(Losses())
    return s.plugins["losses"]


def on(s: Scheduler, fut: Any) -> str | None:
    """The address of the worker a task is processing on (None: not processing, or
    not known to the scheduler yet)."""
    ts = s.tasks.get(fut.key)
    return ts.processing_on.address if ts is not None and ts.processing_on else None


def where_ran(s: Scheduler) -> dict[Any, list[str]]:
    return s.plugins["computes"].where


def engine(s: Scheduler) -> retirement.RetirementEngine:
    return s.plugins[PLUGIN_NAME].retirement


@asynccontextmanager
async def joining_kept_out(s: Scheduler, c: Client, name: str) -> AsyncIterator[Worker]:
    """A worker registering under ``name`` while tasks wait for a thread: it is kept
    closing_gracefully at once, and none of the tasks runs on it."""
    ev = Event()
    await ev.clear()
    queued = c.map(wait_for_event, [ev] * 4, pure=False)
    await until(lambda: s.queued or any(on(s, f) for f in queued), "tasks waiting")
    async with Worker(s.address, name=name, nthreads=1, memory_limit="4GB") as w:
        await until(lambda: w.address in s.workers and s.workers[w.address].status != Status.init,
                    "registered and started")
        assert s.workers[w.address].status == Status.closing_gracefully
        await until(lambda: w.status == Status.closing_gracefully, "worker told")
        yield w
        await ev.set()
        await c.gather(queued)
        assert not any(w.address in where for where in where_ran(s).values())


class DropFrom(ActiveMemoryManagerPolicy):
    """A user's policy: drop every replicated key's copy on one worker, naming it as
    the only candidate (which defeats upstream's ``_find_dropper`` guard)."""

    def __init__(self, address: str):
        self.address = address

    def run(self) -> SuggestionGenerator:
        ws = self.manager.scheduler.workers.get(self.address)
        for ts in list(ws.has_what if ws else ()):
            if len(ts.who_has or ()) > 1:
                yield Suggestion("drop", ts, {ws})


def amm_cycle(s: Scheduler, *policies: ActiveMemoryManagerPolicy) -> None:
    """One cycle of the scheduler's main AMM with these policies only."""
    amm = s.extensions["amm"]
    saved = set(amm.policies)
    amm.policies.clear()
    for p in policies:
        amm.add_policy(p)
    try:
        amm.run_once()
    finally:
        amm.policies.clear()
        amm.policies.update(saved)


async def test_case1_a_dying_worker_whose_hook_is_refused_stays_out() -> None:
    """A node drain: w0 runs a seceded task (its retirement cannot finish), w1 holds
    the only copy of a scattered key. w0 must not take w1's key, nor new tasks."""
    async with cluster(4) as (s, ws, c):
        lost = losses(s)
        a0, a1 = ws[0].address, ws[1].address
        # w2 and w3 hold data: the least loaded recipient would be w0
        load = [*await scatter_to(c, ws[2], 2, 4 * MB, 100),
                *await scatter_to(c, ws[3], 2, 4 * MB, 200)]
        [x] = await scatter_to(c, ws[1], 1, 2 * MB, 0)
        ev = Event()
        await ev.clear()
        sec = c.submit(seceding, ev, workers=[a0], pure=False)
        await until(lambda: s.workers[a0].long_running, "w0 runs a seceded task")

        both = await call(s, "amm_core_retire", workers=["w0", "w1"], limit=30, **HOOK)
        rec = {r["worker"]: r for r in both["retirements"]}
        assert rec["w0"]["state"] != "aborted" and "long-running" in rec["w0"]["blocked"]
        assert rec["w0"]["leaving"] and rec["w1"]["leaving"]
        await until(lambda: records(s)["w1"]["state"] == "done", "w1 done")
        assert s.workers[a0].status == Status.closing_gracefully
        assert s.workers[a0] not in s.running
        holders = {w.address for w in s.tasks[x.key].who_has}
        assert holders - {a0, a1}, holders
        # new work goes elsewhere
        more = c.map(wait_for_event, [ev] * 3, pure=False)
        await until(lambda: any(on(s, f) for f in more), "assigned")

        # the seceded task ends before the SIGTERM: its result, on a leaving
        # worker, is moved too, and w0's retirement can finish
        await ev.set()
        await c.gather(more)
        await until(lambda: records(s)["w0"]["state"] == "done", "w0 done")
        assert records(s)["w0"]["blocked"] == ""
        # both pods get their SIGTERM
        await ws[0].close()
        await ws[1].close()
        assert not lost.lost(), (lost.scattered, lost.computed)
        assert await c.gather(x) == blob(0, 2 * MB)
        assert await sec == 1
        assert not any(a0 in where_ran(s).get(f.key, []) for f in more)
        assert s.plugins["computes"].started[sec.key] == 1
        assert await c.gather(load)


async def test_case2_done_is_a_commit_no_policy_drops_the_safe_copy() -> None:
    """After done, a user's policy naming the worker in service as the only drop
    candidate, and upstream retire_workers (whose RetireWorker drops any copy once a
    key has two), cannot take the one copy that made the retirement safe."""
    async with cluster(3) as (s, ws, c):
        lost = losses(s)
        a0, a1, a2 = (w.address for w in ws)
        [x] = await scatter_to(c, ws[0], 1, 2 * MB, 0)
        await call(s, "amm_core_retire", workers=["w0"], limit=30)
        await until(lambda: records(s)["w0"]["state"] == "done", "w0 done")
        holder = next(w for w in s.tasks[x.key].who_has if w.address != a0)

        amm_cycle(s, DropFrom(holder.address))
        await until(lambda: engine(s).departures.drops_refused >= 1, "drop refused")
        assert holder in s.tasks[x.key].who_has
        status = await call(s, "amm_core_status")
        assert status["amm"]["drops_refused"] >= 1

        # upstream retire_workers of the holder: its RetireWorker must copy x to the
        # third worker before it calls the holder retired
        retired = await s.retire_workers(
            names=[str(holder.name)], close_workers=False, remove=False,
            stimulus_id="test-upstream-retire",
        )
        assert holder.address in retired
        third = {a1, a2} - {holder.address}
        assert {w.address for w in s.tasks[x.key].who_has} & third
        await ws[0].close()
        for w in ws:
            if w.address == holder.address:
                await w.close()
        assert not lost.lost()
        assert await c.gather(x) == blob(0, 2 * MB)


async def test_case3_records_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hook retirements of workers that then leave: their records end and go, and
    the engine never holds more than MAX_RECORDS."""
    monkeypatch.setattr(retirement, "MAX_RECORDS", 3)
    monkeypatch.setattr(retirement, "RECORD_TTL", 3600.0)
    async with cluster(1) as (s, ws, c):
        seen = []
        for i in range(6):
            async with Worker(s.address, name=f"p{i}", nthreads=1, memory_limit="4GB") as w:
                held = await scatter_to(c, w, 1, MB, i)
                await call(s, "amm_core_retire", workers=[f"p{i}"], limit=30, **HOOK)
                await until(lambda: records(s)[f"p{i}"]["state"] == "done", "done")
            await until(lambda: records(s).get(f"p{i}", {}).get("left", True), "left")
            seen.append(len(engine(s).records))
            assert await c.gather(held)
        assert max(seen) <= 3, seen
        assert len(await call(s, "amm_core_retirements")) <= 3
        # past their TTL, ended records go at the next call
        monkeypatch.setattr(retirement, "RECORD_TTL", 0.0)
        await call(s, "amm_core_retire", workers=["nobody"], limit=30, **HOOK)
        assert engine(s).records == {}


@pytest.mark.parametrize("stealing", [False, True])
async def test_case4_drain_hands_queued_tasks_back_without_work_stealing(stealing: bool) -> None:
    settings = {
        "distributed.scheduler.work-stealing": stealing,
        "distributed.scheduler.worker-saturation": "inf",
    }
    with dask.config.set(settings):
        async with cluster(2) as (s, ws, c):
            assert ("stealing" in s.extensions) == stealing
            a0, a1 = ws[0].address, ws[1].address
            ev = Event()
            await ev.clear()
            running = c.submit(wait_for_event, ev, workers=[a0], pure=False)
            await until(lambda: s.workers[a0].processing, "w0 runs a task")
            blocked = c.map(wait_for_event, [ev] * 6, pure=False)
            await until(lambda: all(on(s, f) for f in blocked), "assigned")
            queued_on_w0 = [f for f in blocked if on(s, f) == a0]
            assert queued_on_w0, "no task queued on w0"

            await call(s, "amm_core_retire", workers=["w0"], limit=20)
            await until(
                lambda: all(on(s, f) in (None, a1) for f in queued_on_w0),
                "queued tasks handed to w1",
            )
            await ev.set()
            await until(lambda: records(s)["w0"]["state"] == "done", "w0 done")
            await c.gather([running, *blocked])
            assert all(where_ran(s)[f.key] == [a0] or where_ran(s)[f.key][-1] == a1
                       for f in queued_on_w0)
            assert records(s)["w0"]["wasted_tasks"] == 0


async def test_case5_abort_restores_only_what_the_engine_changed() -> None:
    """A busy worker upstream retire_workers keeps closing_gracefully (remove=False)
    is retired by the operator too, then cancelled: it stays as upstream left it.
    One the engine itself set closing_gracefully goes back running."""
    async with cluster(3) as (s, ws, c):
        ev = Event()
        await ev.clear()
        busy = [c.submit(wait_for_event, ev, workers=[w.address], pure=False) for w in ws[:2]]
        await until(lambda: all(on(s, f) for f in busy), "w0 and w1 busy")
        a0, a1 = ws[0].address, ws[1].address
        await s.retire_workers(names=["w0"], close_workers=False, remove=False,
                               stimulus_id="test-upstream")
        assert s.workers[a0].status == Status.closing_gracefully

        await call(s, "amm_core_retire", workers=["w0", "w1"], limit=30)
        assert {r["worker"]: r["state"] for r in records(s).values()} == {
            "w0": "draining", "w1": "draining"}
        reply = await call(s, "amm_core_cancel_retirement", workers=["w0", "w1"])
        assert reply["cancelled"] == ["w0", "w1"]
        assert s.workers[a0].status == Status.closing_gracefully
        assert s.workers[a1].status == Status.running
        await ev.set()
        await c.gather(busy)


async def test_case6_a_restart_inside_the_dying_pod_is_kept_out() -> None:
    """A hook's worker restarts in its own pod (same host, no nanny here) before the
    SIGTERM: the new process is kept out, not handed tasks."""
    async with cluster(2) as (s, ws, c):
        lost = losses(s)
        [x] = await scatter_to(c, ws[0], 1, 2 * MB, 0)
        await call(s, "amm_core_retire", workers=["w0"], limit=30, **HOOK)
        await until(lambda: records(s)["w0"]["state"] == "done", "done")
        await ws[0].close()
        await until(lambda: records(s)["w0"]["left"], "old process gone")
        async with joining_kept_out(s, c, "w0"):
            assert records(s)["w0"]["rejoined"] == 1
        assert not lost.lost()
        assert await c.gather(x) == blob(0, 2 * MB)


async def test_case8_room_counts_copies_still_in_flight() -> None:
    """Two hooks in successive cycles, one recipient with room for one key: the
    second retirement must not ask it for the second key too."""
    async with cluster(3) as (s, ws, c):
        size = 64 * MB
        held = [*await scatter_to(c, ws[0], 1, size, 0), *await scatter_to(c, ws[1], 1, size, 1)]
        w2 = s.workers[ws[2].address]
        room_for = 1.5 * size
        fraction = (max(w.memory.process for w in s.workers.values()) + room_for) / w2.memory_limit
        handlers = s.handlers
        with dask.config.set({"distributed.worker.memory.pause": fraction}):
            # no await between the two: the first copy cannot have landed
            handlers["amm_core_retire"](workers=["w0"], limit=30, **HOOK)
            handlers["amm_core_retire"](workers=["w1"], limit=30, **HOOK)
            asked = [copy.recipient.address for copy in engine(s).in_flight.copies.values()]
        rec = records(s)
        assert asked.count(w2.address) == 1, (asked, rec, fraction, w2.memory)
        assert "room" in rec["w1"]["blocked"] or "room" in rec["w0"]["blocked"], rec
        del held


async def test_case9_a_name_barred_before_its_worker_connected_is_kept_out() -> None:
    """The operator retires a pending worker (not connected: "unknown"); a worker of
    that name registering before the Deployment is deleted gets nothing."""
    async with cluster(1) as (s, ws, c):
        reply = await call(s, "amm_core_retire", workers=["late"], limit=30)
        assert reply["unknown"] == ["late"]
        async with joining_kept_out(s, c, "late"):
            rec = records(s)["late"]
            assert rec["leaving"] and rec["state"] in ("draining", "moving", "done")
        # its Deployment deleted: it took nothing with it, by the scheduler's account
        rec = await until(lambda: records(s)["late"]["left"] and records(s)["late"], "left")
        assert (rec["state"], rec["keys_lost"], rec["wasted_tasks"]) == ("done", 0, 0)
        forgot = await call(s, "amm_core_forget_retirement", workers=["late"])
        assert forgot["forgotten"] == ["late"]


def _pinned(s: Scheduler) -> Iterator[str]:
    for shuffle in s.plugins["shuffle"].active_shuffles.values():
        yield from shuffle.run_spec.worker_for.values()


async def test_case11_a_shuffle_after_done_neither_aborts_nor_pins_the_leaving_worker() -> None:
    with dask.config.set({"distributed.scheduler.worker-saturation": "inf"}):
        async with cluster(3) as (s, ws, c):
            lost = losses(s)
            a0 = ws[0].address
            [x] = await scatter_to(c, ws[0], 1, 2 * MB, 0)
            await call(s, "amm_core_retire", workers=["w0"], limit=30)
            await until(lambda: records(s)["w0"]["state"] == "done", "w0 done")

            arr = da.ones((40, 40), chunks=(5, 40)).rechunk((40, 5), method="p2p")
            total = c.compute(arr.sum())
            await until(lambda: any(True for _ in _pinned(s)) or total.done(), "shuffle created")
            assert a0 not in set(_pinned(s))
            assert records(s)["w0"]["state"] == "done"
            assert s.workers[a0].status == Status.closing_gracefully
            assert await total == 1600
            await ws[0].close()
            assert not lost.lost()
            assert await c.gather(x) == blob(0, 2 * MB)


# --- found in review: the same guarantees against other paths ---------------------


async def test_rebalance_neither_sends_to_nor_strips_the_last_copy_off_a_leaving_worker() -> None:
    """Scheduler.rebalance copies with gather_on_worker and frees with
    delete_worker_data, outside the AMM: a done (committed) worker is no recipient,
    and no copy in service is freed while it still holds one."""
    rebalance = "distributed.worker.memory.rebalance"
    with dask.config.set({f"{rebalance}.measure": "managed", f"{rebalance}.sender-min": 0.0,
                          f"{rebalance}.recipient-max": 1.0,
                          f"{rebalance}.sender-recipient-gap": 0.0}):
        async with cluster(3) as (s, ws, c):
            lost = losses(s)
            a2 = ws[2].address
            await call(s, "amm_core_retire", workers=["w2"], limit=30, **HOOK)
            await until(lambda: records(s)["w2"]["state"] == "done", "w2 done")
            held = await scatter_to(c, ws[0], 8, 8 * MB, 0)
            await c.rebalance()
            assert any(len(s.tasks[f.key].who_has) == 1 and s.workers[ws[1].address]
                       in s.tasks[f.key].who_has for f in held), "rebalance moved nothing"
            assert not any(s.workers[a2] in s.tasks[f.key].who_has for f in held)
            await ws[2].close()
            assert not lost.lost()
            assert await c.gather(held)


async def test_an_engine_that_took_over_a_status_puts_it_back_when_cancelled() -> None:
    """Upstream retire_workers set w0 closing_gracefully and aborted, telling only the
    worker; the worker says running, the operator's retirement sets it back: the
    engine owns that status now, and a cancel puts the worker back running."""
    async with cluster(2) as (s, ws, c):
        a0 = ws[0].address
        ev = Event()
        await ev.clear()
        busy = c.submit(wait_for_event, ev, workers=[a0], pure=False)
        await until(lambda: on(s, busy), "w0 busy")
        await s.retire_workers(names=["w0"], close_workers=False, remove=False,
                               stimulus_id="test-upstream")
        await call(s, "amm_core_retire", workers=["w0"], limit=30)
        assert records(s)["w0"]["state"] == "draining"
        # upstream's abort told only the worker; the worker's echo arrives
        s.handle_worker_status_change("running", a0, f"worker-status-change-{retirement.time()}")
        assert s.workers[a0].status == Status.closing_gracefully, "not taken back"
        await call(s, "amm_core_cancel_retirement", workers=["w0"])
        # (the worker's echo of an earlier change may cross the cancel: it converges)
        await until(lambda: s.workers[a0].status == ws[0].status == Status.running,
                    "back running, on both sides")
        await ev.set()
        await busy


async def test_a_bar_holds_over_an_older_record_of_the_same_name() -> None:
    async with cluster(2) as (s, ws, c):
        ev = Event()
        await ev.clear()
        busy = c.submit(wait_for_event, ev, workers=[ws[1].address], pure=False)
        await until(lambda: on(s, busy), "w1 busy")
        await call(s, "amm_core_retire", workers=["w1"], limit=30)
        await call(s, "amm_core_cancel_retirement", workers=["w1"])
        await ev.set()
        await busy
        await ws[1].close()
        await until(lambda: records(s)["w1"]["left"], "the cancelled record's worker left")
        assert (await call(s, "amm_core_retire", workers=["w1"], limit=30))["unknown"] == ["w1"]
        async with joining_kept_out(s, c, "w1"):
            assert records(s)["w1"]["leaving"]


async def test_tasks_with_loose_restrictions_are_handed_back_too() -> None:
    with dask.config.set({"distributed.scheduler.worker-saturation": "inf"}):
        async with cluster(3) as (s, ws, c):
            a0 = ws[0].address
            ev = Event()
            await ev.clear()
            running = c.submit(wait_for_event, ev, workers=[a0], pure=False)
            await until(lambda: on(s, running), "w0 busy")
            loose = c.map(wait_for_event, [ev] * 4, workers=[a0], allow_other_workers=True,
                          pure=False)
            await until(lambda: all(on(s, f) == a0 for f in loose), "queued on w0")
            await call(s, "amm_core_retire", workers=["w0"], limit=30)
            await until(lambda: all(on(s, f) not in (None, a0) for f in loose), "handed back")
            assert len({on(s, f) for f in loose}) == 2, "all went to one worker"
            await ev.set()
            await until(lambda: records(s)["w0"]["state"] == "done", "w0 done")
            await c.gather([running, *loose])


async def test_a_done_records_time_to_live_counts_from_when_its_worker_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(retirement, "RECORD_TTL", 1.0)
    async with cluster(2) as (s, ws, c):
        await call(s, "amm_core_retire", workers=["w0"], limit=30, **HOOK)
        await until(lambda: records(s)["w0"]["state"] == "done", "done")
        await until(lambda: retirement.time() - records(s)["w0"]["started"] > 1.5, "TTL past done")
        await ws[0].close()
        await until(lambda: records(s)["w0"]["left"], "left")
        # a restart inside the same pod right away is still kept out
        async with joining_kept_out(s, c, "w0"):
            pass


async def test_a_hook_worker_gone_with_data_says_what_the_scheduler_lost() -> None:
    """No room anywhere: the hook's retirement is blocked, not aborted; when the pod
    goes anyway, the record ends aborted with the keys the scheduler itself lost."""
    async with cluster(2) as (s, ws, c):
        lost = losses(s)
        futs = await scatter_to(c, ws[0], 2, 2 * MB, 0)
        with dask.config.set({"distributed.worker.memory.pause": 1e-6}):
            await call(s, "amm_core_retire", workers=["w0"], limit=30, **HOOK)
            rec = records(s)["w0"]
            assert rec["state"] == "moving" and "room" in rec["blocked"]
            assert s.workers[ws[0].address].status == Status.closing_gracefully
            await ws[0].close()
        rec = await until(lambda: records(s)["w0"]["left"] and records(s)["w0"], "left")
        assert rec["state"] == "aborted"
        assert rec["keys_lost"] == 2 == len(lost.scattered[ws[0].address])
        assert rec["bytes_lost"] == 4 * MB
        del futs
