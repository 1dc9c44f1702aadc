"""The amm_core scheduler plugin and the operator's RPC client for it, against real
schedulers: LocalCluster (scheduler in this process, worker processes) when the test
needs workers and a look at the scheduler's objects, ``dask scheduler`` subprocesses
when the scheduler's own environment matters (env config, preload, no amm_core).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import pytest
from distributed import Client, LocalCluster, Scheduler
from distributed.active_memory_manager import (
    ActiveMemoryManagerPolicy,
    ReduceReplicas,
    RetireWorker,
    Suggestion,
)

import amm_core
import amm_core.rebalance
import amm_core.replicate
import amm_core.retire_paused
from amm_core.config import MIN_INTERVAL, OrderedPolicies, dotted_name as dotted
from amm_core.plugin import PLUGIN_NAME, MemoryPolicyPlugin
from dask_memory_operator.schedulers import install, rpc as scheduler_rpc
from dask_memory_operator.schedulers.rpc import (
    ApplyRejected,
    PluginMissing,
)

REDUCE = "distributed.active_memory_manager.ReduceReplicas"
AMM_ENV = "DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER"
DEADLINE = 30.0


class KeepCopies(ActiveMemoryManagerPolicy):
    """Test-local policy: wants ``copies`` replicas of every key in memory, holds
    state (its number of runs) and reports it."""

    def __init__(self, copies: int = 1, replace: list[dict[str, Any]] | None = None):
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        self.copies = copies
        self.replace = replace or []
        self.runs = 0

    def run(self):  # type: ignore[no-untyped-def]
        self.runs += 1
        for ts in self.manager.scheduler.tasks.values():
            if ts.state == "memory":
                for _ in range(self.copies - len(ts.who_has or ())):
                    yield Suggestion("replicate", ts)

    def report(self) -> dict[str, Any]:
        return {"class": "KeepCopies", "runs": self.runs, "replace": self.replace}


class OpaqueReport(KeepCopies):
    """Test-local policy whose report is not plain data."""

    def report(self) -> dict[str, Any]:
        return {"class": "OpaqueReport", "keys": {"a", "b"}}


#: Tags of the Record policies, in the order they ran (the scheduler of the cluster
#: fixture runs in this process)
RUNS: list[str] = []


class Record(ActiveMemoryManagerPolicy):
    """Test-local policy: notes its tag in RUNS whenever it runs."""

    def __init__(self, tag: str):
        self.tag = tag

    def run(self):  # type: ignore[no-untyped-def]
        RUNS.append(self.tag)
        yield from ()


KEEP = f"{KeepCopies.__module__}.KeepCopies"


class NotAPolicy:
    """Importable, allowed by name, and not an AMM policy."""


@pytest.fixture(autouse=True)
def allow_this_module() -> Iterator[None]:
    """The schedulers here may import this module's policies (amm_core's and
    distributed's are always allowed)."""
    with dask.config.set({"amm-core.allowed-policy-classes": [f"{__name__}.*"]}):
        yield
OPAQUE = f"{OpaqueReport.__module__}.OpaqueReport"
RECORD = f"{Record.__module__}.Record"


def owner(generation: int = 1, uid: str = "uid-1") -> dict[str, Any]:
    return {"uid": uid, "namespace": "default", "name": "mp", "generation": generation}


def config(**overrides: Any) -> dict[str, Any]:
    base = {
        "start": True,
        "interval": "2s",
        "measure": "optimistic",
        "policies": [{"class": REDUCE}],
    }
    return {**base, **overrides}


async def until(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll ``check`` until it returns something truthy; fail after DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[LocalCluster, Client]]:
    async with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        memory_limit="1GiB",
        dashboard_address=":0",
        asynchronous=True,
    ) as cl, Client(cl, asynchronous=True) as client:
        yield cl, client


def amm_of(cl: LocalCluster):  # type: ignore[no-untyped-def]
    return cl.scheduler.extensions["amm"]


def configured(cl: LocalCluster) -> set[ActiveMemoryManagerPolicy]:
    return {p for p in amm_of(cl).policies if not isinstance(p, RetireWorker)}


