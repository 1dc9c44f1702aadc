"""The Helm chart (``charts/dask-memory-operator``), the image recipe (``Dockerfile``)
and ``dask-memory-operator check`` (the chart's ``helm test``), checked statically:
everything here runs the real ``helm`` v4 binary, the real CLI and the real emulator,
but no cluster and no docker daemon (``helm install`` into the emulated API with RBAC
enforced is the end-to-end part, elsewhere).

- ``helm lint --strict`` and ``helm template`` of the default values and of each
  variant; every rendered built-in object validated against the Kubernetes 1.36
  schemas (``kubernetes_validate``), the kopf peerings against the CRDs the chart
  ships; ServiceMonitor, Certificate and Issuer are not validated (their CRDs are
  not here) and are listed as such;
- bad values refused by ``values.schema.json`` with a message naming the key;
- RBAC: no wildcard, Roles exactly in ``watchNamespaces``, rules per feature;
- the Deployment's arguments parse with the operator's own argument parser;
- the chart's CRD is the one in ``crds/`` (also inside ``helm package``'s archive);
- the rendered MutatingWebhookConfiguration is the one the Python code renders;
- the Dockerfile's install steps in a fresh venv, then its entrypoint started
  against an emulated API server until it answers its liveness URL.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp.web
import dask_kubernetes
import httpx
import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID

from dask_memory_operator.cli import build_parser
from dmo_devstack.apiserver import ApiServer, write_kubeconfig
from dmo_devstack.helm import helm_binary
from dask_memory_operator.webhook import configuration

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "dask-memory-operator"
RELEASE, NAMESPACE = "dmo", "dmo-system"
FULLNAME = "dmo-dask-memory-operator"
KUBERNETES_VERSION = "1.36.0"
DASK_CRDS = Path(dask_kubernetes.__file__).parent / "operator/deployment/helm/dask-kubernetes-operator/crds"

#: Values per variant, as helm arguments
VARIANTS: dict[str, list[str]] = {
    "defaults": [],
    "namespaced": ["--set-json", 'watchNamespaces=["a","b"]'],
    "replicas2": ["--set", "replicaCount=2"],
    "namespaced-replicas2": ["--set-json", 'watchNamespaces=["a","b"]', "--set", "replicaCount=2"],
    "cert-manager": ["--set", "webhook.certManager.enabled=true"],
    "cert-manager-issuer": ["--set", "webhook.certManager.enabled=true",
                            "--set-json", 'webhook.certManager.issuerRef={"name":"corp-ca","kind":"ClusterIssuer"}'],
    "metrics-off": ["--set", "metrics.enabled=false"],
    "servicemonitor": ["--set", "metrics.serviceMonitor.enabled=true",
                       "--set-json", 'metrics.serviceMonitor.labels={"release":"prometheus"}'],
    "webhook-off": ["--set", "webhook.enabled=false"],
    "dashboards": ["--set", "dashboards.enabled=true", "--set", "dashboards.namespace=monitoring",
                   "--set-json", 'dashboards.annotations={"grafana_folder":"Dask"}'],
    "every-namespace": ["--set", "namespaceSelector="],
    "kube-1.29": ["--kube-version", "1.29.0"],
    "client-auth": ["--set", "webhook.clientAuth.enabled=true", "--set", "webhook.clientAuth.caConfigMap=apiserver-ca"],
    "networkpolicy-peers": [
        "--set-json", 'networkPolicy.webhook.from=[{"ipBlock":{"cidr":"10.0.0.0/24"}}]',
        # Helm merges maps with the defaults: null drops the default label
        "--set-json", 'networkPolicy.metrics.namespaceSelector={"kubernetes.io/metadata.name":null,"team":"observability"}',
        "--set-json", 'networkPolicy.extraIngress=[{"ports":[{"port":"health"}],"from":[{"ipBlock":{"cidr":"192.168.0.0/16"}}]}]',
    ],
    "everything": [
        "--set", "priorityClassName=system-cluster-critical", "--set", "image.tag=dev",
        "--set", "serviceAccount.annotations.team=data",
        "--set-json", 'nodeSelector={"kubernetes.io/os":"linux"}',
        "--set-json", 'tolerations=[{"key":"dedicated","operator":"Equal","value":"ops","effect":"NoSchedule"}]',
        "--set-json", 'affinity={"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":'
                      '{"nodeSelectorTerms":[{"matchExpressions":[{"key":"pool","operator":"In","values":["ops"]}]}]}}}',
        "--set-json", 'extraEnv=[{"name":"DASK_LOGGING__DISTRIBUTED","value":"info"}]',
        "--set-json", 'extraArgs=["--rpc-timeout","10"]',
        "--set-json", 'allowPolicyClasses=["mycorp.amm.*"]',
        "--set-json", 'imagePullSecrets=[{"name":"registry"}]',
        "--set", "podAnnotations.owner=ops", "--set", "podLabels.tier=control",
    ],
}
#: Custom kinds whose CRDs are not here: rendered but not validated
NOT_VALIDATED = {"ServiceMonitor", "Certificate", "Issuer"}
GOVERNED = "dask-memory-operator.io/governed"
#: Custom kinds validated against a CRD the chart ships
CHART_CRDS = {"KopfPeering", "ClusterKopfPeering"}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stderr}")
    return out


@functools.cache
def _render(variant: str) -> tuple[dict[str, Any], ...]:
    out = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, "--include-crds", *VARIANTS[variant])
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(variant: str) -> list[dict[str, Any]]:
    return list(_render(variant))


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    [found] = [d for d in kinds(docs, kind) if name is None or d["metadata"]["name"] == name]
    return found


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def rules(docs: list[dict[str, Any]], *, hooks: bool = False) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(kind, namespace, rule) of every Role/ClusterRole rule (the operator's only,
    unless ``hooks``)."""
    found = []
    for d in docs:
        if d["kind"] in ("Role", "ClusterRole"):
            is_hook = "helm.sh/hook" in (d["metadata"].get("annotations") or {})
            if hooks or not is_hook:
                found += [(d["kind"], d["metadata"].get("namespace"), r) for r in d["rules"]]
    return found


def grants(docs: list[dict[str, Any]], resource: str) -> set[str]:
    return {v for _, _, r in rules(docs) if resource in r["resources"] for v in r["verbs"]}


# --- lint, render, validate -------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_strict(variant):
    out = helm("lint", "--strict", str(CHART), "-n", NAMESPACE, *VARIANTS[variant])
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


