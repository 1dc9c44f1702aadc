"""Scaling a busy Dask cluster on Kubernetes down from 6 to 3 workers, mid-job.

Issue 7's first benchmark. The AMM announcement (the seed text
``seed/000_b26fd8aca74d3a12.txt``) promised that worker retirement on top of the
AMM would make it possible "to gracefully retire a worker on a busy cluster, while
jobs are running on it". This measures what that takes on Kubernetes today, and
what this project's operator does instead.

Everything runs on the local stack (``dmo_devstack.stack``: the
emulated Kubernetes API, the process kubelet, the real dask-kubernetes operator).
Each run gets a fresh namespace and DaskCluster of 6 workers x 1 thread
(``--memory-limit`` each), the AMM on at 2 s in every mode. It persists a random
array of about 1 GB (``--rows`` x 8000 float64 in 1000^2 chunks of 8 MB: 128 chunks
by default) and then runs the job: ``--passes`` passes over every chunk, one task a
chunk and pass that reads the chunk and sleeps ``--task-seconds`` (sleep, not CPU:
the machine has 2 cores for 6 workers), each task on the worker that holds its chunk.
About 32 s on 6 workers with the defaults. ``--at`` seconds (10) after the job is
submitted, the cluster goes from 6 to 3 workers, one of these ways:

- ``none``: no scale-down;
- ``dask-kubernetes``: dask-kubernetes' own path: ``kubectl scale daskworkergroup
  <cluster>-default --replicas 3``; its operator retires workers it chooses through
  the scheduler's ``retire_workers`` RPC, then deletes their Deployments;
- ``deleted``: the last three worker Deployments (by creation time, then name: what
  dask-kubernetes' LIFO fallback picks) deleted from outside, which is also what a
  node drain or a preemption amounts to;
- ``operator``: this project's operator: a MemoryPolicy governing the cluster with
  ``adaptive: {minimum: 6, maximum: 6}`` and ``retirement: {timeLimit: 2m,
  maxConcurrent: 3, drain: true}``, patched at ``--at`` to ``adaptive: {minimum: 3,
  maximum: 3}`` (lowering ``maximum`` is the immediate graceful scale-down);
- ``deleted+hook``: Deployments deleted from outside, with the hook: ``deleted``, but
  the operator's admission webhook gave the worker pods its ``preStop`` retirement
  hook when they were created (a MemoryPolicy governing the cluster with
  ``retirement: {timeLimit: 2m, drain: true}`` and no ``adaptive``, applied and seen
  by the operator before the DaskCluster is created);
- ``dask-kubernetes+hook``: dask-kubernetes' own scale-down, with the hook: the
  ``dask-kubernetes`` mode under the same policy and webhook.

The webhook is served by the same operator process as the ``operator`` mode's, and
its (cluster-wide) MutatingWebhookConfiguration is created once, limited to the hook
modes' namespaces (a namespace label): the other modes' pods are created unpatched.
A hook mode checks that every worker pod carries the hook before the job starts.

Runs are interleaved round-robin over the modes, the starting mode rotating every
round (``--repeat`` rounds, 3 by default), so that the machine's drifting load hits
every mode alike. The stack (and this operator, when its mode runs) is started once.

Measured, all from the scheduler (``_k8s_bench.Ledger``) unless said otherwise:

- **wall**: seconds from submitting the job to having all its results;
- **re-run**: task completions beyond a key's first (a lost chunk recomputed counts);
- **lost**: keys whose only copy went with a removed worker (the scheduler's own
  ``remove-worker`` event), and their bytes;
- **wasted**: executions started on a worker that never completed because the
  worker was removed under them (running work thrown away); tasks only assigned to
  the removed worker and not started are *reassigned* (no work lost);
- **retire s**: seconds from the scale-down request to the last removed worker
  leaving the scheduler;
- **moved**: bytes the surviving workers fetched from the removed workers after the
  request (their ``transfer_incoming_log``: the retirement's copies and the job's own
  fetches alike);
- **rate**: the worker-to-worker transfer rate of the same run, from the survivors'
  logs: per sending worker, bytes fetched from it over the seconds it was sending (the
  union of its fetches' intervals), summed over senders;
- **goal**: per retirement (a worker seen ``closing_gracefully``, sampled every 0.1 s,
  until it left): done within 1.5 x (bytes moved from it / rate) + 2 AMM intervals.
  Printed as met/retirements; ``-`` when no worker went through retirement;
- **rescued**: keys (and MB) only a retiring worker held, at the start of its
  retirement or computed during it, that had another holder when it left
  (``_k8s_bench.Ledger``); and, in the modes with a MemoryPolicy (``operator`` and
  the hook modes), **reported**: what the operator reported as rescued in the
  policy's status (``status.clusters[].savings.rescued``, from the scheduler
  plugin's own count), read once the status shows every removed worker.

The table shows median [min, max] over the rounds. The last line is::

    wall_ratio_vs_dask_kubernetes=<x> lost_keys=<n> rerun_tasks=<n> wasted_tasks=<n>

with the ratio of the medians of wall time (operator / dask-kubernetes), and the
counts of the operator mode summed over all its runs (``nan`` when a mode is missing),
followed by ``hook_lost_keys=<n> hook_rerun_tasks=<n> hook_wasted_tasks=<n>``: the same
counts summed over the runs of both hook modes, then
``rescued_reported_vs_measured=<bytes ratio> rescued_keys_reported_vs_measured=<ratio>``:
what the operator reported as rescued over what the benchmark measured, summed over
the runs of the modes where the operator's retirements move the data (``operator``
and ``deleted+hook``; they must agree within 5 %: ``rescued_agree=yes|no``). In
``dask-kubernetes+hook`` dask-kubernetes' own ``retire_workers`` moves the data
before the pods go, so the hooks find nothing left to move: the operator reports
(about) nothing rescued there, truthfully, and the benchmark measures what
dask-kubernetes moved.

Usage::

    python benchmarks/scale_down.py --repeat 3
    python benchmarks/scale_down.py --quick        # smoke run: smaller, 1 round
    python benchmarks/scale_down.py --modes none,dask-kubernetes,deleted
    python benchmarks/scale_down.py --modes deleted+hook,dask-kubernetes+hook,deleted
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
from distributed import Client, futures_of, wait
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
import _k8s_bench as kb  # noqa: E402

MODES = ["none", "dask-kubernetes", "deleted", "operator", "deleted+hook", "dask-kubernetes+hook"]
HOOK_MODES = [m for m in MODES if kb.is_hook_mode(m)]
CLUSTER = "sd"
POLICY = "scale-down"
MB = kb.MB
RETIREMENT = {"timeLimit": "2m", "maxConcurrent": 3, "drain": True}
#: The hook modes' policy: the preStop hook's limit; no adaptive (nothing scaled by the operator)
HOOK_RETIREMENT = {"timeLimit": "2m", "drain": True}
FROM, TO = 6, 3
#: The modes where the operator's retirements (its own, or its hooks') move the data:
#: what it reports as rescued must agree with what the benchmark measures
AGREE_MODES = ("operator", "deleted+hook")


def work(chunk: Any, p: int, seconds: float) -> float:
    """One task of the job: read the chunk, then sleep."""
    import time

    value = float(chunk[0, 0])
    time.sleep(seconds)
    return value + p


@dataclass
class Run(kb.BaseRun):
    wall: float = float("nan")
    rerun: int = 0
    lost: int = 0
    lost_bytes: int = 0
    wasted: int = 0
    reassigned: int = 0
    retire_s: float = float("nan")
    moved: int = 0
    rate: float = float("nan")
    goal_met: int = 0
    goal_of: int = 0
    workers_after: int = 0
    rescued: int = 0
    rescued_bytes: int = 0
    #: What the operator reported in the policy's status (-1: no policy in this mode)
    reported: int = -1
    reported_bytes: int = -1


def scale_down(stack: kb.LocalStack, ns: str, mode: str, client: Client) -> None:
    mode = mode.removesuffix("+hook")  # the hook is in the pods already
    if mode == "dask-kubernetes":
        kb.scale_worker_group(stack, ns, CLUSTER, TO)
    elif mode == "deleted":
        deps = sorted(kb.worker_deployments(stack, ns, CLUSTER),
                      key=lambda d: (d["metadata"].get("creationTimestamp", ""), d["metadata"]["name"]))
        names = [d["metadata"]["name"] for d in deps[-(FROM - TO):]]
        stack.kubectl("delete", "deployment", "-n", ns, "--wait=false", *names)
    elif mode == "operator":
        kb.patch_policy(stack, ns, POLICY, {"adaptive": {"minimum": TO, "maximum": TO}})


def run_once(stack: kb.LocalStack, mode: str, rep: int, args: argparse.Namespace, console: Console) -> Run:
    run = Run(mode, rep)
    with kb.isolated(stack, run, "sd", console, args.logs_on_error) as ns:
        if mode == "operator":
            stack.apply(kb.memory_policy(POLICY, CLUSTER, {"minimum": FROM, "maximum": FROM}, RETIREMENT),
                        namespace=ns)
        elif kb.is_hook_mode(mode):
            stack.apply(kb.memory_policy(POLICY, CLUSTER, None, HOOK_RETIREMENT), namespace=ns)
            kb.wait_policy_observed(stack, ns, POLICY)  # before the pods exist: born with the hook
        with kb.make_cluster(stack, ns, CLUSTER, FROM, args.memory_limit) as client:
            if kb.is_hook_mode(mode):
                check_hooks(stack, ns)
            measure(stack, ns, mode, client, run, args)
    return run


def check_hooks(stack: kb.LocalStack, ns: str) -> None:
    """Every worker pod of the cluster was born with the preStop hook."""
    pods = [p for p in kb.worker_pods(stack, ns, CLUSTER) if not p["metadata"].get("deletionTimestamp")]
    bare = [p["metadata"]["name"] for p in pods
            if "preStop" not in (p["spec"]["containers"][0].get("lifecycle") or {})]
    if len(pods) != FROM or bare:
        raise RuntimeError(f"{len(pods)} worker pods, without the preStop hook: {bare}")


def measure(stack: kb.LocalStack, ns: str, mode: str, client: Client, run: Run, args: argparse.Namespace) -> None:
    if mode == "operator":
        kb.wait_policy_scaling(stack, ns, POLICY, CLUSTER, lambda e: e.get("replicas") == FROM,
                               f"status.scaling[] for {CLUSTER} with replicas {FROM}", timeout=60)
    kb.install_ledger(client)  # before persist: a chunk computed again counts as re-run
    x = da.random.random((args.rows, 8000), chunks=(1000, 1000)).persist()
    wait(x)
    chunks = futures_of(x)
    time.sleep(2 * kb.AMM_INTERVAL)  # let the AMM settle after persist

    start = time.time()
    results = [client.submit(work, c, p, args.task_seconds, pure=False)
               for p in range(args.passes) for c in chunks]
    acted = None
    if mode != "none":
        while time.time() - start < args.at:
            time.sleep(0.05)
        acted = time.time()
        scale_down(stack, ns, mode, client)
    client.gather(results)
    run.wall = time.time() - start

    if mode != "none":
        def settled() -> bool:
            n = len(client.scheduler_info(n_workers=-1)["workers"])
            return n == TO and len(kb.worker_deployments(stack, ns, CLUSTER)) == TO

        try:
            stack.wait_for(settled, args.settle_timeout, f"{TO} workers and Deployments")
        except TimeoutError as exc:
            run.notes.append(str(exc))
    run.workers_after = len(client.scheduler_info(n_workers=-1)["workers"])
    report = kb.ledger_report(client)
    missing = [c.key for c in chunks if c.status != "finished"]
    if missing:
        run.notes.append(f"{len(missing)} chunks of the persisted array not in memory at the end")
    run.rerun, run.wasted, run.reassigned = report["rerun"], report["wasted"], report["reassigned"]
    run.lost, run.lost_bytes = report["lost"], report["lost_bytes"]
    run.rescued, run.rescued_bytes = report["rescued"], report["rescued_bytes"]
    moves = kb.transfers(client, since=acted or start)
    run.rate = moves["rate"]
    if acted is not None:
        removals = [r for r in report["removals"] if r["time"] >= acted]
        last = {}
        for r in removals:  # a worker may leave, come back under its name, leave again
            last[r["name"]] = r
        if last:
            run.retire_s = max(r["time"] for r in last.values()) - acted
        run.moved = sum(moves["moved_from"].get(w, 0) for w in {r["worker"] for r in removals})
        for address, c in report["closing"].items():
            gone = [r["time"] for r in removals if r["worker"] == address]
            if not gone:
                continue
            took = gone[0] - c["closing_since"]
            moved = moves["moved_from"].get(address, 0)
            bound = 1.5 * moved / run.rate + 2 * kb.AMM_INTERVAL
            run.goal_of += 1
            run.goal_met += took <= bound
            run.notes.append(f"{c['name']}: retired in {took:.1f} s, moved {moved / MB:.0f} MB "
                             f"(bound {bound:.1f} s), held {c['unique_bytes'] / MB:.0f} MB unique")
        if mode == "operator":
            run.notes.append(f"status.scaling: {kb.policy_scaling(stack, ns, POLICY)}")
    if mode == "operator" or kb.is_hook_mode(mode):
        read_reported(stack, ns, run, len({r["name"] for r in report["removals"]}))
        run.notes.append(f"measured per leaving worker (a key saved off two counts twice): "
                         f"{report['rescued_each']} keys")


def read_reported(stack: kb.LocalStack, ns: str, run: Run, removed: int) -> None:
    """What the operator reported as rescued, once its status counts every worker that
    left (it reads the scheduler at each resync)."""
    def settled() -> dict[str, Any] | None:
        saved = kb.policy_savings(stack, ns, POLICY, CLUSTER)
        rescued, lost = saved.get("rescued") or {}, (saved.get("lost") or {}).get("byReason") or {}
        seen = sum(rescued.get(w, {}).get("workers", 0) for w in ("operator", "hook")) \
            + sum(c.get("workers", 0) for r, c in lost.items() if r != "retired")
        return saved if saved and seen >= removed else None

    try:
        saved = stack.wait_for(settled, 30, "the policy's savings to count every removed worker", interval=0.5)
    except TimeoutError as exc:
        run.notes.append(str(exc))
        saved = kb.policy_savings(stack, ns, POLICY, CLUSTER)
    rescued = saved.get("rescued") or {}
    run.reported, run.reported_bytes = rescued.get("keys", 0), rescued.get("bytes", 0)
    run.notes.append(f"savings: rescued {run.reported} keys ({run.reported_bytes / MB:.0f} MB) reported, "
                     f"{run.rescued} keys ({run.rescued_bytes / MB:.0f} MB) measured; "
                     f"lost {saved.get('lost', {}).get('keys', 0)} keys reported, {run.lost} measured")


def print_table(console: Console, runs: list[Run], modes: list[str]) -> None:
    def cells(ok: list[Run]) -> list[str]:
        goal = (f"{sum(r.goal_met for r in ok)}/{sum(r.goal_of for r in ok)}"
                if any(r.goal_of for r in ok) else "-")
        return [
            kb.stat([r.wall for r in ok], ".1f"),
            kb.stat([r.rerun for r in ok], "d"),
            kb.stat([r.lost for r in ok], "d"),
            kb.stat([r.lost_bytes / MB for r in ok], ".0f"),
            kb.stat([r.wasted for r in ok], "d"),
            kb.stat([r.reassigned for r in ok], "d"),
            kb.stat([r.retire_s for r in ok if not math.isnan(r.retire_s)], ".1f"),
            kb.stat([r.moved / MB for r in ok], ".0f"),
            kb.stat([r.rate / MB for r in ok if not math.isnan(r.rate)], ".0f"),
            goal,
            kb.stat([r.rescued_bytes / MB for r in ok], ".0f"),
            kb.stat([r.reported_bytes / MB for r in ok if r.reported >= 0], ".0f"),
        ]

    console.print(kb.mode_table(
        f"Scale-down {FROM} -> {TO} workers mid-job: median [min, max] over rounds",
        ("wall s", "re-run", "lost keys", "lost MB", "wasted", "reassigned", "retire s", "moved MB",
         "rate MB/s", "goal", "rescued MB", "reported MB"), runs, modes, cells))


def describe(run: Run) -> str:
    return (f"wall {run.wall:5.1f} s  re-run {run.rerun}  lost {run.lost} ({run.lost_bytes / MB:.0f} MB)  "
            f"wasted {run.wasted}  reassigned {run.reassigned}  retire {run.retire_s:.1f} s  "
            f"moved {run.moved / MB:.0f} MB  rate {run.rate / MB:.0f} MB/s  workers after {run.workers_after}  "
            f"rescued {run.rescued} ({run.rescued_bytes / MB:.0f} MB)"
            + (f"  reported {run.reported} ({run.reported_bytes / MB:.0f} MB)" if run.reported >= 0 else ""))


def agreement(runs: list[Run]) -> tuple[float, float]:
    """(bytes, keys): reported over measured rescued, summed over the runs with a policy."""
    mine = [r for r in runs if r.reported >= 0]
    measured, reported = sum(r.rescued_bytes for r in mine), sum(r.reported_bytes for r in mine)
    keys, reported_keys = sum(r.rescued for r in mine), sum(r.reported for r in mine)
    return (reported / measured if measured else math.nan, reported_keys / keys if keys else math.nan)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    kb.add_common_args(parser, MODES)
    parser.add_argument("--rows", type=int, default=16000, help="rows of the array (x 8000 float64)")
    parser.add_argument("--passes", type=int, default=3, help="passes of the job over the array")
    parser.add_argument("--task-seconds", type=float, default=0.5, help="sleep per task")
    parser.add_argument("--at", type=float, default=10.0, help="seconds into the job to scale down")
    parser.add_argument("--settle-timeout", type=float, default=180.0,
                        help="seconds to wait after the job for 3 workers and Deployments")
    parser.add_argument("--quick", action="store_true", help="smoke run: 512 MB, 2 passes, scale down at 4 s, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.passes, args.at, args.repeat = 8000, 2, 4.0, 1
    modes = kb.parse_modes(parser, args, MODES)

    console = Console(soft_wrap=True, width=200)
    size = args.rows * 8000 * 8
    console.print(f"array {args.rows}x8000 float64 = {size / 1e9:.2f} GB in {args.rows // 1000 * 8} chunks; "
                  f"job {args.passes} passes x {args.task_seconds:g} s/task; {FROM} workers x 1 thread "
                  f"{args.memory_limit}; scale-down to {TO} at {args.at:g} s; {args.repeat} rounds of {modes}")
    runs = kb.run_rounds(modes, args, console,
                         lambda stack, mode, rep: run_once(stack, mode, rep, args, console), describe)
    print_table(console, runs, modes)
    ours, theirs = kb.ok_runs(runs, "operator"), kb.ok_runs(runs, "dask-kubernetes")
    ratio = kb.median(r.wall for r in ours) / kb.median(r.wall for r in theirs) if ours and theirs else math.nan
    hooked = [r for m in HOOK_MODES if m in modes for r in kb.ok_runs(runs, m)]
    with_policy = [r for m in modes if m in AGREE_MODES for r in kb.ok_runs(runs, m)]
    by_bytes, by_keys = agreement(with_policy)
    agree = "yes" if abs(by_bytes - 1) <= 0.05 and abs(by_keys - 1) <= 0.05 else "no"
    print(f"wall_ratio_vs_dask_kubernetes={ratio:.3f} lost_keys={kb.total(ours, 'lost')} "
          f"rerun_tasks={kb.total(ours, 'rerun')} wasted_tasks={kb.total(ours, 'wasted')} "
          f"hook_lost_keys={kb.total(hooked, 'lost')} hook_rerun_tasks={kb.total(hooked, 'rerun')} "
          f"hook_wasted_tasks={kb.total(hooked, 'wasted')} "
          f"rescued_reported_vs_measured={by_bytes:.3f} rescued_keys_reported_vs_measured={by_keys:.3f} "
          f"rescued_agree={agree}")


if __name__ == "__main__":
    main()
