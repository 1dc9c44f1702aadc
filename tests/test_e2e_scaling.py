"""End to end: the operator scales DaskClusters itself, and every worker it removes is
retired through the scheduler first.

On the local stack with the real dask-kubernetes operator. "Nothing lost" is asserted
from the scheduler: a :class:`~dmo_devstack.probes.TaskLedger` there
counts tasks computed twice, keys lost with a leaving worker and running tasks whose
worker left under them. Every test ends with the cluster consistent: the worker
group's replicas equal its Deployments and no worker is left closing_gracefully.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Iterator

import dask.array as da
import pytest
from distributed import wait
from prometheus_client.parser import text_string_to_metric_families

from dmo_devstack.probes import amm_savings, grow_memory, task_ledger, worker_statuses
from dmo_devstack.scaling_probes import (
    OPERATOR,
    PRELOAD,
    assert_consistent,
    assert_nothing_lost,
    busy_job,
    client_of,
    events,
    free_port,
    make_cluster,
    policy,
    replicas,
    savings_entry,
    scaling_entry,
    set_adaptive,
    start_operator,
    worker_deployments,
)
from dmo_devstack.stack import LocalStack, daskcluster_manifest


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def memory_operator(stack: LocalStack, metrics_port: int) -> Iterator[None]:
    start_operator(stack, metrics_port)
    yield
    stack.stop_process("dask-memory-operator")


# --- helpers -------------------------------------------------------------------


def retirement_metric(port: int, name: str, **labels: str) -> float:
    """A sample of the operator's /metrics (0 when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def counts(c: dict) -> dict:
    return {k: c[k] for k in ("workers", "keys", "bytes")}


def wait_savings(stack: LocalStack, ns: str, cluster: str, check, what: str, policy: str = "scale") -> dict:
    """Wait until the policy's status.clusters[cluster].savings passes ``check``."""
    return stack.wait_for(lambda: (s := savings_entry(stack, ns, policy, cluster)) and check(s) and s,
                          60, what)


def wait_scaled(stack: LocalStack, ns: str, cluster: str, workers: int, policy: str = "scale") -> dict:
    """Wait until the policy's status says it scales the cluster at ``workers``."""
    def check():
        entry = scaling_entry(stack, ns, policy, cluster)
        return entry.get("replicas") == entry.get("desired") == workers and entry
    return stack.wait_for(check, 60, f"{policy} to scale {cluster} at {workers}")


# --- tests ---------------------------------------------------------------------


