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
from dask_memory_operator.webhook.mutation import PRELOAD_ENV, amm_env, scheduler_containers

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


def admit(body, policies=(policy_body(),), preload=False):
    clusters, policy_index = indexes(policies, preload)
    patch = kopf.Patch()
    mutate_pod(body=kopf.Body(copy.deepcopy(body)), patch=patch, namespace="ns",
               memo=kopf.Memo(config=OperatorConfig()), daskclusters_by_namespace=clusters,
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
