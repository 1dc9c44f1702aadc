"""End to end: the Helm chart, installed with the real ``helm`` into the local stack.

The chart's operator Deployment runs as a pod of the process kubelet, with the
chart's ServiceAccount token; the emulated API enforces RBAC for it as kube-apiserver
does and writes an audit log. So the scenario (a MemoryPolicy applied to a
DaskCluster, its scheduler configured, a graceful scale-down of a busy cluster)
passing shows the chart's rules are enough, and the audit log shows none is
superfluous: every rule the chart renders allowed at least one request.

``helm upgrade`` with changed values keeps the webhook's certificate and runs two
replicas under the release's own kopf peering, one active; ``helm uninstall`` leaves
nothing behind but the CRDs. A release with ``watchNamespaces`` and two replicas does
the same scenario with Roles in the watched namespace only (and still a
ClusterKopfPeering, which tenants cannot write).

The default release acts only in namespaces labelled
``dask-memory-operator.io/governed=true`` (a cluster admin's opt-in): the tests label
theirs. Its NetworkPolicy and ValidatingAdmissionPolicy are stored, not enforced, by
the emulated API.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from dmo_devstack.emulator.rbac import attributes_of_audit_event, rule_allows
from dmo_devstack.helm import helm
from dmo_devstack.probes import amm_state, task_ledger
from dmo_devstack.scaling_probes import (
    assert_consistent,
    assert_nothing_lost,
    busy_job,
    client_of,
    events,
    make_cluster,
    policy,
    scaling_entry,
    set_adaptive,
    wait_policy_reconciled,
)
from dmo_devstack.stack import LocalStack

CHART = Path(__file__).resolve().parents[1] / "charts" / "dask-memory-operator"
#: The chart's default namespace selector (values.yaml namespaceSelector)
GOVERNED = "dask-memory-operator.io/governed=true"
VALUES = ["--set", "resyncInterval=2", "--set-json", 'extraArgs=["--verbose", "--rpc-timeout", "3"]']
#: Helm 4 applies server-side by default, which the emulated API does not serve (415).
INSTALL = ["--server-side=false", "--wait", "--timeout", "3m"]


@dataclass
class Release:
    """An installed release, and what the cluster held before it."""

    name: str
    namespace: str
    #: Where its audit events begin in the stack's audit log.
    audit_from: int
    #: (kind, name) of the cluster-scoped objects before the install.
    cluster_scoped_before: set[tuple[str, str]] = field(default_factory=set)

    @property
    def fullname(self) -> str:
        return f"{self.name}-dask-memory-operator"


def run_helm(stack: LocalStack, *args: str) -> str:
    return helm(*args, kubeconfig=stack.kubeconfig).stdout


def install(stack: LocalStack, name: str, *values: str, replicas: int = 1) -> Release:
    """``helm install`` into a namespace of the release's own; waits for its operators."""
    ns = f"{name}-system-{secrets.token_hex(3)}"
    release = Release(name, ns, len(stack.audit_events()), cluster_scoped_objects(stack))
    stack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    run_helm(stack, "install", name, str(CHART), "-n", ns, *INSTALL, *VALUES, *values)
    wait_operators_ready(stack, ns, replicas)
    return release


def manifests(stack: LocalStack, release: Release, what: str = "manifest") -> list[dict]:
    """The release's objects (``helm get manifest``) or its hooks (``helm get hooks``)."""
    return [d for d in yaml.safe_load_all(run_helm(stack, "get", what, release.name, "-n", release.namespace)) if d]


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
def release(stack: LocalStack) -> Iterator[Release]:
    """The chart installed with its defaults (cluster-wide)."""
    release = install(stack, "dmo")
    yield release
    helm("uninstall", release.name, "-n", release.namespace, "--wait", "--ignore-not-found",
         kubeconfig=stack.kubeconfig, check=False)
    stack.kubectl("delete", "namespace", release.namespace, "--wait=false", check=False)


# --- tests ---------------------------------------------------------------------


