"""Shared fixtures for the end-to-end tests on the local Kubernetes stack.

- ``stack`` (session): one :class:`~dask_memory_operator.devstack.stack.LocalStack`
  (emulated API server, process kubelet, the real dask-kubernetes operator) for the
  whole run. Tests isolate themselves by namespace, not by stack.
- ``namespace`` (function): a fresh Namespace for one test. At teardown every
  DaskCluster in it is deleted and the fixture waits until its pods' processes are
  gone, so that no test leaves Dask processes running for the next one. When the
  test failed, the logs of the stack and of the namespace's pods are printed.

Both need the stack's processes; tests that only need the units import the modules.
"""

from __future__ import annotations

import re
import secrets

import pytest

from dask_memory_operator.devstack.stack import LocalStack


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Record each phase's report on the item, so fixtures can tell a failed test."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The local Kubernetes stack, started once per test session."""
    with LocalStack(tmp_path_factory.mktemp("stack")) as local_stack:
        yield local_stack


@pytest.fixture
def namespace(stack, request):
    """A new Namespace named after the test; its DaskClusters and pods end with it."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base}-{secrets.token_hex(3)}"
    stack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        print(f"\n===== logs of the stack and of namespace {name} =====")
        print(stack.dump_logs(name))
    stack.kubectl("delete", "daskclusters", "--all", "-n", name, "--wait=false", check=False)
    stack.kubectl("delete", "deployments", "--all", "-n", name, "--wait=false", check=False)
    stack.wait_for(
        lambda: not stack.pod_processes(name),
        timeout=60,
        what=f"the processes of namespace {name} to end",
    )
    stack.kubectl("delete", "namespace", name, "--wait=false", check=False)
