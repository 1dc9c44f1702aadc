"""The long chaos run: ``--rounds`` rounds of random ``adaptive`` bound changes on a
busy cluster, some of them killing (SIGKILL) and restarting the operator, on the local
stack with the real dask-kubernetes operator. The driver is
:mod:`dask_memory_operator.devstack.chaos` (the suite's tests/test_chaos.py runs a few
rounds of it).

Prints a row per round as it ends (bounds, the size before, whether the operator was
killed, the wait, then replicas, Deployments, connected workers, workers
closing_gracefully and retiring, and the policy's status reason as seen at the round's
end), a summary (retirements started, done, aborted, cancelled, from the Events), and
last:
``rounds=... kills=... lost_keys=... rerun_tasks=... wasted_tasks=... closing_gracefully_left=... replicas_mismatch=...``

Exits 1 when a promise is broken (a wrong result, a key lost or re-run, a running
task wasted, the cluster not settled). The stack's logs stay in ``--state-dir`` (a
temporary folder by default, printed).

Run: python benchmarks/chaos.py --rounds 20 --seed 1   (2 to 3 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile

from dask_memory_operator.devstack import chaos
from dask_memory_operator.devstack.stack import LocalStack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kill-probability", type=float, default=0.35)
    parser.add_argument("--state-dir", default=None, help="where the stack's logs go (kept)")
    args = parser.parse_args(argv)

    state_dir = args.state_dir or tempfile.mkdtemp(prefix="dmo-chaos-")
    print(f"stack state and logs: {state_dir}", flush=True)
    with LocalStack(state_dir) as stack:
        operator = chaos.Operator(stack)
        operator.start()
        ns = f"chaos-{args.seed}"
        stack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        header = True

        def row(r: chaos.Round) -> None:
            nonlocal header
            table = chaos.ChaosResult.rows([r], header)
            header = False
            print(table, flush=True)

        result = chaos.run_chaos(stack, ns, random.Random(args.seed), args.rounds, operator=operator,
                                 kill_probability=args.kill_probability, must_kill=True,
                                 seed=args.seed, on_round=row)
        print("events:", *result.event_log, sep="\n  ")
        print(result.summary())
        broken = []
        if result.wrong:
            broken.append(f"wrong results: {result.wrong}")
        for what, found in (("lost", result.lost), ("re-run", result.rerun), ("wasted", result.wasted)):
            if found:
                broken.append(f"{what}: {found}")
        if not result.settled or not result.in_bounds:
            broken.append(f"not settled within bounds {result.bounds}: {result.workers} workers")
        for line in broken:
            print(f"BROKEN {line}")
        stack.kubectl("delete", "daskclusters", "--all", "-n", ns, "--wait=false", check=False)
        operator.stop()
    print(result.last_line())
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
