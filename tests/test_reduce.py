"""PressureReduceReplicas on a real LocalCluster (worker processes, 1 thread each).

The AMM is configured from plain dask config but not started: each test triggers a
cycle with ``client.amm.run_once()``, so that what is dropped is decided by the policy
at a known moment, and reads the scheduler's state through ``run_on_scheduler``.
Whether a copy was lost is asserted from the scheduler (``amm_testing.KeyHistory``):
a lost key is recomputed, identically, so no result can tell.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import pytest
from distributed import Client, Event, LocalCluster

from amm_core.reduce import PressureReduceReplicas
from amm_core.replicate import replicate
from amm_testing import assert_never_lost, recomputed, track_keys

POLICY = "amm_core.reduce.PressureReduceReplicas"


@contextmanager
def cluster(
    n_workers: int = 3, start: bool = False, **policy_kwargs: Any
) -> Iterator[tuple[Client, list[str]]]:
    """A cluster whose AMM runs only PressureReduceReplicas, set up by dask config.
    No key may be computed twice (a dropped last copy would be recomputed)."""
    config = {
        "distributed.scheduler.active-memory-manager.start": start,
        "distributed.scheduler.active-memory-manager.interval": "50ms",
        "distributed.scheduler.active-memory-manager.policies": [
            {"class": POLICY, **policy_kwargs}
        ],
    }
    with (
        dask.config.set(config),
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            memory_limit="1GB",
            processes=True,
            dashboard_address=":0",
        ) as lc,
        Client(lc) as client,
    ):
        client.wait_for_workers(n_workers)
        track_keys(client)
        yield client, sorted(client.scheduler_info()["workers"])
        assert not recomputed(client), recomputed(client)


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.05)


def holders(client: Client, key: Any) -> set[str]:
    return set(client.who_has().get(key, ()))


def _processing_on(dask_scheduler: Any, key: str) -> str | None:
    ts = dask_scheduler.tasks.get(key)
    return ts.processing_on.address if ts and ts.processing_on else None


def _reports(dask_scheduler: Any) -> list[dict[str, Any]]:
    amm = dask_scheduler.extensions["amm"]
    return [p.report() for p in amm.policies if isinstance(p, PressureReduceReplicas)]


def _heaviest(dask_scheduler: Any) -> str:
    amm = dask_scheduler.extensions["amm"]
    return max(
        dask_scheduler.workers.values(), key=lambda ws: getattr(ws.memory, amm.measure)
    ).address


def heaviest(client: Client) -> str:
    """The worker with the most memory by the AMM's measure."""
    return client.run_on_scheduler(_heaviest)


def _waiter_states(dask_scheduler: Any, key: str) -> list[str]:
    return sorted(w.state for w in dask_scheduler.tasks[key].waiters or ())


def filled(nbytes: int) -> bytes:
    """Bytes that occupy RSS (``bytes(n)`` is zero pages the kernel does not map)."""
    return b"x" * nbytes


def wait_on_event(name: str, *inputs: Any) -> int:
    Event(name).wait()
    return sum(len(i) if isinstance(i, bytes) else int(i) for i in inputs)


def test_loads_from_dask_config() -> None:
    with cluster(pressure=0.3, imbalance=None, max_scan=8) as (client, _):
        reports = client.run_on_scheduler(_reports)
    assert len(reports) == 1
    assert reports[0]["class"] == "PressureReduceReplicas"
    assert reports[0]["config"] == {
        "pressure": 0.3,
        "imbalance": None,
        "keep_imminent": True,
        "keep_queued": True,
        "idle_below": 0.0,
        "max_scan": 8,
    }


