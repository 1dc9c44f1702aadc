"""A tenant cannot make the operator configure another tenant's scheduler (issue 15, case 1).

Kubernetes routes a Service's name and clusterIP through every EndpointSlice labelled
``kubernetes.io/service-name: <svc>``, including one the namespace's owner writes by
hand that points at another namespace's pod IP (the CVE-2021-25740 class). The local
stack routes Services that way too (the kubelet's endpoint controller and userspace
kube-proxy), so the attack is real here: tenant A adds a slice to its scheduler
Service pointing at tenant B's scheduler pod, then scales its own scheduler to zero so
that A's Service leads only to B. The test checks the stack does route A's Service to
B, and that A's MemoryPolicy nevertheless configures A's scheduler only, and B's never
(asked of B's scheduler itself, at its pod IP).

The operator runs with ``--scheduler-access cluster-ip``: the mode that used to go
through the Service, and what the local stack's command lines still say; it now means
``pod-ip`` (tests/test_access.py checks the two are one).
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator

import pytest
from distributed import Client

from dmo_devstack.probes import amm_state
from dmo_devstack.stack import LocalStack, daskcluster_manifest

AMM_OFF = {"DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START": "False"}
#: the policy A applies, and what a scheduler it configured reports
POLICY = {"interval": "500ms", "measure": "managed", "policies": [{"class": "ReduceReplicas"}]}
CONFIGURED = {"running": True, "interval": 0.5, "measure": "managed"}
#: the schedulers' own configuration
OWN = {"running": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def operator_process(stack: LocalStack) -> Iterator[None]:
    stack.start_process("dask-memory-operator", [
        sys.executable, "-m", "dask_memory_operator.cli", "run", "--verbose",
        "--metrics-port", str(_free_port()),
        "--scheduler-access", "pod-ip", "--resync-interval", "1", "--rpc-timeout", "2",
    ])
    yield
    stack.stop_process("dask-memory-operator")



def scheduler_pod_ip(stack: LocalStack, ns: str, cluster: str) -> str | None:
    pods = stack.pods(ns, f"dask.org/cluster-name={cluster},dask.org/component=scheduler")
    ready = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                    for c in p.get("status", {}).get("conditions") or ())]
    return ready[0]["status"]["podIP"] if ready else None


def amm_at(address: str) -> dict:
    """What the scheduler at ``address`` runs, asked of that scheduler."""
    with Client(address, timeout="30s") as client:
        return client.run_on_scheduler(amm_state)


def answering_scheduler(address: str) -> str:
    """The address the scheduler that answers at ``address`` listens on (who it is)."""
    with Client(address, timeout="30s") as client:
        return client.scheduler_info()["address"]


def policy_entry(stack: LocalStack, ns: str, cluster: str) -> dict | None:
    """The policy's status for ``cluster``, once it is of the policy's current generation."""
    policy = json.loads(stack.kubectl("get", "mempol", "reach", "-n", ns, "-o", "json").stdout)
    status = policy.get("status") or {}
    if status.get("observedGeneration") != policy["metadata"]["generation"]:
        return None
    return next((e for e in status.get("clusters") or () if e["name"] == cluster), None)


def test_a_hand_written_endpointslice_does_not_lead_to_another_tenants_scheduler(
        stack: LocalStack, namespace: str, other_namespace: str, operator_process):
    a_ns, b_ns = namespace, other_namespace
    stack.apply(daskcluster_manifest("a", workers=0, scheduler_env=AMM_OFF), namespace=a_ns)
    stack.apply(daskcluster_manifest("b", workers=0, scheduler_env=AMM_OFF), namespace=b_ns)
    a_ip = stack.wait_for(lambda: scheduler_pod_ip(stack, a_ns, "a"), 120, "a's scheduler pod")
    b_ip = stack.wait_for(lambda: scheduler_pod_ip(stack, b_ns, "b"), 120, "b's scheduler pod")
    a_direct, b_direct = f"tcp://{a_ip}:8786", f"tcp://{b_ip}:8786"
    assert amm_at(b_direct)["running"] is False

    # Tenant A, with every right in its own namespace, adds a slice to its scheduler
    # Service that points at B's scheduler pod, and scales its own scheduler to zero:
    # A's Service now leads only to B, and the stack routes it there as kube-proxy would.
    stack.apply({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "a-scheduler-by-hand", "labels": {"kubernetes.io/service-name": "a-scheduler"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [b_ip], "conditions": {"ready": True}}],
        "ports": [{"name": "tcp-comm", "port": 8786, "protocol": "TCP"},
                  {"name": "http-dashboard", "port": 8787, "protocol": "TCP"}],
    }, namespace=a_ns)
    stack.kubectl("scale", "deployment", "a-scheduler", "-n", a_ns, "--replicas=0")
    stack.wait_for(lambda: not stack.pods(a_ns, "dask.org/cluster-name=a,dask.org/component=scheduler"), 60,
                   "A's scheduler pod to go")
    assert answering_scheduler(stack.scheduler_address(a_ns, "a")) == b_direct  # the attack is live

    def b_untouched() -> None:
        state = amm_at(b_direct)
        assert state["running"] is False and not state["plugin"], f"A's policy reached B's scheduler: {state}"

    # A's policy for its cluster: the operator does not follow A's Service to B.
    stack.apply({"apiVersion": "amm.dask.org/v1alpha1", "kind": "MemoryPolicy",
                 "metadata": {"name": "reach"},
                 "spec": {"clusterNames": ["a"], "activeMemoryManager": POLICY}}, namespace=a_ns)
    entry = stack.wait_for(lambda: policy_entry(stack, a_ns, "a"), 60, "the policy's verdict on cluster a")
    b_untouched()
    assert entry["state"] == "Pending" and "no running scheduler pod" in entry["message"], entry

    # A's scheduler back (the hand-written slice still there): A's policy configures
    # A's own scheduler, and still never B's.
    stack.kubectl("scale", "deployment", "a-scheduler", "-n", a_ns, "--replicas=1")
    a_ip = stack.wait_for(lambda: scheduler_pod_ip(stack, a_ns, "a"), 120, "a's new scheduler pod")
    a_direct = f"tcp://{a_ip}:8786"
    seen: list[dict] = []

    def a_configured() -> bool:
        b_untouched()  # at every look, not only at the end
        seen.append(amm_at(a_direct))
        return all(seen[-1][k] == v for k, v in CONFIGURED.items())

    try:
        stack.wait_for(a_configured, 60, "A's scheduler configured by A's policy", interval=0.5)
    except TimeoutError:
        raise AssertionError(f"A's scheduler runs {seen[-1]}") from None
    b_untouched()
