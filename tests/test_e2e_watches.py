"""End to end: the operator reads from watches (issue 16).

On the local stack with the real dask-kubernetes operator and real schedulers, the
operator run under a ServiceAccount of its own, so that the API server's audit log
tells its requests from everyone else's. Two governed clusters, one under an AMM-only
policy and one under ``adaptive`` with nothing to do (bounds 0..0, no workers):

- over a window where nothing changes, their passes (a resync a second, an adaptive
  look a second) make no API request at all: not a LIST, not a ``/version``, not a
  status write; the window counts as one only if the operator did contact both
  schedulers in it;
- ``/version`` is asked once over the operator's life;
- a scheduler pod deleted from outside is replaced (by its Deployment), and the new one
  is found and configured from the watch's events: no LIST of pods or Deployments.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dmo_devstack.scaling_probes import free_port, make_cluster, policy, scaling_entry
from dmo_devstack.stack import LocalStack
from dask_memory_operator.schedulers import rpc

OPERATOR = "dmo-watches"
WINDOW = 8.0  # seconds: eight resyncs and eight adaptive looks


class Audit:
    """The operator's requests in the audit log from where the last read ended (the
    session's log is long: read on, never again from its start)."""

    def __init__(self, stack: LocalStack, user: str):
        self.path, self.user = stack.audit_log_path, user
        self.offset = self.path.stat().st_size

    def read(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        events = [json.loads(line) for line in data[:end].splitlines()]
        return [e for e in events if (e.get("user") or {}).get("username") == self.user
                and e["stage"] == ("ResponseStarted" if e["verb"] == "watch" else "ResponseComplete")]


def what(events: list[dict[str, Any]]) -> list[str]:
    return [f"{e['verb']} {(e.get('objectRef') or {}).get('resource') or e['requestURI']}" for e in events]


def contacts(port: int, namespace: str) -> float:
    """The operator's scheduler contacts in ``namespace`` so far (its /metrics)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == "dask_memory_operator_scheduler_contacts_total"
               and s.labels.get("namespace") == namespace)


def scheduler_pod(stack: LocalStack, ns: str, cluster: str) -> dict[str, Any] | None:
    for pod in stack.pods(ns, f"dask.org/cluster-name={cluster},dask.org/component=scheduler"):
        status = pod.get("status") or {}
        if not pod["metadata"].get("deletionTimestamp") and status.get("podIP") and any(
                c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ()):
            return pod
    return None


def amm_interval(pod: dict[str, Any]) -> float | None:
    try:
        status = asyncio.run(rpc.get_status(f"tcp://{pod['status']['podIP']}:8786", timeout=5))
    except Exception:  # restarting, no plugin yet
        return None
    return (status.get("amm") or {}).get("interval")


@pytest.fixture
def operator(stack: LocalStack, namespace: str) -> Iterator[tuple[Audit, int]]:
    """This project's operator, as its own ServiceAccount; its audit and metrics port."""
    kubeconfig, user = stack.service_account_kubeconfig(namespace, "dmo-watches")
    port = free_port()
    audit = Audit(stack, user)
    stack.start_process(OPERATOR, [
        sys.executable, "-m", "dask_memory_operator.cli", "run", "--verbose", "--metrics-port", str(port),
        "--scheduler-access", "pod-ip", "--resync-interval", "1", "--rpc-timeout", "3",
    ], env={"KUBECONFIG": str(Path(kubeconfig))})
    try:
        yield audit, port
    finally:
        stack.stop_process(OPERATOR)


def test_idle_governed_clusters_cost_the_api_nothing(stack: LocalStack, namespace: str, operator):
    audit, port = operator
    ns = namespace
    for name in ("amm", "adapt"):
        make_cluster(stack, ns, name, workers=0)
    stack.apply(policy("amm", "amm"), namespace=ns)
    stack.apply(policy("adapt", "adapt", adaptive={"minimum": 0, "maximum": 0}), namespace=ns)

    def applied(name: str) -> bool:
        body = stack.get_json(f"/apis/amm.dask.org/v1alpha1/namespaces/{ns}/memorypolicies/{name}") or {}
        return (body.get("status") or {}).get("appliedClusters") == 1

    stack.wait_for(lambda: applied("amm") and applied("adapt"), 120, "both policies applied", interval=0.5)
    stack.wait_for(lambda: scaling_entry(stack, ns, "adapt", "adapt").get("reason") == "Steady", 60,
                   "the adaptive cluster steady", interval=0.5)
    started = audit.read()

    # nothing changes: no request at all, though both schedulers are contacted
    before = contacts(port, ns)
    audit.read()
    time.sleep(WINDOW)
    idle = [e for e in audit.read() if e["verb"] != "watch"]  # (kopf's watches end and resume)
    assert contacts(port, ns) - before >= WINDOW, "the passes did not run"
    assert what(idle) == []

    # a scheduler pod deleted from outside: its replacement found from the watch's events
    old = scheduler_pod(stack, ns, "amm")
    stack.kubectl("delete", "pod", old["metadata"]["name"], "-n", ns, "--grace-period=1")

    def configured() -> bool:
        new = scheduler_pod(stack, ns, "amm")
        return new is not None and new["metadata"]["uid"] != old["metadata"]["uid"] and amm_interval(new) == 0.5

    stack.wait_for(configured, 90, "the new scheduler configured", interval=0.5)
    replaced = what(audit.read())
    assert not [r for r in replaced if r in ("list pods", "list deployments", "list replicasets")], replaced
    assert len([r for r in what(started) + replaced if r.startswith("get /version")]) == 1
