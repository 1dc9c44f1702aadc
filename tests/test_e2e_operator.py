"""End to end: MemoryPolicy -> dask-memory-operator -> live Dask schedulers.

Everything runs for real on the local stack: kubectl talks to the emulated API, the
dask-kubernetes operator turns DaskClusters into Deployments, the process kubelet
turns those into `dask scheduler`/`dask worker` processes, and this operator (its
own process, as `dask-memory-operator run`) configures the schedulers. What a
scheduler runs is always checked by asking that scheduler, never the operator.

Both clusters start with their own configuration "AMM off", so that what the
operator changes, and what it restores, can be told apart from distributed's
default (AMM on with ReduceReplicas).

The tests share one namespace and its two clusters (starting Dask processes is the
slow part) and run as a story, in file order: each says what it expects to find.
The policy `both` is created by the unreachable-scheduler test and used by the two
after it; the last test leaves a worker of `other` retired.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import urllib.request
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import yaml
from distributed import Client
from kr8s.asyncio.objects import Service
from prometheus_client.parser import text_string_to_metric_families

from amm_core.replicate import replicate
from dask_memory_operator.schedulers.locator import _target_port, comm_port
from dask_memory_operator.devstack.probes import (
    amm_cycles,
    amm_dropped,
    amm_state,
    replica_counts,
    set_pause_fraction,
)
from dask_memory_operator.devstack.stack import LocalStack, daskcluster_manifest

MATCHING, OTHER = "matching", "other"
AMM_OFF = {"DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START": "False"}
#: `matching` has amm_core in its image and preloads it; `other` gets it live
PRELOAD = {"DASK_DISTRIBUTED__SCHEDULER__PRELOAD": "amm_core.plugin"}
#: what the short name ReduceReplicas stands for
REDUCE = "amm_core.replicate.ReduceReplicas"
#: the schedulers' own configuration: distributed's defaults, but the AMM off
OWN_CONFIG = {"running": False, "interval": 2.0, "measure": "optimistic",
              "policies": ["distributed.active_memory_manager.ReduceReplicas"]}


# --- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def memory_operator(stack: LocalStack, metrics_port: int):
    """This operator, as users run it, in its own process."""
    stack.start_process("dask-memory-operator", [
        sys.executable, "-m", "dask_memory_operator.cli", "run", "--verbose",
        "--scheduler-access", "cluster-ip", "--resync-interval", "1", "--rpc-timeout", "2",
        "--metrics-port", str(metrics_port),
    ])
    yield
    stack.stop_process("dask-memory-operator")


@pytest.fixture(scope="module")
def clusters(stack: LocalStack, memory_operator) -> Iterator[str]:
    """A namespace with the MemoryPolicy `analytics` (team=analytics), then two
    DaskClusters of 2 workers created after it: `matching` is labelled team=analytics
    and preloads the plugin, `other` is neither. Yields the namespace."""
    ns = "e2e-operator"
    stack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    stack.apply(ANALYTICS, namespace=ns)
    for name, labels, env in ((MATCHING, {"team": "analytics"}, AMM_OFF | PRELOAD), (OTHER, {}, AMM_OFF)):
        manifest = daskcluster_manifest(name, workers=2, scheduler_env=env)
        manifest["metadata"]["labels"] = labels
        stack.apply(manifest, namespace=ns)
    for name in (MATCHING, OTHER):
        with scheduler(stack, ns, name) as client:
            client.wait_for_workers(2, timeout=120)
    yield ns
    stack.kubectl("delete", "memorypolicies", "--all", "-n", ns, "--wait=false", check=False)
    stack.kubectl("delete", "daskclusters", "--all", "-n", ns, "--wait=false", check=False)
    stack.wait_for(lambda: not stack.pod_processes(ns), timeout=90, what=f"the processes of namespace {ns} to end")


@pytest.fixture(autouse=True)
def logs_on_failure(request, stack: LocalStack):
    yield
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        print(stack.dump_logs("e2e-operator", tail=60))


# --- helpers -------------------------------------------------------------------


@contextmanager
def scheduler(stack: LocalStack, ns: str, cluster: str) -> Iterator[Client]:
    address = stack.wait_for(lambda: _address(stack, ns, cluster), 120, f"{cluster}'s Service")
    with Client(address, timeout="60s") as client:
        yield client


def _address(stack: LocalStack, ns: str, cluster: str) -> str | None:
    try:
        return stack.scheduler_address(ns, cluster)
    except LookupError:
        return None


def scheduler_amm(stack: LocalStack, ns: str, cluster: str) -> dict:
    with scheduler(stack, ns, cluster) as client:
        return client.run_on_scheduler(amm_state)


def wait_amm(stack: LocalStack, ns: str, cluster: str, timeout: float = 60, **expected) -> dict:
    """Wait until the scheduler itself reports ``expected`` (a subset of amm_state)."""
    def check():
        state = scheduler_amm(stack, ns, cluster)
        return state if all(state[k] == v for k, v in expected.items()) else None
    return stack.wait_for(check, timeout, f"{cluster}'s AMM to be {expected}", interval=0.5)


def policy_manifest(name: str, selector=None, names=None, **amm) -> dict:
    spec = {"activeMemoryManager": amm}
    if selector is not None:
        spec["clusterSelector"] = selector
    if names is not None:
        spec["clusterNames"] = names
    return {"apiVersion": "amm.dask.org/v1alpha1", "kind": "MemoryPolicy",
            "metadata": {"name": name}, "spec": spec}


def get_policy(stack: LocalStack, ns: str, name: str) -> dict:
    return json.loads(stack.kubectl("get", "mempol", name, "-n", ns, "-o", "json").stdout)


def conditions(policy: dict) -> dict:
    return {c["type"]: c for c in (policy.get("status") or {}).get("conditions") or ()}


def wait_status(stack: LocalStack, ns: str, name: str, predicate, what: str, timeout: float = 60) -> dict:
    def check():
        policy = get_policy(stack, ns, name)
        status = policy.get("status") or {}
        if status.get("observedGeneration") != policy["metadata"]["generation"]:
            return None
        return policy if predicate(policy) else None
    return stack.wait_for(check, timeout, f"MemoryPolicy {name}: {what}", interval=0.5)


def cluster_entry(policy: dict, cluster: str) -> dict:
    return next((e for e in policy["status"].get("clusters") or () if e["name"] == cluster), {})


def events_about(stack: LocalStack, ns: str, kind: str, name: str) -> list[dict]:
    out = stack.kubectl("get", "events", "-n", ns, "-o", "json").stdout
    return [e for e in json.loads(out)["items"]
            if e["involvedObject"].get("kind") == kind and e["involvedObject"].get("name") == name]


def scheduler_pid(stack: LocalStack, ns: str, cluster: str) -> int:
    [pod] = stack.pods(ns, f"dask.org/cluster-name={cluster},dask.org/component=scheduler")
    procs = stack.pod_processes(ns, pod["metadata"]["name"])
    [main] = [p for p in procs if "scheduler" in " ".join(p.cmdline())][:1]
    return main.pid


# --- the tests -------------------------------------------------------------------


ANALYTICS = policy_manifest("analytics", selector={"matchLabels": {"team": "analytics"}},
                            interval="500ms", measure="managed", policies=[{"class": "ReduceReplicas"}])


def test_cluster_created_after_policy_gets_exactly_its_config(stack: LocalStack, clusters: str):
    ns = clusters
    # kubectl wait, as a user would
    stack.kubectl("wait", "--for=condition=Ready", "mempol/analytics", "-n", ns, "--timeout=60s")

    assert scheduler_amm(stack, ns, MATCHING) == {
        "running": True, "interval": 0.5, "measure": "managed", "policies": [REDUCE], "plugin": True,
    }
    assert scheduler_amm(stack, ns, OTHER) == dict(OWN_CONFIG, plugin=False)

    policy = wait_status(stack, ns, "analytics", lambda p: p["status"].get("appliedClusters") == 1, "applied")
    assert policy["status"]["matchedClusters"] == 1
    entry = cluster_entry(policy, MATCHING)
    assert entry["state"] == "Applied" and entry["pluginSource"] == "preload"
    assert entry["appliedGeneration"] == policy["metadata"]["generation"]
    assert entry["amm"]["running"] is True and entry["amm"]["measure"] == "managed"

    table = stack.kubectl("get", "mempol", "-n", ns).stdout
    assert table.split("\n")[0].split() == ["NAME", "MATCHED", "APPLIED", "READY", "REASON", "AGE"]
    assert table.split("\n")[1].split()[:5] == ["analytics", "1", "1", "True", "Applied"]

    assert any(e["reason"] == "Applied" for e in events_about(stack, ns, "MemoryPolicy", "analytics"))
    assert any(e["reason"] == "MemoryPolicyApplied" for e in events_about(stack, ns, "DaskCluster", MATCHING))


def test_reduce_replicas_works_on_configured_cluster_only(stack: LocalStack, clusters: str):
    ns = clusters
    wait_amm(stack, ns, MATCHING, running=True, policies=[REDUCE])
    with scheduler(stack, ns, MATCHING) as matching, scheduler(stack, ns, OTHER) as other:
        dropped_before = matching.run_on_scheduler(amm_dropped)
        futures = {}
        for name, client in (("matching", matching), ("other", other)):
            futures[name] = client.submit(lambda: b"x" * 2**20, key=f"payload-{name}", pure=False)
            futures[name].result()
            client.replicate([futures[name]])  # a copy on both workers

        key = futures["matching"].key
        stack.wait_for(lambda: matching.run_on_scheduler(replica_counts, [key])[key] == 1, 30,
                       "the configured cluster's AMM to drop the extra copy")
        assert matching.run_on_scheduler(amm_dropped) > dropped_before
        start = matching.run_on_scheduler(amm_cycles)
        stack.wait_for(lambda: matching.run_on_scheduler(amm_cycles) >= start + 4, 30, "4 more AMM cycles")
        key = futures["other"].key
        assert other.run_on_scheduler(replica_counts, [key]) == {key: 2}

    policy = wait_status(stack, ns, "analytics",
                         lambda p: cluster_entry(p, MATCHING).get("amm", {}).get("replicasDropped", 0) >= 1,
                         "replicasDropped reported")
    assert cluster_entry(policy, MATCHING)["amm"]["cycles"] > 0


def test_replicate_asks_for_the_policy_on_a_managed_scheduler(stack: LocalStack, clusters: str):
    """amm_core's replicate() would add a Replicate policy that the operator then takes
    away: on a scheduler a MemoryPolicy manages, it says what to change instead."""
    ns = clusters
    with scheduler(stack, ns, MATCHING) as client:
        future = client.submit(lambda: 1, key="replicate-me", pure=False)
        future.result()
        with pytest.raises(RuntimeError, match=f"managed by MemoryPolicy {ns}/analytics.*class: Replicate"):
            replicate(client, [future], n=2)
        assert client.run_on_scheduler(amm_state)["policies"] == [REDUCE]


def test_metrics_mirror_the_schedulers(clusters: str, metrics_port: int):
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
    ours = {"namespace": clusters, "policy": "analytics", "cluster": MATCHING}

    def value(family: str, **labels: str) -> float:
        [sample] = [s for s in families[family].samples if s.labels == ours | labels]
        return sample.value

    assert value("dask_memory_operator_cluster_state", state="Applied") == 1
    assert value("dask_memory_operator_cluster_state", state="Degraded") == 0
    assert value("dask_memory_operator_amm_replicas_dropped") >= 1
    assert value("dask_memory_operator_amm_cycles") >= 1


def test_policy_change_is_followed(stack: LocalStack, clusters: str):
    ns = clusters
    stack.kubectl("patch", "mempol", "analytics", "-n", ns, "--type=merge", "-p",
                  json.dumps({"spec": {"activeMemoryManager": {"interval": "1s", "measure": "process",
                                                               "policies": []}}}))
    state = wait_amm(stack, ns, MATCHING, interval=1.0, measure="process", policies=[])
    assert state["running"] is True
    stack.kubectl("patch", "mempol", "analytics", "-n", ns, "--type=merge", "-p",
                  json.dumps({"spec": {"activeMemoryManager": {"enabled": False}}}))
    wait_amm(stack, ns, MATCHING, running=False)
    policy = wait_status(stack, ns, "analytics", lambda p: conditions(p)["Ready"]["status"] == "True", "Ready")
    assert cluster_entry(policy, MATCHING)["appliedGeneration"] == policy["metadata"]["generation"]
    assert scheduler_amm(stack, ns, OTHER) == dict(OWN_CONFIG, plugin=False)
    # back to the config the other tests expect
    stack.kubectl("patch", "mempol", "analytics", "-n", ns, "--type=merge", "-p",
                  json.dumps({"spec": {"activeMemoryManager": {"enabled": True, "interval": "500ms",
                                                               "measure": "managed",
                                                               "policies": [{"class": "ReduceReplicas"}]}}}))
    wait_amm(stack, ns, MATCHING, running=True, interval=0.5, policies=[REDUCE])


def test_hand_made_change_is_undone(stack: LocalStack, clusters: str):
    ns = clusters
    wait_amm(stack, ns, MATCHING, running=True, interval=0.5)
    applied_events = len(_applied(stack, ns))
    with scheduler(stack, ns, MATCHING) as client:
        client.amm.stop()
    stack.wait_for(lambda: len(_applied(stack, ns)) > applied_events, 30, "an Applied Event for the repair")
    wait_amm(stack, ns, MATCHING, running=True, interval=0.5, policies=[REDUCE])


def _applied(stack: LocalStack, ns: str) -> list[dict]:
    return [e for e in events_about(stack, ns, "DaskCluster", MATCHING) if e["reason"] == "MemoryPolicyApplied"]


def _invalid(policy: dict) -> bool:
    return conditions(policy).get("Invalid", {}).get("status") == "True"


def test_invalid_policies_are_refused_and_apply_nothing(stack: LocalStack, clusters: str):
    ns = clusters
    bad_measure = policy_manifest("bad-measure", names=[OTHER], measure="rss")
    result = stack.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(bad_measure), check=False)
    assert result.returncode != 0
    assert "Unsupported value" in result.stderr and "rss" in result.stderr

    unknown_field = policy_manifest("bad-field", names=[OTHER])
    unknown_field["spec"]["activeMemoryManager"]["intervall"] = "1s"
    result = stack.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(unknown_field), check=False)
    assert result.returncode != 0 and "intervall" in result.stderr

    unknown_class = policy_manifest("bad-class", names=[OTHER], policies=[{"class": "NoSuchPolicy"}])
    stack.apply(unknown_class, namespace=ns)
    policy = wait_status(stack, ns, "bad-class", _invalid, "Invalid")
    invalid = conditions(policy)["Invalid"]
    assert invalid["status"] == "True"
    assert "spec.activeMemoryManager.policies[0].class" in invalid["message"]
    assert "NoSuchPolicy" in invalid["message"]
    assert conditions(policy)["Ready"]["status"] == "False"
    assert any(e["reason"] == "Invalid" for e in events_about(stack, ns, "MemoryPolicy", "bad-class"))

    not_allowed = policy_manifest("bad-path", names=[OTHER], policies=[{"class": "os.system"}])
    stack.apply(not_allowed, namespace=ns)
    policy = wait_status(stack, ns, "bad-path", _invalid, "Invalid")
    assert "not allowed" in conditions(policy)["Invalid"]["message"]

    bad_args = policy_manifest("bad-args", names=[OTHER], policies=[{"class": "Rebalance", "args": {"nope": 1}}])
    stack.apply(bad_args, namespace=ns)
    policy = wait_status(stack, ns, "bad-args", _invalid, "Invalid")
    assert "policies[0].args" in conditions(policy)["Invalid"]["message"]
    assert "nope" in conditions(policy)["Invalid"]["message"]

    assert scheduler_amm(stack, ns, OTHER) == dict(OWN_CONFIG, plugin=False)
    stack.kubectl("delete", "mempol", "bad-class", "bad-path", "bad-args", "-n", ns)


def test_cluster_labelled_later_is_picked_up_and_released(stack: LocalStack, clusters: str):
    ns = clusters
    stack.kubectl("label", "daskcluster", OTHER, "-n", ns, "team=analytics")
    wait_amm(stack, ns, OTHER, running=True, interval=0.5, measure="managed", policies=[REDUCE])
    policy = wait_status(stack, ns, "analytics", lambda p: p["status"].get("appliedClusters") == 2, "2 applied")
    assert cluster_entry(policy, OTHER)["pluginSource"] == "live"

    stack.kubectl("label", "daskcluster", OTHER, "-n", ns, "team-")
    wait_amm(stack, ns, OTHER, **OWN_CONFIG)
    policy = wait_status(stack, ns, "analytics", lambda p: p["status"].get("matchedClusters") == 1, "1 matched")
    assert cluster_entry(policy, OTHER) == {}


def test_dask_kubernetes_still_scales_the_governed_cluster(stack: LocalStack, clusters: str):
    """Running beside dask-kubernetes: it sees every replica change of a governed
    cluster, and this operator writes nothing on DaskClusters or worker groups."""
    ns = clusters
    wait_amm(stack, ns, MATCHING, running=True)
    with scheduler(stack, ns, MATCHING) as client:
        stack.kubectl("scale", "daskworkergroup", f"{MATCHING}-default", "-n", ns, "--replicas=3")
        client.wait_for_workers(3, timeout=90)
        stack.kubectl("scale", "daskworkergroup", f"{MATCHING}-default", "-n", ns, "--replicas=2")
        stack.wait_for(lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == 2, 90, "2 workers")
    for kind, name in (("daskcluster", MATCHING), ("daskworkergroup", f"{MATCHING}-default")):
        meta = json.loads(stack.kubectl("get", kind, name, "-n", ns, "-o", "json").stdout)["metadata"]
        ours = [k for k in (meta.get("annotations") or {}) if "amm.dask.org" in k]
        assert ours == [] and "amm.dask.org/restore-schedulers" not in (meta.get("finalizers") or [])


def test_changes_made_while_the_operator_is_down_are_applied_on_restart(stack: LocalStack, clusters: str):
    ns = clusters
    wait_amm(stack, ns, MATCHING, running=True, interval=0.5)
    stack.stop_process("dask-memory-operator")
    try:
        stack.kubectl("patch", "mempol", "analytics", "-n", ns, "--type=merge", "-p",
                      json.dumps({"spec": {"activeMemoryManager": {"interval": "750ms"}}}))
        assert scheduler_amm(stack, ns, MATCHING)["interval"] == 0.5  # nobody applied it yet
    finally:
        stack.processes_by_name["dask-memory-operator"].start()
    wait_amm(stack, ns, MATCHING, running=True, interval=0.75)
    stack.apply(ANALYTICS, namespace=ns)
    wait_amm(stack, ns, MATCHING, running=True, interval=0.5)


def test_port_forward_targets_the_pods_port(stack: LocalStack, clusters: str, monkeypatch):
    """`--scheduler-access port-forward` forwards to the pod's port behind tcp-comm
    (the emulator cannot stream a port-forward; the lookup of the port is checked)."""
    monkeypatch.setenv("KUBECONFIG", str(stack.kubeconfig))

    async def target() -> int:
        service = await Service.get(f"{MATCHING}-scheduler", namespace=clusters)
        return await _target_port(service, comm_port(service.raw))

    assert asyncio.run(target()) == 8786


def test_restarted_scheduler_is_configured_again(stack: LocalStack, clusters: str):
    ns = clusters
    wait_amm(stack, ns, MATCHING, running=True, interval=0.5)
    os.kill(scheduler_pid(stack, ns, MATCHING), signal.SIGKILL)
    # the kubelet restarts it with its own config; the operator puts the policy back
    stack.wait_for(lambda: _restarts(stack, ns, MATCHING) >= 1, 60, "the scheduler's restart")
    state = wait_amm(stack, ns, MATCHING, running=True, interval=0.5, measure="managed", policies=[REDUCE])
    assert state["plugin"] is True


def _restarts(stack: LocalStack, ns: str, cluster: str) -> int:
    pods = stack.pods(ns, f"dask.org/cluster-name={cluster},dask.org/component=scheduler")
    return sum(cs.get("restartCount", 0) for p in pods for cs in p.get("status", {}).get("containerStatuses") or ())


def test_unreachable_scheduler_degrades_only_its_cluster(stack: LocalStack, clusters: str):
    ns = clusters
    stack.apply(policy_manifest("both", names=[MATCHING, OTHER], interval="1s"), namespace=ns)
    # `both` is newer than `analytics`: it governs only `other`
    wait_amm(stack, ns, OTHER, running=True, interval=1.0)
    pid = scheduler_pid(stack, ns, OTHER)
    os.kill(pid, signal.SIGSTOP)
    try:
        policy = wait_status(stack, ns, "both",
                             lambda p: cluster_entry(p, OTHER).get("state") == "Degraded", "other Degraded")
        assert conditions(policy)["Degraded"]["status"] == "True"
        assert OTHER in conditions(policy)["Degraded"]["message"]
        assert "unreachable" in cluster_entry(policy, OTHER)["message"]
        assert conditions(policy)["Ready"]["status"] == "False"
        # the stopped scheduler does not hold back the other policy or cluster
        wait_status(stack, ns, "analytics", lambda p: conditions(p)["Ready"]["status"] == "True", "Ready")
        assert any(e["reason"] == "MemoryPolicyDegraded" for e in events_about(stack, ns, "DaskCluster", OTHER))
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_status(stack, ns, "both", lambda p: cluster_entry(p, OTHER).get("state") == "Applied", "other Applied",
                timeout=120)


def test_conflicting_policies_resolve_to_the_oldest(stack: LocalStack, clusters: str):
    ns = clusters
    # `analytics` (older) and `both` select `matching`
    older = wait_status(stack, ns, "analytics", lambda p: conditions(p)["Conflict"]["status"] == "True", "Conflict")
    newer = wait_status(stack, ns, "both", lambda p: cluster_entry(p, MATCHING).get("state") == "Conflict",
                        "matching in Conflict")
    assert "both" in conditions(older)["Conflict"]["message"]
    assert "governed by MemoryPolicy analytics" in cluster_entry(newer, MATCHING)["message"]
    assert cluster_entry(older, MATCHING)["state"] == "Applied"
    assert scheduler_amm(stack, ns, MATCHING)["interval"] == 0.5  # analytics', not both's 1s


def test_deleting_policies_restores_schedulers(stack: LocalStack, clusters: str):
    ns = clusters
    stack.kubectl("delete", "mempol", "analytics", "-n", ns, "--timeout=60s")
    # `both` takes `matching` over, then gives it back when deleted too
    wait_amm(stack, ns, MATCHING, running=True, interval=1.0)
    stack.kubectl("delete", "mempol", "both", "-n", ns, "--timeout=60s")
    wait_amm(stack, ns, MATCHING, **OWN_CONFIG)
    wait_amm(stack, ns, OTHER, **OWN_CONFIG)
    assert stack.kubectl("get", "mempol", "-n", ns, "-o", "name").stdout.strip() == ""


def test_paused_worker_is_retired_and_reported_for_replacement(stack: LocalStack, clusters: str):
    """RetirePaused through the operator: a worker paused for longer than `after` is
    retired by the AMM, and the policy's status names it for replacement."""
    ns = clusters
    stack.apply(policy_manifest("retire", names=[OTHER], interval="200ms",
                                policies=[{"class": "RetirePaused", "args": {"after": "1s"}}]), namespace=ns)
    wait_amm(stack, ns, OTHER, running=True, policies=["amm_core.retire_paused.RetirePaused"])
    with scheduler(stack, ns, OTHER) as client:
        data = client.scatter(list(range(100)))
        victim = sorted(client.scheduler_info(n_workers=-1)["workers"])[0]
        name = client.scheduler_info(n_workers=-1)["workers"][victim]["name"]
        client.run(set_pause_fraction, 0.01, workers=[victim])

        policy = wait_status(stack, ns, "retire", lambda p: any(
            w["retired"] for w in cluster_entry(p, OTHER).get("amm", {}).get("workersToReplace", [])
        ), "a worker to replace")
        [worker] = cluster_entry(policy, OTHER)["amm"]["workersToReplace"]
        assert (worker["name"], worker["address"]) == (name, victim)
        assert client.scheduler_info(n_workers=-1)["workers"][victim]["status"] == "closing_gracefully"
        assert client.gather(data) == list(range(100))  # nothing lost
    stack.kubectl("delete", "mempol", "retire", "-n", ns, "--timeout=60s")
