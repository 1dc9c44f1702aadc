"""Finding a cluster's own scheduler pod, on the emulated API (no kubelet: the objects
are written here as dask-kubernetes and the Deployment controller write them)."""

from __future__ import annotations

import asyncio
import json

import pytest

from dask_memory_operator import kubeclient
from dask_memory_operator.controllers.workergroup import group_record
from dmo_devstack.stack import LocalStack, daskcluster_manifest
from dask_memory_operator.watches import Watches, operator_kinds
from dask_memory_operator.schedulers.locator import SchedulerAccessError, SchedulerLocator, SchedulerServiceMissing

LABELS = {"dask.org/cluster-name": "demo", "dask.org/component": "scheduler"}
POD_IP = "127.2.200.7"


def _uid(stack: LocalStack, path: str) -> str:
    return stack.get_json(path)["metadata"]["uid"]


def _owner(api_version: str, kind: str, name: str, uid: str) -> list[dict]:
    return [{"apiVersion": api_version, "kind": kind, "name": name, "uid": uid,
             "controller": True, "blockOwnerDeletion": True}]


def _template(ports: bool = True) -> dict:
    container = {"name": "scheduler", "image": "ghcr.io/dask/dask:latest", "args": ["dask", "scheduler"]}
    if ports:
        container["ports"] = [{"name": "tcp-comm", "containerPort": 8786}]
    return {"metadata": {"labels": LABELS}, "spec": {"containers": [container]}}


def make_pod(stack: LocalStack, name: str, owner: list[dict] | None, *, ip: str = POD_IP,
             ready: bool = True, host_network: bool = False, ports: bool = True) -> None:
    """A scheduler pod, Running (and Ready) at ``ip``, as a kubelet reports it."""
    spec = _template(ports)["spec"]
    if host_network:
        spec["hostNetwork"] = True
    meta = {"name": name, "labels": LABELS}
    if owner:
        meta["ownerReferences"] = owner
    stack.apply({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}, namespace="ns")
    status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
              "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    stack.kubectl("patch", "pod", name, "-n", "ns", "--subresource=status", "--type=merge",
                  "-p", json.dumps({"status": status}))


@pytest.fixture
def api(tmp_path, monkeypatch):
    """DaskCluster demo -> Deployment demo-scheduler -> ReplicaSet; no pod yet."""
    with LocalStack(tmp_path, dask_operator=False, kubelet=False) as stack:
        monkeypatch.setenv("KUBECONFIG", str(stack.kubeconfig))
        stack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}})
        stack.apply(daskcluster_manifest("demo", workers=0), namespace="ns")
        cluster_uid = _uid(stack, "/apis/kubernetes.dask.org/v1/namespaces/ns/daskclusters/demo")
        workload = {"replicas": 1, "selector": {"matchLabels": LABELS}, "template": _template()}
        stack.apply({"apiVersion": "apps/v1", "kind": "Deployment",
                     "metadata": {"name": "demo-scheduler", "labels": LABELS,  # as dask-kubernetes labels it
                                  "ownerReferences": _owner("kubernetes.dask.org/v1", "DaskCluster", "demo",
                                                            cluster_uid)},
                     "spec": workload}, namespace="ns")
        deployment_uid = _uid(stack, "/apis/apps/v1/namespaces/ns/deployments/demo-scheduler")
        stack.apply({"apiVersion": "apps/v1", "kind": "ReplicaSet",
                     "metadata": {"name": "demo-scheduler-5d9f", "labels": LABELS,
                                  "ownerReferences": _owner("apps/v1", "Deployment", "demo-scheduler",
                                                            deployment_uid)},
                     "spec": workload}, namespace="ns")
        stack.apply({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "demo-scheduler", "namespace": "ns"},
            "spec": {"selector": LABELS, "ports": [
                {"name": "http-dashboard", "port": 8787},
                {"name": "tcp-comm", "port": 8786, "targetPort": 8786},
            ]},
        })
        yield stack


def replicaset_owner(stack: LocalStack) -> list[dict]:
    uid = _uid(stack, "/apis/apps/v1/namespaces/ns/replicasets/demo-scheduler-5d9f")
    return _owner("apps/v1", "ReplicaSet", "demo-scheduler-5d9f", uid)


