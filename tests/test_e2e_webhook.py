"""End to end: the admission webhook, served by the operator over HTTPS and called by
the emulated API server as kube-apiserver calls it (a MutatingWebhookConfiguration
with caBundle, failurePolicy Ignore, a 5 s timeout).

The API server authenticates to the webhook with a client certificate (its
AdmissionConfiguration's kubeconfig, :meth:`LocalStack.set_webhook_client`) and the
operator answers only certificates of that client CA naming ``kube-apiserver``
(``--webhook-client-ca``, ``--webhook-client-name``): every pod below is mutated
through that path; a tenant's pod posting a review itself gets no answer.

"Born configured" is asked of the scheduler process itself: its dask config's AMM
section, which only its environment sets (the operator's live apply changes the AMM
extension, not the config), so what is checked cannot come from a resync.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from distributed import Client

from dask_memory_operator.webhook.certs import write_client_ca, write_client_cert, write_webhook_certs
from dmo_devstack.probes import amm_config
from dmo_devstack.scaling_probes import OPERATOR, free_port, wait_policy_reconciled
from dmo_devstack.stack import LocalStack, daskcluster_manifest
from dask_memory_operator.webhook.configuration import mutating_webhook_configuration

AMM_OFF = {"DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START": "False"}
POLICY_AMM = {"start": True, "interval": "0.7s", "measure": "managed",
              "policies": [{"class": "amm_core.replicate.ReduceReplicas"}]}


@pytest.fixture(scope="module")
def webhook_operator(stack: LocalStack, tmp_path_factory) -> Iterator[dict]:
    port = free_port()
    certs = tmp_path_factory.mktemp("webhook-certs")
    ca = write_webhook_certs(certs, ["localhost"], ["127.0.0.1"])
    clients = tmp_path_factory.mktemp("webhook-clients")
    client_ca = write_client_ca(clients)
    stack.set_webhook_client(f"127.0.0.1:{port}", *write_client_cert(clients, "kube-apiserver"))
    argv = ["--scheduler-access", "pod-ip", "--resync-interval", "600", "--rpc-timeout", "3",
            "--metrics-port", str(free_port()), "--webhook-port", str(port),
            "--webhook-address", "127.0.0.1", "--webhook-cert-dir", str(certs),
            "--webhook-client-ca", str(client_ca), "--webhook-client-name", "kube-apiserver"]
    start = lambda: stack.start_process(OPERATOR, [  # noqa: E731
        sys.executable, "-m", "dask_memory_operator.cli", "run", "--verbose", *argv])
    start()
    stack.apply(mutating_webhook_configuration(ca, url=f"https://127.0.0.1:{port}"))
    yield {"start": start, "port": port, "ca": str(certs / "ca.crt"), "clients": clients}
    stack.kubectl("delete", "mutatingwebhookconfiguration", "dask-memory-operator", check=False)
    stack.set_webhook_client(f"127.0.0.1:{port}", None)
    stack.stop_process(OPERATOR)


def policy(ns: str) -> dict:
    return {"apiVersion": "amm.dask.org/v1alpha1", "kind": "MemoryPolicy",
            "metadata": {"name": "born", "namespace": ns},
            "spec": {"clusterSelector": {},
                     "activeMemoryManager": {"interval": "700ms", "measure": "managed",
                                             "policies": [{"class": "ReduceReplicas"}]}}}


def scheduler_pod(stack: LocalStack, ns: str, cluster: str) -> dict | None:
    pods = [p for p in stack.pods(ns, f"dask.org/cluster-name={cluster},dask.org/component=scheduler")
            if not p["metadata"].get("deletionTimestamp")]
    return pods[0] if pods else None


def env_of(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for c in pod["spec"]["containers"] for e in c.get("env") or ()}


def born_config(stack: LocalStack, ns: str, cluster: str) -> dict:
    address = stack.wait_scheduler_address(ns, cluster)
    with Client(address, timeout="60s") as client:
        return client.run_on_scheduler(amm_config)



def wait_operator_ready(stack: LocalStack, ns: str) -> None:
    """The operator's indexes know the namespace's policy."""
    wait_policy_reconciled(stack, ns, "born")


def test_a_scheduler_created_under_a_policy_runs_its_amm_from_the_start(stack: LocalStack, namespace: str,
                                                                        webhook_operator):
    ns = namespace
    stack.apply(policy(ns), namespace=ns)
    wait_operator_ready(stack, ns)
    stack.apply(daskcluster_manifest("born", workers=1, scheduler_env=AMM_OFF), namespace=ns)
    config = born_config(stack, ns, "born")
    assert {k: config[k] for k in POLICY_AMM} == POLICY_AMM
    env = env_of(scheduler_pod(stack, ns, "born"))
    assert env["DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START"] == "True"

    # a scheduler pod deleted and recreated is configured from its start, too
    old = scheduler_pod(stack, ns, "born")["metadata"]["name"]
    stack.kubectl("delete", "pod", old, "-n", ns, "--wait=false")
    stack.wait_for(lambda: (p := scheduler_pod(stack, ns, "born")) and p["metadata"]["name"] != old, 60,
                   "a new scheduler pod")
    new = scheduler_pod(stack, ns, "born")
    assert env_of(new)["DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__INTERVAL"] == "'0.7s'"


def forged_review(scheduler: dict, namespace: str) -> dict:
    """What a tenant's pod would POST: the AdmissionReview of a scheduler pod's creation."""
    body = {**scheduler, "metadata": {k: v for k, v in scheduler["metadata"].items()
                                      if k in ("generateName", "namespace", "labels")}}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "forged", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": namespace,
        "operation": "CREATE", "userInfo": {"username": "system:serviceaccount:tenant:default"},
        "object": body, "oldObject": None, "dryRun": False}}


def post_review(url: str, review: dict, ca: str, cert: tuple | None = None) -> httpx.Response:
    import ssl

    context = ssl.create_default_context(cafile=ca)
    if cert is not None:
        context.load_cert_chain(*cert)
    return httpx.post(url, json=review, verify=context, timeout=10)


def test_a_forged_review_for_another_namespace_gets_nothing_of_it(stack: LocalStack, namespace: str,
                                                                    webhook_operator):
    """A victim's scheduler pod is born configured through the API server (which presents
    its client certificate); a tenant POSTing the same review straight to the webhook
    port (no certificate, its own CA's, or the client CA's for another name) gets no
    answer, so neither the policy's settings nor whether the cluster exists."""
    ns = namespace
    stack.apply(policy(ns), namespace=ns)
    wait_operator_ready(stack, ns)
    stack.apply(daskcluster_manifest("secret", workers=0, scheduler_env=AMM_OFF), namespace=ns)
    born = stack.wait_for(lambda: scheduler_pod(stack, ns, "secret"), 60, "the scheduler pod")
    assert env_of(born)["DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START"] == "True"

    url = f"https://127.0.0.1:{webhook_operator['port']}/govern-pods"
    unborn = {**born, "spec": {**born["spec"], "containers": [
        {**c, "env": [e for e in c.get("env") or () if "ACTIVE_MEMORY_MANAGER" not in e["name"]]}
        for c in born["spec"]["containers"]]}}
    review = forged_review(unborn, ns)
    other = webhook_operator["clients"].parent / "tenant-ca"
    write_client_ca(other)
    for cert in (None, write_client_cert(other, "kube-apiserver")):
        with pytest.raises(httpx.TransportError):  # the TLS handshake fails: nothing is answered
            post_review(url, review, webhook_operator["ca"], cert)
    kubelet = write_client_cert(webhook_operator["clients"], "kubelet")  # same CA, another client
    answer = post_review(url, review, webhook_operator["ca"], kubelet)
    assert answer.status_code == 403 and "ACTIVE_MEMORY_MANAGER" not in answer.text
    # the API server's own certificate, for a review it could never send: refused alike
    apiserver = (webhook_operator["clients"] / "kube-apiserver.crt", webhook_operator["clients"] / "kube-apiserver.key")
    inconsistent = forged_review(unborn, "default")
    answer = post_review(url, inconsistent, webhook_operator["ca"], apiserver)
    assert answer.status_code == 400 and "ACTIVE_MEMORY_MANAGER" not in answer.text
    # and the consistent one is answered to it (what the API server itself gets)
    patch = post_review(url, review, webhook_operator["ca"], apiserver).json()["response"]["patch"]
    assert "ACTIVE_MEMORY_MANAGER" in base64.b64decode(patch).decode()


