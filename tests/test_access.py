"""Scheduler address lookup through the scheduler Service, on the emulated API."""

from __future__ import annotations

import pytest

from dask_memory_operator.schedulers.locator import SchedulerAccessError, SchedulerLocator, SchedulerServiceMissing
from dask_memory_operator.devstack.stack import LocalStack


@pytest.fixture
def api(tmp_path, monkeypatch):
    with LocalStack(tmp_path, dask_operator=False, kubelet=False) as stack:
        monkeypatch.setenv("KUBECONFIG", str(stack.kubeconfig))
        stack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}})
        stack.apply({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "demo-scheduler", "namespace": "ns"},
            "spec": {"selector": {"dask.org/cluster-name": "demo", "dask.org/component": "scheduler"}, "ports": [
                {"name": "http-dashboard", "port": 8787},
                {"name": "tcp-comm", "port": 8786},
            ]},
        })
        yield stack


async def test_dns_and_cluster_ip_addresses(api, monkeypatch):
    ip = api.scheduler_address("ns", "demo").removeprefix("tcp://").split(":")[0]
    assert await SchedulerLocator("dns").address("ns", "demo") == "tcp://demo-scheduler.ns.svc:8786"
    assert await SchedulerLocator("cluster-ip").address("ns", "demo") == f"tcp://{ip}:8786"


async def test_missing_service_is_reported(api):
    with pytest.raises(SchedulerServiceMissing, match="ns/nope-scheduler not found"):
        await SchedulerLocator("cluster-ip").address("ns", "nope")


def test_auto_picks_dns_in_a_pod_and_port_forward_outside(monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert SchedulerLocator("auto").mode == "dns"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert SchedulerLocator("auto").mode == "port-forward"


@pytest.mark.parametrize("spec, words", [
    ({"type": "ExternalName", "externalName": "victim-scheduler.other.svc.cluster.local"}, "ExternalName"),
    ({"ports": [{"name": "tcp-comm", "port": 8786}]}, "does not select"),  # endpoints by hand
    ({"selector": {"dask.org/cluster-name": "victim", "dask.org/component": "scheduler"},
      "ports": [{"name": "tcp-comm", "port": 8786}]}, "does not select"),
])
async def test_a_service_leading_elsewhere_is_refused(api, spec, words):
    """The namespace's owner writes the Service: it may not route the operator to
    another tenant's scheduler."""
    api.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "sly-scheduler", "namespace": "ns"},
               "spec": spec})
    for mode in ("dns", "cluster-ip"):
        with pytest.raises(SchedulerAccessError, match=words):
            await SchedulerLocator(mode).address("ns", "sly")