@contextlib.asynccontextmanager
async def scheduler_process(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[str]:
    """A ``dask scheduler`` subprocess; yields its address once it listens."""
    workdir = tmp_path / f"scheduler-{uuid.uuid4().hex[:8]}"
    workdir.mkdir()
    scheduler_file = workdir / "scheduler.json"
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dask"),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(scheduler_file),
            *args,
        ],
        # Not the repository: nothing may be importable from the working directory
        cwd=workdir,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "scheduler.log", "wb"),
    )
    try:

        async def address() -> str | None:
            assert proc.poll() is None, (workdir / "scheduler.log").read_text()
            if not scheduler_file.exists():
                return None
            try:
                return json.loads(scheduler_file.read_text())["address"]
            except json.JSONDecodeError:  # being written
                return None

        yield await until(address, "the scheduler file")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def preloaded_status(addr: str) -> dict[str, Any]:
    """The status of a preloaded plugin, once it has started."""

    async def started() -> dict[str, Any] | None:
        try:
            return await scheduler_rpc.get_status(addr)
        except PluginMissing:  # preloads start after the scheduler listens
            return None

    return await until(started, "the preloaded plugin")



# --- apply ------------------------------------------------------------------


async def test_plugin_missing_then_apply_sets_the_amm_exactly(cluster):
    cl, client = cluster
    addr = cl.scheduler_address
    with pytest.raises(PluginMissing):
        await scheduler_rpc.get_status(addr)

    # amm_core is importable here already: registered, nothing uploaded
    assert await install.ensure_plugin(addr) == "live"
    assert PLUGIN_NAME in cl.scheduler.plugins
    before = await scheduler_rpc.get_status(addr)
    assert ".zip" not in before["amm_core_path"]
    assert before["owner"] is None and before["workers"] == 2

    status = await scheduler_rpc.apply(
        addr,
        config(
            interval="250ms",
            measure="managed",
            policies=[{"class": REDUCE}, {"class": KEEP, "copies": 1, "replace": []}],
        ),
        owner(),
    )

    amm = amm_of(cl)
    assert amm.running and amm.interval == 0.25 and amm.measure == "managed"
    by_type = {type(p): p for p in amm.policies}
    assert set(by_type) == {ReduceReplicas, KeepCopies}
    assert by_type[KeepCopies].copies == 1
    # the handler the AMM client proxy uses agrees
    assert await client.amm.running() is True

    assert status["owner"] == owner()
    assert status["in_force"] is True
    assert status["amm"]["running"] is True
    assert status["amm"]["interval"] == 0.25
    assert status["amm"]["measure"] == "managed"
    assert status["amm"]["policies"] == [
        {"class": REDUCE, "kwargs": {}, "role": "configured"},
        {"class": KEEP, "kwargs": {"copies": 1, "replace": []}, "role": "configured"},
    ]
    reports = [r for r in status["policy_reports"] if r["class"] == "KeepCopies"]
    assert len(reports) == 1

    # What policies want replaced (amm_core.retire_paused's report()["replace"]) is
    # gathered at the top
    entry = {"address": "tcp://127.0.0.1:1234", "name": "w-1", "retired": True}
    status = await scheduler_rpc.apply(
        addr, config(policies=[{"class": KEEP, "replace": [entry]}]), owner(2)
    )
    assert status["replace"] == [entry]

    # A report that msgpack cannot carry is replaced by an error entry; the rest of
    # the status still arrives
    status = await scheduler_rpc.apply(
        addr, config(policies=[{"class": OPAQUE}, {"class": REDUCE}]), owner(3)
    )
    assert status["policy_reports"] == [
        {"class": "OpaqueReport", "error": "report() is not plain data"}
    ]

    # A second ensure_plugin finds it and registers nothing
    assert await install.ensure_plugin(addr) == "live"


