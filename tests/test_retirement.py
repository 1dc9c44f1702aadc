"""The graceful-retirement engine (amm_core.retirement) behind the plugin handlers
amm_core_retire & co., on a real in-process Scheduler with real Workers (threads, one
each, real TCP comms): the handlers are called over RPC with plain msgpack, as the
operator calls them, and every reply is checked to be plain data.

"Nothing lost, nothing recomputed" is asserted from the scheduler: a SchedulerPlugin
counts how often each key went to processing, and the data that must survive is
scattered (it cannot be recomputed: losing it errs). Conditions are polled with a
deadline.

In-process workers share this process's memory, so every worker reports the same
process memory; their limit (4 GB) leaves room for everything the tests move. A test
that wants no room anywhere lowers the scheduler-side pause fraction that the room
check reads (the workers read theirs at start-up).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import dask
from distributed import Client, Event, Scheduler, Worker, secede
from distributed.core import Status, rpc
from distributed.diagnostics.plugin import SchedulerPlugin

from amm_core.config import is_plain, plain
from amm_core.plugin import PLUGIN_NAME, MemoryPolicyPlugin
from amm_core.retirement import retiring_workers, unsafe_keys
from amm_testing import MB, WORKER_MEMORY, blob, until

AMM = "distributed.scheduler.active-memory-manager"
#: A loopback address other than the workers': the host of "another pod"
OTHER_POD_HOST = "127.0.0.2"


class Computes(SchedulerPlugin):
    """How many times each key went to processing (more than once: recomputed or
    rescheduled)."""

    name = "computes"

    def __init__(self) -> None:
        self.started: Counter[Any] = Counter()
        #: key -> addresses of the workers it went processing on
        self.where: dict[Any, list[str]] = {}

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "processing":
            self.started[key] += 1
            ws = self.scheduler.tasks[key].processing_on
            self.where.setdefault(key, []).append(ws.address)


class Veto(SchedulerPlugin):
    """Vetoes the downscaling of one worker, as a P2P shuffle does for its workers."""

    name = "veto"

    def __init__(self, address: str):
        self.address = address

    def valid_workers_downscaling(self, scheduler: Scheduler, workers: list) -> list:
        return [ws for ws in workers if ws.address != self.address]


class Box:
    """An actor."""

    n = 0


@asynccontextmanager
async def cluster(n: int) -> AsyncIterator[tuple[Scheduler, list[Worker], Client]]:
    """Workers named w0.. (one thread each), the main AMM stopped, the plugin
    registered, and a Computes plugin."""
    settings = {
        **WORKER_MEMORY,
        f"{AMM}.start": False,
        f"{AMM}.measure": "managed",
        f"{AMM}.policies": [],
    }
    with dask.config.set(settings):
        async with AsyncExitStack() as stack:
            s = await stack.enter_async_context(
                Scheduler(dashboard_address=":0", port=0, plugins=[Computes()])
            )
            workers = [
                await stack.enter_async_context(
                    Worker(s.address, name=f"w{i}", nthreads=1, memory_limit="4GB")
                )
                for i in range(n)
            ]
            c = await stack.enter_async_context(Client(s.address, asynchronous=True))
            await c.register_plugin(MemoryPolicyPlugin())
            yield s, workers, c


async def call(s: Scheduler, op: str, **kwargs: Any) -> Any:
    """A handler over RPC, as the operator calls it; the reply must be plain data."""
    async with rpc(s.address) as r:
        out = await getattr(r, op)(**kwargs)
    assert is_plain(out), out
    return plain(out)


def records(s: Scheduler) -> dict[str, dict[str, Any]]:
    """The records by worker name, as amm_core_retirements would give them."""
    out = s.plugins[PLUGIN_NAME].retirement.reports()
    assert is_plain(out)
    return {r["worker"]: r for r in out}


def computes(s: Scheduler) -> Counter:
    return s.plugins["computes"].started


def link(prev: Any, i: int, delay: float) -> bytes:
    """A link of a chain: sleeps, then returns 1 MB."""
    time.sleep(delay)
    return blob(i, MB)


def wait_for_event(ev: Event) -> bytes:
    ev.wait()
    return blob(0, MB)


def seceding(ev: Event) -> int:
    secede()
    ev.wait()
    return 1


async def scatter_to(c: Client, w: Worker, n: int, size: int, base: int) -> list:
    return await c.scatter(
        [blob(base + i, size) for i in range(n)], workers=[w.address], hash=False
    )


async def test_busy_cluster_two_retire_at_once_nothing_lost_or_recomputed() -> None:
    async with cluster(4) as (s, ws, c):
        scattered = []
        for i, w in enumerate(ws):
            scattered += await scatter_to(c, w, 3, 2 * MB, 10 * i)
        chains = []
        for j in range(4):
            fut = None
            for i in range(6):
                fut = c.submit(link, fut, 100 * j + i, 0.15, pure=False)
                chains.append(fut)
        a, b = ws[0].address, ws[1].address
        await until(
            lambda: s.workers[a].processing and s.workers[b].processing,
            "tasks running on both workers to retire",
        )

        reply = await call(s, "amm_core_retire", workers=["w0", "w1"], limit=30)
        assert reply["unknown"] == []
        assert {r["worker"]: r["state"] for r in reply["retirements"]} == {
            "w0": "draining",
            "w1": "draining",
        }
        # Idempotent: asking again keeps the records (same start time)
        again = await call(s, "amm_core_retire", workers=["w1", a], limit=5)
        assert [r["started"] for r in again["retirements"]] == [
            r["started"] for r in reply["retirements"]
        ]
        assert {r["limit"] for r in again["retirements"]} == {30}

        await until(
            lambda: {r["state"] for r in records(s).values()} == {"done"}, "both done"
        )
        rec = records(s)
        retiring = retiring_workers(s)
        for name, address in [("w0", a), ("w1", b)]:
            assert rec[name]["address"] == address
            assert rec[name]["bytes_moved"] > 0
            assert rec[name]["keys_left"] == rec[name]["bytes_left"] == 0
            assert rec[name]["wasted_tasks"] == 0
            assert unsafe_keys(s.workers[address], retiring) == []
            assert not s.workers[address].processing
        assert (await call(s, "amm_core_status"))["retirements"] == sorted(
            rec.values(), key=lambda r: r["worker"]
        )

        # The pods go: nothing is lost, nothing recomputed or rescheduled.
        await ws[0].close()
        await ws[1].close()
        await until(lambda: len(s.workers) == 2, "the retired workers gone")
        results = await c.gather(chains)
        assert results == [blob(100 * j + i, MB) for j in range(4) for i in range(6)]
        assert await c.gather(scattered) == [
            blob(10 * i + k, 2 * MB) for i in range(4) for k in range(3)
        ]
        assert set(computes(s).values()) == {1}
        assert set(computes(s)) == {f.key for f in chains}
        assert {r["left"] for r in records(s).values()} == {True}
        assert {r["state"] for r in records(s).values()} == {"done"}


async def test_workers_holding_each_others_only_copies_wait_for_a_third() -> None:
    async with cluster(3) as (s, ws, c):
        a, b, third = (w.address for w in ws)
        [x] = await c.scatter([blob(7, 4 * MB)], workers=[a, b], broadcast=True)
        assert set(s.tasks[x.key].who_has or ()) == {s.workers[a], s.workers[b]}

        # Alone, w0's copy is safe on w1.
        await call(s, "amm_core_retire", workers=["w0"], limit=30)
        await until(lambda: records(s)["w0"]["state"] == "done", "w0 done")
        assert records(s)["w0"]["keys_moved"] == 0

        seen = []

        def observe() -> bool:
            rec = records(s)
            on_third = s.workers[third] in (s.tasks[x.key].who_has or ())
            seen.append((rec["w0"]["state"], rec.get("w1", {}).get("state"), on_third))
            return {r["state"] for r in rec.values()} == {"done"}

        # w1 retires too: the copies on w0 and w1 no longer count. w0's done is a
        # commit and stays so; w1 is done only once the key sits on the third.
        await call(s, "amm_core_retire", workers=["w1"], limit=30)
        await until(observe, "both done")
        assert all(on_third for s0, s1, on_third in seen if s1 == "done"), seen
        assert seen[-1][2], "done without a copy on the third worker"
        assert seen[0][:2] == ("done", "moving")
        assert sum(r["keys_moved"] for r in records(s).values()) == 1
        await ws[0].close()
        await ws[1].close()
        assert await c.gather(x) == blob(7, 4 * MB)


async def test_no_room_anywhere_aborts_and_puts_the_worker_back() -> None:
    async with cluster(2) as (s, ws, c):
        a, b = (w.address for w in ws)
        futs = await scatter_to(c, ws[0], 2, 2 * MB, 0)
        # The scheduler's room check reads the pause fraction: nobody has room.
        with dask.config.set({"distributed.worker.memory.pause": 1e-6}):
            reply = await call(s, "amm_core_retire", workers=["w0"], limit=30)
        [rec] = reply["retirements"]
        assert rec["state"] == "aborted"
        assert "has room" in rec["reason"] and "bytes" in rec["reason"]
        assert rec["keys_left"] == 2
        assert s.workers[a].status == Status.running
        await until(lambda: ws[0].status == Status.running, "worker back to running")

        # Both retiring: no recipient is left at all; w1 holds nothing and is done.
        reply = await call(s, "amm_core_retire", workers=["w0", "w1"], limit=30)
        rec = {r["worker"]: r for r in reply["retirements"]}
        assert rec["w0"]["state"] == "aborted"
        assert "no worker in service is left" in rec["w0"]["reason"]
        assert rec["w1"]["state"] == "done"
        assert s.workers[a].status == Status.running
        assert {ts.key for ts in s.workers[a].has_what} == {f.key for f in futs}

        # w1's done is a commit: not cancelled; w0's abort is not cancelled again
        reply = await call(s, "amm_core_cancel_retirement", workers=["w1", "w0"])
        assert reply["cancelled"] == []
        assert [k["worker"] for k in reply["kept"]] == ["w1"]
        assert s.workers[b].status == Status.closing_gracefully


async def test_limit_passes_aborts_and_the_running_task_goes_on() -> None:
    async with cluster(2) as (s, ws, c):
        a = ws[0].address
        ev = Event()
        await ev.clear()
        fut = c.submit(wait_for_event, ev, workers=[a], pure=False)
        await until(lambda: s.workers[a].processing, "task running")

        reply = await call(s, "amm_core_retire", workers=["w0"], limit=1, reason="scale")
        assert reply["retirements"][0]["state"] == "draining"
        assert reply["retirements"][0]["reason"] == "scale"
        await until(lambda: records(s)["w0"]["state"] == "aborted", "aborted")
        rec = records(s)["w0"]
        assert "limit of 1s passed" in rec["reason"] and "1 task(s) running" in rec["reason"]
        assert rec["requested"] == "scale"
        assert 1 <= rec["seconds"] < 5
        assert s.workers[a].status == Status.running
        await ev.set()
        assert await fut == blob(0, MB)
        assert computes(s)[fut.key] == 1
        # Done with it: the operator forgets the record.
        assert await call(s, "amm_core_forget_retirement", workers=["w0"]) == {
            "forgotten": ["w0"],
            "kept": [],
        }
        assert await call(s, "amm_core_retirements") == []


async def test_without_drain_done_while_running_and_the_task_counts_as_wasted() -> None:
    async with cluster(2) as (s, ws, c):
        a, b = (w.address for w in ws)
        ev = Event()
        await ev.clear()
        [x] = await scatter_to(c, ws[0], 1, MB, 0)
        fut = c.submit(wait_for_event, ev, workers=[a], pure=False)
        await until(lambda: s.workers[a].processing, "task running")

        await call(s, "amm_core_retire", workers=["w0"], limit=30, drain=False)
        await until(lambda: records(s)["w0"]["state"] == "done", "done")
        rec = records(s)["w0"]
        assert rec["drain"] is False and rec["tasks_running"] == 1
        assert rec["wasted_tasks"] == 1
        assert s.workers[b] in s.tasks[x.key].who_has
        await ev.set()
        assert await c.gather([x, fut]) == [blob(0, MB), blob(0, MB)]


async def test_actors_long_running_and_plugin_veto_are_refused_with_reasons() -> None:
    async with cluster(4) as (s, ws, c):
        actor_w, long_w, veto_w, ok_w = (w.address for w in ws)
        actor = c.submit(Box, actor=True, workers=[actor_w])
        await actor
        ev = Event()
        await ev.clear()
        long = c.submit(seceding, ev, workers=[long_w], pure=False)
        await until(lambda: s.workers[long_w].long_running, "task seceded")
        s.add_plugin(Veto(veto_w))

        reply = await call(s, "amm_core_retire", workers=["w0", "w1", "w2", "gone"], limit=30)
        assert reply["unknown"] == ["gone"]
        rec = {r["worker"]: r for r in reply["retirements"]}
        assert {r["state"] for r in rec.values()} == {"aborted"}
        assert "actor" in rec["w0"]["reason"]
        assert "long-running" in rec["w1"]["reason"]
        assert "'veto'" in rec["w2"]["reason"]
        assert "valid_workers_downscaling" in rec["w2"]["reason"]
        for address in (actor_w, long_w, veto_w):
            assert s.workers[address].status == Status.running

        # The candidates leave them out, saying why.
        names = ["w0", "w1", "w2", "w3", "gone"]
        reply = await call(s, "amm_core_retirement_candidates", workers=names, n=4)
        assert [r["worker"] for r in reply["candidates"]] == ["w3"]
        excluded = {e["worker"]: e["reason"] for e in reply["excluded"]}
        assert excluded.keys() == {"w0", "w1", "w2", "gone"}
        assert "actor" in excluded["w0"] and "long-running" in excluded["w1"]
        assert "veto" in excluded["w2"] and "not connected" in excluded["gone"]
        await ev.set()
        assert await long == 1


async def test_candidates_rank_by_unique_bytes_then_processing() -> None:
    async with cluster(4) as (s, ws, c):
        held = await scatter_to(c, ws[0], 3, MB, 0)
        held += await scatter_to(c, ws[1], 1, MB, 10)
        held += await scatter_to(c, ws[2], 1, MB, 20)
        # w3's only key has a copy on w0: not unique
        [shared] = await c.scatter(
            [blob(30, 2 * MB)], workers=[ws[0].address, ws[3].address], broadcast=True
        )
        ev = Event()
        await ev.clear()
        # w1 and w2 hold as much unique data; w1 sorts after w2 only by processing
        busy = c.submit(wait_for_event, ev, workers=[ws[1].address], pure=False)
        await until(lambda: s.workers[ws[1].address].processing, "task running")
        reply = await call(
            s, "amm_core_retirement_candidates", workers=["w0", "w1", "w2", "w3"], n=3
        )
        got = [(r["worker"], r["unique_bytes"], r["tasks_running"]) for r in reply["candidates"]]
        assert got == [("w3", 0, 0), ("w2", MB, 0), ("w1", MB, 1)]
        assert reply["excluded"] == []
        # Once w3 retires, w0's copy of the shared key is its only safe one.
        await call(s, "amm_core_retire", workers=["w3"], limit=30)
        reply = await call(s, "amm_core_retirement_candidates", workers=["w0", "w3"], n=1)
        assert reply["excluded"] == [{"worker": "w3", "reason": reply["excluded"][0]["reason"]}]
        assert reply["excluded"][0]["reason"].startswith("already retiring")
        [w0] = reply["candidates"]
        assert w0["unique_bytes"] >= 3 * MB
        await ev.set()
        assert len(await c.gather([*held, shared, busy])) == 7


async def test_retired_worker_that_registers_again_stays_out_until_its_pod_is_gone() -> None:
    async with cluster(2) as (s, ws, c):
        a, b = (w.address for w in ws)
        [x] = await scatter_to(c, ws[0], 1, 2 * MB, 0)
        await call(s, "amm_core_retire", workers=["w0"], limit=30)
        await until(lambda: records(s)["w0"]["state"] == "done", "done")
        # The pod is not gone yet: the record stays.
        reply = await call(s, "amm_core_forget_retirement", workers=["w0"])
        assert reply["forgotten"] == [] and "still connected" in reply["kept"][0]["reason"]

        # Its process restarts before the pod is deleted (dask-kubernetes#855),
        # while tasks queue on the scheduler for want of threads: a worker turning
        # running would get some at once.
        await ws[0].close()
        await until(lambda: a not in s.workers, "old process gone")
        assert records(s)["w0"]["state"] == "done" and records(s)["w0"]["left"]
        ev = Event()
        await ev.clear()
        queued = c.map(wait_for_event, [ev] * 6, pure=False)
        await until(lambda: s.queued, "tasks queued")
        async with Worker(s.address, name="w0", nthreads=1, memory_limit="4GB") as again:
            new = again.address
            assert s.workers[new].status == Status.closing_gracefully
            await until(lambda: again.status == Status.closing_gracefully, "worker told")
            rec = records(s)["w0"]
            assert (rec["state"], rec["address"], rec["rejoined"], rec["left"]) == (
                "done",
                new,
                1,
                False,
            )
            await ev.set()
            await c.gather(queued)
            assert all(s.tasks[f.key].who_has == {s.workers[b]} for f in queued)
            assert not any(new in where for where in s.plugins["computes"].where.values())
            assert s.workers[new].status == Status.closing_gracefully
            assert not s.workers[new].has_what

            # done is a commit: a cancel cannot put the worker back in service
            reply = await call(s, "amm_core_cancel_retirement", workers=["w0"])
            assert reply["cancelled"] == []
            assert "committed" in reply["kept"][0]["reason"]
            assert s.workers[new].status == Status.closing_gracefully
            assert await c.gather(x) == blob(0, 2 * MB)
        await until(lambda: records(s)["w0"]["left"], "the pod gone")
        assert (await call(s, "amm_core_forget_retirement", workers=["w0"]))[
            "forgotten"
        ] == ["w0"]


async def test_invalid_arguments_are_refused() -> None:
    async with cluster(1) as (s, ws, c):
        for kwargs in [
            {"workers": "w0", "limit": 5},
            {"workers": ["w0"], "limit": 0},
            {"workers": ["w0"], "limit": True},
            {"workers": ["w0"], "limit": 5, "drain": "yes"},
        ]:
            try:
                await call(s, "amm_core_retire", **kwargs)
            except ValueError as e:
                assert "must be" in str(e)
            else:
                raise AssertionError(f"{kwargs} accepted")
        assert await call(s, "amm_core_retirements") == []
        assert s.workers[ws[0].address].status == Status.running


async def test_a_worker_retired_without_keep_out_lets_its_next_process_in() -> None:
    """A preStop hook's retirement (the pod deleted, its Deployment starts another):
    once the old process left, a new one of the same name from another pod (another
    host: the pod's IP) is a running worker."""
    async with cluster(2) as (s, ws, c):
        await scatter_to(c, ws[0], 1, 2 * MB, 0)
        await call(s, "amm_core_retire", workers=["w0"], limit=30, keep_out=False)
        await until(lambda: records(s)["w0"]["state"] == "done", "done")
        assert records(s)["w0"]["keep_out"] is False
        await ws[0].close()
        await until(lambda: records(s)["w0"]["left"], "old process gone")
        async with Worker(s.address, name="w0", nthreads=1, memory_limit="4GB",
                          host=OTHER_POD_HOST) as again:
            await until(lambda: again.address in s.workers
                        and s.workers[again.address].status != Status.init, "registered")
            assert s.workers[again.address].status == Status.running
            assert "w0" not in records(s)
