"""What the end-to-end scaling tests and the chaos driver share: this project's
operator as a process of a :class:`~dmo_devstack.stack.LocalStack`,
a DaskCluster whose scheduler preloads the amm_core plugin, a MemoryPolicy with
``adaptive`` and ``retirement``, and what the API and the scheduler say of the
cluster (replicas, worker Deployments, the policy's status entry, Events), a busy job,
and the end state every scaling test asserts (consistent, nothing lost).
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import dask.array as da
from distributed import Client, wait

from dmo_devstack.probes import TaskLedger, task_ledger, worker_statuses
from dmo_devstack.stack import LocalStack, daskcluster_manifest

PRELOAD = {"DASK_DISTRIBUTED__SCHEDULER__PRELOAD": "amm_core.plugin"}
OPERATOR_ARGS = ["--scheduler-access", "pod-ip", "--resync-interval", "2", "--rpc-timeout", "3"]
OPERATOR = "dask-memory-operator"


# --- the operator ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_operator(stack: LocalStack, metrics_port: int, liveness_port: int | None = None,
                   extra: Sequence[str] = ()) -> None:
    """This project's operator as a process of the stack (log: ``<log_dir>/dask-memory-operator.log``);
    ``extra``: more arguments (e.g. the webhook's)."""
    liveness = ["--liveness", f"http://127.0.0.1:{liveness_port}/healthz"] if liveness_port else []
    stack.start_process(OPERATOR, [
        sys.executable, "-m", "dask_memory_operator.cli", "run", "--verbose",
        "--metrics-port", str(metrics_port), *liveness, *OPERATOR_ARGS, *extra,
    ])


# --- the cluster and its policy -------------------------------------------------


def make_cluster(stack: LocalStack, ns: str, name: str, workers: int, memory: str = "400MB",
                 scheduler_env: dict | None = None, grace: int = 5) -> None:
    """A DaskCluster whose scheduler preloads the amm_core plugin; ``grace``: its worker
    pods' terminationGracePeriodSeconds."""
    manifest = daskcluster_manifest(
        name, workers=workers, scheduler_env=PRELOAD | (scheduler_env or {}),
        worker_args=("--nthreads", "1", "--memory-limit", memory),
        worker_pod_extra={"terminationGracePeriodSeconds": grace},
    )
    stack.apply(manifest, namespace=ns)


@contextmanager
def client_of(stack: LocalStack, ns: str, cluster: str, workers: int) -> Iterator[Client]:
    """A Client of the cluster once ``workers`` workers joined, with a TaskLedger."""
    address = stack.wait_scheduler_address(ns, cluster)
    with Client(address, timeout="60s") as client:
        client.wait_for_workers(workers, timeout=120)
        client.register_plugin(TaskLedger())
        yield client



def policy(name: str, cluster: str, *, adaptive: dict | None = None, retirement: dict | None = None,
           policies: list | None = None, interval: str = "500ms") -> dict:
    """A MemoryPolicy governing one cluster, with the scaling fields given."""
    spec: dict = {"clusterNames": [cluster],
                  "activeMemoryManager": {"interval": interval, "policies": policies or []}}
    if adaptive is not None:
        spec["adaptive"] = adaptive
    if retirement is not None:
        spec["retirement"] = retirement
    return {"apiVersion": "amm.dask.org/v1alpha1", "kind": "MemoryPolicy",
            "metadata": {"name": name}, "spec": spec}


def set_adaptive(stack: LocalStack, ns: str, name: str, **adaptive: int) -> None:
    stack.kubectl("patch", "memorypolicy", name, "-n", ns, "--type", "merge",
                  "-p", json.dumps({"spec": {"adaptive": adaptive}}))


def replicas(stack: LocalStack, ns: str, cluster: str) -> int:
    group = stack.get_json(f"/apis/kubernetes.dask.org/v1/namespaces/{ns}/daskworkergroups/{cluster}-default")
    return group["spec"]["worker"]["replicas"]


def worker_deployments(stack: LocalStack, ns: str, cluster: str) -> list[str]:
    return sorted(d["metadata"]["name"] for d in stack.deployments(
        ns, f"dask.org/cluster-name={cluster},dask.org/component=worker")
        if not d["metadata"].get("deletionTimestamp"))


def wait_policy_reconciled(stack: LocalStack, ns: str, name: str, timeout: float = 60) -> dict:
    """Wait until the operator wrote the policy's status (``observedGeneration``): its
    indexes know the policy from then on."""
    path = f"/apis/amm.dask.org/v1alpha1/namespaces/{ns}/memorypolicies/{name}"
    return stack.wait_for(lambda: (body := stack.get_json(path) or {}).get("status", {}).get("observedGeneration")
                          and body, timeout, f"the status of policy {name}")


def scaling_entry(stack: LocalStack, ns: str, name: str, cluster: str) -> dict:
    body = stack.get_json(f"/apis/amm.dask.org/v1alpha1/namespaces/{ns}/memorypolicies/{name}") or {}
    return next((e for e in (body.get("status") or {}).get("scaling") or () if e["cluster"] == cluster), {})


def savings_entry(stack: LocalStack, ns: str, name: str, cluster: str) -> dict:
    """``status.clusters[cluster].savings`` of the policy ({} when none yet)."""
    body = stack.get_json(f"/apis/amm.dask.org/v1alpha1/namespaces/{ns}/memorypolicies/{name}") or {}
    entry = next((e for e in (body.get("status") or {}).get("clusters") or () if e.get("name") == cluster), {})
    return entry.get("savings") or {}


def events(stack: LocalStack, ns: str, reason: str | None = None) -> list[dict]:
    items = (stack.get_json(f"/api/v1/namespaces/{ns}/events") or {}).get("items", [])
    return [e for e in items if reason is None or e.get("reason") == reason]


# --- what the tests promise -----------------------------------------------------


def assert_consistent(stack: LocalStack, ns: str, cluster: str, client: Client, workers: int) -> None:
    """The end state the operator promises: replicas == Deployments == connected
    workers, none closing_gracefully."""
    def settled():
        statuses = client.run_on_scheduler(worker_statuses)
        return (replicas(stack, ns, cluster) == len(worker_deployments(stack, ns, cluster)) == workers
                and len(statuses) == workers and set(statuses.values()) == {"running"})
    stack.wait_for(settled, 120, f"{cluster} to settle at {workers} running workers", interval=0.5)


def assert_nothing_lost(client: Client) -> dict:
    ledger = client.run_on_scheduler(task_ledger)
    assert ledger["computed"] > 0
    assert ledger["rerun"] == {}, f"tasks computed again: {ledger['rerun']}"
    assert ledger["lost"] == {}, f"keys lost with a worker: {ledger['lost']}"
    assert ledger["wasted"] == {}, f"running tasks whose worker left: {ledger['wasted']}"
    return ledger


def busy_job(client: Client, seconds_per_task: float = 0.4, side: int = 4000, chunk: int = 500):
    """Persisted data on every worker (~40 MB each by default) and a stream of tasks
    over it, one per ``chunk`` x ``chunk`` chunk (2 MB by default)."""
    x = da.random.random((side, side), chunks=(chunk, chunk)).persist()
    wait(x)

    def slow(block, delay=seconds_per_task):
        time.sleep(delay)
        return block.sum(keepdims=True)

    return x, x.map_blocks(slow, dtype=float, chunks=(1, 1)).sum()
