"""The long chaos run: ``--rounds`` rounds of random ``adaptive`` bound changes on a
busy cluster, some of them killing (SIGKILL) and restarting the operator, on the local
stack with the real dask-kubernetes operator; or, with ``--mode drain``, node drains.
The driver is :mod:`dmo_devstack.chaos` (the suite's
tests/test_chaos.py runs a few rounds of each).

Prints a row per round as it ends (bounds, the size before, whether the operator was
killed, the wait, then replicas, Deployments, connected workers, workers
closing_gracefully and retiring, and the policy's status reason as seen at the round's
end), a summary (retirements started, done, aborted, cancelled, from the Events), and
last:
``rounds=... kills=... lost_keys=... rerun_tasks=... wasted_tasks=... closing_gracefully_left=... replicas_mismatch=...``

Exits 1 when a promise is broken (a wrong result, a key lost or re-run, a running
task wasted, the cluster not settled). The stack's logs stay in ``--state-dir`` (a
temporary folder by default, printed).

``--mode drain``: a cluster of 4 workers whose pods are born through the operator's
webhook (the preStop retirement hook), the policy's AMM running PressureReduceReplicas
and Rebalance; each round evicts 2 or 3 of its worker pods at once (a node drain), one
of them running a seceded task that ends a moment after the drain started, and waits
for the Deployments' new pods to be in. Prints per round the pods drained, seconds
until all were back, the TaskLedger's growth, whether the seceded task was wasted, each
victim's retirement record as last seen and its hook's outcome line; last:
``rounds=... pods_drained=... lost_keys=... rerun_tasks=... wasted_tasks=... closing_gracefully_left=...``

Run: python benchmarks/chaos.py --rounds 20 --seed 1   (2 to 3 minutes on 2 cores)
     python benchmarks/chaos.py --mode drain --rounds 20 --seed 1
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile

from dmo_devstack import chaos
from dmo_devstack.stack import LocalStack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("bounds", "drain"), default="bounds",
                        help="bounds: random adaptive bounds and operator kills; drain: node drains")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kill-probability", type=float, default=0.35, help="bounds mode only")
    parser.add_argument("--state-dir", default=None, help="where the stack's logs go (kept)")
    args = parser.parse_args(argv)

    state_dir = args.state_dir or tempfile.mkdtemp(prefix="dmo-chaos-")
    print(f"stack state and logs: {state_dir}", flush=True)
    with LocalStack(state_dir) as stack:
        operator = chaos.Operator(stack, webhook=args.mode == "drain")
        operator.start()
        ns = f"chaos-{args.mode}-{args.seed}"
        stack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        try:
            if args.mode == "drain":
                result, broken = drains(stack, ns, operator, args)
            else:
                result, broken = bounds(stack, ns, operator, args)
        finally:
            stack.kubectl("delete", "pods,deployments,daskclusters", "--all", "-n", ns, "--grace-period=1",
                          "--wait=false", check=False)
            operator.stop()
    for line in broken:
        print(f"BROKEN {line}")
    print(result.last_line())
    return 1 if broken else 0


def _ledger_broken(result) -> list[str]:
    broken = []
    if result.wrong:
        broken.append(f"wrong results: {result.wrong}")
    for what, found in (("lost", result.lost), ("re-run", result.rerun), ("wasted", result.wasted)):
        if found:
            broken.append(f"{what}: {found}")
    return broken


def bounds(stack: LocalStack, ns: str, operator: chaos.Operator, args: argparse.Namespace):
    header = True

    def row(r: chaos.Round) -> None:
        nonlocal header
        print(chaos.ChaosResult.rows([r], header), flush=True)
        header = False

    result = chaos.run_chaos(stack, ns, random.Random(args.seed), args.rounds, operator=operator,
                             kill_probability=args.kill_probability, must_kill=True,
                             seed=args.seed, on_round=row)
    print("events:", *result.event_log, sep="\n  ")
    print(result.summary())
    broken = _ledger_broken(result)
    if not result.settled or not result.in_bounds:
        broken.append(f"not settled within bounds {result.bounds}: {result.workers} workers")
    return result, broken


def drains(stack: LocalStack, ns: str, operator: chaos.Operator, args: argparse.Namespace):
    header = True

    def row(r: chaos.DrainRound) -> None:
        nonlocal header
        print(chaos.DrainResult.rows([r], header), flush=True)
        header = False

    result = chaos.run_drains(stack, ns, random.Random(args.seed), args.rounds, operator=operator,
                              seed=args.seed, on_round=row)
    print(result.summary())
    broken = _ledger_broken(result)
    if result.unhooked:
        broken.append(f"worker pods without the preStop hook: {result.unhooked}")
    if result.hooks_cut:
        broken.append(f"preStop hooks still running at the end of the grace period: {result.hooks_cut}")
    unsettled = [r.index for r in result.rounds if not r.settled]
    if unsettled:
        broken.append(f"rounds whose drained workers did not come back: {unsettled}")
    if not result.settled or result.closing_gracefully_left:
        broken.append(f"not settled: {result.workers} workers, {result.closing_gracefully_left} closing_gracefully")
    return result, broken


if __name__ == "__main__":
    sys.exit(main())
