"""End to end: what a tenant with rights in its own namespace only cannot do to the
shared operator's scope (issue 15, cases 4 and 7).

- Case 4: the operator's kopf peering is a ClusterKopfPeering, also when it watches
  some namespaces. A tenant writing a peer of huge priority and lifetime into the
  KopfPeering of the release's name in its own namespace (which the chart used to
  create there) pauses nothing: a policy in another namespace is still reconciled.
- Case 7: with ``--namespace-selector``, policies in namespaces a cluster admin has not
  labelled are ignored (no status, no finalizer); labelling the namespace later picks
  its existing policies up, unlabelling it lets go of them (kopf drops its finalizer).

The operators watch only the test's namespaces: the stack is shared.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from dmo_devstack.scaling_probes import wait_policy_reconciled
from dmo_devstack.stack import LocalStack

PEERING_CRDS = Path(__file__).resolve().parents[1] / "charts" / "dask-memory-operator" / "crds" / "kopf-peering.yaml"
FINALIZER = "amm.dask.org/restore-schedulers"


def memorypolicy(name: str) -> dict:
    return {"apiVersion": "amm.dask.org/v1alpha1", "kind": "MemoryPolicy", "metadata": {"name": name},
            "spec": {"clusterSelector": {}, "activeMemoryManager": {"policies": []}}}


def policy_body(stack: LocalStack, ns: str, name: str) -> dict:
    return stack.get_json(f"/apis/amm.dask.org/v1alpha1/namespaces/{ns}/memorypolicies/{name}") or {}


def run_operator(stack: LocalStack, name: str, *args: str) -> None:
    stack.start_process(name, [sys.executable, "-m", "dask_memory_operator.cli", "run", "--verbose",
                               "--scheduler-access", "cluster-ip", "--resync-interval", "600", *args])


@pytest.fixture
def other_namespace(stack: LocalStack, namespace: str) -> Iterator[str]:
    """A second namespace, another tenant's."""
    name = f"{namespace[:50]}-b"
    stack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    stack.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_a_tenants_kopfpeering_does_not_pause_the_operator(stack: LocalStack, namespace: str,
                                                           other_namespace: str):
    peering = f"dmo-tenants-{secrets.token_hex(3)}"
    for doc in yaml.safe_load_all(PEERING_CRDS.read_text()):
        if doc:
            stack.apply(doc)
    stack.wait_for(lambda: stack.get_json("/apis/kopf.dev/v1/clusterkopfpeerings") is not None,
                   30, "the peering kinds served")
    # the release's peering, and (as the chart rendered them with watchNamespaces until
    # now) a KopfPeering of that name in each watched namespace: the tenants' to write
    stack.apply({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}})
    for ns in (namespace, other_namespace):
        stack.apply({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": peering}},
                    namespace=ns)
    process = "dmo-peer-tenants"
    run_operator(stack, process, "--namespace", namespace, "--namespace", other_namespace,
                 "--peering", peering, "--priority", "100")
    try:
        stack.apply(memorypolicy("before"), namespace=namespace)
        wait_policy_reconciled(stack, namespace, "before")

        # (kopf starts paused until it has read its peering: only later pauses count)
        logged_before = len(stack.logs(process))
        # the tenant of `namespace` announces a peer that outranks everyone, for ever
        now = datetime.now(UTC).isoformat()
        stack.apply({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": peering},
                     "status": {"tenant@attacker": {"priority": 2**31 - 1, "lifetime": 10**9, "lastseen": now}}},
                    namespace=namespace)
        # the operator still acts, in the other tenant's namespace too
        stack.apply(memorypolicy("after"), namespace=other_namespace)
        wait_policy_reconciled(stack, other_namespace, "after", timeout=30)
        since = stack.logs(process)[logged_before:]
        assert "Pausing" not in since
    finally:
        for ns in (namespace, other_namespace):  # their finalizers go while the operator runs
            stack.kubectl("delete", "memorypolicies", "--all", "-n", ns, "--timeout=30s", check=False)
        stack.stop_process(process)
        stack.kubectl("delete", "clusterkopfpeering", peering, "--wait=false", check=False)


def test_only_namespaces_a_cluster_admin_labelled_are_governed(stack: LocalStack, namespace: str,
                                                             other_namespace: str):
    label = f"dmo-test-{secrets.token_hex(3)}/governed"
    stack.kubectl("label", "namespace", namespace, f"{label}=true")
    process = "dmo-namespace-selector"
    run_operator(stack, process, "--namespace", namespace, "--namespace", other_namespace,
                 "--namespace-selector", f"{label}=true")
    try:
        # the unlabelled namespace's policy first, then the labelled one's: once this
        # one is reconciled, the other has been seen (and ignored) too
        stack.apply(memorypolicy("ignored"), namespace=other_namespace)
        stack.apply(memorypolicy("governed"), namespace=namespace)
        wait_policy_reconciled(stack, namespace, "governed")
        assert FINALIZER in policy_body(stack, namespace, "governed")["metadata"].get("finalizers", [])
        stack.wait_for(lambda: "Ignoring namespace " + other_namespace in stack.logs(process), 30,
                       "the operator to log that it ignores the unlabelled namespace")
        ignored = policy_body(stack, other_namespace, "ignored")
        assert "status" not in ignored and FINALIZER not in ignored["metadata"].get("finalizers", [])

        # a cluster admin opts the namespace in: its existing policy is governed
        stack.kubectl("label", "namespace", other_namespace, f"{label}=true")
        wait_policy_reconciled(stack, other_namespace, "ignored", timeout=30)
        stack.wait_for(lambda: FINALIZER in policy_body(stack, other_namespace, "ignored")["metadata"].get(
            "finalizers", []), 30, "kopf's finalizer on the newly governed policy")

        # and out again: the operator lets go of it (no finalizer left to block a delete)
        stack.kubectl("label", "namespace", other_namespace, f"{label}-")
        stack.wait_for(lambda: FINALIZER not in policy_body(stack, other_namespace, "ignored")["metadata"].get(
            "finalizers", []), 30, "kopf's finalizer dropped when the namespace is no longer governed")
    finally:
        for ns in (namespace, other_namespace):
            stack.kubectl("delete", "memorypolicies", "--all", "-n", ns, "--timeout=30s", check=False)
        stack.stop_process(process)
