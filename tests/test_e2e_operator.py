"""End to end: MemoryPolicy -> dask-memory-operator -> live Dask schedulers.

Everything runs for real on the local stack: kubectl talks to the emulated API, the
dask-kubernetes operator turns DaskClusters into Deployments, the process kubelet
turns those into `dask scheduler`/`dask worker` processes, and this operator (its
own process, as `dask-memory-operator run`) configures the schedulers. What a
scheduler runs is always checked by asking that scheduler, never the operator.

Both shared clusters start with their own configuration "AMM off", so that what the
operator changes, and what it restores, can be told apart from distributed's
default (AMM on with ReduceReplicas).

Starting Dask processes is the slow part, so most tests share one namespace and its
two clusters, but no test depends on another: before each one, every MemoryPolicy
of the namespace is deleted and both schedulers are back to their own
configuration, labels and worker counts (`fresh`), and each test creates the
policies it needs. Tests that change a cluster for good (retire a worker, delete
it) or need a cluster created after a policy have a namespace of their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import yaml
from distributed import Client
from prometheus_client.parser import text_string_to_metric_families

from amm_core.replicate import replicate
from dmo_devstack.probes import (
    amm_cycles,
    amm_dropped,
    amm_state,
    replica_counts,
    set_pause_fraction,
)
from dmo_devstack.stack import LocalStack, daskcluster_manifest
from dask_memory_operator.schedulers.locator import SchedulerLocator

MATCHING, OTHER = "matching", "other"
AMM_OFF = {"DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START": "False"}
#: `matching` has amm_core in its image and preloads it; `other` gets it live
PRELOAD = {"DASK_DISTRIBUTED__SCHEDULER__PRELOAD": "amm_core.plugin"}
#: what the short name ReduceReplicas stands for
REDUCE = "amm_core.replicate.ReduceReplicas"
#: the schedulers' own configuration: distributed's defaults, but the AMM off
OWN_CONFIG = {"running": False, "interval": 2.0, "measure": "optimistic",
              "policies": ["distributed.active_memory_manager.ReduceReplicas"]}
LABELS = {MATCHING: {"team": "analytics"}, OTHER: {}}
#: the operator as the shared clusters' tests run it; dotted amm_core paths allowed
OPERATOR_ARGS = ["--scheduler-access", "pod-ip", "--resync-interval", "1", "--rpc-timeout", "2",
                 "--allow-policy-class", "amm_core.**"]


# --- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_operator(stack: LocalStack, metrics_port: int, *args: str) -> None:
    """This operator, as users run it, in its own process."""
    stack.start_process("dask-memory-operator", [
        sys.executable, "-m", "dask_memory_operator.cli", "run", "--verbose",
        "--metrics-port", str(metrics_port), *args,
    ])


@pytest.fixture(scope="module")
def memory_operator(stack: LocalStack, metrics_port: int):
    start_operator(stack, metrics_port, *OPERATOR_ARGS)
    yield
    stack.stop_process("dask-memory-operator")


@pytest.fixture(scope="module")
def clusters(stack: LocalStack, memory_operator) -> Iterator[str]:
    """A namespace with two DaskClusters of 2 workers: `matching` is labelled
    team=analytics and preloads the plugin, `other` is neither. Yields the namespace."""
    ns = "e2e-operator"
    stack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    for name, env in ((MATCHING, AMM_OFF | PRELOAD), (OTHER, AMM_OFF)):
        manifest = daskcluster_manifest(name, workers=2, scheduler_env=env)
        manifest["metadata"]["labels"] = LABELS[name]
        stack.apply(manifest, namespace=ns)
    for name in (MATCHING, OTHER):
        with scheduler(stack, ns, name) as client:
            client.wait_for_workers(2, timeout=120)
    yield ns
    stack.kubectl("delete", "memorypolicies", "--all", "-n", ns, "--wait=false", check=False)
    # the pods first, with a short grace period, as the namespace fixture does (conftest)
    stack.kubectl("delete", "pods,deployments,daskclusters", "--all", "-n", ns, "--grace-period=1",
                  "--wait=false", check=False)
    stack.wait_for(lambda: not stack.pod_processes(ns), timeout=90, what=f"the processes of namespace {ns} to end")


@pytest.fixture
def fresh(stack: LocalStack, clusters: str) -> str:
    """The shared namespace as a test expects it: no MemoryPolicy, both schedulers on
    their own configuration with their labels and 2 workers each."""
    ns = clusters
    stack.kubectl("delete", "memorypolicies", "--all", "-n", ns, "--timeout=90s")
    for name, labels in LABELS.items():
        # one kubectl call per cluster: a label a test may have set goes, its own are set
        removed = [key for key in ("team", "e2e-touched") if key not in labels]
        stack.kubectl("label", "daskcluster", name, "-n", ns, *(f"{key}-" for key in removed),
                      *(f"{key}={value}" for key, value in labels.items()), "--overwrite", check=False)
        now = get_cluster_labels(stack, ns, name)
        assert labels.items() <= now.items() and not set(removed) & set(now), now
        wait_amm(stack, ns, name, **OWN_CONFIG)
        with scheduler(stack, ns, name) as client:
            client.wait_for_workers(2, timeout=120)
    return ns


@pytest.fixture(autouse=True)
def logs_on_failure(request, stack: LocalStack):
    yield
    reports = (getattr(request.node, f"report_{when}", None) for when in ("setup", "call"))
    if any(r is not None and r.failed for r in reports):
        print(stack.dump_logs("e2e-operator", tail=60))


# --- helpers -------------------------------------------------------------------


def get_cluster_labels(stack: LocalStack, ns: str, cluster: str) -> dict:
    body = stack.get_json(f"/apis/kubernetes.dask.org/v1/namespaces/{ns}/daskclusters/{cluster}") or {}
    return body.get("metadata", {}).get("labels") or {}


@contextmanager
def scheduler(stack: LocalStack, ns: str, cluster: str) -> Iterator[Client]:
    address = stack.wait_scheduler_address(ns, cluster)
    with Client(address, timeout="60s") as client:
        yield client



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


def metric_samples(metrics_port: int) -> list:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def metric(metrics_port: int, name: str, **labels: str) -> float | None:
    """The value of one series, None when it does not exist."""
    values = [s.value for s in metric_samples(metrics_port) if s.name == name and s.labels == labels]
    return values[0] if values else None


def contacts(metrics_port: int, ns: str, cluster: str, purpose: str) -> float:
    return metric(metrics_port, "dask_memory_operator_scheduler_contacts_total",
                  namespace=ns, cluster=cluster, purpose=purpose) or 0


def wait_contacts(stack: LocalStack, metrics_port: int, ns: str, cluster: str, purpose: str, more: int) -> None:
    """Wait until the operator has set out to ask the scheduler ``more`` more times."""
    start = contacts(metrics_port, ns, cluster, purpose)
    stack.wait_for(lambda: contacts(metrics_port, ns, cluster, purpose) >= start + more, 60,
                   f"{more} more {purpose} contacts with {cluster}", interval=0.3)


def apply_cluster(stack: LocalStack, ns: str, name: str, workers: int = 1, env=None, labels=None) -> None:
    manifest = daskcluster_manifest(name, workers=workers, scheduler_env=AMM_OFF | (env or {}))
    manifest["metadata"]["labels"] = labels or {}
    stack.apply(manifest, namespace=ns)


def wait_workers(stack: LocalStack, ns: str, name: str, workers: int = 1) -> None:
    with scheduler(stack, ns, name) as client:
        client.wait_for_workers(workers, timeout=120)


def make_cluster(stack: LocalStack, ns: str, name: str, workers: int = 1, env=None, labels=None) -> None:
    apply_cluster(stack, ns, name, workers, env, labels)
    wait_workers(stack, ns, name, workers)


# --- the tests -------------------------------------------------------------------


ANALYTICS = policy_manifest("analytics", selector={"matchLabels": {"team": "analytics"}},
                            interval="500ms", measure="managed", policies=[{"class": "ReduceReplicas"}])
#: MATCHING under ANALYTICS, as the scheduler reports it
ANALYTICS_AMM = {"running": True, "interval": 0.5, "measure": "managed", "policies": [REDUCE]}


def apply_analytics(stack: LocalStack, ns: str) -> None:
    stack.apply(ANALYTICS, namespace=ns)
    wait_amm(stack, ns, MATCHING, **ANALYTICS_AMM)


def test_cluster_created_after_policy_gets_exactly_its_config(stack: LocalStack, namespace: str,
                                                              memory_operator):
    ns = namespace
    stack.apply(ANALYTICS, namespace=ns)
    # both clusters start at once (starting Dask processes is the slow part)
    apply_cluster(stack, ns, MATCHING, env=PRELOAD, labels={"team": "analytics"})
    apply_cluster(stack, ns, OTHER)
    wait_workers(stack, ns, MATCHING)
    wait_workers(stack, ns, OTHER)
    # kubectl wait, as a user would
    stack.kubectl("wait", "--for=condition=Ready", "mempol/analytics", "-n", ns, "--timeout=60s")

    assert scheduler_amm(stack, ns, MATCHING) == dict(ANALYTICS_AMM, plugin=True)
    assert scheduler_amm(stack, ns, OTHER) == dict(OWN_CONFIG, plugin=False)

    policy = wait_status(stack, ns, "analytics", lambda p: p["status"].get("appliedClusters") == 1, "applied")
    assert policy["status"]["matchedClusters"] == 1
    entry = cluster_entry(policy, MATCHING)
    assert entry["state"] == "Applied" and entry["pluginSource"] == "preload"
    assert entry["appliedGeneration"] == policy["metadata"]["generation"]
    assert entry["amm"]["running"] is True and entry["amm"]["measure"] == "managed"
    assert "cycles" not in entry["amm"]  # a live counter: metrics, not status

    table = stack.kubectl("get", "mempol", "-n", ns).stdout
    assert table.split("\n")[0].split() == ["NAME", "MATCHED", "APPLIED", "READY", "REASON", "RETIRING", "AGE"]
    assert table.split("\n")[1].split()[:6] == ["analytics", "1", "1", "True", "Applied", "0"]

    # the Events say what changed on the scheduler, from what to what
    [applied] = [e for e in events_about(stack, ns, "MemoryPolicy", "analytics") if e["reason"] == "Applied"]
    assert applied["message"] == (
        f"DaskCluster {MATCHING}: AMM set by MemoryPolicy analytics generation 1: started; "
        "interval 2s → 0.5s; measure optimistic → managed; policies "
        f"[distributed.active_memory_manager.ReduceReplicas] → [{REDUCE}]"
    )
    assert any(e["reason"] == "MemoryPolicyApplied" and "interval 2s → 0.5s" in e["message"]
               for e in events_about(stack, ns, "DaskCluster", MATCHING))
    # a scheduler not started yet is waited for, not reported as a degradation
    assert not [e for e in events_about(stack, ns, "DaskCluster", MATCHING) if e["type"] == "Warning"]
    assert not [e for e in events_about(stack, ns, "MemoryPolicy", "analytics") if e["type"] == "Warning"]


def test_reduce_replicas_works_on_configured_cluster_only(stack: LocalStack, fresh: str, metrics_port: int):
    ns = fresh
    apply_analytics(stack, ns)
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

    # the scheduler's counters reach the metrics
    ours = {"namespace": ns, "policy": "analytics", "cluster": MATCHING}
    stack.wait_for(lambda: (metric(metrics_port, "dask_memory_operator_amm_replicas_dropped", **ours) or 0) >= 1,
                   30, "replicas dropped in the metrics")
    assert metric(metrics_port, "dask_memory_operator_amm_cycles", **ours) >= 1
    assert metric(metrics_port, "dask_memory_operator_cluster_state", **ours, state="Applied") == 1
    assert metric(metrics_port, "dask_memory_operator_cluster_state", **ours, state="Degraded") == 0


def test_resyncs_that_find_nothing_new_write_no_status(stack: LocalStack, fresh: str, metrics_port: int):
    """The AMM's counters change every cycle; the policy's status does not, so a
    resync that finds the same state patches nothing and wakes no watcher."""
    ns = fresh
    apply_analytics(stack, ns)
    wait_status(stack, ns, "analytics", lambda p: conditions(p)["Ready"]["status"] == "True", "Ready")
    wait_contacts(stack, metrics_port, ns, MATCHING, "converge", 1)  # the status patch is out
    version = get_policy(stack, ns, "analytics")["metadata"]["resourceVersion"]
    cycles = scheduler_amm_cycles(stack, ns)
    wait_contacts(stack, metrics_port, ns, MATCHING, "converge", 4)
    assert scheduler_amm_cycles(stack, ns) > cycles  # the counters moved meanwhile
    assert get_policy(stack, ns, "analytics")["metadata"]["resourceVersion"] == version


def scheduler_amm_cycles(stack: LocalStack, ns: str) -> int:
    with scheduler(stack, ns, MATCHING) as client:
        return client.run_on_scheduler(amm_cycles)


def test_replicate_asks_for_the_policy_on_a_managed_scheduler(stack: LocalStack, fresh: str):
    """amm_core's replicate() would add a Replicate policy that the operator then takes
    away: on a scheduler a MemoryPolicy manages, it says what to change instead."""
    ns = fresh
    apply_analytics(stack, ns)
    with scheduler(stack, ns, MATCHING) as client:
        future = client.submit(lambda: 1, key="replicate-me", pure=False)
        future.result()
        with pytest.raises(RuntimeError, match=f"managed by MemoryPolicy {ns}/analytics.*class: Replicate"):
            replicate(client, [future], n=2)
        assert client.run_on_scheduler(amm_state)["policies"] == [REDUCE]


def test_policy_change_is_followed(stack: LocalStack, fresh: str):
    ns = fresh
    apply_analytics(stack, ns)
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
    messages = [e["message"] for e in _applied(stack, ns)]
    assert any("interval 0.5s → 1s; measure managed → process; policies [ReduceReplicas] → []" in m
               for m in messages)
    assert any(m.endswith("generation 3: stopped") for m in messages)


def test_hand_made_change_is_undone(stack: LocalStack, fresh: str):
    ns = fresh
    apply_analytics(stack, ns)
    applied_events = len(_applied(stack, ns))
    with scheduler(stack, ns, MATCHING) as client:
        client.amm.stop()
    stack.wait_for(lambda: len(_applied(stack, ns)) > applied_events, 30, "an Applied Event for the repair")
    wait_amm(stack, ns, MATCHING, **ANALYTICS_AMM)
    assert any("changed on the scheduler" in e["message"] and "started" in e["message"]
               for e in _applied(stack, ns))


def _applied(stack: LocalStack, ns: str) -> list[dict]:
    return [e for e in events_about(stack, ns, "DaskCluster", MATCHING) if e["reason"] == "MemoryPolicyApplied"]


def _invalid(policy: dict) -> bool:
    return conditions(policy).get("Invalid", {}).get("status") == "True"


def test_invalid_policies_are_refused_and_apply_nothing(stack: LocalStack, fresh: str):
    ns = fresh
    bad_measure = policy_manifest("bad-measure", names=[OTHER], measure="rss")
    result = stack.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(bad_measure), check=False)
    assert result.returncode != 0
    assert "Unsupported value" in result.stderr and "rss" in result.stderr

    unknown_field = policy_manifest("bad-field", names=[OTHER])
    unknown_field["spec"]["activeMemoryManager"]["intervall"] = "1s"
    result = stack.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(unknown_field), check=False)
    assert result.returncode != 0 and "intervall" in result.stderr

    too_fast = policy_manifest("too-fast", names=[OTHER], interval="1ms")
    result = stack.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(too_fast), check=False)
    assert result.returncode != 0 and "spec.activeMemoryManager.interval" in result.stderr

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


def touch(stack: LocalStack, ns: str, cluster: str, value: str) -> None:
    """A label change of the DaskCluster that selects nothing differently: the
    operator looks at which policy governs it (an orphan check, when none does)."""
    stack.kubectl("label", "daskcluster", cluster, "-n", ns, f"e2e-touched={value}", "--overwrite")


def assert_not_restored_on_orphan_checks(stack: LocalStack, metrics_port: int, ns: str, cluster: str) -> None:
    """Two orphan checks of the cluster, and no restore: kopf runs one object's
    handlers one after the other, so once the second check started, the first one
    (and any restore it would have done) has finished."""
    releases = contacts(metrics_port, ns, cluster, "release")
    start = contacts(metrics_port, ns, cluster, "orphan-check")
    for value in ("a", "b"):
        touch(stack, ns, cluster, value)
    stack.wait_for(lambda: contacts(metrics_port, ns, cluster, "orphan-check") >= start + 2, 60,
                   f"two orphan checks of {cluster}", interval=0.3)
    assert contacts(metrics_port, ns, cluster, "release") == releases


def test_governing_policy_made_invalid_leaves_its_clusters_as_they_are(stack: LocalStack, fresh: str,
                                                                      metrics_port: int):
    """An invalid edit applies nothing, and restores nothing: the cluster keeps what
    it ran, though the cluster's events now find no valid policy governing it."""
    ns = fresh
    apply_analytics(stack, ns)
    stack.kubectl("patch", "mempol", "analytics", "-n", ns, "--type=merge", "-p",
                  json.dumps({"spec": {"activeMemoryManager": {"policies": [{"class": "NoSuchPolicy"}]}}}))
    policy = wait_status(stack, ns, "analytics", _invalid, "Invalid")
    assert cluster_entry(policy, MATCHING)["state"] == "Applied"  # what it ran, still listed
    assert_not_restored_on_orphan_checks(stack, metrics_port, ns, MATCHING)
    assert scheduler_amm(stack, ns, MATCHING) == dict(ANALYTICS_AMM, plugin=True)