async def test_repeated_apply_keeps_policy_objects_and_repairs_drift(cluster):
    cl, client = cluster
    addr = cl.scheduler_address
    await install.ensure_plugin(addr)
    cfg = config(interval="100ms", policies=[{"class": KEEP, "copies": 1}])

    await scheduler_rpc.apply(addr, cfg, owner(1))
    first = configured(cl)
    (keep,) = first
    await until(lambda: asyncio.sleep(0, keep.runs >= 2), "KeepCopies to run")

    status = await scheduler_rpc.apply(addr, cfg, owner(1))
    assert configured(cl) == first  # the very same objects, state kept
    assert status["policy_reports"][0]["runs"] >= 2

    # Someone stops the AMM behind the operator's back: the same apply repairs it
    # without recreating the policies
    await client.amm.stop()
    assert not amm_of(cl).running
    status = await scheduler_rpc.apply(addr, cfg, owner(1))
    assert amm_of(cl).running and configured(cl) == first
    assert status["in_force"] is True

    # A policy added by someone else shows as foreign, and the same apply takes it
    # out, keeping ours
    amm_of(cl).add_policy(ReduceReplicas())
    status = await scheduler_rpc.get_status(addr)
    assert status["in_force"] is False
    assert {"class": REDUCE, "kwargs": None, "role": "foreign"} in status["amm"]["policies"]
    status = await scheduler_rpc.apply(addr, cfg, owner(1))
    assert configured(cl) == first and status["in_force"] is True

    # One of ours removed behind our back: built anew
    amm_of(cl).policies.discard(keep)
    await scheduler_rpc.apply(addr, cfg, owner(1))
    (rebuilt,) = configured(cl)
    assert rebuilt is not keep and isinstance(rebuilt, KeepCopies)

    # A new generation with the entry unchanged keeps the object, and its state
    runs = rebuilt.runs
    status = await scheduler_rpc.apply(addr, {**cfg, "interval": "150ms"}, owner(2))
    assert configured(cl) == {rebuilt} and status["in_force"] is True
    assert status["owner"] == owner(2) and status["amm"]["interval"] == 0.15
    assert status["policy_reports"][0]["runs"] >= runs

    # So does another MemoryPolicy (uid) with the same entry
    await scheduler_rpc.apply(addr, cfg, owner(2, uid="uid-2"))
    assert configured(cl) == {rebuilt}

    # Changed arguments: a new object built with them
    status = await scheduler_rpc.apply(
        addr, config(interval="100ms", policies=[{"class": KEEP, "copies": 2}]), owner(3)
    )
    (changed,) = configured(cl)
    assert changed is not rebuilt and changed.copies == 2
    assert status["in_force"] is True


async def test_unchanged_entries_keep_their_objects_changed_ones_are_rebuilt(cluster):
    cl, _ = cluster
    addr = cl.scheduler_address
    await install.ensure_plugin(addr)
    cfg = config(
        interval="1h",
        policies=[
            {"class": "RetirePaused", "after": "30s"},
            {"class": KEEP, "copies": 1},
            {"class": KEEP, "copies": 1},
            {"class": REDUCE},
        ],
    )
    await scheduler_rpc.apply(addr, cfg, owner(1))
    by_type: dict[type, list[ActiveMemoryManagerPolicy]] = {}
    for p in configured(cl):
        by_type.setdefault(type(p), []).append(p)
    (retire_paused,) = by_type[amm_core.retire_paused.RetirePaused]
    keeps = set(by_type[KeepCopies])
    assert len(keeps) == 2

    cfg2 = config(
        interval="30m",
        policies=[
            # the same entry by its dotted path instead of its short name: kept
            {"class": "amm_core.retire_paused.RetirePaused", "after": "30s"},
            # two equal entries stay two objects; one of them changes
            {"class": KEEP, "copies": 1},
            {"class": KEEP, "copies": 2},
            # REDUCE left out, a new entry in its place
            {"class": "Rebalance"},
        ],
    )
    status = await scheduler_rpc.apply(addr, cfg2, owner(2))
    now = configured(cl)
    assert len(now) == 4 and status["in_force"] is True
    assert retire_paused in now
    kept = now & keeps
    assert len(kept) == 1 and next(iter(kept)).copies == 1
    (two,) = [p for p in now if isinstance(p, KeepCopies) and p not in keeps]
    assert two.copies == 2
    assert not [p for p in now if isinstance(p, ReduceReplicas)]
    assert [p for p in now if isinstance(p, amm_core.rebalance.Rebalance)]
    assert [p["class"] for p in status["amm"]["policies"]] == [
        e["class"] for e in cfg2["policies"]
    ]

    # Restoring the scheduler's own config keeps nothing it does not list, and a new
    # apply after it builds afresh
    await scheduler_rpc.restore(addr)
    assert not configured(cl) & now
    await scheduler_rpc.apply(addr, cfg2, owner(3))
    assert not configured(cl) & now


