"""The admission webhook's mutation, from a pod and the indexes to the patch: the AMM
settings a scheduler pod is born with, and every pod that is not ours left alone."""

from __future__ import annotations

import ast
import copy
import os
import subprocess
import sys

import kopf
import pytest

from dask_memory_operator.api.memorypolicy import parse_spec
from dask_memory_operator.controllers.config import OperatorConfig
from dask_memory_operator.webhook.handlers import mutate_pod
from dask_memory_operator.webhook.mutation import ALLOWED_ENV, PRELOAD_ENV, amm_env, scheduler_containers

SPEC = {"clusterNames": ["demo"],
        "activeMemoryManager": {"interval": "500ms", "measure": "managed",
                                "policies": [{"class": "ReduceReplicas"},
                                             {"class": "RetirePaused", "args": {"after": "30s"}}]}}


def pod(component="scheduler", cluster="demo", env=None):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": f"{cluster}-{component}-", "namespace": "ns",
                         "labels": {"dask.org/cluster-name": cluster, "dask.org/component": component}},
            "spec": {"containers": [{"name": "sidecar", "image": "x"},
                                    {"name": "scheduler", "image": "dask", "env": env or []}]}}


def policy_body(spec=SPEC, name="p", created="2026-01-01T00:00:00Z"):
    return {"apiVersion": "amm.dask.org/v1alpha1", "kind": "MemoryPolicy",
            "metadata": {"name": name, "namespace": "ns", "uid": name, "creationTimestamp": created},
            "spec": spec}


def indexes(policies=(policy_body(),), preload=False):
    from dask_memory_operator.api.selection import PolicyInfo

    return ({"ns": [{"name": "demo", "labels": {}, "uid": "c1", "preload": preload}]},
            {"ns": [PolicyInfo.from_body(p) for p in policies]} if policies else {})


def admit(body, policies=(policy_body(),), preload=False, config=None):
    clusters, policy_index = indexes(policies, preload)
    patch = kopf.Patch()
    mutate_pod(body=kopf.Body(copy.deepcopy(body)), patch=patch, namespace="ns",
               memo=kopf.Memo(config=config or OperatorConfig()), daskclusters_by_namespace=clusters,
               memorypolicies_by_namespace=policy_index)
    return dict(patch)


def test_the_env_is_what_dask_config_reads_back_as_the_policy():
    """Set in a fresh Python's environment, the variables give exactly the policy's
    AMM section as dask config (what the scheduler runs from its first cycle)."""
    amm = parse_spec(SPEC)
    code = ("import dask, distributed, json; "
            "print(json.dumps(dask.config.get('distributed.scheduler.active-memory-manager')))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **amm_env(amm)},
                         capture_output=True, text=True, check=True).stdout
    import json
    got = json.loads(out)
    assert got["start"] is True and got["measure"] == "managed"
    assert got["interval"] in ("0.5s", 0.5)
    assert got["policies"] == amm.to_dask_config()["policies"]
    for value in amm_env(amm).values():
        ast.literal_eval(value)


def test_a_governed_scheduler_pod_gets_the_settings_in_its_scheduler_container():
    patch = admit(pod(env=[{"name": "DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START",
                            "value": "False"}, {"name": "KEEP", "value": "1"}]))
    sidecar, scheduler = patch["spec"]["containers"]
    assert "env" not in sidecar
    env = {e["name"]: e["value"] for e in scheduler["env"]}
    assert env["KEEP"] == "1"
    assert env["DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START"] == "True"  # the policy wins
    assert [e["name"] for e in scheduler["env"]].count("DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START") == 1
    assert PRELOAD_ENV not in env


def test_the_plugin_is_preloaded_only_where_the_cluster_says_its_image_has_it():
    env = {e["name"]: e["value"] for e in admit(pod(), preload=True)["spec"]["containers"][1]["env"]}
    assert env[PRELOAD_ENV] == "amm_core.plugin"
    theirs = pod(env=[{"name": PRELOAD_ENV, "value": "mycompany.preload"}])
    env = {e["name"]: e["value"] for e in admit(theirs, preload=True)["spec"]["containers"][1]["env"]}
    assert env[PRELOAD_ENV] == "mycompany.preload"  # their preload list is theirs