def test_lowering_maximum_retires_busy_workers_and_loses_nothing(stack: LocalStack, namespace: str,
                                                                  metrics_port: int, memory_operator):
    """A busy cluster of 4, maximum lowered to 2 mid-job: two workers retire while
    tasks run, their Deployments go, replicas follow; no key lost, no task re-run, no
    running task wasted; Events and metrics tell each retirement."""
    ns, cluster = namespace, "busy"
    make_cluster(stack, ns, cluster, workers=4)
    with client_of(stack, ns, cluster, 4) as client:
        stack.apply(policy("scale", cluster, adaptive={"minimum": 4, "maximum": 4, "interval": "500ms"},
                           retirement={"timeLimit": "60s", "maxConcurrent": 2}), namespace=ns)
        wait_scaled(stack, ns, cluster, 4)
        x, job = busy_job(client)
        future = client.compute(job)
        stack.wait_for(lambda: client.run_on_scheduler(task_ledger)["computed"] > 70, 60, "the job to run")
        before = worker_deployments(stack, ns, cluster)
        set_adaptive(stack, ns, "scale", minimum=2, maximum=2)
        expected = float(x.sum().compute())
        assert abs(future.result() - expected) < 1e-6 * expected
        assert_consistent(stack, ns, cluster, client, 2)
        ledger = assert_nothing_lost(client)
        assert ledger["computed"] >= 64 * 2
        gone = set(before) - set(worker_deployments(stack, ns, cluster))
        assert len(gone) == 2
        retired = events(stack, ns, "WorkerRetired")
        assert {e["message"].split()[1] for e in retired} == gone
        assert all("0 running tasks lost" in e["message"] for e in retired)
        assert len(events(stack, ns, "RetirementStarted")) == 2
        entry = scaling_entry(stack, ns, "scale", cluster)
        assert entry["replicas"] == 2 and entry["desired"] == 2 and "retiring" not in entry
        assert retirement_metric(metrics_port, "dask_memory_operator_retirements_total",
                                 namespace=ns, cluster=cluster, outcome="done") == 2
        assert retirement_metric(metrics_port, "dask_memory_operator_retirement_duration_seconds_count",
                                 outcome="done") >= 2

        # The savings: what the scheduler counted as rescued from the two retired
        # workers (only they held it, another worker did when they left), in the
        # policy's status and the metrics. The Events tell the copies the engine made:
        # a key a task fetched first is rescued without one, and one released before
        # the worker left is not rescued
        counted = client.run_on_scheduler(amm_savings)["rescued"]["operator"]
        assert counted["workers"] == 2 and counted["keys"] > 0 and counted["bytes"] > 0
        saved = wait_savings(stack, ns, cluster, lambda s: s["rescued"]["operator"] == counts(counted),
                             "the savings of the scale-down in the status")
        assert saved["rescued"]["keys"] == counted["keys"] and saved["rescued"]["bytes"] == counted["bytes"]
        assert saved["rescued"]["hook"]["keys"] == 0
        assert saved["lost"]["keys"] == 0 and saved["lost"]["bytes"] == 0
        assert saved["oomKills"]["count"] == 0
        assert saved["workerSeconds"]["adaptive"] >= 0 and saved["workerSeconds"]["maximum"] == 2
        assert retirement_metric(metrics_port, "dask_memory_operator_rescued_bytes", namespace=ns,
                                 cluster=cluster, by="operator") == counted["bytes"]
        assert retirement_metric(metrics_port, "dask_memory_operator_lost_keys", namespace=ns, cluster=cluster) == 0
        assert retirement_metric(metrics_port, "dask_memory_operator_worker_seconds", namespace=ns,
                                 cluster=cluster, run="at_maximum") > 0


def test_retirement_without_room_keeps_the_worker_and_says_why(stack: LocalStack, namespace: str,
                                                               memory_operator):
    """Data that fits on 2 workers but not 1: maximum lowered to 1 aborts the
    retirement (no room), the worker is kept and running, nothing is deleted, and
    the status and an Event say why."""
    ns, cluster = namespace, "full"
    make_cluster(stack, ns, cluster, workers=2, memory="300MB")
    with client_of(stack, ns, cluster, 2) as client:
        stack.apply(policy("scale", cluster, adaptive={"minimum": 2, "maximum": 2, "memoryFloor": False},
                           retirement={"timeLimit": "30s"}), namespace=ns)
        # ~160 MB on each worker: one worker cannot hold it all under its limit
        x = da.random.random((2 * 20_000, 1000), chunks=(5_000, 1000)).persist()
        wait(x)
        before = worker_deployments(stack, ns, cluster)
        set_adaptive(stack, ns, "scale", minimum=1, maximum=1)
        stack.wait_for(lambda: events(stack, ns, "RetirementAborted"), 90, "the retirement to abort")
        aborted = events(stack, ns, "RetirementAborted")[0]
        assert "room" in aborted["message"] and aborted["type"] == "Warning"
        entry = stack.wait_for(
            lambda: (e := scaling_entry(stack, ns, "scale", cluster)).get("reason") == "RetirementAborted" and e,
            30, "the status to say the retirement aborted")
        assert "room" in entry["message"]
        assert worker_deployments(stack, ns, cluster) == before
        assert replicas(stack, ns, cluster) == 2
        statuses = client.run_on_scheduler(worker_statuses)
        assert set(statuses.values()) == {"running"}
        assert_nothing_lost(client)
        assert not events(stack, ns, "WorkerRetired")