async def test_the_address_is_the_owned_pods_ip_whatever_the_service_says(api):
    make_pod(api, "demo-scheduler-5d9f-abcde", replicaset_owner(api))
    for mode in ("pod-ip", "dns", "cluster-ip"):  # the old names mean pod-ip now
        assert await SchedulerLocator(mode).address("ns", "demo") == f"tcp://{POD_IP}:8786"
    # the local stack's kubelet makes pods straight from the Deployment
    api.kubectl("delete", "pod", "demo-scheduler-5d9f-abcde", "-n", "ns", "--grace-period=0", "--force")
    deployment_uid = _uid(api, "/apis/apps/v1/namespaces/ns/deployments/demo-scheduler")
    make_pod(api, "direct", _owner("apps/v1", "Deployment", "demo-scheduler", deployment_uid), ip="127.2.200.8")
    assert await SchedulerLocator("pod-ip").address("ns", "demo") == "tcp://127.2.200.8:8786"


async def test_the_port_may_come_from_the_services_target_port(api):
    make_pod(api, "unnamed-ports", replicaset_owner(api), ports=False)
    assert await SchedulerLocator("pod-ip").address("ns", "demo") == f"tcp://{POD_IP}:8786"


async def test_no_running_pod_is_reported(api):
    with pytest.raises(SchedulerServiceMissing, match="no running scheduler pod of DaskCluster ns/demo owned by"):
        await SchedulerLocator("pod-ip").address("ns", "demo")
    make_pod(api, "not-ready", replicaset_owner(api), ready=False)
    with pytest.raises(SchedulerServiceMissing, match="no running scheduler pod"):
        await SchedulerLocator("pod-ip").address("ns", "demo")
    with pytest.raises(SchedulerServiceMissing, match="no running scheduler pod of DaskCluster ns/nope"):
        await SchedulerLocator("pod-ip").address("ns", "nope")


def test_auto_picks_pod_ip_in_a_pod_and_port_forward_outside(monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert SchedulerLocator("auto").mode == "pod-ip"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert SchedulerLocator("auto").mode == "port-forward"
    assert SchedulerLocator("dns").mode == SchedulerLocator("cluster-ip").mode == "pod-ip"


@pytest.mark.parametrize("case, words", [
    ("hostNetwork", "hostNetwork"),
    ("no owner", "not controlled by Deployment demo-scheduler"),
    ("another Deployment", "not controlled by Deployment demo-scheduler"),
    ("Deployment not the cluster's", "is not controlled by DaskCluster demo"),
])
async def test_a_pod_not_made_for_the_cluster_is_refused(api, case, words):
    """The namespace's owner can label any pod as the scheduler: only the one made
    through the DaskCluster's own objects, on the pod network, is taken. (An owner
    reference to a uid that does not exist needs no check of its own: the garbage
    collector deletes such a pod.)"""
    owner = replicaset_owner(api)
    if case == "hostNetwork":
        make_pod(api, "on-the-node", owner, host_network=True)
    elif case == "no owner":
        make_pod(api, "by-hand", None)
    elif case == "another Deployment":
        api.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "sly"},
                   "spec": {"selector": {"matchLabels": LABELS}, "template": _template()}}, namespace="ns")
        make_pod(api, "sly-pod", _owner("apps/v1", "Deployment", "sly",
                                        _uid(api, "/apis/apps/v1/namespaces/ns/deployments/sly")))
    else:
        api.kubectl("patch", "deployment", "demo-scheduler", "-n", "ns", "--type=json",
                    "-p", json.dumps([{"op": "remove", "path": "/metadata/ownerReferences"}]))
        make_pod(api, "orphaned", owner)
    with pytest.raises(SchedulerAccessError, match=words):
        await SchedulerLocator("pod-ip").address("ns", "demo")


async def test_one_read_per_contact_once_the_pod_is_checked(api):
    """The ownership chain is read once per scheduler pod; each contact then lists the
    cluster's scheduler pods once (pod IPs are reused: a remembered one may be another
    tenant's by now), as the Service was read once before."""
    make_pod(api, "demo-scheduler-5d9f-abcde", replicaset_owner(api))
    locator = SchedulerLocator("pod-ip")
    await locator.address("ns", "demo")
    before = len(api.audit_events())
    assert await locator.address("ns", "demo") == f"tcp://{POD_IP}:8786"
    reads = [e.get("objectRef", {}).get("resource") or e["requestURI"] for e in api.audit_events()[before:]]
    assert reads == ["pods"], reads
    # the pod replaced, at another IP: found and checked again
    api.kubectl("delete", "pod", "demo-scheduler-5d9f-abcde", "-n", "ns", "--grace-period=0", "--force")
    make_pod(api, "demo-scheduler-5d9f-fghij", replicaset_owner(api), ip="127.2.200.9")
    assert await locator.address("ns", "demo") == "tcp://127.2.200.9:8786"