def test_the_scheduler_allows_the_classes_the_operator_allows():
    """The operator's --allow-policy-class patterns become the scheduler's dask config
    amm-core.allowed-policy-classes (read back in a fresh Python, as the scheduler
    reads its environment), so a policy the operator accepts later is not refused
    there; without patterns nothing is added, and a pod's own list is its owner's."""
    allowed = ("mycorp.amm.**", "other.policies.Keep")
    config = OperatorConfig(allowed_policy_classes=allowed)
    env = {e["name"]: e["value"] for e in admit(pod(), config=config)["spec"]["containers"][1]["env"]}
    code = ("import json, amm_core.config as c; "
            "print(json.dumps([list(c.allowed_patterns()), "
            "c.class_allowed('mycorp.amm.sub.Keep', c.allowed_patterns()), "
            "c.class_allowed('mycorp.other.Keep', c.allowed_patterns())]))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                         capture_output=True, text=True, check=True).stdout
    patterns, sub_allowed, other_allowed = json.loads(out)
    assert set(allowed) <= set(patterns) and sub_allowed and not other_allowed
    assert ALLOWED_ENV not in {e["name"] for e in admit(pod())["spec"]["containers"][1]["env"]}
    theirs = pod(env=[{"name": ALLOWED_ENV, "value": "['mine.*']"}])
    env = {e["name"]: e["value"] for e in admit(theirs, config=config)["spec"]["containers"][1]["env"]}
    assert env[ALLOWED_ENV] == "['mine.*']"


@pytest.mark.parametrize("body, policies", [
    (pod(cluster="other"), (policy_body(),)),                       # not selected
    (pod(), ()),                                                   # no policy in the namespace
    (pod(), (policy_body({**SPEC, "adaptive": {"minimum": 3, "maximum": 1}}),)),  # invalid
    ({"metadata": {"labels": {"dask.org/cluster-name": "demo", "dask.org/component": "scheduler"}},
      "spec": {"containers": "nonsense"}}, (policy_body(),)),       # malformed: admitted as it is
    ({"metadata": {"labels": {"dask.org/cluster-name": ["x"], "dask.org/component": "scheduler"}}},
     (policy_body(),)),
])
def test_pods_that_are_not_ours_or_not_understood_are_admitted_unchanged(body, policies):
    assert admit(body, policies) == {}


def test_scheduler_containers_returns_none_when_nothing_changes():
    amm = parse_spec(SPEC)
    once = scheduler_containers(pod(), amm, preload=False)
    again = {**pod(), "spec": {"containers": once}}
    assert scheduler_containers(again, amm, preload=False) is None


def test_a_governed_worker_pod_gets_the_retirement_hook_and_a_grace_period_that_covers_it():
    spec = {**SPEC, "retirement": {"timeLimit": "2m", "drain": False}}
    body = pod(component="worker")
    body["spec"]["containers"][1]["name"] = "worker"
    patch = admit(body, (policy_body(spec),))
    assert patch["spec"]["terminationGracePeriodSeconds"] == 120 + 15
    worker = patch["spec"]["containers"][1]
    command = worker["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    assert command[3:] == ["--limit", "120", "--grace", "135", "--no-drain"]
    compile(command[2], "prestop", "exec")  # the module's own source, runnable as -c
    assert "lifecycle" not in patch["spec"]["containers"][0]


def test_the_inlined_hook_runs_and_exits_at_once_without_a_scheduler():
    """python -c with the inlined source, as the pod runs it: no scheduler listening,
    it exits 0 within its connect timeout."""
    from dask_memory_operator.webhook.mutation import prestop_source

    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": "tcp://127.0.0.1:9", "DASK_WORKER_NAME": "w"}
    done = subprocess.run([sys.executable, "-c", prestop_source(), "--limit", "5", "--grace", "20"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "not retired" in done.stderr.splitlines()[-1]


def test_a_worker_pod_with_a_prestop_hook_of_its_own_keeps_it():
    body = pod(component="worker")
    body["spec"]["containers"][1].update(name="worker", lifecycle={"preStop": {"exec": {"command": ["true"]}}})
    assert admit(body) == {}


def test_without_a_cert_dir_the_server_gets_a_certificate_for_its_host(tmp_path):
    """Local use: a CA (the caBundle) and a certificate it signed for the host."""
    import ssl

    from dask_memory_operator.controllers.config import WebhookConfig
    from dask_memory_operator.controllers.registry import webhook_server

    server = webhook_server(WebhookConfig(port=0, address="127.0.0.1", host="127.0.0.1"))
    context = ssl.create_default_context(cafile=server.cafile)
    context.load_cert_chain(server.certfile, server.pkeyfile)  # the pair matches
    import cryptography.x509 as x509
    cert = x509.load_pem_x509_certificate(open(server.certfile, "rb").read())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(open(server.cafile, "rb").read()))
    assert context.verify_mode == ssl.CERT_REQUIRED


# ---------------------------------------------------------------- who is answered, and with what
#
# kopf's own HTTPS server as the operator builds it (registry.webhook_server), served
# in-process; the handler behind it is a stand-in that records what reaches it and
# answers as a leaky handler would (another namespace's settings, a warning, a status).

import base64  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402

import httpx  # noqa: E402

from dask_memory_operator.webhook.certs import write_client_ca, write_client_cert, write_webhook_certs  # noqa: E402

LEAK = {"op": "add", "path": "/spec/containers/0/env",
        "value": [{"name": "SECRET", "value": "s3://victim-private-bucket/x"}]}


def forged_review(namespace="victim", object_namespace="victim", kind="Pod", operation="CREATE", **extra):
    obj = pod()
    obj["metadata"]["namespace"] = object_namespace
    if object_namespace is None:
        del obj["metadata"]["namespace"]
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "forged-1", "kind": {"group": "", "version": "v1", "kind": kind},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": namespace, "operation": operation, "userInfo": {"username": "system:unsecured"},
        "object": obj, "oldObject": None, "dryRun": False, **extra}}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def serving(tmp_path, **hook):
    """The operator's webhook server on 127.0.0.1 with a recording handler: yields
    (url, the CA of its certificate, the reviews that reached the handler)."""
    from dask_memory_operator.controllers.config import WebhookConfig
    from dask_memory_operator.controllers.registry import webhook_server

    write_webhook_certs(tmp_path / "serving", ["localhost"], ["127.0.0.1"])
    server = webhook_server(WebhookConfig(port=_free_port(), address="127.0.0.1", host="127.0.0.1",
                                          cert_dir=str(tmp_path / "serving"), **hook))
    seen = []

    async def handler(review, **_):
        seen.append(review)
        return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": {
            "uid": review["request"]["uid"], "allowed": True, "warnings": ["cluster demo exists in victim"],
            "status": {"message": "victim's policy p", "code": 200}, "patchType": "JSONPatch",
            "patch": base64.b64encode(json.dumps([LEAK, {"op": "add", "path": "/metadata/labels/x",
                                                         "value": "y"}]).encode()).decode()}}

    served = server(handler)
    config = await served.__anext__()  # listening from here on
    try:
        yield config["url"].rstrip("/"), str(tmp_path / "serving" / "ca.crt"), seen
    finally:
        await served.aclose()


