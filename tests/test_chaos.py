"""The chaos tests, a few seeded rounds each (the driver is
:mod:`dmo_devstack.chaos`; the long runs are ``benchmarks/chaos.py
--rounds 20`` and ``benchmarks/chaos.py --mode drain --rounds 20``):

- random ``adaptive`` bound changes on a busy cluster, the operator killed (SIGKILL)
  and restarted in some rounds;
- node drains: several worker pods born with the preStop hook evicted at once, one
  running a seceded task.

Each time the job's result is exact, nothing is lost, re-run or wasted, and the
cluster settles consistent.
"""

from __future__ import annotations

import random

import pytest

from dmo_devstack import chaos
from dmo_devstack.stack import LocalStack

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


DRAIN_SEED = 3
DRAIN_ROUNDS = 3


@pytest.fixture
def webhook_operator(stack: LocalStack):
    """The operator with its admission webhook (worker pods born with the preStop hook)."""
    operator = chaos.Operator(stack, webhook=True)
    operator.start()
    yield operator
    operator.stop()


@pytest.mark.timeout(300)
def test_node_drains_with_a_seceded_task_lose_nothing(stack: LocalStack, namespace: str,
                                                      webhook_operator: chaos.Operator):
    """Node drains: 2 or 3 hooked worker pods of one cluster evicted at once while the
    AMM policies run, one of them running a seceded task that ends a moment after the
    drain started. Nothing lost, re-run or wasted (the scheduler's TaskLedger), every
    result exact (scattered data included), no worker left closing_gracefully."""
    result = chaos.run_drains(stack, namespace, random.Random(DRAIN_SEED), DRAIN_ROUNDS,
                              operator=webhook_operator, seed=DRAIN_SEED, round_timeout=60, settle_timeout=60,
                              on_round=lambda r: print(chaos.DrainResult.rows([r], r.index == 1), flush=True))
    print(result.summary(), result.last_line(), sep="\n")
    assert result.unhooked == [], "worker pods created without the hook"
    assert result.hooks_cut == 0, "preStop hooks still running at the end of the grace period"
    assert result.wrong == [], f"wrong or missing results: {result.wrong}"
    assert result.lost == {}, f"keys lost with a worker: {result.lost}"
    assert result.rerun == {}, f"tasks computed again: {result.rerun}"
    assert result.wasted == {}, f"running tasks whose worker left: {result.wasted}"
    assert all(r.settled for r in result.rounds), result.table()
    assert result.settled and result.closing_gracefully_left == 0, result.summary()