def test_operator_killed_mid_retirement_finishes_it_after_restart(stack: LocalStack, namespace: str,
                                                                   metrics_port: int, memory_operator):
    """SIGKILL while two workers retire (their tasks draining): the restarted
    operator finishes them from the scheduler's records and the group's ledger; each
    Deployment deleted once, replicas equal to Deployments, nothing
    closing_gracefully, nothing lost."""
    ns, cluster = namespace, "crash"
    make_cluster(stack, ns, cluster, workers=3)
    with client_of(stack, ns, cluster, 3) as client:
        stack.apply(policy("scale", cluster, adaptive={"minimum": 3, "maximum": 3},
                           retirement={"timeLimit": "120s", "maxConcurrent": 2}), namespace=ns)
        wait_scaled(stack, ns, cluster, 3)
        # long tasks: the drain takes a while. 16 of them over the same 72 MB as 36
        # would be (4.5 MB chunks): the retirements start with every worker busy as
        # before, and the one worker left has less to do alone afterwards
        x, job = busy_job(client, seconds_per_task=1.5, side=3000, chunk=750)
        future = client.compute(job)
        stack.wait_for(lambda: client.run_on_scheduler(task_ledger)["computed"] > 16 + 2, 60, "the job to run")
        set_adaptive(stack, ns, "scale", minimum=1, maximum=1)
        stack.wait_for(lambda: len(scaling_entry(stack, ns, "scale", cluster).get("retiring", [])) == 2,
                       60, "two retirements under way")
        operator = next(p for p in stack.processes() if "dask_memory_operator.cli" in " ".join(p.cmdline())
                        and " run " in f" {' '.join(p.cmdline())} ")
        operator.send_signal(signal.SIGKILL)
        operator.wait(10)
        stack.stop_process("dask-memory-operator")
        start_operator(stack, metrics_port)
        expected = float(x.sum().compute())
        assert abs(future.result() - expected) < 1e-6 * expected
        assert_consistent(stack, ns, cluster, client, 1)
        assert_nothing_lost(client)
        # each Deployment deleted once, across both operators (their log is appended to
        # one file; an Event may be lost with a kill, a request is logged before it)
        prefix = "HTTP Request: DELETE http://"
        deletes = [line.split("/deployments/")[1].split()[0]
                   for line in stack.logs("dask-memory-operator").splitlines()
                   if prefix in line and f"/namespaces/{ns}/deployments/" in line and line.endswith('200 OK"')]
        assert len(deletes) == 2 and len(set(deletes)) == 2, deletes
        # The savings survive the restart and are not counted twice: the status says
        # what the scheduler counted, whichever operator read it
        counted = client.run_on_scheduler(amm_savings)["rescued"]["operator"]
        assert counted["workers"] == 2 and counted["bytes"] > 0
        wait_savings(stack, ns, cluster, lambda s: s["rescued"]["operator"] == counts(counted),
                     "the savings of both retirements in the status")


def test_target_scales_up_at_once_and_back_down_after_the_wait_count(stack: LocalStack, namespace: str,
                                                                       memory_operator):
    """minimum 1, maximum 3: a burst of tasks raises replicas at once (dask-kubernetes
    creates the pods); once idle, the operator waits waitCount looks, then retires
    the extra workers gracefully."""
    ns, cluster = namespace, "elastic"
    make_cluster(stack, ns, cluster, workers=1)
    with client_of(stack, ns, cluster, 1) as client:
        stack.apply(policy("scale", cluster, adaptive={"minimum": 1, "maximum": 3, "waitCount": 4,
                                                       "interval": "500ms"}), namespace=ns)
        wait_scaled(stack, ns, cluster, 1)
        # 40 s of work: the scheduler's target stays at 3 until the last 5 tasks, long
        # after the two new workers joined
        futures = client.map(lambda i: time.sleep(2) or i, range(20))
        stack.wait_for(lambda: replicas(stack, ns, cluster) == 3, 60, "replicas raised to maximum")
        # posted right after the replicas are written
        stack.wait_for(lambda: events(stack, ns, "ScaledUp"), 30, "the ScaledUp Event")
        client.wait_for_workers(3, timeout=120)
        assert client.gather(futures) == list(range(20))
        del futures
        assert_consistent(stack, ns, cluster, client, 1)
        assert_nothing_lost(client)
        assert len(events(stack, ns, "WorkerRetired")) + len(events(stack, ns, "PendingWorkersRemoved")) >= 1