def test_restart_with_a_narrower_allowlist_restores_nothing(stack: LocalStack, fresh: str, metrics_port: int):
    ns = fresh
    stack.apply(policy_manifest("dotted", names=[OTHER], interval="1s",
                                policies=[{"class": "amm_core.rebalance.Rebalance"}]), namespace=ns)
    wait_amm(stack, ns, OTHER, running=True, interval=1.0, policies=["amm_core.rebalance.Rebalance"])
    stack.stop_process("dask-memory-operator")
    narrower = [a for a in OPERATOR_ARGS if a not in ("--allow-policy-class", "amm_core.**")]
    start_operator(stack, metrics_port, *narrower)
    try:
        policy = wait_status(stack, ns, "dotted", _invalid, "Invalid under the narrower allowlist")
        assert "not allowed" in conditions(policy)["Invalid"]["message"]
        assert_not_restored_on_orphan_checks(stack, metrics_port, ns, OTHER)
        assert scheduler_amm(stack, ns, OTHER)["interval"] == 1.0  # not mass-restored
    finally:
        stack.stop_process("dask-memory-operator")
        start_operator(stack, metrics_port, *OPERATOR_ARGS)


def test_cluster_labelled_later_is_picked_up_and_released(stack: LocalStack, fresh: str):
    ns = fresh
    apply_analytics(stack, ns)
    stack.kubectl("label", "daskcluster", OTHER, "-n", ns, "team=analytics")
    wait_amm(stack, ns, OTHER, **ANALYTICS_AMM)
    policy = wait_status(stack, ns, "analytics", lambda p: p["status"].get("appliedClusters") == 2, "2 applied")
    assert cluster_entry(policy, OTHER)["pluginSource"] == "live"

    stack.kubectl("label", "daskcluster", OTHER, "-n", ns, "team-")
    wait_amm(stack, ns, OTHER, **OWN_CONFIG)
    policy = wait_status(stack, ns, "analytics", lambda p: p["status"].get("matchedClusters") == 1, "1 matched")
    assert cluster_entry(policy, OTHER) == {}


