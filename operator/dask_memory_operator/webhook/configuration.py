"""The ``MutatingWebhookConfiguration`` that sends pod creations of dask-kubernetes
clusters to the operator: one source for the local stack and the Helm chart.

``failurePolicy: Ignore`` and a short timeout: with the operator down, pods are
created at once, ungoverned (the operator reports them afterwards). Only pods that
carry both dask-kubernetes labels are sent (``objectSelector``); the handler answers
the others' governed-or-not at once from memory.
"""

from __future__ import annotations

import base64
from typing import Any

from dask_memory_operator.api.memorypolicy import GROUP
from dask_memory_operator.webhook.handlers import CLUSTER_LABEL, COMPONENT_LABEL, HANDLER_ID

NAME = "dask-memory-operator"
#: Seconds the API server waits for an answer before going on without it
TIMEOUT_SECONDS = 5


def mutating_webhook_configuration(
    ca_pem: bytes, *, url: str | None = None, service: dict[str, Any] | None = None,
    name: str = NAME, timeout_seconds: int = TIMEOUT_SECONDS, namespaces: list[str] | None = None,
) -> dict[str, Any]:
    """The configuration, with a URL (local use) or a Service reference (in a
    cluster: ``{"namespace", "name", "port"}``) to kopf's path for the handler. An
    operator watching only some ``namespaces`` is sent only their pods (by the
    ``kubernetes.io/metadata.name`` label every Namespace has)."""
    if (url is None) == (service is None):
        raise ValueError("give one of url and service")
    client: dict[str, Any] = {"caBundle": base64.b64encode(ca_pem).decode()}
    if url is not None:
        client["url"] = f"{url.rstrip('/')}/{HANDLER_ID}"
    else:
        client["service"] = {**service, "path": f"/{HANDLER_ID}"}
    scope: dict[str, Any] = {}
    if namespaces:
        scope["namespaceSelector"] = {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": list(namespaces)}]}
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": f"{HANDLER_ID}.{GROUP}",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Ignore",
            "timeoutSeconds": timeout_seconds,
            "matchPolicy": "Equivalent",
            "reinvocationPolicy": "Never",
            "clientConfig": client,
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                       "operations": ["CREATE"], "scope": "Namespaced"}],
            **scope,
            "objectSelector": {"matchExpressions": [
                {"key": CLUSTER_LABEL, "operator": "Exists"},
                {"key": COMPONENT_LABEL, "operator": "Exists"},
            ]},
        }],
    }