def test_memory_floor_holds_a_cluster_whose_data_needs_more_than_the_target(stack: LocalStack, namespace: str,
                                                                            memory_operator):
    """An idle cluster whose data needs 3 workers under their pause threshold stays
    at 3 (HeldByMemoryFloor) although the scheduler's target asks for 2 and minimum
    is 1; once the data is released it scales down to 1."""
    ns, cluster = namespace, "floor"
    # The floor reads the pause threshold from the scheduler's config (one image for
    # both); set low there only, so that the workers themselves never pause here.
    make_cluster(stack, ns, cluster, workers=3, memory="300MB",
                 scheduler_env={"DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE": "0.3"})
    with client_of(stack, ns, cluster, 3) as client:
        # 210 MB: 3 workers under 30% of 300 MB; distributed's own target (which keeps
        # twice the data in memory limits) asks for 2
        x = da.random.random((3 * 8_750, 1000), chunks=(8_750, 1000)).persist()
        wait(x)
        stack.apply(policy("scale", cluster, adaptive={"minimum": 1, "maximum": 3, "waitCount": 2,
                                                       "interval": "500ms"}), namespace=ns)
        entry = stack.wait_for(
            lambda: (e := scaling_entry(stack, ns, "scale", cluster)).get("reason") == "HeldByMemoryFloor" and e,
            60, "the memory floor to hold the cluster")
        assert entry["memoryFloor"] == 3 and entry["desired"] == 3 and entry["target"] < 3
        time.sleep(3)  # several looks past waitCount: nothing may retire meanwhile
        assert not events(stack, ns, "RetirementStarted")
        assert replicas(stack, ns, cluster) == 3
        del x
        assert_consistent(stack, ns, cluster, client, 1)
        assert_nothing_lost(client)


def test_a_daskautoscaler_beside_adaptive_is_a_conflict_not_a_fight(stack: LocalStack, namespace: str,
                                                                    memory_operator):
    ns, cluster = namespace, "autoscaled"
    make_cluster(stack, ns, cluster, workers=2)
    stack.apply({"apiVersion": "kubernetes.dask.org/v1", "kind": "DaskAutoscaler",
                 "metadata": {"name": "theirs"}, "spec": {"cluster": cluster, "minimum": 2, "maximum": 2}},
                namespace=ns)
    stack.apply(policy("scale", cluster, adaptive={"minimum": 1, "maximum": 1}), namespace=ns)

    def conflict():
        body = stack.get_json(f"/apis/amm.dask.org/v1alpha1/namespaces/{ns}/memorypolicies/scale") or {}
        cond = {c["type"]: c for c in (body.get("status") or {}).get("conditions") or ()}.get("Conflict", {})
        entry = scaling_entry(stack, ns, "scale", cluster)
        return cond.get("status") == "True" and entry.get("reason") == "Conflict" and (cond, entry)
    cond, entry = stack.wait_for(conflict, 60, "the Conflict to be reported")
    assert cond["reason"] == "DaskAutoscaler" and "theirs" in cond["message"]
    assert "theirs" in entry["message"]
    time.sleep(2)  # the operator had many looks: maximum 1 was not acted on
    assert replicas(stack, ns, cluster) == 2 and len(worker_deployments(stack, ns, cluster)) == 2
    assert not events(stack, ns, "RetirementStarted")


