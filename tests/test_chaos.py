"""The chaos test: random ``adaptive`` bound changes on a busy cluster, the operator
killed (SIGKILL) and restarted in some rounds; the job's result is exact, nothing is
lost, re-run or wasted, and the cluster settles consistent.

A few seeded rounds (the driver is :mod:`dask_memory_operator.devstack.chaos`; the
long run is ``benchmarks/chaos.py --rounds 20``).
"""

from __future__ import annotations

import random

import pytest

from dask_memory_operator.devstack import chaos
from dask_memory_operator.devstack.stack import LocalStack

SEED = 7
ROUNDS = 4


@pytest.fixture
def operator(stack: LocalStack):
    operator = chaos.Operator(stack)
    operator.start()
    yield operator
    operator.stop()


@pytest.mark.timeout(240)
def test_random_bounds_and_operator_kills_lose_nothing(stack: LocalStack, namespace: str,
                                                       operator: chaos.Operator):
    result = chaos.run_chaos(stack, namespace, random.Random(SEED), ROUNDS, operator=operator,
                             must_kill=True, seed=SEED, settle_timeout=90)
    print(result.table(), *result.event_log, result.summary(), result.last_line(), sep="\n")
    assert result.kills >= 1
    assert result.wrong == []
    assert result.rerun == {}, f"tasks computed again: {result.rerun}"
    assert result.lost == {}, f"keys lost with a worker: {result.lost}"
    assert result.wasted == {}, f"running tasks whose worker left: {result.wasted}"
    assert result.settled, f"the cluster did not settle: {result.summary()}"
    assert result.closing_gracefully_left == 0 and result.replicas_mismatch == 0
    assert result.in_bounds, result.summary()
    assert result.events["RetiringWorkerLost"] == 0
