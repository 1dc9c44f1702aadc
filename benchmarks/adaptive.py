"""Adaptive scaling of a job with a burst of parallelism and a long serial tail.

Issue 7's second benchmark, the case of the AMM announcement (the seed text
``seed/000_b26fd8aca74d3a12.txt``): graceful retirement "will also let you partially
downscale an adaptive cluster before it's completely idle; this will potentially
result in substantial monetary savings whenever a job features an initial burst of
parallelism followed by a long 'tail' of serial tasks".

Everything runs on the local stack (``dmo_devstack.stack``: the
emulated Kubernetes API, the process kubelet, the real dask-kubernetes operator).
Each run gets a fresh namespace and DaskCluster of ``--start-workers`` (6: the
cluster is at its maximum when the job comes, as after a previous burst) workers x 1
thread, the AMM on at 2 s in every mode. The job: a burst of ``--burst`` independent
tasks (sleep ``--burst-seconds``, return ``--result-mb`` MB each), then a serial tail:
step i waits for step i-1 and for burst result i, and sleeps ``--tail-seconds``. The
client holds only the last step, so the burst results are released as the tail
consumes them; until then they are unique data on the workers a scale-down removes.
Three modes, bounds minimum 1 and maximum 6:

- ``fixed``: 6 workers throughout;
- ``daskautoscaler``: a dask-kubernetes ``DaskAutoscaler`` (``minimum: 1, maximum:
  6``) created as the job is submitted; the real dask-kubernetes operator scales (a
  5 s timer on the scheduler's ``adaptive_target``, at most 25% down a step, 15 s
  cool-down, retirement through ``retire_workers``);
- ``operator``: a MemoryPolicy with ``adaptive: {minimum: 1, maximum: 6}`` governing
  the cluster, created as the job is submitted (retirement settings left to their
  defaults).

Runs are interleaved round-robin over the modes, the starting mode rotating every
round (``--repeat`` rounds, 3 by default). The stack (and this operator, when its
mode runs) is started once.

Measured:

- **worker-s** (what a cloud bills): the integral over the job (submit to last
  result) of the number of the cluster's worker Pods in the Kubernetes API, whatever
  their phase (Pending, Running, Terminating: a pod holds its node from creation
  until it is gone), sampled every 0.25 s. Also **sched worker-s**: the same integral
  of the workers registered at the scheduler (sampled there every 0.1 s);
- **wall**: seconds from submitting the job to having its result;
- **lost**, **re-run**, **wasted**: from the scheduler, as ``_k8s_bench`` defines them
  (keys whose only copy went with a removed worker; completions beyond a key's
  first; executions thrown away when their worker was removed);
- **workers at end**: registered at the scheduler when the job ended.

The table shows median [min, max] over the rounds. The last line is::

    cost_ratio_vs_daskautoscaler=<x> wall_ratio_vs_fixed=<x> lost_keys=<n> rerun_tasks=<n>

with ratios of medians (worker-s of operator / daskautoscaler, wall of operator /
fixed), and the counts of the operator mode summed over all its runs (``nan`` when a
mode is missing).

Usage::

    python benchmarks/adaptive.py --repeat 3
    python benchmarks/adaptive.py --quick       # smoke run: shorter job, 1 round
    python benchmarks/adaptive.py --modes fixed,daskautoscaler
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed import Client
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
import _k8s_bench as kb  # noqa: E402

MODES = ["fixed", "daskautoscaler", "operator"]
CLUSTER = "ad"
POLICY = "adaptive"
MINIMUM, MAXIMUM = 1, 6
MB = kb.MB


def burst_task(i: int, seconds: float, nbytes: int) -> bytes:
    import time

    time.sleep(seconds)
    return i.to_bytes(4, "little") * (nbytes // 4)


def tail_step(prev: int, result: bytes, seconds: float) -> int:
    import time

    time.sleep(seconds)
    return prev + int.from_bytes(result[:4], "little")


def submit_job(client: Client, args: argparse.Namespace) -> Any:
    burst = [client.submit(burst_task, i, args.burst_seconds, args.result_mb * MB, pure=False)
             for i in range(args.burst)]
    step: Any = 0
    for i in range(args.burst):
        step = client.submit(tail_step, step, burst[i], args.tail_seconds, pure=False)
    return step


@dataclass
class Run(kb.BaseRun):
    wall: float = float("nan")
    worker_s: float = float("nan")
    sched_worker_s: float = float("nan")
    lost: int = 0
    rerun: int = 0
    wasted: int = 0
    workers_end: int = 0


def start_scaler(stack: kb.LocalStack, ns: str, mode: str) -> None:
    if mode == "daskautoscaler":
        stack.apply({"apiVersion": "kubernetes.dask.org/v1", "kind": "DaskAutoscaler",
                     "metadata": {"name": CLUSTER},
                     "spec": {"cluster": CLUSTER, "minimum": MINIMUM, "maximum": MAXIMUM}}, namespace=ns)
    elif mode == "operator":
        stack.apply(kb.memory_policy(POLICY, CLUSTER, {"minimum": MINIMUM, "maximum": MAXIMUM}), namespace=ns)


def run_once(stack: kb.LocalStack, mode: str, rep: int, args: argparse.Namespace, console: Console) -> Run:
    run = Run(mode, rep)
    with kb.isolated(stack, run, "ad", console, args.logs_on_error) as ns:
        workers = MAXIMUM if mode == "fixed" else args.start_workers
        with kb.make_cluster(stack, ns, CLUSTER, workers, args.memory_limit) as client:
            measure(stack, ns, mode, client, run, args)
    return run


def measure(stack: kb.LocalStack, ns: str, mode: str, client: Client, run: Run, args: argparse.Namespace) -> None:
    kb.install_ledger(client)
    with kb.PodCounter(stack, ns, CLUSTER) as pods:
        start_scaler(stack, ns, mode)
        start = time.time()
        value = submit_job(client, args).result()
        end = time.time()
    run.wall = end - start
    expected = sum(range(args.burst))
    if value != expected:
        run.notes.append(f"wrong result {value} != {expected}")
    run.worker_s = kb.integral(pods.samples, start, end)
    report = kb.ledger_report(client)
    run.sched_worker_s = kb.integral(report["counts"], start, end)
    run.lost, run.rerun, run.wasted = report["lost"], report["rerun"], report["wasted"]
    run.workers_end = len(client.scheduler_info(n_workers=-1)["workers"])
    steps, last = [], None
    for t, n in pods.samples:
        if n != last:
            steps.append(f"{t - start:.1f}s:{n}")
            last = n
    run.notes.append("worker pods over time: " + " ".join(steps))
    if mode == "operator":
        run.notes.append(f"status.scaling: {kb.policy_scaling(stack, ns, POLICY)}")


def print_table(console: Console, runs: list[Run], modes: list[str]) -> None:
    def cells(ok: list[Run]) -> list[str]:
        return [
            kb.stat([r.worker_s for r in ok], ".0f"),
            kb.stat([r.sched_worker_s for r in ok], ".0f"),
            kb.stat([r.wall for r in ok], ".1f"),
            kb.stat([r.lost for r in ok], "d"),
            kb.stat([r.rerun for r in ok], "d"),
            kb.stat([r.wasted for r in ok], "d"),
            kb.stat([r.workers_end for r in ok], "d"),
        ]

    console.print(kb.mode_table(
        f"Burst then serial tail, bounds {MINIMUM}..{MAXIMUM} workers: median [min, max] over rounds",
        ("worker-s (pods)", "sched worker-s", "wall s", "lost keys", "re-run", "wasted", "workers at end"),
        runs, modes, cells))


def describe(run: Run) -> str:
    return (f"wall {run.wall:5.1f} s  worker-s {run.worker_s:.0f} (pods) {run.sched_worker_s:.0f} (scheduler)  "
            f"lost {run.lost}  re-run {run.rerun}  wasted {run.wasted}  workers at end {run.workers_end}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    kb.add_common_args(parser, MODES)
    parser.add_argument("--burst", type=int, default=36, help="parallel tasks, and serial steps")
    parser.add_argument("--burst-seconds", type=float, default=1.0, help="sleep per burst task")
    parser.add_argument("--result-mb", type=int, default=8, help="MB per burst result")
    parser.add_argument("--tail-seconds", type=float, default=0.75, help="sleep per serial step")
    parser.add_argument("--start-workers", type=int, default=MAXIMUM,
                        help="workers of the adaptive modes when the job comes")
    parser.add_argument("--quick", action="store_true", help="smoke run: 18 tasks, 0.5 s tail steps, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.burst, args.tail_seconds, args.repeat = 18, 0.5, 1
    modes = kb.parse_modes(parser, args, MODES)

    console = Console(soft_wrap=True, width=200)
    console.print(f"burst of {args.burst} x {args.burst_seconds:g} s tasks ({args.result_mb} MB results), then "
                  f"{args.burst} serial steps x {args.tail_seconds:g} s; workers x 1 thread {args.memory_limit}, "
                  f"bounds {MINIMUM}..{MAXIMUM}, adaptive modes start at {args.start_workers}; "
                  f"{args.repeat} rounds of {modes}")
    runs = kb.run_rounds(modes, args, console,
                         lambda stack, mode, rep: run_once(stack, mode, rep, args, console), describe)
    print_table(console, runs, modes)

    def median(mode: str, attr: str) -> float:
        return kb.median(getattr(r, attr) for r in kb.ok_runs(runs, mode))

    ours = kb.ok_runs(runs, "operator")
    cost = median("operator", "worker_s") / median("daskautoscaler", "worker_s") if ours else math.nan
    wall = median("operator", "wall") / median("fixed", "wall") if ours else math.nan
    print(f"cost_ratio_vs_daskautoscaler={cost:.3f} wall_ratio_vs_fixed={wall:.3f} "
          f"lost_keys={kb.total(ours, 'lost')} rerun_tasks={kb.total(ours, 'rerun')}")


if __name__ == "__main__":
    main()