def client_context(ca, cert=None):
    context = ssl.create_default_context(cafile=ca)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


async def test_a_review_whose_namespace_differs_from_its_objects_never_reaches_the_handler(tmp_path):
    """A tenant's review for its own namespace wrapping another namespace's pod (or the
    converse) is refused before anything is looked up; so are other kinds and operations."""
    async with serving(tmp_path) as (url, ca, seen), httpx.AsyncClient(verify=client_context(ca)) as http:
        for review in (forged_review("tenant", "victim"), forged_review("victim", "tenant"),
                       forged_review(kind="Secret"), forged_review(operation="UPDATE"),
                       forged_review(subResource="status"), forged_review(namespace="")):
            answer = await http.post(f"{url}/govern-pods", json=review)
            assert answer.status_code == 400 and "victim" not in answer.text, answer.text
        assert seen == []
        # the API server's form: the object's namespace unset, the request's says it
        answer = await http.post(f"{url}/govern-pods", json=forged_review("tenant", None))
        assert answer.status_code == 200
        assert [r["request"]["object"]["metadata"]["namespace"] for r in seen] == ["tenant"]


async def test_the_answer_carries_the_pods_patch_and_nothing_else(tmp_path):
    """No warning, no status message, no patch outside the pod's containers and grace
    period: whatever a handler adds, the server does not pass on."""
    async with serving(tmp_path) as (url, ca, seen), httpx.AsyncClient(verify=client_context(ca)) as http:
        answer = (await http.post(f"{url}/govern-pods", json=forged_review())).json()
    response = answer["response"]
    assert set(response) == {"uid", "allowed", "patch", "patchType"} and response["allowed"] is True
    assert json.loads(base64.b64decode(response["patch"])) == [LEAK]  # /metadata/labels/x dropped