def test_workers_that_never_connected_go_first_without_a_retirement(stack: LocalStack, namespace: str,
                                                                    memory_operator):
    """adaptive on a second worker group whose pods never connect (pending): lowering
    maximum deletes those Deployments at once (nothing to retire) and takes their
    replicas off; the default group is left alone."""
    ns, cluster = namespace, "mixed"
    make_cluster(stack, ns, cluster, workers=1)
    stack.apply({"apiVersion": "kubernetes.dask.org/v1", "kind": "DaskWorkerGroup",
                 "metadata": {"name": f"{cluster}-stuck"},
                 "spec": {"cluster": cluster, "worker": {"replicas": 2, "spec": {"containers": [
                     {"name": "worker", "image": "ghcr.io/dask/dask:latest", "args": ["sleep", "600"]}]}}}},
                namespace=ns)
    with client_of(stack, ns, cluster, 1) as client:
        stack.wait_for(lambda: len(worker_deployments(stack, ns, cluster)) == 3, 60, "the stuck group's Deployments")
        default = worker_deployments(stack, ns, cluster)
        stack.apply(policy("scale", cluster, adaptive={"minimum": 0, "maximum": 0,
                                                       "workerGroup": f"{cluster}-stuck"}), namespace=ns)
        stuck = f"/apis/kubernetes.dask.org/v1/namespaces/{ns}/daskworkergroups/{cluster}-stuck"
        stack.wait_for(lambda: stack.get_json(stuck)["spec"]["worker"]["replicas"] == 0, 60,
                       "the stuck group scaled to 0")
        left = worker_deployments(stack, ns, cluster)
        assert len(left) == 1 and left[0] in default and left[0].startswith(f"{cluster}-default-")
        # posted right after the replicas are written
        stack.wait_for(lambda: events(stack, ns, "PendingWorkersRemoved"), 30, "the PendingWorkersRemoved Event")
        [removed] = events(stack, ns, "PendingWorkersRemoved")
        assert "2 worker(s)" in removed["message"]
        assert not events(stack, ns, "RetirementStarted")
        ledger = json.loads(stack.get_json(stuck)["metadata"]["annotations"]["amm.dask.org/scaling-ledger"])
        assert ledger["deleting"] == [] and len(ledger["removed"]) == 2
        assert replicas(stack, ns, cluster) == 1
        assert set(client.run_on_scheduler(worker_statuses).values()) == {"running"}


