"""End to end: two replicas of the operator under one kopf peering, as the chart runs
them with ``replicaCount: 2`` (issue 14, case 10). Both serve the webhook, as the
webhook Service reaches both; kopf keeps the watches of the one with the lower
priority paused (its log says so), so its indexes never learn the namespace's
MemoryPolicy. A worker pod's admission review, sent to each replica's webhook server
as the API server sends it, must come back with the same governed patch: the
retirement hook and its grace period.

The replicas watch only the test's namespace: the stack is shared, and they must not
act on other tests' namespaces. They peer in a ClusterKopfPeering of the test's own
(never a namespace's KopfPeering, which its tenant could write: issue 15, case 4).
"""

from __future__ import annotations

import base64
import json
import ssl
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonpatch
import pytest
import yaml

from dmo_devstack.scaling_probes import free_port, wait_policy_reconciled
from dmo_devstack.stack import LocalStack, daskcluster_manifest
from dask_memory_operator.webhook.certs import write_webhook_certs
from dask_memory_operator.webhook.handlers import HANDLER_ID

PEERING_CRDS = Path(__file__).resolve().parents[1] / "charts" / "dask-memory-operator" / "crds" / "kopf-peering.yaml"
PEERING = "dmo-peers"
CLUSTER = "demo"
#: (process name, kopf priority): the higher one is active
ACTIVE, STANDBY = ("dmo-peer-active", 200), ("dmo-peer-standby", 100)


def policy() -> dict:
    return {"apiVersion": "amm.dask.org/v1alpha1", "kind": "MemoryPolicy", "metadata": {"name": "hooked"},
            "spec": {"clusterNames": [CLUSTER], "activeMemoryManager": {"policies": []},
                     "retirement": {"timeLimit": "40s"}}}


def worker_pod(ns: str) -> dict:
    """A worker pod as dask-kubernetes creates one (the parts the webhook reads)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": f"{CLUSTER}-default-worker-", "namespace": ns,
                         "labels": {"dask.org/cluster-name": CLUSTER, "dask.org/component": "worker",
                                    "dask.org/workergroup-name": f"{CLUSTER}-default"}},
            "spec": {"containers": [{"name": "worker", "image": "ghcr.io/dask/dask:latest",
                                     "args": ["dask", "worker", "--name", "$(DASK_WORKER_NAME)"]}]}}


def admission_review(ns: str, pod: dict) -> dict:
    """An admission.k8s.io/v1 review of a Pod CREATE, as the API server sends it."""
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": str(uuid.uuid4()), "kind": gvk, "resource": gvr, "requestKind": gvk,
                        "requestResource": gvr, "name": "", "namespace": ns, "operation": "CREATE",
                        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                        "object": pod, "oldObject": None, "dryRun": False,
                        "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}}}


def admit(port: int, ca: Path, review: dict) -> list[dict]:
    """The JSON patch a replica's webhook answers ``review`` with ([] for none)."""
    answer = httpx.post(f"https://127.0.0.1:{port}/{HANDLER_ID}", json=review, timeout=10,
                        verify=ssl.create_default_context(cafile=str(ca)))
    answer.raise_for_status()
    response = answer.json()["response"]
    assert response["uid"] == review["request"]["uid"] and response["allowed"] is True
    return json.loads(base64.b64decode(response["patch"])) if response.get("patch") else []


def memorypolicy_watch_paused(log: str) -> bool:
    """Whether kopf's last word in this log on its MemoryPolicy watch is a pause."""
    states = [line for line in log.splitlines()
              if "the watch-stream for memorypolicies" in line and ("Resuming" in line or "Pausing" in line)]
    return bool(states) and "Pausing" in states[-1]


@pytest.fixture
def peers(stack: LocalStack, namespace: str, tmp_path: Path) -> Iterator[dict[str, int]]:
    """The two replicas, each with its webhook port; the active one has reconciled the
    policy, the standby one's watches are paused."""
    for doc in yaml.safe_load_all(PEERING_CRDS.read_text()):
        if doc:
            stack.apply(doc)
    stack.wait_for(lambda: stack.get_json("/apis/kopf.dev/v1/clusterkopfpeerings") is not None,
                   30, "the ClusterKopfPeering kind served")
    peering = f"{PEERING}-{namespace}"[:253]
    stack.apply({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}})
    write_webhook_certs(tmp_path / "certs", ["localhost"], ["127.0.0.1"])
    ports = {}
    try:
        for name, priority in (ACTIVE, STANDBY):
            ports[name] = free_port()
            stack.start_process(name, [
                sys.executable, "-m", "dask_memory_operator.cli", "run", "--verbose",
                "--namespace", namespace, "--peering", peering, "--priority", str(priority),
                "--scheduler-access", "pod-ip", "--resync-interval", "600", "--rpc-timeout", "3",
                "--webhook-port", str(ports[name]), "--webhook-address", "127.0.0.1",
                "--webhook-cert-dir", str(tmp_path / "certs")])
            if name == ACTIVE[0]:
                stack.apply(policy(), namespace=namespace)
                stack.apply(daskcluster_manifest(CLUSTER, workers=0), namespace=namespace)
                wait_policy_reconciled(stack, namespace, "hooked")
        stack.wait_for(lambda: memorypolicy_watch_paused(stack.logs(STANDBY[0])), 60,
                       "kopf to pause the standby replica's watches")
        yield ports
    finally:
        for name in ports:
            stack.stop_process(name)
        stack.kubectl("delete", "clusterkopfpeering", peering, "--wait=false", check=False)


def test_a_standby_replica_admits_a_worker_pod_with_the_active_ones_patch(
        stack: LocalStack, namespace: str, peers: dict[str, int], tmp_path: Path):
    ca = tmp_path / "certs" / "ca.crt"
    pod = worker_pod(namespace)
    review = admission_review(namespace, pod)

    active = admit(peers[ACTIVE[0]], ca, review)
    standby = admit(peers[STANDBY[0]], ca, review)

    assert standby == active
    born = jsonpatch.JsonPatch(active).apply(pod)
    assert born["spec"]["terminationGracePeriodSeconds"] == 40 + 15
    [worker] = born["spec"]["containers"]
    command = worker["lifecycle"]["preStop"]["exec"]["command"]
    assert command[3:] == ["--limit", "40", "--grace", "55", "--drain"]
    # the standby stood by all along: kopf never let it watch the policy
    log = stack.logs(STANDBY[0])
    assert memorypolicy_watch_paused(log) and "Resuming the watch-stream for memorypolicies" not in log
