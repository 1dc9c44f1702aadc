"""Shared fixtures for the end-to-end tests on the local Kubernetes stack.

- ``stack`` (session): one :class:`~dmo_devstack.stack.LocalStack`
  (emulated API server, process kubelet, the real dask-kubernetes operator) for the
  whole run. Tests isolate themselves by namespace, not by stack.
- ``namespace`` (function): a fresh Namespace for one test. At teardown its pods
  (with a grace period of 1 s), Deployments and DaskClusters are deleted and the
  fixture waits until its pods' processes are gone, so that no test leaves Dask
  processes running for the next one. When the test failed, the logs of the stack
  and of the namespace's pods are printed.

Why the pods go first, with a short grace period: what the test wanted is over, and a
worker pod's own grace period can be long (75 s and more with the retirement hook),
while a worker whose scheduler went first waits out distributed's connect timeout
(30 s) before it exits on SIGTERM. The pods are deleted in the same kubectl call as
their owners and before them, so that the kubelet stops them with the short grace
period (it keeps the first grace period it was given for a pod).

Both need the stack's processes; tests that only need the units import the modules.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from pathlib import Path

# The tests exercise the checkout they are in, also when the venv's editable install
# points at another one (a git worktree): its packages go first, for this process and
# for every process the stack starts.
_CHECKOUT = Path(__file__).resolve().parent.parent
_FIRST = [str(_CHECKOUT), str(_CHECKOUT / "operator"), str(_CHECKOUT / "devstack")]
sys.path[:0] = _FIRST
os.environ["PYTHONPATH"] = os.pathsep.join(
    _FIRST + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in _FIRST]
)

import pytest

from dmo_devstack.stack import LocalStack


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


def _test_namespace(stack, request, suffix: str = ""):
    """A new Namespace named after the test; its DaskClusters and pods end with it."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:38].strip("-")
    name = f"{base}{suffix}-{secrets.token_hex(3)}"
    stack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        print(f"\n===== logs of the stack and of namespace {name} =====")
        print(stack.dump_logs(name))
    stack.kubectl("delete", "pods,deployments,daskclusters", "--all", "-n", name,
                  "--grace-period=1", "--wait=false", check=False)
    stack.wait_for(
        lambda: not stack.pod_processes(name),
        timeout=60,
        what=f"the processes of namespace {name} to end",
    )
    stack.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def namespace(stack, request):
    yield from _test_namespace(stack, request)


@pytest.fixture
def other_namespace(stack, request):
    """A second tenant's namespace, beside ``namespace``."""
    yield from _test_namespace(stack, request, "-b")
