"""End to end: one object cannot stop the shared operator (issue 15, case 2).

One operator process watches two tenants' namespaces. In namespace A the tenant
writes what the API server accepts but the operator used to choke on:

- a MemoryPolicy whose ``args`` nest 1,200 deep (about 7.5 kB; the API server takes
  JSON up to 10,000 levels): kopf's JSON decoding raised RecursionError in the
  watcher and the operator exited, then again after every restart;
- 1.3 MB of ``args`` within the CRD's first-level bounds (32 keys, lists of long
  strings: what lies below the first level cannot be bounded by a structural
  schema). ``kubectl apply`` is refused by the API server (its last-applied
  annotation passes the 256 KiB bound of annotations); ``kubectl create`` is
  accepted (a request is read up to 3 MiB, etcd stores up to 1.5 MiB);
- ``args`` at the CRD's first-level maximum (32 strings of 4096 characters, about
  130 kB), by ``kubectl apply``: kubectl's last-applied annotation and kopf's copy of
  the spec together would pass the 256 KiB bound, so kopf's patch would be refused
  for ever.

Each is reported Invalid on itself with a message naming the bound (and, for the
deep one, the path), the operator process keeps running (no RecursionError, no
refused patches), A's scheduler keeps its own configuration, and tenant B's valid
policy, applied afterwards, reaches B's scheduler (asked of that scheduler).
"""

from __future__ import annotations

import json
import sys

import pytest
from distributed import Client

from dmo_devstack.probes import amm_state
from dmo_devstack.stack import KubectlError, LocalStack, ManagedProcess, daskcluster_manifest

AMM_OFF = {"DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START": "False"}
PROCESS = "dmo-bounds"
#: B's policy, and what B's scheduler runs under it
VALID_AMM = {"interval": "500ms", "measure": "managed", "policies": [{"class": "ReduceReplicas"}]}
CONFIGURED = {"running": True, "interval": 0.5, "measure": "managed"}


def nested(depth: int, leaf: object = 1) -> dict:
    value: object = leaf
    for _ in range(depth):
        value = {"a": value}
    return value  # type: ignore[return-value]


#: 1.3 MB within the CRD's bounds of the first level (32 keys, lists of at most 256)
HUGE_ARGS = {f"k{i}": ["x" * 4000] * 10 for i in range(32)}
#: the CRD's first-level maximum: 32 strings of 4096 characters
WIDEST_ARGS = {f"k{i}": "x" * 4096 for i in range(32)}


def memorypolicy(name: str, amm: dict, clusters: list[str]) -> dict:
    return {"apiVersion": "amm.dask.org/v1alpha1", "kind": "MemoryPolicy", "metadata": {"name": name},
            "spec": {"clusterNames": clusters, "activeMemoryManager": amm}}


def with_args(name: str, args: dict) -> dict:
    return memorypolicy(name, {"interval": "500ms", "policies": [{"class": "ReduceReplicas", "args": args}]}, ["a"])



def amm_of(stack: LocalStack, ns: str, cluster: str) -> dict:
    """What the cluster's scheduler runs, asked of that scheduler."""
    with Client(stack.wait_scheduler_address(ns, cluster), timeout="30s") as client:
        return client.run_on_scheduler(amm_state)


def invalid_condition(stack: LocalStack, process: ManagedProcess, ns: str, name: str) -> dict:
    """The policy's Invalid condition, once the operator wrote it (failing at once if
    the operator process is gone)."""
    def check() -> dict | None:
        assert process.alive, f"the operator exited:\n{stack.logs(PROCESS)[-3000:]}"
        body = stack.get_json(f"/apis/amm.dask.org/v1alpha1/namespaces/{ns}/memorypolicies/{name}") or {}
        status = body.get("status") or {}
        if status.get("observedGeneration") != body.get("metadata", {}).get("generation"):
            return None
        conditions = {c["type"]: c for c in status.get("conditions") or ()}
        invalid = conditions.get("Invalid", {})
        return invalid if invalid.get("status") == "True" else None
    return stack.wait_for(check, 60, f"MemoryPolicy {name} reported Invalid", interval=0.3)


