"""The Rebalance AMM policy next to other policies, on real LocalClusters (worker
processes, one thread each): it does not fight PressureReduceReplicas over copies
kept for imminent dependents, a move undone by another policy ends at once and the
key cools down, and a cycle examines a bounded number of keys.

AMM cycles are driven with client.amm.run_once(); conditions are polled with a
deadline. The small helpers repeat those of tests/test_policies.py, so that the two
files can change independently.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import dask
import pytest
from distributed import Event, Scheduler, wait
from distributed.active_memory_manager import Suggestion, SuggestionGenerator

from amm_core._room import CountingPolicy
from amm_core.rebalance import Rebalance
from amm_core.reduce import PressureReduceReplicas
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


def block(x: bytes, ev: Event) -> int:
    ev.wait()
    return len(x)


def wait_event(ev: Event, i: int) -> int:
    ev.wait()
    return i


def combine(x: bytes, i: int) -> int:
    return len(x) + i


class DropOnce(CountingPolicy):
    """Test policy: drop one worker's copy of one key in the next cycle, then leave."""

    def __init__(self, key: Any, address: str) -> None:
        super().__init__()
        self.key = key
        self.address = address

    def run(self) -> SuggestionGenerator:
        scheduler = self.manager.scheduler
        ws = yield Suggestion(
            "drop", scheduler.tasks[self.key], {scheduler.workers[self.address]}
        )
        self.count("dropped" if ws is not None else "refused")
        self.manager.policies.remove(self)


def rebalance_of(dask_scheduler: Scheduler) -> dict[str, Any]:
    (policy,) = (
        p for p in dask_scheduler.extensions["amm"].policies if isinstance(p, Rebalance)
    )
    return policy.report()


def test_rebalance_and_pressure_reducer_do_not_undo_each_other() -> None:
    """Keys whose dependent is about to run on the sender stay there: the reducer
    keeps the sender's copy of those, so moving them would be undone and repeated."""
    with cluster(3) as (lc, c):
        a, b, w3 = sorted(c.scheduler_info()["workers"])
        # Skewed data: everything on a. The imminent keys are the newest, which
        # Rebalance considers first.
        plain = [c.submit(blob, i, 10 * MB, workers=[a], pure=False) for i in range(8)]
        imminent = [
            c.submit(blob, 100 + i, 10 * MB, workers=[a], pure=False) for i in range(4)
        ]
        wait(plain + imminent)
        # The running job: inputs computed on a (held by an event), and dependents
        # not assigned yet that need them and an imminent key each.
        ev = Event()
        inputs = [c.submit(wait_event, ev, i, workers=[a], pure=False) for i in range(4)]
        deps = [c.submit(combine, x, y, pure=False) for x, y in zip(imminent, inputs)]

        def job_is_waiting(dask_scheduler: Scheduler) -> bool:
            tasks = [dask_scheduler.tasks.get(f.key) for f in inputs + deps]
            if None in tasks:
                return False  # not submitted yet
            return all(
                ts.processing_on is not None and ts.processing_on.address == a
                for ts in tasks[: len(inputs)]
            ) and all(ts.state == "waiting" for ts in tasks[len(inputs) :])

        wait_for(lambda: c.run_on_scheduler(job_is_waiting), what="job waiting on a")
        # a (120 MB of 1 GB) is not under pressure: the reducer keeps imminent copies.
        add_policies(
            c,
            Rebalance(threshold=0.02),
            PressureReduceReplicas(pressure=1.0, imbalance=None),
        )

        keys = plain + imminent
        moved: dict[Any, int] = defaultdict(int)
        prev = holders(c, keys)
        for _ in range(40):
            c.amm.run_once()
            time.sleep(0.1)  # pacing: copies and drops land between cycles
            now = holders(c, keys)
            for k, ws in now.items():
                assert ws, f"{k} lost its last copy"
                if ws - prev[k]:
                    moved[k] += 1
            prev = now

        rep = c.run_on_scheduler(reports)
        counters = rep["Rebalance"]["counters"]
        assert moved and max(moved.values()) == 1, (moved, rep)
        assert not {f.key for f in imminent} & set(moved), moved
        assert all(prev[f.key] == {a} for f in imminent), prev
        assert sum(b in ws or w3 in ws for ws in prev.values()) >= 4, prev
        assert counters.get("moves_abandoned", 0) == 0, counters
        assert counters.get("moves_undone", 0) == 0, counters
        assert counters["replicas_copied"] == counters["moves_completed"] == len(moved)
        assert rep["PressureReduceReplicas"]["counters"].get("kept_imminent", 0) == 0

        ev.set()
        assert c.gather(deps) == [10 * MB + i for i in range(4)]
        assert c.gather(keys) == [blob(i, 10 * MB) for i in range(8)] + [
            blob(100 + i, 10 * MB) for i in range(4)
        ]
        assert_never_lost(c, keys)