async def test_replicate_keeps_wanted_counts_when_a_new_generation_changes_interval(
    cluster,
):
    cl, client = cluster
    addr = cl.scheduler_address
    await install.ensure_plugin(addr)
    cfg = config(
        interval="100ms",
        policies=[
            {"class": "amm_core.replicate.Replicate"},
            # amm_core's reducer honours the wanted counts; upstream's would be swapped
            # for it by register_wanted, behind the plugin's back
            {"class": "amm_core.replicate.ReduceReplicas"},
        ],
    )
    await scheduler_rpc.apply(addr, cfg, owner(1))
    (replicate_policy,) = [
        p for p in configured(cl) if isinstance(p, amm_core.replicate.Replicate)
    ]

    fut = client.submit(bytes, 1_000_000, pure=False)
    await fut
    registered = await amm_core.replicate.replicate(client, [fut], n="all")
    assert registered == {"tracked": 1, "unknown": 0, "amm_running": True}

    async def copies() -> int:
        return len((await client.who_has([fut]))[fut.key])

    async def two_copies() -> bool:
        return await copies() == 2

    await until(two_copies, "Replicate to copy the key to both workers")

    def tracked(status: dict[str, Any]) -> dict[str, Any]:
        (report,) = [r for r in status["policy_reports"] if r["class"] == "Replicate"]
        return report

    # Only the MemoryPolicy's interval changes: a new generation
    status = await scheduler_rpc.apply(addr, {**cfg, "interval": "200ms"}, owner(2))
    assert status["owner"] == owner(2) and status["amm"]["interval"] == 0.2
    assert replicate_policy in configured(cl)
    assert tracked(status)["tracked_keys"] == 1
    assert tracked(status)["tracked_by_count"] == {"all": 1}

    # Enough cycles for the reducer to drop the copy if the count had been forgotten
    cycles = status["amm"]["cycles"]

    async def cycled() -> dict[str, Any] | None:
        status = await scheduler_rpc.get_status(addr)
        return status if status["amm"]["cycles"] >= cycles + 10 else None

    status = await until(cycled, "10 AMM cycles")
    assert await copies() == 2
    assert tracked(status)["tracked_keys"] == 1
    assert status["amm"]["replicas_dropped"] == 0


async def test_an_older_generation_of_the_owner_in_force_changes_nothing(
    cluster, caplog
):
    cl, _ = cluster
    addr = cl.scheduler_address
    await install.ensure_plugin(addr)
    cfg = config(interval="1s", policies=[{"class": KEEP}])
    await scheduler_rpc.apply(addr, cfg, owner(3))
    before = configured(cl)
    amm = amm_of(cl)

    with caplog.at_level("INFO", logger="amm_core.control"):
        status = await scheduler_rpc.apply(
            addr, config(interval="5s", measure="managed"), owner(2)
        )
    assert status["owner"] == owner(3) and status["in_force"] is True
    assert status["amm"]["interval"] == 1.0
    assert status["amm"]["measure"] == "optimistic"
    assert status["amm"]["policies"] == [
        {"class": KEEP, "kwargs": {}, "role": "configured"}
    ]
    assert configured(cl) == before and (amm.interval, amm.measure) == (1.0, "optimistic")
    assert "generation 2" in caplog.text and "generation 3" in caplog.text

    # Not even an invalid config of an older generation is looked at
    status = await scheduler_rpc.apply(addr, config(measure="rss"), owner(1))
    assert status["owner"] == owner(3) and amm.measure == "optimistic"

    # Another MemoryPolicy (uid) at an older generation number does take over, and the
    # owner in force moves on to newer generations
    status = await scheduler_rpc.apply(addr, config(interval="2s"), owner(1, uid="uid-2"))
    assert status["owner"] == owner(1, uid="uid-2") and amm.interval == 2.0
    status = await scheduler_rpc.apply(addr, config(interval="3s"), owner(2, uid="uid-2"))
    assert status["owner"] == owner(2, uid="uid-2") and amm.interval == 3.0