def govern_and_scale_down(stack: LocalStack, ns: str, release: Release, *, one_replica: bool = True) -> None:
    """The scenario: a policy, a cluster born governed, its scheduler configured, a busy
    cluster scaled 3 -> 2 with nothing lost; then ``helm test``.

    With several replicas the webhook Service also reaches the standby ones, whose
    watches kopf keeps paused: they answer from the API (test_e2e_webhook_peers); a pod
    admitted unchanged when that read timed out (a loaded machine, an operator just
    started) must be reported by the active replica (README, "Several replicas")."""
    cluster = "busy"
    # the policy first: the cluster's pods are born governed, through the chart's webhook
    stack.apply(policy("scale", cluster, adaptive={"minimum": 3, "maximum": 3, "interval": "500ms"},
                       retirement={"timeLimit": "60s", "maxConcurrent": 2}), namespace=ns)
    wait_policy_reconciled(stack, ns, "scale")
    make_cluster(stack, ns, cluster, workers=3)
    with client_of(stack, ns, cluster, 3) as client:
        configured = lambda: (state := client.run_on_scheduler(amm_state))["running"] and \
            state["interval"] == 0.5 and state["plugin"]  # noqa: E731
        if one_replica:
            assert configured(), "the scheduler was not born with its policy's AMM"
        else:  # born so, or configured live by the active replica
            stack.wait_for(configured, 60, "the scheduler's AMM configured")
        workers = stack.pods(ns, f"dask.org/cluster-name={cluster},dask.org/component=worker")
        unhooked = [p for p in workers if not all(c.get("lifecycle", {}).get("preStop") for c in p["spec"]["containers"])]
        if one_replica:
            assert unhooked == [], "worker pods were not born with the retirement hook"
        elif unhooked:
            stack.wait_for(lambda: scaling_entry(stack, ns, "scale", cluster).get("workersWithoutRetirementHook")
                           == len(unhooked), 60, "the pods a standby admitted to be reported")
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
    run_helm(stack, "test", release.name, "-n", release.namespace, "--timeout", "2m")


def opt_in(stack: LocalStack, namespace: str) -> None:
    """What a cluster admin does for a tenant's namespace under the default release."""
    stack.kubectl("label", "namespace", namespace, GOVERNED)


def test_the_charts_operator_governs_and_retires_gracefully_under_its_own_rbac(
        stack: LocalStack, namespace: str, release: Release):
    opt_in(stack, namespace)
    govern_and_scale_down(stack, namespace, release)
    assert_rbac_exact(stack, release)


def assert_rbac_exact(stack: LocalStack, release: Release) -> None:
    """From the audit log since the install: the rules as shipped were enough (nothing
    the operator or the test pod asked was refused, no token was refused), and none is
    superfluous (every verb of every rule the release renders allowed a request)."""
    rns, fullname = release.namespace, release.fullname
    since = stack.audit_events()[release.audit_from:]
    assert [e["requestURI"] for e in since if e.get("responseStatus", {}).get("code") == 401] == []
    sa, test_sa = service_account_user(rns, fullname), service_account_user(rns, f"{fullname}-test")
    audit = [e for e in since if (e.get("user") or {}).get("username") in (sa, test_sa)]
    assert {e["user"]["username"] for e in audit} == {sa, test_sa}
    forbidden = sorted({f'{e["verb"]} {e["requestURI"]}' for e in audit
                        if e["annotations"].get("authorization.k8s.io/decision") != "allow"})
    assert forbidden == []
    allowed = [a for e in audit if e["annotations"].get("authorization.k8s.io/decision") == "allow"
               for a in attributes_of_audit_event(e)]
    unused = [(role, verb, rule) for role, subject, rule in chart_rules(stack, release) for verb in rule["verbs"]
              if not any(a.user == subject and rule_allows({**rule, "verbs": [verb]}, a) for a in allowed)
              and (rule["apiGroups"], rule["resources"], verb) not in NOT_EXERCISED]
    assert unused == []


#: Rules these scenarios cannot exercise on the local stack, and why: none (the
#: ReplicaSets and Services the locator reads only in cases the local stack does not
#: make are listed and watched by the operator's caches, dask_memory_operator/watches.py)
NOT_EXERCISED: list[tuple[list[str], list[str], str]] = []


def chart_rules(stack: LocalStack, release: Release) -> list[tuple[str, str, dict]]:
    """(role, the user bound to it, rule) for every rule of every role the release
    renders, its test hooks' included."""
    docs = manifests(stack, release) + manifests(stack, release, "hooks")
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


