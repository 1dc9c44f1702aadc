"""End to end: the Helm chart, installed with the real ``helm`` into the local stack.

The chart's operator Deployment runs as a pod of the process kubelet, with the
chart's ServiceAccount token; the emulated API enforces RBAC for it as kube-apiserver
does and writes an audit log. So the scenario (a MemoryPolicy applied to a
DaskCluster, its scheduler configured, a graceful scale-down of a busy cluster)
passing shows the chart's rules are enough, and the audit log shows none is
superfluous: every rule the chart renders allowed at least one request.

``helm upgrade`` with changed values keeps the webhook's certificate and runs two
replicas under the release's own kopf peering; ``helm uninstall`` leaves nothing
behind but the CRDs.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dask_memory_operator.devstack.emulator.rbac import attributes_of_audit_event, rule_allows
from dask_memory_operator.devstack.helm import helm
from dask_memory_operator.devstack.probes import amm_state, task_ledger
from dask_memory_operator.devstack.scaling_probes import (
    assert_consistent,
    assert_nothing_lost,
    busy_job,
    client_of,
    events,
    make_cluster,
    policy,
    scaling_entry,
    set_adaptive,
)
from dask_memory_operator.devstack.stack import LocalStack

CHART = Path(__file__).resolve().parents[1] / "charts" / "dask-memory-operator"
RELEASE = "dmo"
FULLNAME = f"{RELEASE}-dask-memory-operator"
VALUES = ["--set", "resyncInterval=2", "--set-json", 'extraArgs=["--verbose", "--rpc-timeout", "3"]']
#: Helm 4 applies server-side by default, which the emulated API does not serve (415).
INSTALL = ["--server-side=false", "--wait", "--timeout", "3m"]


def run_helm(stack: LocalStack, *args: str) -> str:
    return helm(*args, kubeconfig=stack.kubeconfig).stdout


def manifests(stack: LocalStack, ns: str, what: str = "manifest") -> list[dict]:
    """The release's objects (``helm get manifest``) or its hooks (``helm get hooks``)."""
    return [d for d in yaml.safe_load_all(run_helm(stack, "get", what, RELEASE, "-n", ns)) if d]


def operator_pods(stack: LocalStack, ns: str) -> list[dict]:
    return [p for p in stack.pods(ns, "app.kubernetes.io/component=operator")
            if not p["metadata"].get("deletionTimestamp")]


def ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", ()))


def wait_operators_ready(stack: LocalStack, ns: str, count: int) -> list[dict]:
    return stack.wait_for(lambda: (pods := operator_pods(stack, ns)) and len(pods) == count
                          and all(ready(p) for p in pods) and pods, 90, f"{count} ready operator pods")


def cluster_scoped_objects(stack: LocalStack) -> set[tuple[str, str]]:
    """(kind, name) of every cluster-scoped object but Namespaces."""
    names = stack.kubectl("api-resources", "--namespaced=false", "--verbs=list", "-o", "name").stdout.split()
    names = [n for n in names if n != "namespaces"]
    items = json.loads(stack.kubectl("get", ",".join(names), "-o", "json").stdout)["items"]
    return {(o["kind"], o["metadata"]["name"]) for o in items}


def service_account_user(ns: str, name: str) -> str:
    return f"system:serviceaccount:{ns}:{name}"


@pytest.fixture(scope="module")
def release(stack: LocalStack) -> Iterator[dict]:
    """The chart installed with its defaults (cluster-wide) into a namespace of its own."""
    ns = f"dmo-system-{secrets.token_hex(3)}"
    state = {"namespace": ns, "cluster_scoped_before": cluster_scoped_objects(stack),
             "audit_from": len(stack.audit_events())}
    stack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    run_helm(stack, "install", RELEASE, str(CHART), "-n", ns, *INSTALL, *VALUES)
    wait_operators_ready(stack, ns, 1)
    yield state
    helm("uninstall", RELEASE, "-n", ns, "--wait", "--ignore-not-found", kubeconfig=stack.kubeconfig, check=False)
    stack.kubectl("delete", "namespace", ns, "--wait=false", check=False)


# --- tests ---------------------------------------------------------------------