@pytest.mark.parametrize(
    "kwargs, copies",
    [
        ({}, 1),
        # Workers below 90% of their pause threshold keep a copy per unassigned
        # dependent, as upstream does (imbalance=None: whether a worker's process
        # memory is above the mean by 25% must not decide the outcome).
        ({"idle_below": 0.9, "imbalance": None}, 2),
    ],
)
def test_copies_kept_for_unassigned_dependents(
    kwargs: dict[str, Any], copies: int
) -> None:
    """Upstream keeps a copy per dependent not yet assigned; by default this policy
    drops them, since where those dependents will run is unknown."""
    with cluster(**kwargs) as (client, (a, b, c)):
        x = client.submit(bytes, 10_000_000, workers=[a], key="x")
        # The dependents of x wait on `later`, which waits on `gate`: neither
        # assigned nor about to be, so no worker is known to need x soon.
        gate = client.submit(wait_on_event, "gate", workers=[b], key="gate")
        later = client.submit(lambda g: g, gate, key="later")
        deps = [
            client.submit(wait_on_event, "never", x, later, key=f"dep-{i}")
            for i in range(2)
        ]
        x.result()
        client.replicate([x], n=3)
        assert holders(client, "x") == {a, b, c}
        wait_for(
            lambda: client.run_on_scheduler(_waiter_states, key="x") == ["waiting"] * 2
        )

        client.amm.run_once()
        wait_for(lambda: len(holders(client, "x")) == copies)
        [report] = client.run_on_scheduler(_reports)
        assert report["counters"]["replicas_dropped"] == 3 - copies
        assert report["counters"]["bytes_dropped"] >= (3 - copies) * 10_000_000
        # One copy kept per unassigned dependent when idle (the counter sums cycles)
        assert report["counters"]["kept_idle"] == (2 if kwargs else 0)
        assert all(d.status == "pending" for d in deps)


def test_keeps_copy_a_processing_task_needs() -> None:
    with cluster() as (client, (a, b, c)):
        x = client.submit(bytes, 10_000_000, workers=[a], key="x")
        x.result()
        client.replicate([x], n=3)
        assert holders(client, "x") == {a, b, c}
        running = client.submit(wait_on_event, "go", x, workers=[b], key="running")
        wait_for(lambda: client.run_on_scheduler(_processing_on, key="running") == b)

        client.amm.run_once()
        wait_for(lambda: holders(client, "x") == {b})
        # Several more cycles: the last copy, needed on b, stays.
        for _ in range(3):
            client.amm.run_once()
        assert holders(client, "x") == {b}
        Event("go", client=client).set()
        assert running.result() == 10_000_000
        assert_never_lost(client, [x])


@pytest.mark.parametrize("keep_imminent", [True, False])
def test_keeps_copy_for_imminent_dependent(keep_imminent: bool) -> None:
    """A dependent whose other input is being computed on b will run on b: the copy
    on b stays, although b is the heaviest worker (the AMM otherwise drops there)."""
    with cluster(keep_imminent=keep_imminent, imbalance=None, pressure=0.9) as (
        client,
        (a, b, c),
    ):
        ballast = client.submit(filled, 200_000_000, workers=[b], key="ballast")
        x = client.submit(bytes, 10_000_000, workers=[a], key="x")
        x.result()
        # The AMM's measure (optimistic) follows the heartbeats' process memory.
        wait_for(lambda: heaviest(client) == b)
        client.replicate([x], n=3)
        y = client.submit(wait_on_event, "y", workers=[b], key="y")
        wait_for(lambda: client.run_on_scheduler(_processing_on, key="y") == b)
        z = client.submit(wait_on_event, "z", x, y, key="z")
        wait_for(
            lambda: client.run_on_scheduler(_waiter_states, key="x") == ["waiting"]
        )

        client.amm.run_once()
        wait_for(lambda: len(holders(client, "x")) == 1)
        assert (holders(client, "x") == {b}) is keep_imminent
        Event("y", client=client).set()
        Event("z", client=client).set()
        assert z.result() == 10_000_000
        del ballast