def test_undone_move_ends_at_once_and_key_cools_down() -> None:
    with cluster(2) as (lc, c):
        a, b = sorted(c.scheduler_info()["workers"])
        futs = [c.submit(blob, i, 5 * MB, workers=[a], pure=False) for i in range(4)]
        wait(futs)
        add_policies(
            c, Rebalance(threshold=0.005, max_bytes_per_cycle=6 * MB, cooldown=5)
        )

        # Cycle 1 copies the newest key (the last one the worker computed) to b.
        c.amm.run_once()
        (key,) = wait_for(
            lambda: [k for k, ws in holders(c, futs).items() if b in ws],
            what="copy on b",
        )
        (fut,) = (f for f in futs if f.key == key)

        # A task running on a needs the key: the sender's drop is refused...
        ev = Event()
        blocker = c.submit(block, fut, ev, workers=[a])
        wait_for(lambda: c.processing()[a] == (blocker.key,), what="blocker running")
        c.amm.run_once()
        assert rebalance_of_key_in_flight(c, key)
        # ...and another policy drops the recipient's copy.
        add_policies(c, DropOnce(key, b))
        c.amm.run_once()
        wait_for(lambda: holders(c, [fut])[key] == {a}, what="b's copy dropped")

        # The move ends at the next cycle, not after move_timeout.
        c.amm.run_once()
        rep = c.run_on_scheduler(rebalance_of)
        assert rep["counters"]["moves_undone"] == 1, rep
        assert rep["keys_cooling"] == 1, rep
        assert not rebalance_of_key_in_flight(c, key)

        # During the cool-down the key stays although it is the newest on the
        # sender: an older one moves instead.
        ev.set()
        assert blocker.result() == 5 * MB
        wait_for(lambda: not any(c.processing().values()), what="blocker done")
        others = [f for f in futs if f is not fut]
        before = holders(c, others)
        for _ in range(3):
            c.amm.run_once()
            time.sleep(0.1)
        assert holders(c, [fut])[key] == {a}
        assert holders(c, others) != before
        assert c.gather(futs) == [blob(i, 5 * MB) for i in range(4)]
        assert_never_lost(c, futs)


def rebalance_of_key_in_flight(c: Any, key: Any) -> bool:
    def in_flight(dask_scheduler: Scheduler) -> bool:
        (policy,) = (
            p
            for p in dask_scheduler.extensions["amm"].policies
            if isinstance(p, Rebalance)
        )
        return key in policy.moves

    return c.run_on_scheduler(in_flight)


def test_cycle_examines_at_most_max_keys_per_cycle() -> None:
    with cluster(2) as (lc, c):
        a, b = sorted(c.scheduler_info()["workers"])
        futs = [c.submit(blob, i, 1 * MB, workers=[a], pure=False) for i in range(30)]
        wait(futs)
        add_policies(c, Rebalance(threshold=0.002, max_keys_per_cycle=5))
        c.amm.run_once()
        rep = c.run_on_scheduler(rebalance_of)
        assert rep["last_cycle"]["keys_examined"] == 5, rep
        assert rep["counters"]["scan_capped"] == 1, rep
        assert rep["counters"]["replicas_copied"] == 5, rep
        # Over more cycles the moves go on.
        def cycle_and_count() -> bool:
            c.amm.run_once()
            return sum(b in ws for ws in holders(c, futs).values()) >= 10

        wait_for(cycle_and_count, what="more keys on b")
        assert c.gather(futs) == [blob(i, 1 * MB) for i in range(30)]
        assert_never_lost(c, futs)


def test_no_room_skips_keys_without_scanning_recipients() -> None:
    """With no room anywhere nothing moves, the cycle still counts no_room, and it
    stops at the cap."""
    with cluster(2) as (lc, c):
        a, b = sorted(c.scheduler_info()["workers"])
        futs = [c.submit(blob, i, 2 * MB, workers=[a], pure=False) for i in range(20)]
        wait(futs)
        add_policies(c, Rebalance(threshold=0.002, max_keys_per_cycle=8))
        with dask.config.set({"distributed.worker.memory.pause": 0.001}):
            c.amm.run_once()
        rep = c.run_on_scheduler(rebalance_of)
        assert rep["counters"].get("replicas_copied", 0) == 0, rep
        assert rep["counters"]["no_room"] == 1, rep
        assert rep["last_cycle"]["keys_examined"] == 8, rep


@pytest.mark.parametrize(
    "kwargs",
    [{"cooldown": -1}, {"max_keys_per_cycle": 0}, {"max_scan": -1}],
)
def test_invalid_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Rebalance(**kwargs)