def test_dask_kubernetes_still_scales_the_governed_cluster(stack: LocalStack, fresh: str):
    """Running beside dask-kubernetes: it sees every replica change of a governed
    cluster, and this operator writes nothing on DaskClusters or worker groups."""
    ns = fresh
    apply_analytics(stack, ns)
    with scheduler(stack, ns, MATCHING) as client:
        stack.kubectl("scale", "daskworkergroup", f"{MATCHING}-default", "-n", ns, "--replicas=3")
        client.wait_for_workers(3, timeout=90)
        stack.kubectl("scale", "daskworkergroup", f"{MATCHING}-default", "-n", ns, "--replicas=2")
        stack.wait_for(lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == 2, 90, "2 workers")
    for kind, name in (("daskcluster", MATCHING), ("daskworkergroup", f"{MATCHING}-default")):
        meta = json.loads(stack.kubectl("get", kind, name, "-n", ns, "-o", "json").stdout)["metadata"]
        ours = [k for k in (meta.get("annotations") or {}) if "amm.dask.org" in k]
        assert ours == [] and "amm.dask.org/restore-schedulers" not in (meta.get("finalizers") or [])


def test_changes_made_while_the_operator_is_down_are_applied_on_restart(stack: LocalStack, fresh: str):
    ns = fresh
    apply_analytics(stack, ns)
    stack.stop_process("dask-memory-operator")
    try:
        stack.kubectl("patch", "mempol", "analytics", "-n", ns, "--type=merge", "-p",
                      json.dumps({"spec": {"activeMemoryManager": {"interval": "750ms"}}}))
        assert scheduler_amm(stack, ns, MATCHING)["interval"] == 0.5  # nobody applied it yet
    finally:
        stack.processes_by_name["dask-memory-operator"].start()
    wait_amm(stack, ns, MATCHING, running=True, interval=0.75)