@pytest.mark.parametrize(
    "kwargs, copies",
    [
        ({}, 3),
        ({"keep_queued": False}, 1),
        # Every worker holding data is "under pressure": only processing needs count.
        ({"pressure": 0.0, "imbalance": None}, 1),
    ],
)
def test_copies_for_queued_dependents(kwargs: dict[str, Any], copies: int) -> None:
    """Queued root-ish tasks run wherever a thread frees up: their input stays on
    every holder (one copy per queued task at most), unless keep_queued is off or
    the holders are under memory pressure."""
    with cluster(**kwargs) as (client, (a, b, c)):
        x = client.submit(bytes, 1_000_000, workers=[a], key="x")
        x.result()
        client.replicate([x], n=3)
        # 9 blockers fill the 3 x 2 slots (worker-saturation 1.1) and queue 3 more;
        # the 30 tasks reading x, root-ish (one group, one small dependency), queue
        # behind them: none is assigned to a worker.
        blockers = client.map(
            wait_on_event, ["block"] * 9, key=[f"b-{i}" for i in range(9)]
        )
        wait_for(lambda: len(client.processing()[a]) == 2)
        readers = client.map(
            wait_on_event, ["block"] * 30, [x] * 30, key=[f"r-{i}" for i in range(30)]
        )
        wait_for(
            lambda: client.run_on_scheduler(_waiter_states, key="x") == ["queued"] * 30
        )
        client.amm.run_once()
        assert len(holders(client, "x")) == copies
        Event("block", client=client).set()
        assert client.gather(readers) == [1_000_000] * 30
        assert client.gather(blockers) == [0] * 9


def test_honours_wanted_replicas() -> None:
    with cluster() as (client, (a, b, c)):
        x = client.submit(bytes, 10_000_000, workers=[a], key="x")
        x.result()
        replicate(client, [x], n=2)
        client.amm.run_once()  # Replicate makes the second copy
        wait_for(lambda: len(holders(client, "x")) == 2)
        client.replicate([x], n=3)  # upstream's blocking replicate adds a third
        assert len(holders(client, "x")) == 3

        client.amm.run_once()
        wait_for(lambda: len(holders(client, "x")) == 2)
        for _ in range(3):
            client.amm.run_once()
        assert len(holders(client, "x")) == 2


def _replicated_keys(dask_scheduler: Any) -> int:
    return len(dask_scheduler.replicated_tasks)


def test_result_unchanged_and_copies_dropped() -> None:
    """A dot product computed with the policy running between the tasks equals the
    one computed without it, the copies the computation spread are dropped, and no
    chunk lost its last copy on the way (the scheduler saw none leave memory or
    computed twice).

    ``A`` is persisted: the chunks each worker fetched for its matmul tasks stay
    there after the computation, until a reducer drops them. Cycles are driven with
    ``run_once`` while the graph runs, then until every chunk has one copy, so that
    the outcome does not depend on how fast the machine runs the graph.
    """
    rng = da.random.default_rng(42)
    A = rng.random((1500, 1500), chunks=(250, 250))
    expected = (A @ A.T).sum().compute(scheduler="sync")
    with cluster(n_workers=3) as (client, _):
        A = A.persist()
        total = (A @ A.T).sum()
        future = client.compute(total)
        while not future.done():
            client.amm.run_once()
            time.sleep(0.05)  # one cycle per poll, as the AMM's own interval would
        result = future.result()

        def one_copy_each() -> bool:
            client.amm.run_once()
            return all(len(w) == 1 for w in client.who_has(A).values())

        wait_for(one_copy_each)
        assert client.run_on_scheduler(_replicated_keys) == 0
        [report] = client.run_on_scheduler(_reports)
        assert_never_lost(client, A)
    assert result == expected
    assert report["counters"]["replicas_dropped"] > 0


def test_benchmark_quick_mode(tmp_path: Path) -> None:
    """The benchmark runs end to end at a small size and ends with its ratio line."""
    script = Path(__file__).parent.parent / "benchmarks" / "seed_dot_product.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    ).stdout
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"peak_ratio_vs_upstream=\d+\.\d+ wall_ratio_vs_upstream=\d+\.\d+"
        r" peak_ratio_vs_floor=\d+\.\d+",
        last,
    )
    assert list(tmp_path.glob("*.png"))