def test_an_oom_killed_worker_is_counted_told_and_holds_the_floor(stack: LocalStack, namespace: str,
                                                                   metrics_port: int, memory_operator):
    """A worker whose process outgrows its pod's 400Mi limit is OOM-killed (the process
    kubelet kills its container as the kernel would, and reports OOMKilled): the
    policy's status counts it once, with the keys the scheduler lost with it (as
    oomKilled, not killed), a Warning Event on the DaskCluster names the worker and its
    limit, the metric counts it; adaptive does not scale the group below the size it
    was killed at although its minimum is lowered; and a restarted operator neither
    counts it again nor forgets the floor."""
    ns, cluster = namespace, "oom"
    manifest = daskcluster_manifest(
        cluster, workers=3, scheduler_env=PRELOAD, worker_args=("--nthreads", "1", "--memory-limit", "400MB"),
        # the nanny does not restart its worker first: the container's limit is reached
        worker_env={"DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE": "False"},
        worker_pod_extra={"terminationGracePeriodSeconds": 5})
    manifest["spec"]["worker"]["spec"]["containers"][0]["resources"] = {"limits": {"memory": "400Mi"}}
    stack.apply(manifest, namespace=ns)
    with client_of(stack, ns, cluster, 3) as client:
        stack.apply(policy("scale", cluster, adaptive={"minimum": 3, "maximum": 3, "interval": "500ms",
                                                       "waitCount": 2}), namespace=ns)
        wait_scaled(stack, ns, cluster, 3)
        wait_savings(stack, ns, cluster, lambda s: "source" in s, "the savings to start")
        victim, info = sorted(client.scheduler_info(n_workers=-1)["workers"].items())[0]
        name = info["name"]
        data = client.scatter([bytes(2_000_000) + bytes([i]) for i in range(5)], workers=[victim])
        client.run(grow_memory, workers=[victim])

        saved = wait_savings(stack, ns, cluster, lambda s: s["oomKills"]["count"] == 1, "the OOM kill counted")
        [kill] = saved["oomKills"]["recent"]
        assert kill["worker"] == name and kill["group"] == f"{cluster}-default", kill
        assert kill["memoryLimit"] == 400 * 2**20 and kill["workers"] == 3
        [left] = [d for d in client.run_on_scheduler(amm_savings)["departures"]
                  if d["worker"] == name and d["why"] == "killed"]
        assert left["keys"] >= 5 and left["bytes"] >= 10_000_000  # the scattered keys, at least
        assert kill["matched"] and (kill["keys"], kill["bytes"]) == (left["keys"], left["bytes"])
        assert saved["lost"]["byReason"]["oomKilled"] == {"workers": 1, "keys": left["keys"], "bytes": left["bytes"]}
        assert saved["lost"]["byReason"]["killed"]["keys"] == 0
        assert saved["lost"]["keys"] == left["keys"]
        del data

        told = [e for e in events(stack, ns, "OOMKilled") if e["involvedObject"]["kind"] == "DaskCluster"]
        assert len(told) == 1 and told[0]["type"] == "Warning", told
        message = told[0]["message"]
        assert f"Worker {name} " in message and "memory limit of 419 MB" in message, message
        assert f"lost {left['keys']} keys" in message and "at 3 workers or more until" in message, message
        def oom_metric() -> float:
            try:
                return retirement_metric(metrics_port, "dask_memory_operator_oom_kills", namespace=ns,
                                         cluster=cluster)
            except OSError:  # a new operator not serving its metrics yet
                return -1
        assert oom_metric() == 1
        assert retirement_metric(metrics_port, "dask_memory_operator_lost_keys", namespace=ns,
                                 cluster=cluster, reason="oomKilled") == left["keys"]

        # the floor: minimum 1 would let the idle cluster go to 1; the kill holds it at 3
        client.wait_for_workers(3, timeout=120)  # the killed container restarted
        set_adaptive(stack, ns, "scale", minimum=1, maximum=3)
        entry = stack.wait_for(lambda: (e := scaling_entry(stack, ns, "scale", cluster)).get("reason")
                               == "HeldByOOMKill" and e, 60, "the OOM floor to hold the group")
        assert entry["oomFloor"] == 3 and entry["desired"] == 3 and entry["target"] < 3, entry
        assert f"worker {name} was OOM-killed at 3 workers" in entry["message"]
        time.sleep(3)  # several looks past waitCount: nothing retires
        assert replicas(stack, ns, cluster) == 3 and not events(stack, ns, "RetirementStarted")

        # a new operator: the kill, still in the pod's lastState, is not counted again
        stack.stop_process(OPERATOR)
        start_operator(stack, metrics_port)
        stack.wait_for(lambda: oom_metric() == 1, 60, "the new operator's savings metrics")
        time.sleep(3)  # passes of the new operator
        after = savings_entry(stack, ns, "scale", cluster)
        assert after["oomKills"] == saved["oomKills"] and after["lost"] == saved["lost"]
        assert len([e for e in events(stack, ns, "OOMKilled") if e["involvedObject"]["kind"] == "DaskCluster"]) == 1
        assert scaling_entry(stack, ns, "scale", cluster).get("reason") == "HeldByOOMKill"
        assert replicas(stack, ns, cluster) == 3
