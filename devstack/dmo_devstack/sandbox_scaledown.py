"""The sandbox's scale-down demo: what the operator is for, on the demo cluster.

A busy cluster of 6 workers goes to 3 in the middle of a job, twice:

- **deleted**: three worker Deployments deleted from outside (``kubectl delete``),
  as a node drain, a preemption or a hand-made scale-down does it; the pods have no
  preStop hook (the sandbox runs the operator without its webhook): whatever only
  they held is lost and computed again;
- **MemoryPolicy**: the policy's ``adaptive.maximum`` lowered from 6 to 3: the
  operator retires three workers through the scheduler (their data copied to the
  others, their running tasks finished) before it deletes their Deployments.

Each run persists fresh data, so that both start alike; what they lost, re-ran and
took is read from the scheduler (:class:`~.probes.TaskLedger`), not from the results,
which recomputation would also give. After the table of both, the savings as the
memory report shows them: the scheduler's counters (``amm_core_savings``, over the
operator's RPC) and the policy's status.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import dask.array as da
from distributed import Client, futures_of, wait
from rich.console import Console
from rich.table import Table

from dmo_devstack.probes import TaskLedger, task_ledger
from dmo_devstack.stack import LocalStack
from dask_memory_operator.observability.report import ReportData, savings_rows
from dask_memory_operator.observability.report_data import scheduler_savings
from dask_memory_operator.schedulers import rpc as scheduler_rpc

FROM, TO = 6, 3
#: What the MemoryPolicy run adds to the policy: the operator sizes the cluster, and
#: retires with drain
RETIREMENT = {"timeLimit": "2m", "maxConcurrent": 3, "drain": True}


@dataclass
class ScaleDownRun:
    how: str
    wall: float = 0.0
    lost_keys: int = 0
    rerun: int = 0
    wasted: int = 0


@dataclass
class Demo:
    """The demo cluster as the sandbox made it."""

    stack: LocalStack
    client: Client
    namespace: str
    cluster: str
    policy: str
    #: Rows of the persisted array: x 2,000 float64, in chunks of 1,000 x 1,000 (8 MB)
    rows: int = 12_000
    #: Passes of the job over every chunk (one task a chunk and pass, on the worker
    #: that holds it), and seconds each task sleeps (sleep, not CPU: 2 cores here)
    passes: int = 6
    task_seconds: float = 0.3
    #: Seconds into the job at which the cluster is scaled down
    at: float = 3.0

    @property
    def group(self) -> str:
        return f"{self.cluster}-default"

    def kubectl(self, *args: str) -> str:
        return self.stack.kubectl(*args, "-n", self.namespace).stdout

    def workers(self) -> int:
        return len(self.client.scheduler_info(n_workers=-1)["workers"])

    def deployments(self) -> list[dict[str, Any]]:
        return [d for d in self.stack.deployments(
            self.namespace, f"dask.org/cluster-name={self.cluster},dask.org/component=worker")
            if not d["metadata"].get("deletionTimestamp")]

    def policy_status(self) -> dict[str, Any]:
        return json.loads(self.kubectl("get", "memorypolicy", self.policy, "-o", "json")).get("status") or {}

    def settle(self, n: int, timeout: float = 180) -> None:
        self.stack.wait_for(lambda: self.workers() == n and len(self.deployments()) == n, timeout,
                            f"{n} workers and worker Deployments")


def scale_up(demo: Demo) -> None:
    """To FROM workers through dask-kubernetes (no policy scaling yet)."""
    demo.kubectl("scale", "daskworkergroup", demo.group, f"--replicas={FROM}")
    demo.client.wait_for_workers(FROM, timeout=180)
    demo.settle(FROM)


def delete_from_outside(demo: Demo) -> None:
    newest = sorted(demo.deployments(), key=lambda d: (d["metadata"].get("creationTimestamp", ""),
                                                      d["metadata"]["name"]))[-(FROM - TO):]
    demo.kubectl("delete", "deployment", "--wait=false", *[d["metadata"]["name"] for d in newest])


def lower_maximum(demo: Demo) -> None:
    _patch_policy(demo, {"adaptive": {"minimum": TO, "maximum": TO}})


def _patch_policy(demo: Demo, spec: dict[str, Any]) -> None:
    demo.kubectl("patch", "memorypolicy", demo.policy, "--type=merge", "-p", json.dumps({"spec": spec}))


def _work(chunk: Any, p: int, seconds: float) -> float:
    time.sleep(seconds)
    return float(chunk[0, 0]) + p


def busy_run(demo: Demo, how: str, scale_down: Any) -> ScaleDownRun:
    """Persist fresh data, start the job, scale down ``demo.at`` seconds in, wait for
    the results and for the cluster to settle at TO workers."""
    client = demo.client
    client.register_plugin(TaskLedger())  # a fresh ledger (same name: replaces the last)
    x = da.random.random((demo.rows, 2000), chunks=(1000, 1000)).persist()
    wait(x)
    chunks = futures_of(x)
    start = time.time()
    results = [client.submit(_work, c, p, demo.task_seconds, pure=False)
               for p in range(demo.passes) for c in chunks]
    while time.time() - start < demo.at:
        time.sleep(0.05)
    scale_down(demo)
    client.gather(results)
    run = ScaleDownRun(how, wall=time.time() - start)
    demo.settle(TO)
    ledger = client.run_on_scheduler(task_ledger)
    run.lost_keys = len(ledger["lost"])
    run.rerun = sum(ledger["rerun"].values())
    run.wasted = sum(ledger["wasted"].values())
    del x, chunks, results
    return run


def scale_down_demo(console: Console, demo: Demo) -> list[ScaleDownRun]:
    """Both runs, and their table."""
    runs = []
    with console.status(f"kubectl scale daskworkergroup {demo.group} --replicas={FROM} ..."):
        scale_up(demo)
    with console.status(f"Busy job; {FROM - TO} worker Deployments deleted from outside at {demo.at:g}s ..."):
        runs.append(busy_run(demo, "deleted from outside", delete_from_outside))
    console.print(f"[green]✓[/] {FROM} → {TO} by deleting Deployments: {runs[-1].lost_keys} keys lost")

    with console.status(f"The MemoryPolicy sizes the cluster: adaptive {FROM}..{FROM} ..."):
        # back to FROM, now by the operator: replicas 3 first, so that dask-kubernetes
        # has nothing of its own to retire when the policy raises them
        demo.kubectl("scale", "daskworkergroup", demo.group, f"--replicas={TO}")
        _patch_policy(demo, {"adaptive": {"minimum": FROM, "maximum": FROM}, "retirement": RETIREMENT})
        demo.client.wait_for_workers(FROM, timeout=180)
        demo.settle(FROM)
    with console.status(f"Busy job; adaptive.maximum lowered to {TO} at {demo.at:g}s ..."):
        runs.append(busy_run(demo, "MemoryPolicy", lower_maximum))
    console.print(f"[green]✓[/] {FROM} → {TO} through the MemoryPolicy: {runs[-1].lost_keys} keys lost")

    _print_runs(console, runs)
    _print_savings(console, demo)
    return runs


def _print_runs(console: Console, runs: list[ScaleDownRun]) -> None:
    """The table, and its numbers on one line (for scripts and the tests)."""
    table = Table(title=f"A busy scale-down, {FROM} → {TO} workers, mid-job (the scheduler's ledger)")
    for column in ("how", "keys lost", "tasks re-run", "tasks cut short", "wall s"):
        table.add_column(column, justify="left" if column == "how" else "right")
    for r in runs:
        table.add_row(r.how, str(r.lost_keys), str(r.rerun), str(r.wasted), f"{r.wall:.1f}")
    console.print(table)
    for r in runs:
        console.print(f"scale_down how={r.how.replace(' ', '_')} keys_lost={r.lost_keys} rerun={r.rerun} "
                      f"cut_short={r.wasted} wall_s={r.wall:.1f}", highlight=False)


def _print_savings(console: Console, demo: Demo) -> None:
    """What the scheduler counted (over the operator's bounded RPC) and what the
    policy's status reports, as the memory report's savings table has them."""
    savings = asyncio.run(scheduler_rpc.savings(demo.client.scheduler.address))
    entry = next((e for e in demo.policy_status().get("clusters") or () if e.get("name") == demo.cluster), {})
    data = ReportData(demo.namespace, demo.cluster, demo.policy, scheduler_savings=scheduler_savings(savings["counters"]),
                      status_savings=entry.get("savings"))
    table = Table(title=f"Savings on DaskCluster {demo.cluster} since its scheduler started")
    for column in ("", "the scheduler counted", "the MemoryPolicy's status"):
        table.add_column(column)
    for what, scheduler, status, _ in savings_rows(data):
        table.add_row(what, scheduler, status)
    console.print(table)
