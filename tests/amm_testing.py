"""Helpers shared by the amm_core policy tests (test_policies, test_rebalance,
test_retire_paused): real LocalClusters of worker processes, one thread each, and
conditions polled with a deadline.

Functions here that run on workers or the scheduler are found there by reference:
the tests' folder is on the worker processes' path, as it is on pytest's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client, LocalCluster, Scheduler

from amm_core._room import CountingPolicy

MB = 2**20

#: Workers never spill, pause at 80% unless a test says otherwise, never get killed.
WORKER_MEMORY = {
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": 0.8,
    "distributed.worker.memory.terminate": False,
}


def wait_for(cond: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    """Poll ``cond`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while not (out := _check(cond, deadline, what)):
        time.sleep(0.05)
    return out


async def until(cond: Callable[[], Any], what: str = "", timeout: float = 30) -> Any:
    """:func:`wait_for` for tests on the event loop of an in-process scheduler."""
    deadline = time.monotonic() + timeout
    while not (out := _check(cond, deadline, what)):
        await asyncio.sleep(0.01)
    return out


def _check(cond: Callable[[], Any], deadline: float, what: str) -> Any:
    out = cond()
    if not out and time.monotonic() > deadline:
        raise AssertionError(f"timed out waiting for {what or cond}")
    return out


@contextmanager
def cluster(
    n: int = 3, memory_limit: str = "1GB", **config: Any
) -> Iterator[tuple[LocalCluster, Client]]:
    """``n`` worker processes; the AMM stopped, measuring "managed", with no policy,
    unless ``config`` (dask config keys) says otherwise."""
    settings = {
        **WORKER_MEMORY,
        "distributed.scheduler.active-memory-manager.start": False,
        "distributed.scheduler.active-memory-manager.measure": "managed",
        "distributed.scheduler.active-memory-manager.policies": [],
        **config,
    }
    with (
        dask.config.set(settings),
        LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=":0",
        ) as lc,
        Client(lc) as c,
    ):
        c.wait_for_workers(n)
        yield lc, c


def add_policies(c: Client, *policies: Any) -> None:
    def add(dask_scheduler: Scheduler) -> None:
        for p in policies:
            dask_scheduler.extensions["amm"].add_policy(p)

    c.run_on_scheduler(add)


def reports(dask_scheduler: Scheduler) -> dict[str, dict]:
    """report() of every counting policy, by class name (run on the scheduler)."""
    return {
        type(p).__name__: p.report()
        for p in dask_scheduler.extensions["amm"].policies
        if isinstance(p, CountingPolicy)
    }


def holders(c: Client, futures: list) -> dict[Any, set[str]]:
    return {k: set(v) for k, v in c.who_has(futures).items()}


def blob(i: int, size: int) -> bytes:
    # Distinct contents, so that reading them back checks the right data moved.
    return i.to_bytes(4, "little") * (size // 4)