def test_pods_of_ungoverned_clusters_and_foreign_pods_are_left_alone(stack: LocalStack, namespace: str,
                                                                      webhook_operator):
    ns = namespace
    policy_ = policy(ns)
    policy_["spec"] = {**policy_["spec"], "clusterSelector": {"matchLabels": {"team": "x"}}}
    stack.apply(policy_, namespace=ns)
    wait_operator_ready(stack, ns)
    stack.apply(daskcluster_manifest("free", workers=1, scheduler_env=AMM_OFF), namespace=ns)
    pod = stack.wait_for(lambda: scheduler_pod(stack, ns, "free"), 60, "the scheduler pod")
    assert "DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__INTERVAL" not in env_of(pod)
    assert born_config(stack, ns, "free")["start"] is False
    # a pod that only looks like a dask-kubernetes pod: no DaskCluster of that name
    stack.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "lookalike", "labels": {
        "dask.org/cluster-name": "nothing", "dask.org/component": "scheduler"}},
        "spec": {"containers": [{"name": "scheduler", "image": "x", "args": ["sleep", "60"]}]}}, namespace=ns)
    pod = stack.get_json(f"/api/v1/namespaces/{ns}/pods/lookalike")
    assert "env" not in pod["spec"]["containers"][0]


def test_with_the_operator_down_pods_are_created_at_once_unpatched(stack: LocalStack, namespace: str,
                                                                   webhook_operator):
    ns = namespace
    stack.apply(policy(ns), namespace=ns)
    wait_operator_ready(stack, ns)
    stack.stop_process(OPERATOR)
    try:
        started = time.monotonic()
        stack.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ungoverned", "labels": {
            "dask.org/cluster-name": "x", "dask.org/component": "scheduler"}},
            "spec": {"containers": [{"name": "scheduler", "image": "x", "args": ["sleep", "60"]}]}}, namespace=ns)
        assert time.monotonic() - started < 4  # a refused connection, not the 5 s timeout
        assert stack.get_json(f"/api/v1/namespaces/{ns}/pods/ungoverned")
    finally:
        webhook_operator["start"]()