def test_port_forward_targets_the_pods_port(stack: LocalStack, clusters: str, monkeypatch):
    """`--scheduler-access port-forward` forwards to the scheduler pod's tcp-comm port
    (the emulator cannot stream a port-forward; the lookup of pod and port is checked)."""
    monkeypatch.setenv("KUBECONFIG", str(stack.kubeconfig))

    async def target() -> tuple[str, int]:
        pod, port = await SchedulerLocator("port-forward").scheduler_pod(clusters, MATCHING)
        return pod.cluster, port

    assert asyncio.run(target()) == (MATCHING, 8786)


def test_restarted_scheduler_is_configured_again(stack: LocalStack, fresh: str):
    ns = fresh
    apply_analytics(stack, ns)
    restarts = _restarts(stack, ns, MATCHING)
    os.kill(scheduler_pid(stack, ns, MATCHING), signal.SIGKILL)
    # the kubelet restarts it with its own config; the operator puts the policy back
    stack.wait_for(lambda: _restarts(stack, ns, MATCHING) > restarts, 60, "the scheduler's restart")
    state = wait_amm(stack, ns, MATCHING, **ANALYTICS_AMM)
    assert state["plugin"] is True


def _restarts(stack: LocalStack, ns: str, cluster: str) -> int:
    pods = stack.pods(ns, f"dask.org/cluster-name={cluster},dask.org/component=scheduler")
    return sum(cs.get("restartCount", 0) for p in pods for cs in p.get("status", {}).get("containerStatuses") or ())


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP): it accepts connections and answers nothing."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_unreachable_scheduler_degrades_only_its_cluster(stack: LocalStack, fresh: str):
    ns = fresh
    apply_analytics(stack, ns)
    stack.apply(policy_manifest("both", names=[MATCHING, OTHER], interval="1s"), namespace=ns)
    # `both` is newer than `analytics`: it governs only `other`
    wait_amm(stack, ns, OTHER, running=True, interval=1.0)
    with stopped(scheduler_pid(stack, ns, OTHER)):
        policy = wait_status(stack, ns, "both",
                             lambda p: cluster_entry(p, OTHER).get("state") == "Degraded", "other Degraded")
        assert conditions(policy)["Degraded"]["status"] == "True"
        assert OTHER in conditions(policy)["Degraded"]["message"]
        assert "unreachable" in cluster_entry(policy, OTHER)["message"]
        assert conditions(policy)["Ready"]["status"] == "False"
        # the stopped scheduler does not hold back the other policy or cluster
        wait_status(stack, ns, "analytics", lambda p: conditions(p)["Ready"]["status"] == "True", "Ready")
        assert any(e["reason"] == "MemoryPolicyDegraded" for e in events_about(stack, ns, "DaskCluster", OTHER))
    wait_status(stack, ns, "both", lambda p: cluster_entry(p, OTHER).get("state") == "Applied", "other Applied",
                timeout=120)