def test_the_charts_operator_governs_and_retires_gracefully_under_its_own_rbac(
        stack: LocalStack, namespace: str, release: dict):
    ns, cluster, rns = namespace, "busy", release["namespace"]
    # the policy first: the cluster's pods are born governed, through the chart's webhook
    stack.apply(policy("scale", cluster, adaptive={"minimum": 3, "maximum": 3, "interval": "500ms"},
                       retirement={"timeLimit": "60s", "maxConcurrent": 2}), namespace=ns)
    stack.wait_for(lambda: (stack.get_json(f"/apis/amm.dask.org/v1alpha1/namespaces/{ns}/memorypolicies/scale")
                            or {}).get("status", {}).get("observedGeneration"), 60, "the policy's status")
    make_cluster(stack, ns, cluster, workers=3)
    with client_of(stack, ns, cluster, 3) as client:
        state = client.run_on_scheduler(amm_state)
        assert state["running"] and state["interval"] == 0.5 and state["plugin"]
        workers = stack.pods(ns, f"dask.org/cluster-name={cluster},dask.org/component=worker")
        assert all(c.get("lifecycle", {}).get("preStop") for p in workers for c in p["spec"]["containers"]), \
            "worker pods were not born with the retirement hook"
        stack.wait_for(lambda: scaling_entry(stack, ns, "scale", cluster).get("replicas") == 3, 60, "scaling at 3")

        x, job = busy_job(client)
        future = client.compute(job)
        stack.wait_for(lambda: client.run_on_scheduler(task_ledger)["computed"] > 70, 60, "the job to run")
        set_adaptive(stack, ns, "scale", minimum=2, maximum=2)
        expected = float(x.sum().compute())
        assert abs(future.result() - expected) < 1e-6 * expected
        assert_consistent(stack, ns, cluster, client, 2)
        assert_nothing_lost(client)
        assert len(events(stack, ns, "WorkerRetired")) == 1

    # helm test: the CRD is established and the operator answers its liveness endpoint
    run_helm(stack, "test", RELEASE, "-n", rns, "--timeout", "2m")

    assert_rbac_exact(stack, release)


def assert_rbac_exact(stack: LocalStack, release: dict) -> None:
    """From the audit log since the install: the rules as shipped were enough (nothing
    the operator or the test pod asked was refused, no token was refused), and none is
    superfluous (every verb of every rule the release renders allowed a request)."""
    rns = release["namespace"]
    since = stack.audit_events()[release["audit_from"]:]
    assert [e["requestURI"] for e in since if e.get("responseStatus", {}).get("code") == 401] == []
    sa, test_sa = service_account_user(rns, FULLNAME), service_account_user(rns, f"{FULLNAME}-test")
    audit = [e for e in since if (e.get("user") or {}).get("username") in (sa, test_sa)]
    assert {e["user"]["username"] for e in audit} == {sa, test_sa}
    forbidden = sorted({f'{e["verb"]} {e["requestURI"]}' for e in audit
                        if e["annotations"].get("authorization.k8s.io/decision") != "allow"})
    assert forbidden == []
    allowed = [a for e in audit if e["annotations"].get("authorization.k8s.io/decision") == "allow"
               for a in attributes_of_audit_event(e)]
    unused = [(role, verb, rule) for role, subject, rule in chart_rules(stack, rns) for verb in rule["verbs"]
              if not any(a.user == subject and rule_allows({**rule, "verbs": [verb]}, a) for a in allowed)]
    assert unused == []