@pytest.mark.parametrize("how", ["delete-pod", "evict", "delete-deployment", "scale"])
def test_a_worker_pod_deleted_from_outside_retires_first_and_loses_nothing(stack: LocalStack, namespace: str,
                                                                          webhook_operator, how: str):
    """A busy worker's pod goes from outside the operator (kubectl delete pod, an
    eviction, its Deployment deleted, kubectl scale of the worker group that
    dask-kubernetes carries out its own way): the injected preStop hook retires it
    through the scheduler's plugin before its SIGTERM. Scattered data (which nothing
    could recompute) is intact, no key is lost and no task computed twice (from the
    scheduler's TaskLedger); running tasks whose worker left are counted and printed."""
    from dmo_devstack.probes import task_ledger, worker_statuses
    from dmo_devstack.scaling_probes import client_of, make_cluster

    ns, cluster = namespace, "hooked"
    stack.apply({**policy(ns), "spec": {**policy(ns)["spec"], "retirement": {"timeLimit": "60s"}}}, namespace=ns)
    wait_operator_ready(stack, ns)
    make_cluster(stack, ns, cluster, workers=3)
    with client_of(stack, ns, cluster, 3) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        victim, info = sorted(workers.items())[0]
        [pod] = [p for p in stack.pods(ns, "dask.org/component=worker")
                 if p["metadata"]["name"].startswith(info["name"]) and not p["metadata"].get("deletionTimestamp")]
        hook = pod["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert hook[:2] == ["python", "-c"] and pod["spec"]["terminationGracePeriodSeconds"] == 75
        # on every worker for `scale` (dask-kubernetes picks the worker), else on the victim
        where = None if how == "scale" else [victim]
        values = [bytes(1_000_000) + bytes([i]) for i in range(20)]
        data = client.scatter(values, workers=where)
        futures = client.map(lambda i: time.sleep(0.5) or i, range(40), pure=False)
        stack.wait_for(lambda: client.run_on_scheduler(task_ledger)["computed"] > 3, 60, "the job to run")
        name = pod["metadata"]["name"]
        if how == "delete-pod":
            stack.kubectl("delete", "pod", name, "-n", ns, "--wait=false")
        elif how == "evict":
            stack.kubectl("create", "--raw", f"/api/v1/namespaces/{ns}/pods/{name}/eviction", "-f", "-",
                          input=json.dumps({"apiVersion": "policy/v1", "kind": "Eviction",
                                            "metadata": {"name": name, "namespace": ns}}))
        elif how == "delete-deployment":
            stack.kubectl("delete", "deployment", info["name"], "-n", ns, "--wait=false")
        else:
            stack.kubectl("scale", "daskworkergroup", f"{cluster}-default", "--replicas", "2", "-n", ns)
        stack.wait_for(lambda: len(client.scheduler_info(n_workers=-1)["workers"]) < 3
                       or victim not in client.scheduler_info(n_workers=-1)["workers"], 90, "a worker to leave")
        assert client.gather(data) == values
        assert client.gather(futures) == list(range(40))
        ledger = client.run_on_scheduler(task_ledger)
        print(f"{how}: running tasks whose worker left: {len(ledger['wasted'])}")
        assert ledger["lost"] == {} and ledger["rerun"] == {}, ledger
        if how != "scale":  # dask-kubernetes' own retirement does not wait for running tasks
            assert ledger["wasted"] == {}, ledger
        if how == "delete-pod":
            # the hook's retirement is told on the DaskCluster at the policy's next pass
            # (a change of its spec here: its resync is 10 minutes in this module), and
            # counted as rescued by a hook
            stack.kubectl("patch", "memorypolicy", "born", "-n", ns, "--type", "merge",
                          "-p", json.dumps({"spec": {"retirement": {"timeLimit": "61s"}}}))
            told = stack.wait_for(lambda: [e for e in stack.get_json(f"/api/v1/namespaces/{ns}/events")["items"]
                                           if e["reason"] == "WorkerRetiredByHook"
                                           and e["involvedObject"]["kind"] == "DaskCluster"], 60,
                                  "the hook's retirement told")
            assert len(told) == 1 and told[0]["message"].startswith(f"Worker {info['name']} retired by its "
                                                                    "preStop hook: "), told
            moved = int(told[0]["message"].split(": ", 1)[1].split()[0])
            assert moved >= 20 and told[0]["message"].endswith("nothing lost")
            [entry] = stack.get_json(f"/apis/amm.dask.org/v1alpha1/namespaces/{ns}/memorypolicies/born")[
                "status"]["clusters"]
            assert entry["savings"]["rescued"]["hook"]["keys"] == moved
        final = 3 if how in ("delete-pod", "evict") else 2  # a new pod of the same Deployment
        stack.wait_for(lambda: len(client.run_on_scheduler(worker_statuses)) == final
                       and set(client.run_on_scheduler(worker_statuses).values()) == {"running"},
                       90, f"{final} running workers")


def test_worker_pods_created_while_the_operator_was_down_are_reported_once_it_is_back(
        stack: LocalStack, namespace: str, webhook_operator):
    ns = namespace
    stack.apply(policy(ns), namespace=ns)
    wait_operator_ready(stack, ns)
    stack.stop_process(OPERATOR)
    try:
        stack.apply(daskcluster_manifest("late", workers=2, scheduler_env=AMM_OFF), namespace=ns)
        stack.wait_for(lambda: len(stack.pods(ns, "dask.org/cluster-name=late,dask.org/component=worker")) == 2,
                       60, "two worker pods")
    finally:
        webhook_operator["start"]()

    def reported():
        body = stack.get_json(f"/apis/amm.dask.org/v1alpha1/namespaces/{ns}/memorypolicies/born") or {}
        entry = next((e for e in (body.get("status") or {}).get("scaling") or () if e["cluster"] == "late"), {})
        return entry.get("workersWithoutRetirementHook") == 2
    stack.wait_for(reported, 90, "the status to count the workers without the hook")
    items = (stack.get_json(f"/api/v1/namespaces/{ns}/events") or {}).get("items", [])
    [event] = [e for e in items if e.get("reason") == "WorkersWithoutRetirementHook"]
    assert event["type"] == "Warning" and "2 worker pod(s)" in event["message"]