INVALID = [
    # checked against the scheduler's allow list before anything is imported
    ({"policies": [{"class": "no_such_module.Policy"}]}, "is not allowed on this scheduler"),
    ({"policies": [{"class": "collections.OrderedDict"}]}, "is not allowed on this scheduler"),
    ({"policies": [{"class": f"{__name__}.NoSuchPolicy"}]}, "cannot be imported"),
    ({"policies": [{"class": f"{__name__}.NotAPolicy"}]}, "is not an AMM policy"),
    ({"policies": [{"class": "amm_core._room.CountingPolicy"}]}, "abstract"),
    ({"policies": [{"class": KEEP, "nope": 1}]}, "does not accept arguments"),
    ({"policies": [{"class": KEEP, "copies": 0}]}, "copies must be >= 1"),
    # the unchanged entry would keep its object: the other one still fails it all
    ({"policies": [{"class": REDUCE}, {"class": KEEP, "copies": 0}]}, "copies must"),
    ({"policies": [{"copies": 2}]}, "'class' string"),
    ({"measure": "rss"}, "measure 'rss' is not one of"),
    ({"interval": "soon"}, "'soon' is not a positive duration"),
    ({"interval": "-1s"}, "is not a positive duration"),
    ({"interval": -1}, "is not a positive duration"),
    ({"interval": 0}, "is not a positive duration"),
    ({"interval": "1ms"}, "AMM interval '1ms' is below the minimum of 100ms"),
    ({"interval": 0.099}, "is below the minimum of 100ms: the AMM would spin"),
    ({"start": "yes"}, "start must be true or false"),
    ({"polices": []}, "unknown AMM config key"),
]


async def test_invalid_config_is_rejected_and_leaves_the_scheduler_unchanged(cluster):
    cl, _ = cluster
    addr = cl.scheduler_address
    await install.ensure_plugin(addr)
    good = config(interval="1s", measure="managed", policies=[{"class": REDUCE}])
    await scheduler_rpc.apply(addr, good, owner(1))
    amm = amm_of(cl)
    policies = configured(cl)

    for overrides, words in INVALID:
        with pytest.raises(ApplyRejected) as info:
            await scheduler_rpc.apply(addr, {**good, **overrides}, owner(2))
        assert words in info.value.message, info.value.message
        assert "Traceback" not in info.value.message
        assert configured(cl) == policies
        assert (amm.running, amm.interval, amm.measure) == (True, 1.0, "managed")

    status = await scheduler_rpc.get_status(addr)
    assert status["owner"] == owner(1)

    with pytest.raises(ApplyRejected, match="owner"):
        await scheduler_rpc.apply(addr, good, {"name": "no uid"})
    for generation in (None, "3", True):
        with pytest.raises(ApplyRejected, match="generation must be an int"):
            await scheduler_rpc.apply(addr, good, {**owner(), "generation": generation})
    assert (await scheduler_rpc.get_status(addr))["owner"] == owner(1)


async def test_keys_left_out_take_the_schedulers_own_values(cluster):
    cl, _ = cluster
    addr = cl.scheduler_address
    await install.ensure_plugin(addr)
    status = await scheduler_rpc.apply(addr, {"interval": "3s"}, owner())
    assert status["amm"]["interval"] == 3.0
    assert status["amm"]["measure"] == "optimistic"  # distributed's default
    assert [p["class"] for p in status["amm"]["policies"]] == [REDUCE]


async def test_amm_core_builtin_policies_by_short_name_report_plain_data(cluster):
    cl, _ = cluster
    addr = cl.scheduler_address
    await install.ensure_plugin(addr)
    names = list(amm_core.BUILTIN_POLICIES)
    cfg = config(interval="100ms", policies=[{"class": n} for n in names])
    status = await scheduler_rpc.apply(addr, cfg, owner())
    assert [p["class"] for p in status["amm"]["policies"]] == names
    assert {dotted(type(p)) for p in configured(cl)} == set(
        amm_core.BUILTIN_POLICIES.values()
    )

    cycles = status["amm"]["cycles"]

    async def reported() -> dict[str, Any] | None:
        status = await scheduler_rpc.get_status(addr)
        return status if status["amm"]["cycles"] > cycles else None

    status = await until(reported, "AMM cycles with every built-in policy")
    assert status["policy_reports"], "amm_core policies have report()"
    assert not [r for r in status["policy_reports"] if "error" in r]


# --- counters ---------------------------------------------------------------


