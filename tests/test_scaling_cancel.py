"""A retirement the operator cancelled (a scale-up needed its worker again) is not an
abort: the engine reports it ``aborted`` with reason ``cancelled``, and the next pass
must forget it without a RetirementAborted warning, an "aborted" count, or the
abort hold that stops scale-downs for ABORT_HOLD seconds.

Found by the chaos run (benchmarks/chaos.py --rounds 20 --seed 1): maximum lowered
to 1 on 2 workers waited 15 s after a cancelled retirement.
"""

from __future__ import annotations

import pytest

from dask_memory_operator.controllers import scaling
from dask_memory_operator.controllers.scaling import TAG, ClusterScaling, Pass, ScalingController


class FakeReconciler:
    rpc_timeout = 1.0


def record(state: str, reason: str) -> dict:
    return {"worker": "g-worker-a", "state": state, "reason": reason, "requested": f"{TAG}: g from 2 to 1",
            "seconds": 1.0, "left": False}


@pytest.fixture
def calls(monkeypatch):
    seen: dict[str, list] = {"events": [], "forgotten": [], "observed": []}

    async def post(ref, reason, message, type_="Normal"):
        seen["events"].append((reason, type_))

    async def forget(address, workers, *, timeout=None):
        seen["forgotten"] += workers
        return {"forgotten": workers, "kept": []}

    monkeypatch.setattr(scaling, "post_from_background", post)
    monkeypatch.setattr(scaling.rpc, "forget_retirement", forget)
    monkeypatch.setattr(scaling.metrics, "observe_retirement",
                        lambda ns, cluster, outcome, seconds: seen["observed"].append(outcome))
    return seen


def a_pass(*records: dict) -> Pass:
    return Pass("ns", "c", "uid", "tcp://s:8786", {"retirements": list(records)}, {}, {}, {"cluster": "c"})


async def test_a_cancelled_retirement_is_forgotten_without_an_abort_or_a_hold(calls):
    state = ClusterScaling()
    p = a_pass(record("aborted", "cancelled"))
    await ScalingController(FakeReconciler())._finish_retirements(p, state)
    assert calls["forgotten"] == ["g-worker-a"]
    assert calls["events"] == [] and calls["observed"] == []
    assert state.hold_until == 0.0 and state.hold == 0.0
    assert p.entry.get("reason") != "RetirementAborted"


async def test_a_real_abort_still_warns_and_holds(calls):
    state = ClusterScaling()
    p = a_pass(record("aborted", "no running worker that is not retiring has room for key 'x'"))
    await ScalingController(FakeReconciler())._finish_retirements(p, state)
    assert calls["events"] == [("RetirementAborted", "Warning")]
    assert calls["observed"] == ["aborted"]
    assert state.hold == scaling.ABORT_HOLD and state.hold_until > 0