@functools.cache
def _crd_schemas() -> dict[str, dict[str, Any]]:
    schemas = {}
    for doc in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text()):
        if doc:
            schemas[doc["spec"]["names"]["kind"]] = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schemas


@pytest.fixture(scope="module")
def cached_schemas():
    """kubernetes_validate reads its 1.6 MB of definitions on every call: once here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kubernetes_validate.utils, "schema_contents",
                   functools.cache(kubernetes_validate.utils.schema_contents))
        yield


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_object_validates(variant, cached_schemas):
    docs = render(variant)
    unvalidated = set()
    for doc in docs:
        kind = doc["kind"]
        if kind == "CustomResourceDefinition" and variant != "defaults":
            continue  # crds/ is the same in every variant: validated once
        if kind in CHART_CRDS:
            assert doc["apiVersion"] == "kopf.dev/v1"
            jsonschema.validate({k: v for k, v in doc.items() if k != "metadata"}, _crd_schemas()[kind])
        elif kind in NOT_VALIDATED:
            unvalidated.add(kind)
        else:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"{kind} {doc['metadata'].get('name')}: {e.message}") from None
        assert len(doc["metadata"]["name"]) <= 63
    assert unvalidated <= NOT_VALIDATED


def test_default_objects():
    docs = render("defaults")
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs if "helm.sh/hook" not in
                  (d["metadata"].get("annotations") or {})) == sorted([
        ("CustomResourceDefinition", "memorypolicies.amm.dask.org"),
        ("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev"),
        ("CustomResourceDefinition", "kopfpeerings.kopf.dev"),
        ("ServiceAccount", FULLNAME),
        ("ClusterRole", FULLNAME), ("ClusterRoleBinding", FULLNAME),
        ("Deployment", FULLNAME),
        ("Service", FULLNAME), ("Service", f"{FULLNAME}-webhook"),
        ("Secret", f"{FULLNAME}-webhook-tls"),
        ("MutatingWebhookConfiguration", FULLNAME),
        ("NetworkPolicy", FULLNAME),
        ("ValidatingAdmissionPolicy", f"{FULLNAME}-scope"),
        ("ValidatingAdmissionPolicyBinding", f"{FULLNAME}-scope"),
    ])
    assert one(docs, "Deployment")["spec"]["replicas"] == 1


# --- values.schema.json ------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--set", "replicaCount=two"], "at '/replicaCount': got string, want integer"),
    (["--set", "unknownKey=1"], "additional properties 'unknownKey' not allowed"),
    (["--set", "webhook.failurePolicy=Fail"], "at '/webhook': additional properties 'failurePolicy' not allowed"),
    (["--set", "image.pullPolicy=Sometimes"], "at '/image/pullPolicy': value must be one of"),
    (["--set", "securityContext.runAsUser=0"], "at '/securityContext/runAsUser': minimum: got 0, want 1"),
    (["--set-json", 'watchNamespaces=["Not_A_Namespace"]'], "at '/watchNamespaces/0'"),
    (["--set-json", 'tolerations=[{"key":"a","operator":"Maybe"}]'], "at '/tolerations/0/operator'"),
    (["--set", "webhook.certManager.issuerRef.kind=Vault"], "at '/webhook/certManager/issuerRef/kind'"),
    (["--set", "namespaceSelector=governed"], "at '/namespaceSelector'"),
    (["--set", "namespaceSelector=a=b=c"], "at '/namespaceSelector'"),
    (["--set", "webhook.certValidityDays=3651"], "at '/webhook/certValidityDays'"),
])
def test_bad_values_are_refused_naming_the_key(args, message, tmp_path):
    for command in (["template", RELEASE], ["lint", "--strict"]):
        out = helm(*command, str(CHART), *args, check=False)
        assert out.returncode != 0
        assert "values don't meet the specifications of the schema" in out.stdout + out.stderr
        assert message in out.stdout + out.stderr


def test_a_bad_values_file_is_refused(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text("metrics:\n  enabled: 'yes'\n  servicemonitor: {}\n")
    out = helm("template", RELEASE, str(CHART), "-f", str(values), check=False)
    assert out.returncode != 0
    assert "at '/metrics/enabled': got string, want boolean" in out.stderr
    assert "additional properties 'servicemonitor' not allowed" in out.stderr


def test_every_value_is_documented():
    """Each key of values.yaml has a comment line right above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z][\w-]*:", line):
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#"), f"values.yaml line {i + 1} has no comment: {line}"


def test_schema_closes_every_object():
    """additionalProperties is false (or a type, for maps) wherever properties are listed."""
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "properties" in node:
                assert node.get("additionalProperties") is False, path
            for key, value in node.items():
                walk(value, f"{path}/{key}")
    walk(json.loads((CHART / "values.schema.json").read_text()), "")


# --- RBAC ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_wildcard_in_any_rule(variant):
    for kind, _, rule in rules(render(variant), hooks=True):
        assert "nonResourceURLs" not in rule
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            for item in rule.get(field, []):
                assert "*" not in item, (kind, rule)
        assert rule["verbs"] and rule["resources"] and rule["apiGroups"]


def test_default_rbac_is_one_clusterrole_bound_to_the_service_account():
    docs = render("defaults")
    assert not kinds(docs, "Role") and not kinds(docs, "RoleBinding")
    binding = one(docs, "ClusterRoleBinding", FULLNAME)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": FULLNAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == FULLNAME
    assert grants(docs, "memorypolicies") == {"list", "watch", "patch"}
    assert grants(docs, "memorypolicies/status") == {"patch"}
    assert grants(docs, "deployments") == {"list", "watch", "delete"}
    # the caches of dask_memory_operator/watches.py: listed, then watched
    assert grants(docs, "pods") == {"list", "watch"}  # the scheduler pods (and the webhook's counts)
    assert grants(docs, "replicasets") == {"list", "watch"}  # a scheduler pod's ownership chain
    assert grants(docs, "services") == {"list", "watch"}
    assert grants(docs, "daskworkergroups") == {"list", "watch", "patch"}
    assert grants(docs, "customresourcedefinitions") == {"list", "watch"}
    # the namespace selector's index and watch of Namespaces; no peering when standalone
    assert grants(docs, "namespaces") == {"list", "watch"} and not grants(docs, "clusterkopfpeerings")
    # every namespace (no selector): kopf does not look at namespaces
    assert not grants(render("every-namespace"), "namespaces")
    assert not grants(docs, "pods/portforward") and not grants(docs, "secrets")