async def test_look_alike_pods_cost_no_reads_after_their_first_refusal(api):
    """A tenant's pods with the scheduler's labels and a broken chain: refused once,
    then remembered until they change; only the newest two are ever checked."""
    api.apply({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "fake"},
               "spec": {"replicas": 5, "selector": {"matchLabels": LABELS}, "template": _template()}},
              namespace="ns")
    owner = _owner("apps/v1", "ReplicaSet", "fake", _uid(api, "/apis/apps/v1/namespaces/ns/replicasets/fake"))
    for i in range(5):
        make_pod(api, f"fake-{i}", owner, ip=f"127.2.201.{i + 1}")
    locator = SchedulerLocator("pod-ip")
    before = len(api.audit_events())
    with pytest.raises(SchedulerAccessError, match="not controlled by Deployment"):
        await locator.address("ns", "demo")
    first = [e.get("objectRef", {}).get("resource") for e in api.audit_events()[before:]]
    assert first.count("replicasets") == 2, first  # the newest two, not all five
    before = len(api.audit_events())
    with pytest.raises(SchedulerAccessError, match="not controlled by Deployment"):
        await locator.address("ns", "demo")
    again = [e.get("objectRef", {}).get("resource") for e in api.audit_events()[before:]]
    assert again == ["pods"], again


async def test_an_ipv6_pod_ip_is_bracketed(api):
    make_pod(api, "demo-scheduler-5d9f-abcde", replicaset_owner(api), ip="fd00::7")
    assert await SchedulerLocator("pod-ip").address("ns", "demo") == "tcp://[fd00::7]:8786"


async def test_with_the_caches_a_contact_reads_nothing(api):
    """With the operator's caches (dask_memory_operator/watches.py), a contact asks
    the API nothing, and a replaced scheduler pod is found from the watch's events:
    the only read left is the new pod's DaskCluster, once (the end of its chain)."""
    make_pod(api, "demo-scheduler-5d9f-abcde", replicaset_owner(api))
    watches = Watches([k for k in operator_kinds(group_record) if k.plural != "daskworkergroups"])
    assert await watches.start(10)
    await kubeclient.client()  # (its /version, once per process: the watches have a client of their own)
    try:
        locator = SchedulerLocator("pod-ip", watches=watches)
        before = len(api.audit_events())
        assert await locator.address("ns", "demo") == f"tcp://{POD_IP}:8786"
        assert await locator.address("ns", "demo") == f"tcp://{POD_IP}:8786"
        assert _reads(api, before) == ["list daskclusters"]
        api.kubectl("delete", "pod", "demo-scheduler-5d9f-abcde", "-n", "ns", "--grace-period=0", "--force")
        make_pod(api, "demo-scheduler-5d9f-fghij", replicaset_owner(api), ip="127.2.200.9")
        before = len(api.audit_events())
        for _ in range(100):  # until the watch's events are in
            if await locator.address("ns", "demo") == "tcp://127.2.200.9:8786":
                break
            await asyncio.sleep(0.05)
        assert await locator.address("ns", "demo") == "tcp://127.2.200.9:8786"
        assert _reads(api, before) == ["list daskclusters"]
    finally:
        await watches.stop()


async def test_with_the_caches_a_refusal_is_still_read_from_the_api(api):
    """The cache is trusted for what it finds: a ReplicaSet it does not hold (not
    labelled as the cluster's, or not seen yet) is asked of the API before the pod is
    refused (refusals are remembered)."""
    api.kubectl("label", "replicaset", "demo-scheduler-5d9f", "-n", "ns", "dask.org/cluster-name-")
    make_pod(api, "demo-scheduler-5d9f-abcde", replicaset_owner(api))
    watches = Watches([k for k in operator_kinds(group_record) if k.plural != "daskworkergroups"])
    assert await watches.start(10)
    await kubeclient.client()  # (its /version, once per process: the watches have a client of their own)
    try:
        before = len(api.audit_events())
        assert await SchedulerLocator("pod-ip", watches=watches).address("ns", "demo") == f"tcp://{POD_IP}:8786"
        assert _reads(api, before) == ["list replicasets", "list daskclusters"]
    finally:
        await watches.stop()


def _reads(stack: LocalStack, since: int) -> list[str]:
    """The kr8s client's requests (not kubectl's) after the ``since``-th audit event."""
    return [f"{e['verb']} {(e.get('objectRef') or {}).get('resource') or e['requestURI']}"
            for e in stack.audit_events()[since:]
            if e.get("userAgent", "").startswith("kr8s") and e["stage"] == "ResponseComplete"]