async def test_counters_count_cycles_copies_and_a_real_reduce_replicas_drop(cluster):
    cl, client = cluster
    addr = cl.scheduler_address
    await install.ensure_plugin(addr)
    await scheduler_rpc.apply(addr, config(start=False, interval="100ms"), owner(1))

    fut = client.submit(bytes, 1_000_000, pure=False)
    await client.wait_for_workers(2)
    await fut
    await client.replicate([fut])
    assert len((await client.who_has([fut]))[fut.key]) == 2
    before = await scheduler_rpc.get_status(addr)
    assert before["amm"]["replicas_dropped"] == 0

    await scheduler_rpc.apply(addr, config(start=True, interval="100ms"), owner(2))

    async def dropped() -> dict[str, Any] | None:
        status = await scheduler_rpc.get_status(addr)
        copies = len((await client.who_has([fut]))[fut.key])
        return status if status["amm"]["replicas_dropped"] >= 1 and copies == 1 else None

    status = await until(dropped, "ReduceReplicas to drop the extra copy")
    assert status["amm"]["replicas_dropped"] == 1
    assert status["amm"]["cycles"] > before["amm"]["cycles"]
    assert status["amm"]["memory_bytes"] > 0

    # And copies: a policy that wants 2 copies of everything
    await scheduler_rpc.apply(
        addr, config(interval="100ms", policies=[{"class": KEEP, "copies": 2}]), owner(3)
    )

    async def copied() -> dict[str, Any] | None:
        status = await scheduler_rpc.get_status(addr)
        copies = len((await client.who_has([fut]))[fut.key])
        return status if status["amm"]["replicas_copied"] >= 1 and copies == 2 else None

    await until(copied, "KeepCopies to copy the key")


# --- retirements ------------------------------------------------------------


async def test_retire_worker_policies_survive_apply_and_restore(cluster):
    cl, _ = cluster
    addr = cl.scheduler_address
    await install.ensure_plugin(addr)
    # A long interval keeps the RetireWorker policy below from ever running by itself:
    # it stands for a retire_workers() call in progress.
    await scheduler_rpc.apply(addr, config(interval="1h"), owner(1))
    amm = amm_of(cl)
    worker = next(iter(cl.scheduler.workers))
    retiring = RetireWorker(worker)
    amm.add_policy(retiring)

    status = await scheduler_rpc.apply(
        addr, config(interval="30m", policies=[{"class": KEEP}]), owner(2)
    )
    assert retiring in amm.policies
    assert status["amm"]["retiring_workers"] == [worker]
    assert {"class": "distributed.active_memory_manager.RetireWorker",
            "kwargs": {"address": worker}, "role": "retirement"} in status["amm"]["policies"]
    assert status["in_force"] is True

    status = await scheduler_rpc.restore(addr)
    assert retiring in amm.policies and status["owner"] is None

    # Stopping the AMM hands the retirement over to an ad-hoc AMM that finishes it
    # (this worker holds no data, so its first run completes it)
    await scheduler_rpc.apply(addr, config(start=False, interval="1h"), owner(3))
    assert not amm.running and retiring not in amm.policies
    side = retiring.manager
    assert side is not amm
    await until(
        lambda: asyncio.sleep(0, retiring not in side.policies and not side.running),
        "the ad-hoc AMM to finish the retirement and stop",
    )
    assert retiring.done()
    status = await scheduler_rpc.get_status(addr)
    assert status["amm"]["retiring_workers"] == []


# --- restore ----------------------------------------------------------------


async def test_restore_brings_back_the_schedulers_own_config(tmp_path):
    env = {
        "DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START": "False",
        "DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__INTERVAL": "3s",
        "DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__MEASURE": "managed",
    }
    async with scheduler_process(tmp_path, env=env) as addr:
        assert await install.ensure_plugin(addr) == "live"
        own = await scheduler_rpc.get_status(addr)
        assert own["amm"]["running"] is False
        assert own["amm"]["interval"] == 3
        assert own["amm"]["measure"] == "managed"

        applied = await scheduler_rpc.apply(
            addr, config(start=True, interval="500ms", measure="process"), owner()
        )
        assert applied["amm"]["running"] is True
        assert applied["amm"]["measure"] == "process"

        restored = await scheduler_rpc.restore(addr)
        assert restored["owner"] is None and restored["in_force"] is True
        assert restored["amm"]["running"] is False
        assert restored["amm"]["interval"] == 3.0
        assert restored["amm"]["measure"] == "managed"
        assert restored["amm"]["policies"] == own["amm"]["policies"]
        async with Client(addr, asynchronous=True) as client:
            assert await client.amm.running() is False
        assert await scheduler_rpc.restore(addr) == await scheduler_rpc.get_status(addr)


# --- installation -----------------------------------------------------------


