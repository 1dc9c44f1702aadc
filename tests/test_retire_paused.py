"""RetirePaused beyond the basics in test_policies.py, on real LocalClusters (worker
processes, one thread each):

- ``retired`` is recomputed at every cycle: a task still running on the worker when it
  was retired leaves its only copy there later, and that key is moved too;
- a retirement survives its RetirePaused being rebuilt by the scheduler plugin (a
  changed ``after``): the new object reports it and handles its abort;
- the ``amm_replace`` handler is there as soon as the policy joins an AMM.

The scheduler of a LocalCluster runs in this process: the scheduler-side config (the
pause fraction that workers_with_room reads) is set here with dask.config.set. A
worker is paused by lowering its own memory_pause_fraction through client.run; its
process alone is above 10% of 500 MB. Conditions are polled with a deadline;
``client.amm.run_once()`` runs one full AMM cycle on the scheduler before it returns.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import dask
import pytest
from distributed import Client, Event, LocalCluster, Scheduler, wait
from distributed.core import Status, rpc

from amm_core.plugin import PLUGIN_NAME, MemoryPolicyPlugin
from amm_core.retire_paused import (
    HANDLER,
    RetirePaused,
    RetireWorkerWithRoom,
    set_status,
)
from amm_testing import (
    MB,
    assert_never_lost,
    blob,
    cluster as amm_cluster,
    holders,
    wait_for,
)

AMM = "distributed.scheduler.active-memory-manager"


def cluster(n: int, after: str) -> AbstractContextManager[tuple[LocalCluster, Client]]:
    """The AMM running every 200 ms with RetirePaused(after)."""
    return amm_cluster(
        n,
        memory_limit="500MB",
        **{
            f"{AMM}.start": True,
            f"{AMM}.interval": "200ms",
            f"{AMM}.measure": "managed",
            f"{AMM}.policies": [{"class": "amm_core.retire_paused.RetirePaused", "after": after}],
        },
    )


def late_blob(ev: Event, i: int, size: int) -> bytes:
    """A task still running when its worker is retired."""
    ev.wait()
    return blob(i, size)


def lower_pause(dask_worker: Any) -> None:
    dask_worker.memory_manager.memory_pause_fraction = 0.1


def the_policy(dask_scheduler: Scheduler) -> RetirePaused:
    (policy,) = [
        p for p in dask_scheduler.extensions["amm"].policies if isinstance(p, RetirePaused)
    ]
    return policy


def report(dask_scheduler: Scheduler) -> dict[str, Any]:
    return the_policy(dask_scheduler).report()


def processing_on(dask_scheduler: Scheduler, key: str) -> str | None:
    # None also while the submission is on its way to the scheduler
    ts = dask_scheduler.tasks.get(key)
    ws = ts.processing_on if ts is not None else None
    return ws.address if ws is not None else None


def status(c: Client, address: str) -> str:
    return c.scheduler_info()["workers"][address]["status"]


def amm_replace(c: Client) -> list[dict]:
    # What an outside caller (the operator) does: plain msgpack over RPC (which
    # decodes lists as tuples).
    async def call() -> list[dict]:
        async with rpc(c.scheduler.address) as r:
            return list(await r.amm_replace())

    return c.sync(call)


def start_blocked(c: Client, a: str, n: int) -> tuple[list, Any, Event]:
    """On worker ``a``: ``n`` keys of 10 MB, and one more task running until its
    event is set."""
    futs = [c.submit(blob, i, 10 * MB, workers=[a], pure=False) for i in range(n)]
    wait(futs)
    ev = Event()
    late = c.submit(late_blob, ev, n, 10 * MB, workers=[a], pure=False)
    wait_for(lambda: c.run_on_scheduler(processing_on, key=late.key) == a)
    return futs, late, ev


@pytest.mark.parametrize("removed", [False, True], ids=["kept", "removed_by_hand"])
def test_key_landing_after_retirement_is_moved_before_retired(removed: bool) -> None:
    """removed_by_hand: someone removes the RetireWorkerWithRoom from the AMM while
    the task runs; RetirePaused starts a new one when the unique key appears."""
    with cluster(3, after="1s") as (lc, c):
        a = sorted(c.scheduler_info()["workers"])[0]
        futs, late, ev = start_blocked(c, a, 4)
        c.run(lower_pause, workers=[a])

        wait_for(lambda: status(c, a) == "closing_gracefully", what="retiring")
        wait_for(
            lambda: all(a not in ws for ws in holders(c, futs).values()),
            what="keys moved off",
        )
        # The keys are gone, but a still runs a task: not safe to kill.
        c.amm.run_once()
        [entry] = amm_replace(c)
        assert entry["address"] == a and entry["retired"] is False
        assert c.run_on_scheduler(processing_on, key=late.key) == a

        if removed:

            def remove(dask_scheduler: Scheduler) -> int:
                amm = dask_scheduler.extensions["amm"]
                mine = [p for p in amm.policies if isinstance(p, RetireWorkerWithRoom)]
                for p in mine:
                    amm.policies.remove(p)
                return len(mine)

            assert c.run_on_scheduler(remove) == 1

        ev.set()
        # The task's result lands on a only; it is moved, then a is retired.
        wait_for(lambda: [e["retired"] for e in amm_replace(c)] == [True])
        assert all(a not in ws for ws in holders(c, [*futs, late]).values())
        assert_never_lost(c, [*futs, late])
        assert c.gather([*futs, late]) == [blob(i, 10 * MB) for i in range(5)]
        assert status(c, a) == "closing_gracefully"
        counters = c.run_on_scheduler(report)["counters"]
        assert counters == {
            "retirements_started": 1,
            "workers_retired": 1,
            **({"retirements_restarted": 1} if removed else {}),
        }


def test_retirement_survives_rebuilt_policy_and_its_abort_is_handled() -> None:
    with cluster(2, after="1s") as (lc, c):
        a, b = sorted(c.scheduler_info()["workers"])
        c.register_plugin(MemoryPolicyPlugin())
        futs, late, ev = start_blocked(c, a, 4)
        c.run(lower_pause, workers=[a])
        wait_for(
            lambda: all(ws == {b} for ws in holders(c, futs).values()),
            what="keys moved off",
        )
        [before] = amm_replace(c)
        old = c.run_on_scheduler(lambda dask_scheduler: id(the_policy(dask_scheduler)))

        # A MemoryPolicy changes ``after``: the plugin builds a new RetirePaused and
        # drops the old one, keeping the RetireWorkerWithRoom.
        def apply(dask_scheduler: Scheduler) -> dict:
            plugin = dask_scheduler.plugins[PLUGIN_NAME]
            policies = [{"class": "RetirePaused", "after": "2s"}]
            owner = {"uid": "u", "namespace": "ns", "name": "mp", "generation": 1}
            return plugin.apply({"policies": policies}, owner)

        status_ = c.run_on_scheduler(apply)
        assert status_["in_force"] is True
        assert c.run_on_scheduler(
            lambda dask_scheduler: id(the_policy(dask_scheduler))
        ) != old
        c.amm.run_once()
        rep = c.run_on_scheduler(report)
        assert rep["after"] == 2
        # Still listed, with the times of the retirement started by the old object
        assert rep["replace"] == [before] == amm_replace(c)
        assert rep["counters"] == {"retirements_adopted": 1}
        assert c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins[
            PLUGIN_NAME].status()["replace"]) == [before]

        # The late key cannot go anywhere (scheduler side only: b has 1 MB of room):
        # the retirement aborts, a is paused again, the new object retries it.
        with dask.config.set({"distributed.worker.memory.pause": 0.002}):
            ev.set()
            wait_for(
                lambda: c.run_on_scheduler(report)["counters"].get(
                    "retirements_aborted"
                ),
                what="abort",
            )
            wait_for(lambda: status(c, a) == "paused", what="back to paused")
            assert holders(c, [late])[late.key] == {a}
        # With room, the new object retires it again.
        wait_for(lambda: [e["retired"] for e in amm_replace(c)] == [True])
        assert all(ws == {b} for ws in holders(c, [*futs, late]).values())
        assert_never_lost(c, [*futs, late])
        assert c.gather([*futs, late]) == [blob(i, 10 * MB) for i in range(5)]
        counters = c.run_on_scheduler(report)["counters"]
        assert counters["retirements_adopted"] == 1
        assert counters["retirements_aborted"] >= 1
        assert counters["retirements_started"] == counters["retirements_aborted"]
        assert counters["workers_retired"] == 1
        [entry] = amm_replace(c)
        assert entry["retiring_since"] - entry["paused_since"] >= 2


def retirement_policies(dask_scheduler: Scheduler) -> list[str]:
    return [
        p.address
        for p in dask_scheduler.extensions["amm"].policies
        if isinstance(p, RetireWorkerWithRoom)
    ]


def test_retired_worker_stays_in_amm_until_taken_out_of_retirement() -> None:
    with cluster(2, after="1s") as (lc, c):
        a, b = sorted(c.scheduler_info()["workers"])
        c.run(lower_pause, workers=[a])
        wait_for(lambda: [e["retired"] for e in amm_replace(c)] == [True])
        # Unlike upstream's RetireWorker, it stays after the worker is empty.
        c.amm.run_once()
        c.amm.run_once()
        assert c.run_on_scheduler(retirement_policies) == [a]

        # Someone takes a out of retirement (and its memory is fine again).
        def unpause(dask_worker: Any) -> None:
            dask_worker.memory_manager.memory_pause_fraction = 0.8

        def back_to_running(dask_scheduler: Scheduler) -> None:
            ws = dask_scheduler.workers[a]
            set_status(dask_scheduler, ws, Status.running)

        c.run(unpause, workers=[a])
        c.run_on_scheduler(back_to_running)
        c.amm.run_once()
        assert amm_replace(c) == []
        assert c.run_on_scheduler(retirement_policies) == []
        assert c.run_on_scheduler(report)["counters"] == {
            "retirements_started": 1,
            "workers_retired": 1,
            "retirements_cancelled": 1,
        }
        assert status(c, a) == "running"
        # It can take data again.
        fut = c.submit(blob, 0, MB, workers=[a])
        wait(fut)
        assert c.who_has([fut])[fut.key] == (a,)


async def test_handler_installed_when_policy_joins_an_amm() -> None:
    config = {
        f"{AMM}.start": False,
        f"{AMM}.policies": [
            {"class": "amm_core.retire_paused.RetirePaused", "after": "45s"}
        ],
    }
    with dask.config.set(config):
        async with Scheduler(dashboard_address=":0", port=0) as s:
            # From the dask config, before any AMM cycle
            assert HANDLER in s.handlers
            assert s.handlers[HANDLER]() == []

    with dask.config.set({f"{AMM}.start": False, f"{AMM}.policies": []}):
        async with Scheduler(dashboard_address=":0", port=0) as s:
            assert HANDLER not in s.handlers
            s.extensions["amm"].add_policy(RetirePaused())
            assert s.handlers[HANDLER]() == []


def test_shared_keys_only_on_other_retiring_workers_are_not_retired() -> None:
    """Two paused workers hold the only copies of a key: neither is retired until
    the key sits on a third. Cycles are driven by hand (the AMM is stopped), so the
    check runs while the copy is still to be made."""
    with amm_cluster(
        3,
        memory_limit="500MB",
        **{
            f"{AMM}.start": False,
            f"{AMM}.policies": [
                {"class": "amm_core.retire_paused.RetirePaused", "after": "0s"}
            ],
        },
    ) as (lc, c):
        a, b, third = sorted(c.scheduler_info()["workers"])
        [x] = c.scatter([blob(1, 10 * MB)], workers=[a, b], broadcast=True)
        c.run(lower_pause, workers=[a, b])
        wait_for(lambda: status(c, a) == status(c, b) == "paused", what="paused")
        c.amm.run_once()  # both retire
        c.amm.run_once()  # the copy to the third worker is asked for
        entries = amm_replace(c)
        assert sorted(e["address"] for e in entries) == [a, b]
        assert holders(c, [x])[x.key] <= {a, b, third}
        assert [e["retired"] for e in entries] == [False, False]

        def retired() -> bool:
            c.amm.run_once()
            return [e["retired"] for e in amm_replace(c)] == [True, True]

        wait_for(retired, what="both retired")
        assert third in holders(c, [x])[x.key]
        assert c.gather(x) == blob(1, 10 * MB)


@pytest.mark.parametrize("how", ["apply_without", "restore"])
def test_dropping_retire_paused_puts_its_retirements_back(how: str) -> None:
    """RetirePaused leaves the config (a MemoryPolicy without it, or the scheduler's
    own config restored): its retirement goes back to paused and its
    RetireWorkerWithRoom detaches, instead of closing_gracefully forever."""
    with amm_cluster(
        2,
        memory_limit="500MB",
        **{f"{AMM}.start": True, f"{AMM}.interval": "200ms", f"{AMM}.policies": []},
    ) as (lc, c):
        a, b = sorted(c.scheduler_info()["workers"])
        c.register_plugin(MemoryPolicyPlugin())

        def apply(dask_scheduler: Scheduler, policies: list, generation: int) -> dict:
            plugin = dask_scheduler.plugins[PLUGIN_NAME]
            owner = {"uid": "u", "namespace": "ns", "name": "mp", "generation": generation}
            return plugin.apply({"policies": policies}, owner)

        c.run_on_scheduler(
            apply, policies=[{"class": "RetirePaused", "after": "1s"}], generation=1
        )
        futs, late, ev = start_blocked(c, a, 2)
        c.run(lower_pause, workers=[a])
        wait_for(lambda: status(c, a) == "closing_gracefully", what="retiring")
        assert c.run_on_scheduler(retirement_policies) == [a]

        if how == "restore":
            c.run_on_scheduler(
                lambda dask_scheduler: dask_scheduler.plugins[PLUGIN_NAME].restore()
            )
        else:
            c.run_on_scheduler(apply, policies=[], generation=2)
        wait_for(lambda: status(c, a) == "paused", what="back to paused")
        assert c.run_on_scheduler(retirement_policies) == []
        c.amm.run_once()
        assert status(c, a) == "paused"
        ev.set()
        assert c.gather([*futs, late]) == [blob(i, 10 * MB) for i in range(3)]