def test_conflicting_policies_resolve_to_the_oldest(stack: LocalStack, fresh: str):
    ns = fresh
    apply_analytics(stack, ns)
    stack.apply(policy_manifest("both", names=[MATCHING, OTHER], interval="1s"), namespace=ns)
    older = wait_status(stack, ns, "analytics", lambda p: conditions(p)["Conflict"]["status"] == "True", "Conflict")
    newer = wait_status(stack, ns, "both", lambda p: cluster_entry(p, MATCHING).get("state") == "Conflict",
                        "matching in Conflict")
    assert "both" in conditions(older)["Conflict"]["message"]
    assert "governed by MemoryPolicy analytics" in cluster_entry(newer, MATCHING)["message"]
    assert cluster_entry(older, MATCHING)["state"] == "Applied"
    assert [e["name"] for e in newer["status"]["clusters"]] == [MATCHING, OTHER]  # each once
    assert scheduler_amm(stack, ns, MATCHING)["interval"] == 0.5  # analytics', not both's 1s


def test_deleting_policies_restores_schedulers(stack: LocalStack, fresh: str, metrics_port: int):
    ns = fresh
    apply_analytics(stack, ns)
    stack.apply(policy_manifest("both", names=[MATCHING, OTHER], interval="1s"), namespace=ns)
    wait_amm(stack, ns, OTHER, running=True, interval=1.0)
    stack.kubectl("delete", "mempol", "analytics", "-n", ns, "--timeout=60s")
    # `both` takes `matching` over, then gives it back when deleted too
    wait_amm(stack, ns, MATCHING, running=True, interval=1.0)
    assert metric(metrics_port, "dask_memory_operator_cluster_state", namespace=ns, policy="analytics",
                  cluster=MATCHING, state="Applied") is None  # the deleted policy's series ended
    stack.kubectl("delete", "mempol", "both", "-n", ns, "--timeout=60s")
    wait_amm(stack, ns, MATCHING, **OWN_CONFIG)
    wait_amm(stack, ns, OTHER, **OWN_CONFIG)
    assert stack.kubectl("get", "mempol", "-n", ns, "-o", "name").stdout.strip() == ""
    assert any(e["reason"] == "MemoryPolicyApplied" and "restored the scheduler's own AMM configuration: "
               "stopped; interval 1s → 2s" in e["message"] for e in events_about(stack, ns, "DaskCluster", OTHER))


