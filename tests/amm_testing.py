"""Helpers shared by the amm_core policy tests (test_policies, test_rebalance,
test_retire_paused, test_reduce): real LocalClusters of worker processes, one thread
each, conditions polled with a deadline, and what the scheduler saw of each key.

"Nothing was lost" cannot be told from a result: the scheduler recomputes a lost key,
identically. :class:`KeyHistory`, a scheduler plugin, counts per key how often it was
computed and how often it left memory; :func:`assert_never_lost` asserts from it, and
:func:`cluster` asserts at its end that no key was computed twice.

Functions here that run on workers or the scheduler are found there by reference:
the tests' folder is on the worker processes' path, as it is on pytest's.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import dask
from dask.typing import Key
from distributed import Client, LocalCluster, Scheduler
from distributed.client import futures_of
from distributed.diagnostics.plugin import SchedulerPlugin

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


class KeyHistory(SchedulerPlugin):
    """Per key: how often it was computed (processing -> memory) and how often it
    left memory (lost with a worker or its last copy dropped, or released)."""

    name = "amm-testing-key-history"

    #: Completed computations per key
    computed: Counter[Key]
    #: Transitions out of memory per key
    left_memory: Counter[Key]

    def __init__(self) -> None:
        self.computed = Counter()
        self.left_memory = Counter()

    def transition(
        self, key: Key, start: str, finish: str, *args: Any, **kwargs: Any
    ) -> None:
        if start == "processing" and finish == "memory":
            self.computed[key] += 1
        elif start == "memory" and finish != "memory":
            self.left_memory[key] += 1


def track_keys(c: Client) -> None:
    """Install :class:`KeyHistory` on the scheduler."""
    c.register_plugin(KeyHistory())


def _history(dask_scheduler: Scheduler) -> KeyHistory:
    plugin = dask_scheduler.plugins[KeyHistory.name]
    assert isinstance(plugin, KeyHistory)
    return plugin


def _recomputed(dask_scheduler: Scheduler) -> dict[Key, int]:
    return {k: n for k, n in _history(dask_scheduler).computed.items() if n > 1}


def recomputed(c: Client) -> dict[Key, int]:
    """Keys computed more than once since :func:`track_keys`, with their count."""
    return c.run_on_scheduler(_recomputed)


def _lost(dask_scheduler: Scheduler, keys: list[Key]) -> dict[Key, str]:
    history = _history(dask_scheduler)
    out = {}
    for key in keys:
        ts = dask_scheduler.tasks.get(key)
        state = ts.state if ts is not None else "forgotten"
        if history.computed[key] > 1 or history.left_memory[key] or state != "memory":
            out[key] = (
                f"computed {history.computed[key]}x, left memory "
                f"{history.left_memory[key]}x, now {state}"
            )
    return out


def assert_never_lost(c: Client, futures: Iterable[Any]) -> None:
    """The keys of ``futures`` (held all along by the test) are in memory, never left
    it and were computed at most once, as the scheduler saw them."""
    keys = [f.key for f in futures_of(list(futures))]
    assert keys
    lost = c.run_on_scheduler(_lost, keys=keys)
    assert not lost, lost


@contextmanager
def cluster(
    n: int = 3, memory_limit: str = "1GB", **config: Any
) -> Iterator[tuple[LocalCluster, Client]]:
    """``n`` worker processes; the AMM stopped, measuring "managed", with no policy,
    unless ``config`` (dask config keys) says otherwise. The scheduler tracks the
    keys (:func:`track_keys`); at the end no key may have been computed twice."""
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
        track_keys(c)
        yield lc, c
        assert not recomputed(c), f"keys computed more than once: {recomputed(c)}"


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