async def test_preload_reports_preload(tmp_path):
    async with scheduler_process(tmp_path, "--preload", "amm_core.plugin") as addr:
        status = await preloaded_status(addr)
        assert status["source"] == "preload" and status["error"] is None
        assert status["baseline_notes"] == []
        assert await install.ensure_plugin(addr) == "preload"
        status = await scheduler_rpc.apply(addr, config(interval="1s"), owner())
        assert status["source"] == "preload" and status["amm"]["interval"] == 1.0


HIDE_EDITABLE_INSTALL = '''\
"""Hides this project's editable install from this interpreter, so that it behaves
like a scheduler image with dask and distributed but without amm_core.
sitecustomize runs after the .pth files of site-packages, which installed the editable
install's import finder (or, with another setuptools, a path entry to the checkout);
both are taken out again here. Whatever lands on sys.path later (the uploaded zip)
is importable as usual."""
import os
import sys

sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "__name__", "") != "_EditableFinder"]
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "amm_core"))]
'''


async def test_live_install_on_a_scheduler_without_amm_core(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(HIDE_EDITABLE_INSTALL))
    async with scheduler_process(tmp_path, env={"PYTHONPATH": str(site)}) as addr:
        async with Client(addr, asynchronous=True) as client:
            assert await client.run_on_scheduler(importlib.util.find_spec, "amm_core") is None

        assert await install.ensure_plugin(addr) == "live"
        status = await scheduler_rpc.get_status(addr)
        assert status["source"] == "live"
        assert ".zip" in status["amm_core_path"]  # imported from the upload

        # amm_core's policies are importable there now, and run
        cfg = config(
            interval="100ms",
            policies=[{"class": "amm_core.replicate.Replicate"}, {"class": REDUCE}],
        )
        status = await scheduler_rpc.apply(addr, cfg, owner())
        assert [p["class"] for p in status["amm"]["policies"]] == [
            "amm_core.replicate.Replicate",
            REDUCE,
        ]

        cycles = status["amm"]["cycles"]

        async def ran() -> dict[str, Any] | None:
            status = await scheduler_rpc.get_status(addr)
            return status if status["amm"]["cycles"] > cycles else None

        status = await until(ran, "AMM cycles with the uploaded policy")
        assert [r["class"] for r in status["policy_reports"]] == ["Replicate"]
        assert await install.ensure_plugin(addr) == "live"


# --- policy order -------------------------------------------------------------


async def test_policies_run_in_config_order(cluster):
    cl, client = cluster
    addr = cl.scheduler_address
    await install.ensure_plugin(addr)
    amm = amm_of(cl)
    # Eight policies: a set would run them in config order once in 40320 tries
    tags = ["h", "c", "a", "f", "b", "g", "e", "d"]

    async def cycle_order(tags: list[str], generation: int) -> list[str]:
        status = await scheduler_rpc.apply(
            addr,
            config(interval="1h", policies=[{"class": RECORD, "tag": t} for t in tags]),
            owner(generation),
        )
        assert [p["kwargs"]["tag"] for p in status["amm"]["policies"]] == tags
        assert status["in_force"] is True
        RUNS.clear()
        amm.run_once()
        return list(RUNS)

    assert await cycle_order(tags, 1) == tags
    first = configured(cl)
    # Reordered: the objects are kept (same entries), and run in the new order
    assert await cycle_order(tags[::-1], 2) == tags[::-1]
    assert configured(cl) == first
    assert isinstance(amm.policies, OrderedPolicies)

    # Someone puts a plain set back: the order is drift, repaired by the same apply
    amm.policies = set(amm.policies)
    assert (await scheduler_rpc.get_status(addr))["in_force"] is False
    assert await cycle_order(tags[::-1], 2) == tags[::-1]

    # Upstream's retire_workers works with it: its RetireWorker runs after ours and
    # removes itself when done (the worker holds no data)
    worker = next(iter(cl.scheduler.workers))
    retired = await client.retire_workers([worker], close_workers=False, remove=False)
    assert set(retired) == {worker}
    assert not [p for p in amm.policies if isinstance(p, RetireWorker)]
    assert [p.tag for p in amm.policies] == tags[::-1]


# --- the scheduler's own config, MIN_INTERVAL -----------------------------------


def test_min_interval_is_100ms():
    assert MIN_INTERVAL == 0.1