def test_policy_deleted_while_its_scheduler_is_unreachable_is_restored_when_it_answers(
        stack: LocalStack, fresh: str):
    ns = fresh
    stack.apply(policy_manifest("gone", names=[OTHER], interval="1s"), namespace=ns)
    wait_amm(stack, ns, OTHER, running=True, interval=1.0)
    with stopped(scheduler_pid(stack, ns, OTHER)):
        stack.kubectl("delete", "mempol", "gone", "-n", ns, "--timeout=90s")
        [failed] = [e for e in events_about(stack, ns, "MemoryPolicy", "gone") if e["reason"] == "RestoreFailed"]
        assert OTHER in failed["message"] and "restored when they answer again" in failed["message"]
    # the same scheduler process answers again, still running the deleted policy's AMM
    wait_amm(stack, ns, OTHER, **OWN_CONFIG)
    stack.wait_for(lambda: any(e["reason"] == "MemoryPolicyReleased" and "gone was deleted" in e["message"]
                               for e in events_about(stack, ns, "DaskCluster", OTHER)), 30, "a Released Event")


def test_deleted_daskcluster_leaves_no_trace(stack: LocalStack, namespace: str, memory_operator,
                                             metrics_port: int):
    ns = namespace
    stack.apply(policy_manifest("p", selector={}, interval="1s"), namespace=ns)
    make_cluster(stack, ns, "short-lived")
    wait_status(stack, ns, "p", lambda p: p["status"].get("appliedClusters") == 1, "applied")
    labels = {"namespace": ns, "policy": "p", "cluster": "short-lived"}
    assert metric(metrics_port, "dask_memory_operator_cluster_state", **labels, state="Applied") == 1
    stack.kubectl("delete", "daskcluster", "short-lived", "-n", ns, "--timeout=60s")
    policy = wait_status(stack, ns, "p", lambda p: p["status"].get("matchedClusters") == 0, "0 matched")
    assert policy["status"]["clusters"] == []
    assert conditions(policy)["Ready"]["reason"] == "NoClustersSelected"
    stack.wait_for(lambda: metric(metrics_port, "dask_memory_operator_cluster_state", **labels,
                                  state="Applied") is None, 30, "the cluster's series to end")