def test_deep_and_huge_policies_do_not_stop_the_operator_for_anyone(stack: LocalStack, namespace: str,
                                                                    other_namespace: str):
    a_ns, b_ns = namespace, other_namespace
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 5_000))  # this test's own json.dumps of `deep`
    # the schedulers start first (the slow part), while the rest goes on
    stack.apply(daskcluster_manifest("a", workers=0, scheduler_env=AMM_OFF), namespace=a_ns)
    stack.apply(daskcluster_manifest("b", workers=0, scheduler_env=AMM_OFF), namespace=b_ns)
    process = stack.start_process(PROCESS, [
        sys.executable, "-m", "dask_memory_operator.cli", "run", "--verbose",
        "--namespace", a_ns, "--namespace", b_ns,
        "--scheduler-access", "pod-ip", "--resync-interval", "1", "--rpc-timeout", "2",
    ])
    try:
        # (a) nested 1,200 deep: the API server takes it
        deep = with_args("deep", nested(1_200))
        assert 7_000 < len(json.dumps(deep, separators=(",", ":"))) < 8_000
        stack.apply(deep, namespace=a_ns)
        # Invalid on itself, with a message naming the path and the bound
        invalid = invalid_condition(stack, process, a_ns, "deep")
        assert "spec.activeMemoryManager.policies[0].args.a.a.a" in invalid["message"], invalid
        assert "nested more than 12 levels deep" in invalid["message"], invalid

        # (b) 1.3 MB: kubectl apply is refused by the API server, naming the bound ...
        huge = with_args("huge", HUGE_ARGS)
        assert 1_250_000 < len(json.dumps(huge)) < 1_350_000
        with pytest.raises(KubectlError) as refused:
            stack.apply(huge, namespace=a_ns)
        assert "metadata.annotations: Too long: must have at most 262144 bytes" in refused.value.stderr
        # ... kubectl create is not (no last-applied annotation)
        stack.kubectl("create", "-n", a_ns, "-f", "-", input=json.dumps(huge))

        # (c) the CRD's first-level maximum, by kubectl apply
        widest = with_args("widest", WIDEST_ARGS)
        assert 130_000 < len(json.dumps(widest)) < 140_000
        stack.apply(widest, namespace=a_ns)

        # each Invalid on itself, naming the bound
        invalid = invalid_condition(stack, process, a_ns, "huge")
        assert invalid["message"] == "spec: larger than the limit of 256 KiB", invalid
        invalid = invalid_condition(stack, process, a_ns, "widest")
        assert invalid["message"] == "spec.activeMemoryManager.policies[0].args: larger than the limit of 16 KiB", \
            invalid

        # tenant B, afterwards: its valid policy reaches its scheduler
        stack.apply(memorypolicy("valid", VALID_AMM, ["b"]), namespace=b_ns)
        seen: list[dict] = []

        def b_configured() -> bool:
            assert process.alive, f"the operator exited:\n{stack.logs(PROCESS)[-3000:]}"
            seen.append(amm_of(stack, b_ns, "b"))
            return all(seen[-1][k] == v for k, v in CONFIGURED.items())

        try:
            stack.wait_for(b_configured, 60, "B's scheduler configured by B's policy", interval=0.5)
        except TimeoutError:
            raise AssertionError(f"B's scheduler runs {seen[-1] if seen else None}") from None
        # A's scheduler keeps its own configuration (invalid policies apply nothing)
        assert amm_of(stack, a_ns, "a")["running"] is False

        # the invalid policies go when deleted: kopf's patches of them (its copy of the
        # spec, then its finalizer's removal) are taken
        stack.kubectl("delete", "memorypolicies", "deep", "huge", "widest", "-n", a_ns, "--timeout=30s")
        # the operator kept running, without a RecursionError or a patch refused again and again
        assert process.alive
        logs = stack.logs(PROCESS)
        assert "RecursionError" not in logs and "maximum recursion depth" not in logs
        assert "262144" not in logs and "Too long" not in logs
        assert "Traceback" not in logs, logs[logs.index("Traceback") - 2000:][:6000]
    finally:
        for ns in (a_ns, b_ns):  # their finalizers go while the operator runs
            stack.kubectl("delete", "memorypolicies", "--all", "-n", ns, "--timeout=30s", check=False)
        stack.stop_process(PROCESS)