async def test_the_schedulers_own_config_is_read_leniently(tmp_path):
    """What a newer distributed (or a hand-written env var) puts in the scheduler's
    AMM section does not stop a preloaded plugin; what an operator sends is still
    checked strictly."""
    env = {
        # a key this plugin does not know
        f"{AMM_ENV}__FUTURE_KNOB": "1",
        # below MIN_INTERVAL, but the scheduler's own choice
        f"{AMM_ENV}__INTERVAL": "50ms",
        # not a bool: the extension starts on any truthy value
        f"{AMM_ENV}__START": "yes",
    }
    preload = ("--preload", "amm_core.plugin")
    async with scheduler_process(tmp_path, *preload, env=env) as addr:
        status = await preloaded_status(addr)
        assert status["error"] is None and status["source"] == "preload"
        assert status["amm"]["interval"] == 0.05 and status["amm"]["running"] is True
        notes = status["baseline_notes"]
        assert len(notes) == 3, notes
        assert [n for n in notes if "future" in n and "ignored" in n], notes
        assert [n for n in notes if "below the minimum" in n], notes
        assert [n for n in notes if "'yes'" in n and "True taken" in n], notes

        with pytest.raises(ApplyRejected, match="unknown AMM config key"):
            await scheduler_rpc.apply(addr, config(future_knob=1), owner())
        with pytest.raises(ApplyRejected, match="below the minimum of 100ms"):
            await scheduler_rpc.apply(addr, config(interval="50ms"), owner())
        # An interval left out is the scheduler's own, sub-minimum or not
        status = await scheduler_rpc.apply(addr, {"measure": "managed"}, owner())
        assert (status["amm"]["interval"], status["amm"]["measure"]) == (0.05, "managed")
        status = await scheduler_rpc.apply(addr, {"interval": "100ms"}, owner(2))
        assert status["amm"]["interval"] == MIN_INTERVAL
        status = await scheduler_rpc.restore(addr)
        assert status["amm"]["interval"] == 0.05 and status["in_force"] is True


# --- a scheduler without the AMM ----------------------------------------------


@contextlib.contextmanager
def without_amm_config() -> Iterator[None]:
    """The dask config without its distributed.scheduler.active-memory-manager
    section (dask.config.set can add and change keys, not remove them)."""
    scheduler_config = dask.config.config["distributed"]["scheduler"]
    section = scheduler_config.pop("active-memory-manager")
    try:
        yield
    finally:
        scheduler_config["active-memory-manager"] = section


def extensions_without_amm() -> dict[str, Any]:
    from distributed.scheduler import DEFAULT_EXTENSIONS

    return {k: v for k, v in DEFAULT_EXTENSIONS.items() if k != "amm"}


@pytest.mark.parametrize("config_section", [True, False], ids=["config", "no_config"])
async def test_preloaded_on_a_scheduler_without_the_amm_stays_inert(config_section):
    with contextlib.nullcontext() if config_section else without_amm_config():
        async with Scheduler(
            extensions=extensions_without_amm(),
            preload=["amm_core.plugin"],
            dashboard_address=":0",
            port=0,
        ) as s:
            assert "amm" not in s.extensions
            status = await scheduler_rpc.get_status(s.address)
            assert status["source"] == "preload"
            assert "no Active Memory Manager extension" in status["error"]
            assert status["amm"] is None and status["owner"] is None
            assert status["in_force"] is False and status["workers"] == 0
            assert status["amm_core_digest"] == amm_core.source_digest()
            with pytest.raises(ApplyRejected, match="no Active Memory Manager"):
                await scheduler_rpc.apply(s.address, config(), owner())
            with pytest.raises(scheduler_rpc.SchedulerCallFailed) as info:
                await scheduler_rpc.restore(s.address)
            assert info.value.remote_type == "ValueError"
            assert "no Active Memory Manager" in info.value.remote_message


async def test_live_registration_on_a_scheduler_without_the_amm_raises():
    async with Scheduler(
        extensions=extensions_without_amm(), dashboard_address=":0", port=0
    ) as s:
        with pytest.raises(scheduler_rpc.SchedulerCallFailed) as info:
            await install.ensure_plugin(s.address)
        assert info.value.remote_type == "AMMUnavailable"
        assert "no Active Memory Manager extension" in info.value.remote_message
        assert PLUGIN_NAME not in s.plugins and "amm_core_status" not in s.handlers
        # Registered in-process, the same
        with pytest.raises(RuntimeError, match="no Active Memory Manager extension"):
            await MemoryPolicyPlugin(source="live").start(s)