async def test_with_a_client_ca_only_certificates_it_signed_get_an_answer(tmp_path):
    """``--webhook-client-ca``: no certificate, or one of another CA, fails the TLS
    handshake (nothing is answered); with ``--webhook-client-name`` a certificate of the
    right CA for another name (a kubelet's, say) gets 403."""
    clients = tmp_path / "clients"
    write_client_ca(clients)
    apiserver, kubelet = write_client_cert(clients, "kube-apiserver"), write_client_cert(clients, "kubelet")
    write_client_ca(tmp_path / "other")
    foreign = write_client_cert(tmp_path / "other", "kube-apiserver")
    async with serving(tmp_path, client_ca=str(clients / "client-ca.crt"),
                       client_names=("kube-apiserver",)) as (url, ca, seen):
        for cert in (None, foreign):
            async with httpx.AsyncClient(verify=client_context(ca, cert)) as http:
                with pytest.raises(httpx.TransportError):
                    await http.post(f"{url}/govern-pods", json=forged_review())
        async with httpx.AsyncClient(verify=client_context(ca, kubelet)) as http:
            answer = await http.post(f"{url}/govern-pods", json=forged_review())
            assert answer.status_code == 403 and "SECRET" not in answer.text
        assert seen == []
        async with httpx.AsyncClient(verify=client_context(ca, apiserver)) as http:
            answer = await http.post(f"{url}/govern-pods", json=forged_review())
            assert answer.status_code == 200 and answer.json()["response"]["patch"]
        assert len(seen) == 1


def test_client_names_without_a_client_ca_are_refused_at_start():
    from dask_memory_operator.cli import build_parser, run

    args = build_parser().parse_args(["run", "--webhook-port", "1", "--webhook-client-name", "kube-apiserver"])
    with pytest.raises(SystemExit, match="--webhook-client-ca"):
        run(args)


async def test_a_rotated_client_ca_is_used_without_a_restart(tmp_path):
    """The client CA file (a mounted ConfigMap) replaced: the server rebuilds its TLS
    context and certificates of the new CA are answered, the old CA's no longer."""
    import asyncio
    import shutil
    import time

    from dask_memory_operator.webhook.server import AdmissionServer

    write_webhook_certs(tmp_path / "serving", ["localhost"], ["127.0.0.1"])
    old_ca, new_ca = write_client_ca(tmp_path / "old"), write_client_ca(tmp_path / "new")
    old_cert, new_cert = write_client_cert(tmp_path / "old", "a"), write_client_cert(tmp_path / "new", "a")
    mounted = tmp_path / "client-ca.crt"
    shutil.copy(old_ca, mounted)
    server = AdmissionServer(addr="127.0.0.1", port=_free_port(), certfile=str(tmp_path / "serving" / "tls.crt"),
                             pkeyfile=str(tmp_path / "serving" / "tls.key"), client_ca=str(mounted),
                             file_check_interval=0.1)

    async def handler(review, **_):
        return {"response": {"uid": review["request"]["uid"], "allowed": True}}

    async def answered(cert):
        try:
            async with httpx.AsyncClient(verify=client_context(str(tmp_path / "serving" / "ca.crt"), cert)) as http:
                return (await http.post(f"{url}/govern-pods", json=forged_review())).status_code == 200
        except httpx.TransportError:
            return False

    configs = asyncio.Queue()

    async def drive():  # as kopf does: the server restarts when it is asked for the next config
        async for config in server(handler):
            configs.put_nowait(config)

    driver = asyncio.create_task(drive())
    url = (await configs.get())["url"].rstrip("/")
    try:
        assert await answered(old_cert) and not await answered(new_cert)
        shutil.copy(new_ca, mounted)
        deadline = time.monotonic() + 10
        while not await answered(new_cert):  # the server restarts with the new CA
            assert time.monotonic() < deadline, "the new client CA was not picked up"
            await asyncio.sleep(0.1)
        assert not await answered(old_cert)
    finally:
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