def test_upgrade_keeps_the_certificate_and_peers_two_replicas(stack: LocalStack, namespace: str,
                                                              release: Release):
    """Two replicas: one active, one standing by, under the release's own peering; the
    peering's rules are enough and all used."""
    rns, fullname = release.namespace, release.fullname
    secret_path = f"/api/v1/namespaces/{rns}/secrets/{fullname}-webhook-tls"
    webhook_path = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{fullname}"
    certificate = stack.get_json(secret_path)["data"]
    ca_bundle = stack.get_json(webhook_path)["webhooks"][0]["clientConfig"]["caBundle"]
    assert ca_bundle == certificate["ca.crt"]

    run_helm(stack, "upgrade", release.name, str(CHART), "-n", rns, "--wait", "--timeout", "3m",
             *VALUES, "--set", "replicaCount=2")
    wait_operators_ready(stack, rns, 2)
    assert stack.get_json(secret_path)["data"] == certificate
    assert stack.get_json(webhook_path)["webhooks"][0]["clientConfig"]["caBundle"] == ca_bundle
    args = stack.get_json(f"/apis/apps/v1/namespaces/{rns}/deployments/{fullname}")[
        "spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--peering") + 1] == fullname
    # both replicas announce themselves in the release's own peering, not kopf's default
    peers = lambda: (stack.get_json(f"/apis/kopf.dev/v1/clusterkopfpeerings/{fullname}") or {}).get("status") or {}  # noqa: E731
    stack.wait_for(lambda: len(peers()) == 2, 60, "two peers in the release's peering")
    assert len({peer["priority"] for peer in peers().values()}) == 2
    # one of them acts ...
    opt_in(stack, namespace)
    stack.apply({"apiVersion": "amm.dask.org/v1alpha1", "kind": "MemoryPolicy", "metadata": {"name": "after"},
                 "spec": {"clusterSelector": {}, "activeMemoryManager": {"policies": []}}}, namespace=namespace)
    wait_policy_reconciled(stack, namespace, "after")
    # ... and the other stands by: its watch of MemoryPolicies is paused (kopf's log)
    pods = [p["metadata"]["name"] for p in operator_pods(stack, rns)]
    assert len(pods) == 2
    stack.wait_for(lambda: [watching(stack.pod_logs(rns, p)) for p in pods].count(True) == 1, 30,
                   "exactly one replica watching")
    assert not any("Pausing all operators" in stack.pod_logs(rns, p) for p in pods)
    assert_rbac_exact(stack, release)
    assert "default" not in {o["metadata"]["name"] for o in (
        stack.get_json("/apis/kopf.dev/v1/clusterkopfpeerings") or {}).get("items", [])}


def watching(log: str) -> bool:
    """Whether kopf's last word on its MemoryPolicy watch in this log is that it runs."""
    states = [line for line in log.splitlines()
              if "the watch-stream for memorypolicies" in line and ("Resuming" in line or "Pausing" in line)]
    return bool(states) and "Resuming" in states[-1]


def uninstall_leaves_nothing_behind_but_the_crds(stack: LocalStack, release: Release,
                                                 watched: tuple[str, ...] = ()) -> None:
    rns = release.namespace
    made = manifests(stack, release) + manifests(stack, release, "hooks")
    run_helm(stack, "uninstall", release.name, "-n", rns, "--wait", "--timeout", "2m")
    stack.wait_for(lambda: not stack.pod_processes(rns), 60, "the operator pods' processes to end")
    left = json.loads(stack.kubectl("get", "all,secrets,configmaps,serviceaccounts,roles,rolebindings",
                                    "-n", rns, "-o", "json").stdout)["items"]
    assert {(o["kind"], o["metadata"]["name"]) for o in left} == {("ServiceAccount", "default")}
    for ns in watched:
        left = json.loads(stack.kubectl("get", "roles,rolebindings,kopfpeerings", "-n", ns, "-o", "json").stdout)
        assert left["items"] == []
    new = cluster_scoped_objects(stack) - release.cluster_scoped_before
    assert all(kind == "CustomResourceDefinition" for kind, _ in new), new
    gone = [(d["kind"], d["metadata"]["name"]) for d in made if d["kind"] != "CustomResourceDefinition"]
    assert gone and not {(k, n) for k, n in gone} & cluster_scoped_objects(stack)


def test_uninstall_leaves_nothing_behind_but_the_crds(stack: LocalStack, release: Release):
    uninstall_leaves_nothing_behind_but_the_crds(stack, release)


def test_a_namespaced_release_needs_only_roles_in_its_namespaces(stack: LocalStack, namespace: str):
    """``watchNamespaces`` and two replicas: Roles in the watched namespace, a
    ClusterRole only for what kopf needs at cluster scope (and its peering); the same
    scenario passes with them, and every verb of them is used."""
    release = install(stack, "team", "--set-json", f'watchNamespaces=["{namespace}"]', "--set", "replicaCount=2",
                      replicas=2)
    try:
        kinds = {(d["kind"], d["metadata"].get("namespace")) for d in manifests(stack, release)}
        assert ("Role", namespace) in kinds and ("ClusterKopfPeering", None) in kinds
        assert not any(kind == "KopfPeering" for kind, _ in kinds)
        assert not any(kind == "Role" and ns != namespace for kind, ns in kinds)
        govern_and_scale_down(stack, namespace, release, one_replica=False)
        assert_rbac_exact(stack, release)
    finally:
        # policies go while their operator runs (their finalizer gives the schedulers back)
        stack.kubectl("delete", "memorypolicies", "--all", "-n", namespace, "--timeout=60s", check=False)
        uninstall_leaves_nothing_behind_but_the_crds(stack, release, watched=(namespace,))