def chart_rules(stack: LocalStack, ns: str) -> list[tuple[str, str, dict]]:
    """(role, the user bound to it, rule) for every rule of every role the release
    renders, its test hooks' included."""
    docs = manifests(stack, ns) + manifests(stack, ns, "hooks")
    roles = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
             for d in docs if d["kind"] in ("ClusterRole", "Role")}
    found = []
    for binding in (d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        ref = binding["roleRef"]
        role = roles[(ref["kind"], "" if ref["kind"] == "ClusterRole" else binding["metadata"]["namespace"],
                      ref["name"])]
        for subject in binding["subjects"]:
            user = service_account_user(subject["namespace"], subject["name"])
            found += [(ref["name"], user, rule) for rule in role["rules"]]
    assert {name for _, _, name in roles} == {name for name, _, _ in found}, "a role bound to nobody"
    return found


def test_upgrade_keeps_the_certificate_and_peers_two_replicas(stack: LocalStack, namespace: str, release: dict):
    """Two replicas: one active, one standing by, under the release's own peering; the
    peering's rules are enough and all used."""
    rns = release["namespace"]
    secret_path = f"/api/v1/namespaces/{rns}/secrets/{FULLNAME}-webhook-tls"
    webhook_path = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{FULLNAME}"
    certificate = stack.get_json(secret_path)["data"]
    ca_bundle = stack.get_json(webhook_path)["webhooks"][0]["clientConfig"]["caBundle"]
    assert ca_bundle == certificate["ca.crt"]

    run_helm(stack, "upgrade", RELEASE, str(CHART), "-n", rns, "--wait", "--timeout", "3m",
             *VALUES, "--set", "replicaCount=2")
    wait_operators_ready(stack, rns, 2)
    assert stack.get_json(secret_path)["data"] == certificate
    assert stack.get_json(webhook_path)["webhooks"][0]["clientConfig"]["caBundle"] == ca_bundle
    args = stack.get_json(f"/apis/apps/v1/namespaces/{rns}/deployments/{FULLNAME}")[
        "spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--peering") + 1] == FULLNAME
    # both replicas announce themselves in the release's own peering, not kopf's default
    peers = lambda: (stack.get_json(f"/apis/kopf.dev/v1/clusterkopfpeerings/{FULLNAME}") or {}).get("status") or {}  # noqa: E731
    stack.wait_for(lambda: len(peers()) == 2, 60, "two peers in the release's peering")
    assert len({peer["priority"] for peer in peers().values()}) == 2
    pods = [p["metadata"]["name"] for p in operator_pods(stack, rns)]
    standing_by = lambda: [p for p in pods if "Pausing operations in favour of" in stack.pod_logs(rns, p)]  # noqa: E731
    stack.wait_for(lambda: len(standing_by()) == 1, 60, "one replica to stand by")
    assert not any("Pausing all operators" in stack.pod_logs(rns, p) for p in pods)
    # ... and the other one acts
    stack.apply({"apiVersion": "amm.dask.org/v1alpha1", "kind": "MemoryPolicy", "metadata": {"name": "after"},
                 "spec": {"clusterSelector": {}, "activeMemoryManager": {"policies": []}}}, namespace=namespace)
    stack.wait_for(lambda: (stack.get_json(
        f"/apis/amm.dask.org/v1alpha1/namespaces/{namespace}/memorypolicies/after") or {}).get(
        "status", {}).get("observedGeneration"), 60, "the policy reconciled by the active replica")
    assert_rbac_exact(stack, release)
    assert "default" not in {o["metadata"]["name"] for o in (
        stack.get_json("/apis/kopf.dev/v1/clusterkopfpeerings") or {}).get("items", [])}


def test_uninstall_leaves_nothing_behind_but_the_crds(stack: LocalStack, release: dict):
    rns = release["namespace"]
    made = manifests(stack, rns) + manifests(stack, rns, "hooks")
    run_helm(stack, "uninstall", RELEASE, "-n", rns, "--wait", "--timeout", "2m")
    stack.wait_for(lambda: not stack.pod_processes(rns), 60, "the operator pods' processes to end")
    left = json.loads(stack.kubectl("get", "all,secrets,configmaps,serviceaccounts,roles,rolebindings",
                                    "-n", rns, "-o", "json").stdout)["items"]
    assert {(o["kind"], o["metadata"]["name"]) for o in left} == {("ServiceAccount", "default")}
    new = cluster_scoped_objects(stack) - release["cluster_scoped_before"]
    assert all(kind == "CustomResourceDefinition" for kind, _ in new), new
    gone = [(d["kind"], d["metadata"]["name"]) for d in made if d["kind"] != "CustomResourceDefinition"]
    assert gone and not {(k, n) for k, n in gone} & cluster_scoped_objects(stack)