def test_namespaced_renders_roles_in_exactly_those_namespaces():
    docs = render("namespaced")
    for kind in ("Role", "RoleBinding"):
        assert sorted(d["metadata"]["namespace"] for d in kinds(docs, kind)) == ["a", "b"]
    for binding in kinds(docs, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
        assert binding["roleRef"]["kind"] == "Role"
    # the ClusterRole keeps only what kopf needs at cluster scope, read only
    cluster = one(docs, "ClusterRole", FULLNAME)["rules"]
    assert {(g, r) for rule in cluster for g in rule["apiGroups"] for r in rule["resources"]} == {
        ("apiextensions.k8s.io", "customresourcedefinitions"), ("", "namespaces")}
    assert {v for rule in cluster for v in rule["verbs"]} == {"list", "watch"}
    role_rules = [r for kind, _, r in rules(docs) if kind == "Role"]
    default_rules = one(render("defaults"), "ClusterRole", FULLNAME)["rules"]
    assert role_rules == 2 * [r for r in default_rules
                              if not {"customresourcedefinitions", "namespaces"} & set(r["resources"])]
    args = container(docs)["args"]
    assert args[:5] == ["run", "--namespace", "a", "--namespace", "b"] and "--all-namespaces" not in args


def test_webhook_off_keeps_the_pods_rule_the_locator_needs():
    # the operator connects to the scheduler pod it lists, never through its Service
    assert grants(render("webhook-off"), "pods") == {"list", "watch"}


def test_replicas_run_under_a_peering_of_their_own():
    docs = render("replicas2")
    assert one(docs, "Deployment")["spec"]["replicas"] == 2
    args = container(docs)["args"]
    assert args[args.index("--peering") + 1] == FULLNAME != "default"
    peering = one(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == FULLNAME
    assert grants(docs, "clusterkopfpeerings") == {"list", "watch", "patch"}
    [patch] = [r for _, _, r in rules(docs) if "clusterkopfpeerings" in r["resources"] and "patch" in r["verbs"]]
    assert patch["resourceNames"] == [FULLNAME] and patch["verbs"] == ["patch"]
    assert "--peering" not in container(render("defaults"))["args"]


def test_namespaced_replicas_peer_in_a_cluster_peering_tenants_cannot_write():
    """Issue 15, case 4: a KopfPeering in a watched namespace is its tenant's to write
    (a peer of higher priority there paused the operator everywhere): the peering is
    the cluster-scoped one, as without watchNamespaces."""
    docs = render("namespaced-replicas2")
    assert not kinds(docs, "KopfPeering")
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == FULLNAME
    assert grants(docs, "clusterkopfpeerings") == {"list", "watch", "patch"}
    assert not grants(docs, "kopfpeerings")
    [patch] = [r for kind, _, r in rules(docs) if "clusterkopfpeerings" in r["resources"] and "patch" in r["verbs"]]
    assert patch["resourceNames"] == [FULLNAME]
    assert all(kind == "ClusterRole" for kind, _, r in rules(docs) if "clusterkopfpeerings" in r["resources"])


def test_a_peering_named_default_is_refused():
    out = helm("template", "x", str(CHART), "--set", "fullnameOverride=default", "--set", "replicaCount=2",
               check=False)
    assert out.returncode != 0 and "the dask-kubernetes operator's" in out.stderr


# --- the Deployment -------------------------------------------------------------------


def _parse_args(args: list[str]):
    return build_parser().parse_args(args)


def test_the_arguments_are_the_operators_own():
    c = container(render("defaults"))
    assert c["command"] == ["dask-memory-operator"]
    assert c["args"] == [
        "run", "--all-namespaces", "--namespace-selector", "dask-memory-operator.io/governed=true",
        "--scheduler-access", "pod-ip", "--resync-interval", "10",
        "--liveness", "http://0.0.0.0:8081/healthz",
        "--metrics-address", "0.0.0.0", "--metrics-port", "8080",
        "--webhook-port", "9443", "--webhook-address", "0.0.0.0",
        "--webhook-cert-dir", "/etc/dask-memory-operator/webhook-certs",
    ]
    # every address of the pod (kubectl port-forward dials localhost in it; IPv6 pods too)
    assert "env" not in c
    for variant in VARIANTS:
        args = _parse_args(container(render(variant))["args"])
        assert args.command == "run" and args.scheduler_access == "pod-ip"
        assert args.liveness == "http://0.0.0.0:8081/healthz"
    parsed = _parse_args(container(render("everything"))["args"])
    assert parsed.allow_policy_class == ["mycorp.amm.*"] and parsed.rpc_timeout == 10.0
    assert "--metrics-port" not in container(render("metrics-off"))["args"]
    assert "--webhook-port" not in container(render("webhook-off"))["args"]


def test_client_auth_mounts_the_client_ca_and_names_the_api_server():
    c = container(render("client-auth"))
    args = _parse_args(c["args"])
    assert args.webhook_client_ca == "/etc/dask-memory-operator/webhook-client-ca/ca.crt"
    assert args.webhook_client_name == ["kube-apiserver"]
    volumes = one(render("client-auth"), "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "webhook-client-ca", "configMap": {"name": "apiserver-ca"}} in volumes
    assert {"name": "webhook-client-ca", "mountPath": "/etc/dask-memory-operator/webhook-client-ca",
            "readOnly": True} in c["volumeMounts"]
    assert "--webhook-client-ca" not in container(render("defaults"))["args"]
    out = helm("template", "x", str(CHART), "--set", "webhook.clientAuth.enabled=true", check=False)
    assert out.returncode != 0 and "webhook.clientAuth.caConfigMap is required" in out.stderr


def test_one_replica_is_replaced_not_rolled():
    """Standalone, a rolling update would run two active operators at once."""
    assert one(render("defaults"), "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert "strategy" not in one(render("replicas2"), "Deployment")["spec"]  # peered: rolling


def test_the_cert_dir_is_the_secrets_mount():
    c = container(render("defaults"))
    mount = next(m for m in c["volumeMounts"] if m["name"] == "webhook-certs")
    assert mount["readOnly"] is True
    assert c["args"][c["args"].index("--webhook-cert-dir") + 1] == mount["mountPath"]
    volume = next(v for v in one(render("defaults"), "Deployment")["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == "webhook-certs")
    assert volume["secret"]["secretName"] == f"{FULLNAME}-webhook-tls"
    assert not any(m["name"] == "webhook-certs" for m in container(render("webhook-off"))["volumeMounts"])


@pytest.mark.parametrize("variant", ["defaults", "everything"])
def test_security_context(variant):
    docs = render(variant)
    pods = [one(docs, "Deployment")["spec"]["template"]["spec"],
            one(docs, "Pod")["spec"]]  # the helm test pod
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsGroup"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        [c] = pod["containers"]
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
        assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]


def test_probes_resources_and_scheduling():
    c = container(render("defaults"))
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8081, "protocol": "TCP"} in c["ports"]
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
    spec = one(render("everything"), "Deployment")["spec"]["template"]
    assert spec["spec"]["priorityClassName"] == "system-cluster-critical"
    assert spec["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["spec"]["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in spec["spec"]["affinity"]
    assert spec["spec"]["imagePullSecrets"] == [{"name": "registry"}]
    assert spec["metadata"]["annotations"] == {"owner": "ops"} and spec["metadata"]["labels"]["tier"] == "control"
    everything = spec["spec"]["containers"][0]
    assert everything["image"] == "dask-memory-operator:dev"
    assert {"name": "DASK_LOGGING__DISTRIBUTED", "value": "info"} in everything["env"]
    assert c["image"] == "dask-memory-operator:0.1.0"  # appVersion


# --- CRDs ---------------------------------------------------------------------------------


def test_the_chart_crd_is_the_one_in_crds(tmp_path):
    source = (ROOT / "crds" / "memorypolicy.yaml").read_bytes()
    # a copy, not a link: Helm 4 warns of every link in a chart it reads
    assert not (CHART / "crds" / "memorypolicy.yaml").is_symlink()
    assert (CHART / "crds" / "memorypolicy.yaml").read_bytes() == source
    for what in ("template", "lint"):
        warned = helm(what, RELEASE, str(CHART)) if what == "template" else helm(what, str(CHART))
        assert "symbolic link" not in warned.stderr + warned.stdout
    helm("package", str(CHART), "-d", str(tmp_path))
    [archive] = tmp_path.glob("dask-memory-operator-0.1.0.tgz")
    with tarfile.open(archive) as tar:
        member = tar.getmember("dask-memory-operator/crds/memorypolicy.yaml")
        assert member.isfile()
        assert tar.extractfile(member).read() == source
    packaged = helm("template", RELEASE, str(archive), "--include-crds").stdout
    assert "name: memorypolicies.amm.dask.org" in packaged


def test_no_default_peering_is_shipped():
    docs = [d for d in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text()) if d]
    assert {d["metadata"]["name"] for d in docs} == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


# --- the webhook ---------------------------------------------------------------------------


def _without_labels(doc: dict[str, Any]) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    doc["metadata"].pop("labels", None)
    doc["metadata"].pop("annotations", None)
    return doc


def _governed_only(configuration: dict[str, Any]) -> dict[str, Any]:
    """The Python configuration with the chart's default namespace selector (a label only
    a cluster admin sets), in the webhook's key order."""
    [hook] = configuration["webhooks"]
    items = list(hook.items())
    at = [k for k, _ in items].index("objectSelector")
    selector = {"matchLabels": {"dask-memory-operator.io/governed": "true"}}
    configuration["webhooks"] = [dict(items[:at] + [("namespaceSelector", selector)] + items[at:])]
    return configuration


def test_the_webhook_configuration_is_the_pythons():
    docs = render("defaults")
    rendered = one(docs, "MutatingWebhookConfiguration")
    ca_pem = base64.b64decode(rendered["webhooks"][0]["clientConfig"]["caBundle"])
    expected = configuration.mutating_webhook_configuration(
        ca_pem, service={"namespace": NAMESPACE, "name": f"{FULLNAME}-webhook", "port": 443}, name=FULLNAME)
    assert _without_labels(rendered) == _governed_only(expected)
    namespaced = one(render("namespaced"), "MutatingWebhookConfiguration")
    assert _without_labels(namespaced) == configuration.mutating_webhook_configuration(
        base64.b64decode(namespaced["webhooks"][0]["clientConfig"]["caBundle"]),
        service={"namespace": NAMESPACE, "name": f"{FULLNAME}-webhook", "port": 443}, name=FULLNAME,
        namespaces=["a", "b"])
    assert yaml.safe_load((CHART / "values.yaml").read_text())["webhook"]["timeoutSeconds"] == \
        configuration.TIMEOUT_SECONDS
    service = one(docs, "Service", f"{FULLNAME}-webhook")
    assert service["spec"]["ports"] == [{"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"}]
    assert {"name": "webhook", "containerPort": 9443, "protocol": "TCP"} in container(docs)["ports"]


def test_the_generated_certificate_serves_the_service_and_matches_the_ca_bundle():
    docs = render("defaults")
    secret = one(docs, "Secret", f"{FULLNAME}-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    bundle = one(docs, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["caBundle"]
    assert base64.b64decode(bundle) == data["ca.crt"]
    ca, cert = x509.load_pem_x509_certificate(data["ca.crt"]), x509.load_pem_x509_certificate(data["tls.crt"])
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert sorted(names.get_values_for_type(x509.DNSName)) == [
        f"{FULLNAME}-webhook.{NAMESPACE}.svc", f"{FULLNAME}-webhook.{NAMESPACE}.svc.cluster.local"]
    assert b"PRIVATE KEY" in data["tls.key"]


def test_cert_manager_issues_the_certificate_and_injects_the_ca():
    docs = render("cert-manager")
    assert not kinds(docs, "Secret")
    hook = one(docs, "MutatingWebhookConfiguration")
    assert hook["metadata"]["annotations"] == {"cert-manager.io/inject-ca-from": f"{NAMESPACE}/{FULLNAME}-webhook"}
    assert "caBundle" not in hook["webhooks"][0]["clientConfig"]
    cert = one(docs, "Certificate", f"{FULLNAME}-webhook")
    assert cert["spec"]["secretName"] == f"{FULLNAME}-webhook-tls"
    assert cert["spec"]["dnsNames"] == [f"{FULLNAME}-webhook.{NAMESPACE}.svc",
                                        f"{FULLNAME}-webhook.{NAMESPACE}.svc.cluster.local"]
    issuer = one(docs, "Issuer")
    assert issuer["spec"] == {"selfSigned": {}}
    assert cert["spec"]["issuerRef"] == {"name": issuer["metadata"]["name"], "kind": "Issuer",
                                         "group": "cert-manager.io"}
    # the rest of the configuration as the Python one
    expected = configuration.mutating_webhook_configuration(
        b"", service={"namespace": NAMESPACE, "name": f"{FULLNAME}-webhook", "port": 443}, name=FULLNAME)
    del expected["webhooks"][0]["clientConfig"]["caBundle"]
    assert _without_labels(hook) == _governed_only(expected)

    given = render("cert-manager-issuer")
    assert not kinds(given, "Issuer")
    assert one(given, "Certificate")["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer",
                                                              "group": "cert-manager.io"}


def test_webhook_off_renders_no_webhook():
    docs = render("webhook-off")
    for kind in ("MutatingWebhookConfiguration", "Secret", "Certificate", "Issuer"):
        assert not kinds(docs, kind)
    assert [s["metadata"]["name"] for s in kinds(docs, "Service")] == [FULLNAME]


def test_the_generated_certificate_is_ecdsa_for_a_year_with_its_expiry_noted():
    """Issue 15, case 8: no longer RSA-2048 for 10 years."""
    secret = one(render("defaults"), "Secret", f"{FULLNAME}-webhook-tls")
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    ca, cert = x509.load_pem_x509_certificate(data["ca.crt"]), x509.load_pem_x509_certificate(data["tls.crt"])
    for c in (ca, cert):
        assert isinstance(c.public_key(), ec.EllipticCurvePublicKey) and c.public_key().curve.name == "secp256r1"
        assert timedelta(days=364) < c.not_valid_after_utc - c.not_valid_before_utc <= timedelta(days=366)
    # what the next `helm upgrade` reads to decide whether to renew it
    noted = datetime.fromisoformat(secret["metadata"]["annotations"]["dask-memory-operator.io/certificate-not-after"])
    assert abs(noted - cert.not_valid_after_utc) < timedelta(minutes=5)


def _secret_of(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], bytes]:
    secret = one(docs, "Secret", f"{FULLNAME}-webhook-tls")
    bundle = one(docs, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["caBundle"]
    return secret, base64.b64decode(bundle)


async def test_an_upgrade_keeps_the_certificate_until_it_is_due_for_renewal(tmp_path):
    """`helm upgrade` (rendered as with a cluster: --dry-run=server, so `lookup` reads
    the emulated API) keeps a Secret that expires in more than 30 days, renews one
    that expires sooner or whose expiry is unknown (an older chart's), and trusts the
    old CA too while the pods still serve the old certificate."""
    async with ApiServer() as server:
        write_kubeconfig(tmp_path / "kubeconfig", server.url)
        await server.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        installed, _ = _secret_of(render("defaults"))

        async def upgrade_with(not_after: str | None) -> tuple[dict[str, Any], bytes]:
            existing = json.loads(json.dumps(installed))
            # as the release made it (Helm's ownership marks), with that expiry noted or none
            annotations = {"meta.helm.sh/release-name": RELEASE, "meta.helm.sh/release-namespace": NAMESPACE}
            if not_after is not None:
                annotations["dask-memory-operator.io/certificate-not-after"] = not_after
            existing["metadata"] = {"name": installed["metadata"]["name"], "namespace": NAMESPACE,
                                    "labels": installed["metadata"]["labels"], "annotations": annotations}
            await server.apply(existing)
            proc = await asyncio.create_subprocess_exec(
                str(helm_binary()), "template", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=server",
                "--is-upgrade", "--kubeconfig", str(tmp_path / "kubeconfig"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            return _secret_of([d for d in yaml.safe_load_all(out.decode()) if d])

        def iso(days: float) -> str:
            return (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")

        kept, bundle = await upgrade_with(iso(31))
        assert kept["data"] == installed["data"] and bundle == base64.b64decode(installed["data"]["ca.crt"])
        old_ca = base64.b64decode(installed["data"]["ca.crt"])
        for not_after in (iso(29), iso(-1), None):
            renewed, bundle = await upgrade_with(not_after)
            assert renewed["data"]["tls.key"] != installed["data"]["tls.key"]
            new_ca = base64.b64decode(renewed["data"]["ca.crt"])
            assert new_ca != old_ca and bundle == new_ca + old_ca, not_after
            cert = x509.load_pem_x509_certificate(base64.b64decode(renewed["data"]["tls.crt"]))
            cert.verify_directly_issued_by(x509.load_pem_x509_certificate(new_ca))
            assert cert.not_valid_after_utc - datetime.now(UTC) > timedelta(days=364)


# --- multi-tenant defaults (issue 15, cases 6 and 7) ----------------------------------------


def test_the_operator_acts_only_in_namespaces_a_cluster_admin_labelled():
    docs = render("defaults")
    args = _parse_args(container(docs)["args"])
    assert args.all_namespaces and args.namespace_selector == (GOVERNED, "true")
    [hook] = one(docs, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["namespaceSelector"] == {"matchLabels": {GOVERNED: "true"}}
    # empty: every namespace, as before
    every = render("every-namespace")
    assert _parse_args(container(every)["args"]).namespace_selector is None
    assert "namespaceSelector" not in one(every, "MutatingWebhookConfiguration")["webhooks"][0]
    # a list of namespaces is the admin's choice already: the selector is not used
    namespaced = render("namespaced")
    assert _parse_args(container(namespaced)["args"]).namespace_selector is None
    assert one(namespaced, "MutatingWebhookConfiguration")["webhooks"][0]["namespaceSelector"] == {
        "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["a", "b"]}]}


def test_the_cli_refuses_a_namespace_selector_that_is_not_a_label():
    assert _parse_args(["run", "--namespace-selector", "example.com/team=data"]).namespace_selector == (
        "example.com/team", "data")
    assert _parse_args(["run", "--namespace-selector", "opted-in="]).namespace_selector == ("opted-in", "")
    for bad in ("governed", "=true", "a b=c", "x=" + "v" * 64, "Bad_Prefix.io/x=y"):
        with pytest.raises(SystemExit):
            _parse_args(["run", "--namespace-selector", bad])


def test_the_network_policy_admits_each_port_from_its_callers_only():
    docs = render("defaults")
    spec = one(docs, "NetworkPolicy", FULLNAME)["spec"]
    assert spec["podSelector"] == one(docs, "Deployment")["spec"]["selector"]
    assert spec["policyTypes"] == ["Ingress"]
    by_port = {}
    for rule in spec["ingress"]:
        [port] = rule["ports"]
        assert port["protocol"] == "TCP"
        by_port[port["port"]] = rule.get("from")
    assert by_port == {
        "webhook": None,  # the API server's address is not selectable: any source
        "metrics": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "health": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "dask-memory-operator",
                                                    "app.kubernetes.io/instance": RELEASE,
                                                    "app.kubernetes.io/component": "test"}}}],
    }
    # named ports of the operator's container; the helm test pod matches its rule
    assert set(by_port) == {p["name"] for p in container(docs)["ports"]}
    test_pod = one(docs, "Pod")["metadata"]["labels"]
    assert by_port["health"][0]["podSelector"]["matchLabels"].items() <= test_pod.items()
    # the probes ask the health port: they come from the node, which a policy lets through
    assert container(docs)["livenessProbe"]["httpGet"]["port"] == "health"

    given = one(render("networkpolicy-peers"), "NetworkPolicy")["spec"]["ingress"]
    assert given[0]["from"] == [{"ipBlock": {"cidr": "10.0.0.0/24"}}]
    assert given[1]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "observability"}}}]
    assert given[-1] == {"ports": [{"port": "health"}], "from": [{"ipBlock": {"cidr": "192.168.0.0/16"}}]}
    assert [r["ports"][0]["port"] for r in one(render("metrics-off"), "NetworkPolicy")["spec"]["ingress"]] == [
        "webhook", "health"]
    assert [r["ports"][0]["port"] for r in one(render("webhook-off"), "NetworkPolicy")["spec"]["ingress"]] == [
        "metrics", "health"]
    off = helm("template", RELEASE, str(CHART), "--set", "networkPolicy.enabled=false").stdout
    assert "kind: NetworkPolicy" not in off
    # no selector would be every namespace's pods: refused, not rendered
    out = helm("template", RELEASE, str(CHART), "--set", "networkPolicy.metrics.namespaceSelector=null", check=False)
    assert out.returncode != 0 and "networkPolicy.metrics.namespaceSelector" in out.stderr


def test_an_admission_policy_narrows_the_deletes_and_patches_rbac_cannot():
    docs = render("defaults")
    policy = one(docs, "ValidatingAdmissionPolicy", f"{FULLNAME}-scope")["spec"]
    assert one(docs, "ValidatingAdmissionPolicyBinding", f"{FULLNAME}-scope")["spec"] == {
        "policyName": f"{FULLNAME}-scope", "validationActions": ["Deny"]}
    assert policy["failurePolicy"] == "Fail"
    matched = {(r["apiGroups"][0], r["resources"][0], r["operations"][0])
               for r in policy["matchConstraints"]["resourceRules"]}
    assert matched == {("apps", "deployments", "DELETE"), ("kubernetes.dask.org", "daskworkergroups", "UPDATE")}
    # exactly the writes the ClusterRole grants in every namespace
    assert "delete" in grants(docs, "deployments") and "patch" in grants(docs, "daskworkergroups")
    [who] = policy["matchConditions"]
    assert who["expression"] == f"request.userInfo.username == 'system:serviceaccount:{NAMESPACE}:{FULLNAME}'"
    worker, governed = (v["expression"] for v in policy["validations"])
    assert "oldObject.metadata.labels['dask.org/component'] == 'worker'" in worker
    assert f"namespaceObject.metadata.labels['{GOVERNED}'] == 'true'" in governed
    # every namespace: only the Deployments are narrowed
    [only] = one(render("every-namespace"), "ValidatingAdmissionPolicy")["spec"]["validations"]
    assert only["expression"] == worker
    # not served (before 1.30, or off): not rendered; discovery saying it is served wins
    assert not kinds(render("kube-1.29"), "ValidatingAdmissionPolicy")
    served = helm("template", RELEASE, str(CHART), "--kube-version", "1.29.0",
                  "--api-versions", "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy").stdout
    assert "kind: ValidatingAdmissionPolicyBinding" in served
    off = helm("template", RELEASE, str(CHART), "--set", "admissionPolicy.enabled=false").stdout
    assert "ValidatingAdmissionPolicy" not in off


def _admits(policy: dict[str, Any], request: dict[str, Any], old: dict[str, Any], namespace: dict[str, Any]) -> bool:
    """The policy's verdict on one request, its CEL evaluated as the API server does
    (cel-python: the emulator evaluates no CEL)."""
    import celpy

    env = celpy.Environment()
    activation = {"request": celpy.json_to_cel(request), "oldObject": celpy.json_to_cel(old),
                  "object": celpy.json_to_cel(None), "namespaceObject": celpy.json_to_cel(namespace)}

    def true(expression: str) -> bool:
        result = env.program(env.compile(expression)).evaluate(activation)
        assert isinstance(result, celpy.celtypes.BoolType), (expression, result)  # an error denies
        return bool(result)

    if not all(true(c["expression"]) for c in policy.get("matchConditions", ())):
        return True  # not the operator's request
    return all(true(v["expression"]) for v in policy["validations"])


def test_the_admission_policy_admits_the_operators_own_writes_and_no_other():
    policy = one(render("defaults"), "ValidatingAdmissionPolicy", f"{FULLNAME}-scope")["spec"]
    operator = {"username": f"system:serviceaccount:{NAMESPACE}:{FULLNAME}"}

    def deletes(labels: dict[str, str], ns_labels: dict[str, str], user: dict[str, str] = operator) -> bool:
        request = {"userInfo": user, "operation": "DELETE",
                   "resource": {"group": "apps", "version": "v1", "resource": "deployments"}}
        return _admits(policy, request, {"metadata": {"name": "w", "labels": labels}},
                       {"metadata": {"name": "team-a", "labels": ns_labels}})

    def scales(ns_labels: dict[str, str]) -> bool:
        request = {"userInfo": operator, "operation": "UPDATE",
                   "resource": {"group": "kubernetes.dask.org", "version": "v1", "resource": "daskworkergroups"}}
        return _admits(policy, request, {"metadata": {"name": "g"}}, {"metadata": {"name": "team-a", "labels": ns_labels}})

    governed = {GOVERNED: "true"}
    assert deletes({"dask.org/component": "worker", "dask.org/cluster-name": "c"}, governed)
    assert not deletes({"dask.org/component": "scheduler"}, governed)
    assert not deletes({}, governed)
    assert not deletes({"dask.org/component": "worker"}, {})
    assert scales(governed) and not scales({GOVERNED: "false"}) and not scales({})
    assert deletes({}, {}, user={"username": "alice"})  # anyone else: not this policy's business


# --- metrics, helm test, NOTES ----------------------------------------------------------------


def test_metrics_service_and_service_monitor():
    docs = render("defaults")
    service = one(docs, "Service", FULLNAME)
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"health": 8081, "metrics": 8080}
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "operator"
    assert not kinds(docs, "ServiceMonitor")
    off = one(render("metrics-off"), "Service", FULLNAME)
    assert [p["name"] for p in off["spec"]["ports"]] == ["health"]
    monitor = one(render("servicemonitor"), "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    assert all(service["metadata"]["labels"][k] == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())


def test_no_dashboard_by_default():
    assert not [d for d in kinds(render("defaults"), "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]


def test_the_dashboard_is_a_configmap_grafanas_sidecar_loads():
    [cm] = [d for d in kinds(render("dashboards"), "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Dask"}
    [(name, text)] = cm["data"].items()
    assert name == "dask-memory-operator.json"
    assert json.loads(text) == json.loads((CHART / "dashboards" / name).read_text())


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((CHART / "dashboards" / "dask-memory-operator.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return queries


def test_every_metric_the_dashboard_queries_exists_with_its_labels():
    """The names and labels the dashboard's PromQL uses are those the operator exposes
    (prometheus_client's registry: counters end in _total, histograms in _bucket...)."""
    from prometheus_client import REGISTRY

    import dask_memory_operator.observability.metrics  # noqa: F401  (registers them)

    exposed: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("dask_memory_operator_"):
            continue
        labels = set(getattr(REGISTRY._names_to_collectors.get(family.name), "_labelnames", ()))
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        for suffix in suffixes:
            exposed[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    queries = _dashboard_queries()
    assert len(queries) >= 8
    used = set()
    for query in queries:
        for name, selector in re.findall(r"(dask_memory_operator_\w+)(\{[^}]*\})?", query):
            assert name in exposed, f"{name} (in {query!r}) is not a metric the operator exposes"
            used.add(name)
            for label in re.findall(r"(\w+)\s*[=!]~?", selector or ""):
                assert label in exposed[name], f"{name} has no label {label!r} (in {query!r})"
        for group in re.findall(r"by \(([^)]*)\)", query):
            names = [n for n in re.findall(r"dask_memory_operator_\w+", query)]
            for label in (g.strip() for g in group.split(",")):
                assert any(label in exposed[n] for n in names), f"no metric of {query!r} has label {label!r}"
    # every family of the operator is on the dashboard
    families = {n.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
                for n in exposed}
    shown = {n.removesuffix("_total").removesuffix("_bucket") for n in used}
    assert families <= shown, f"not on the dashboard: {sorted(families - shown)}"


def test_helm_test_hook():
    docs = [d for d in render("defaults") if "helm.sh/hook" in (d["metadata"].get("annotations") or {})]
    weights = {d["kind"]: int(d["metadata"]["annotations"]["helm.sh/hook-weight"]) for d in docs}
    assert set(weights) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Pod"}
    assert max(w for k, w in weights.items() if k != "Pod") < weights["Pod"]
    for d in docs:
        assert d["metadata"]["annotations"]["helm.sh/hook"] == "test"
        # a passed test leaves nothing; a failed one keeps its pod for `kubectl logs`
        assert d["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    assert one(docs, "ClusterRole")["rules"] == [{
        "apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
        "resourceNames": ["memorypolicies.amm.dask.org"], "verbs": ["get"]}]
    pod = one(docs, "Pod")["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == f"{FULLNAME}-test"
    [c] = pod["containers"]
    assert c["image"] == container(render("defaults"))["image"]
    args = build_parser().parse_args(c["args"])
    assert args.command == "check" and args.crd == "memorypolicies.amm.dask.org"
    assert args.healthz == f"http://{FULLNAME}.{NAMESPACE}.svc:8081/healthz"


def test_notes_say_how_to_check_and_warn_without_webhook():
    def notes(*values: str) -> str:
        out = helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", *values)
        return out.stdout.split("NOTES:", 1)[1]
    default = notes()
    assert "kubectl get mempol -A" in default and f"helm test {RELEASE}" in default
    assert f"http://{FULLNAME}.{NAMESPACE}.svc:8080/metrics" in default and "WARNING" not in default
    assert "WARNING: the admission webhook is off" in notes("--set", "webhook.enabled=false")


# --- dask-memory-operator check, against the emulator ---------------------------------------


async def _run_check(kubeconfig: Path, *args: str) -> tuple[int, str]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dask_memory_operator.cli", "check", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode()


async def _healthz_server(status: int) -> tuple[aiohttp.web.AppRunner, str]:
    app = aiohttp.web.Application()
    async def healthz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({}, status=status)

    app.router.add_get("/healthz", healthz)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/healthz"


async def test_check_passes_with_the_crd_established_and_the_operator_live(tmp_path):
    async with ApiServer(crd_dirs=[ROOT / "crds"]) as server:
        write_kubeconfig(tmp_path / "kubeconfig", server.url)
        live, url = await _healthz_server(200)
        dead, dead_url = await _healthz_server(500)
        try:
            rc, out = await _run_check(tmp_path / "kubeconfig", "--healthz", url, "--timeout", "10")
            assert rc == 0, out
            assert "ok: CRD memorypolicies.amm.dask.org is Established" in out
            assert f"ok: operator liveness {url}: 200" in out

            rc, out = await _run_check(tmp_path / "kubeconfig", "--healthz", dead_url, "--timeout", "0")
            assert rc == 1 and f"FAILED: operator liveness {dead_url}: HTTP 500" in out, out

            rc, out = await _run_check(tmp_path / "kubeconfig", "--crd", "daskclusters.kubernetes.dask.org",
                                       "--timeout", "0")
            assert rc == 1, out
            assert ('FAILED: CRD daskclusters.kubernetes.dask.org: HTTP 404: customresourcedefinitions.'
                    'apiextensions.k8s.io "daskclusters.kubernetes.dask.org" not found') in out
        finally:
            await live.cleanup()
            await dead.cleanup()


@pytest.mark.parametrize("spelling", ["", "/"])
async def test_kubectl_applies_crds_and_examples_from_the_checkout(tmp_path, spelling):
    """``kubectl apply -f crds`` as well as ``crds/``: real folders (kubectl reads no
    linked folder without its slash), whose files link into the package."""
    async with ApiServer(crd_dirs=[DASK_CRDS]) as server:
        write_kubeconfig(tmp_path / "kubeconfig", server.url)
        applied = []
        for folder in ("crds", "examples"):
            out = await asyncio.to_thread(
                subprocess.run, ["kubectl", "--kubeconfig", str(tmp_path / "kubeconfig"), "apply",
                                 "-o", "name", "-f", folder + spelling],
                cwd=ROOT, capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            applied += out.stdout.split()
        assert "customresourcedefinition.apiextensions.k8s.io/memorypolicies.amm.dask.org" in applied
        assert {"daskcluster.kubernetes.dask.org/demo", "memorypolicy.amm.dask.org/analytics",
                "memorypolicy.amm.dask.org/demo-adaptive"} <= set(applied)


async def test_check_waits_for_the_crd(tmp_path):
    """A CRD created while the check waits: it passes then, not at its first look."""
    async with ApiServer() as server:
        write_kubeconfig(tmp_path / "kubeconfig", server.url)
        check = asyncio.ensure_future(_run_check(tmp_path / "kubeconfig", "--timeout", "30"))
        # it has looked at least once (and found nothing) before the CRD exists
        deadline = time.monotonic() + 20
        while not any(r.url.path.endswith("customresourcedefinitions/memorypolicies.amm.dask.org")
                      for r in _requests(server)):
            assert time.monotonic() < deadline and not check.done()
            await asyncio.sleep(0.05)
        await server.apply_files([ROOT / "crds" / "memorypolicy.yaml"])
        rc, out = await check
        assert rc == 0 and "is Established" in out, out


def _requests(server: ApiServer) -> list[Any]:
    return list(server.emulator._requests)  # kmock's record of every request


# --- the image -------------------------------------------------------------------------------


def _dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """(instruction, argument) per stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, argument = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), argument.strip()))
    return stages


def test_the_dockerfile():
    builder, runtime = _dockerfile_stages(ROOT / "Dockerfile")
    assert builder[0] == ("FROM", "python:3.11-slim AS builder")
    assert runtime[0] == ("FROM", "python:3.11-slim")
    run = dict((i, a) for i, a in builder if i == "RUN")["RUN"]
    assert run.startswith("pip wheel") and "--no-deps" in run and "/wheels" in run
    [install] = [a for i, a in runtime if i == "RUN"]
    assert "pip install --no-cache-dir /wheels/*.whl" in install and "[" not in install  # no extras
    [user] = [a for i, a in runtime if i == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0 and int(uid) == 10001
    assert ("ENTRYPOINT", '["dask-memory-operator"]') in runtime and ("CMD", '["run"]') in runtime
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[1] == "*" and "!operator/" in ignored

    *_, scheduler = _dockerfile_stages(ROOT / "images" / "scheduler" / "Dockerfile")
    assert scheduler[0] == ("FROM", "${DASK_IMAGE}")
    assert "ARG DASK_IMAGE=ghcr.io/dask/dask:2026.8.0-py3.11" in (ROOT / "images/scheduler/Dockerfile").read_text()
    assert ("ENV", "DASK_DISTRIBUTED__SCHEDULER__PRELOAD=amm_core.plugin") in scheduler
    [install] = [a for i, a in scheduler if i == "RUN"]
    assert "--no-deps" in install  # the Dask image's dask/distributed stay as they are


def _build_context(dest: Path) -> Path:
    """What the Dockerfile's COPY lines put in /src, with .dockerignore's exclusions."""
    [builder, _] = _dockerfile_stages(ROOT / "Dockerfile")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for instruction, argument in builder:
        if instruction == "COPY":
            *sources, _target = argument.split()
            for source in sources:
                src = ROOT / source.rstrip("/")
                if src.is_dir():
                    shutil.copytree(src, dest / src.name, ignore=ignore, symlinks=True)
                else:
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dest / src.name)
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_the_image_install_steps_and_entrypoint(tmp_path):
    source = _build_context(tmp_path / "src")
    # an image's environment: nothing of this checkout on the path (its metadata would
    # tell pip the package is installed already)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "KUBERNETES_SERVICE_HOST")}
    # builder: the same command as the Dockerfile's
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-cache-dir", "--no-deps",
                    "--wheel-dir", str(tmp_path / "wheels"), str(source)], check=True, cwd=tmp_path, env=env)
    [wheel] = (tmp_path / "wheels").glob("dask_memory_operator-0.1.0-*.whl")
    # runtime: a fresh venv, the wheel with its dependencies (pip's cache may serve them)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)], check=True, cwd=tmp_path,
                   capture_output=True, env=env)
    installed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format=json"], capture_output=True,
                               text=True, check=True, env=env).stdout
    names = {p["name"].lower().replace("_", "-") for p in json.loads(installed)}
    assert {"kopf", "kr8s", "distributed", "prometheus-client"} <= names
    assert not names & {"kmock", "dask-kubernetes", "kubernetes", "pytest", "matplotlib", "jsonschema"}

    entrypoint = venv / "bin" / "dask-memory-operator"
    help_ = subprocess.run([str(entrypoint), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert help_.returncode == 0 and "run" in help_.stdout and "check" in help_.stdout

    # `run` (the image's CMD) against an emulated API, until it answers its liveness URL
    kubeconfig = tmp_path / "kubeconfig"
    api = subprocess.Popen([sys.executable, "-m", "dmo_devstack.apiserver", "--port", "0",
                            "--kubeconfig", str(kubeconfig), "--crds", str(ROOT / "crds"),
                            "--crds", str(DASK_CRDS)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    operator = None
    try:
        _wait(lambda: kubeconfig.exists(), 30, "the emulator's kubeconfig")
        health, metrics = _free_port(), _free_port()
        env["KUBECONFIG"] = str(kubeconfig)
        operator = subprocess.Popen(
            [str(entrypoint), "run", "--scheduler-access", "pod-ip",
             "--liveness", f"http://127.0.0.1:{health}/healthz",
             "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics)],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _wait(lambda: _answers(f"http://127.0.0.1:{health}/healthz") or operator.poll() is not None, 60,
              "the operator's liveness endpoint")
        assert operator.poll() is None, operator.stdout.read()
        assert _answers(f"http://127.0.0.1:{metrics}/metrics")
        check = subprocess.run([str(entrypoint), "check", "--healthz", f"http://127.0.0.1:{health}/healthz",
                                "--timeout", "10"], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        for proc in (operator, api):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