def test_paused_worker_is_replaced_by_a_fresh_pod_with_its_data_intact(stack: LocalStack, namespace: str,
                                                                       memory_operator):
    """RetirePaused through the operator: a worker paused for longer than `after` is
    retired by the AMM; the operator adds a replacement worker first, and once the
    paused one is retired deletes its Deployment and takes its replica off. Scattered
    data (which nothing could recompute) is intact."""
    ns = namespace
    stack.apply(policy_manifest("retire", selector={}, interval="200ms",
                                policies=[{"class": "RetirePaused", "args": {"after": "1s"}}]), namespace=ns)
    make_cluster(stack, ns, "pausing", workers=2)
    wait_amm(stack, ns, "pausing", running=True, policies=["amm_core.retire_paused.RetirePaused"])
    with scheduler(stack, ns, "pausing") as client:
        data = client.scatter(list(range(100)))
        victim = sorted(client.scheduler_info(n_workers=-1)["workers"])[0]
        name = client.scheduler_info(n_workers=-1)["workers"][victim]["name"]
        client.run(set_pause_fraction, 0.01, workers=[victim])

        replaced = stack.wait_for(lambda: [e for e in events_in(stack, ns) if e["reason"] == "PausedWorkerReplaced"],
                                  120, "the paused worker to be replaced")
        assert name in replaced[0]["message"]
        added = [e for e in events_in(stack, ns) if e["reason"] == "ReplacingPausedWorker"]
        assert len(added) == 1 and name in added[0]["message"]

        def settled():
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            deployments = [d["metadata"]["name"] for d in stack.deployments(ns, "dask.org/component=worker")]
            group = stack.get_json(f"/apis/kubernetes.dask.org/v1/namespaces/{ns}/daskworkergroups/pausing-default")
            return (name not in deployments and len(deployments) == 2
                    and group["spec"]["worker"]["replicas"] == 2
                    and sorted(w["status"] for w in workers) == ["running", "running"])
        stack.wait_for(settled, 120, "two running workers, the paused one gone")
        assert client.gather(data) == list(range(100))  # scattered: nothing could be recomputed


def events_in(stack: LocalStack, ns: str) -> list[dict]:
    return (stack.get_json(f"/api/v1/namespaces/{ns}/events") or {}).get("items", [])
