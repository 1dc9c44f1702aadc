"""The webhook's HTTPS server: kopf's, answering only for what an API server sends.

Anyone who can reach the webhook port can POST an AdmissionReview, and the answer to
a pod of a governed cluster carries its policy's AMM settings (classes and args) and
retirement settings, and tells whether a DaskCluster of that name exists in that
namespace. So, on top of kopf's :class:`kopf.WebhookServer`:

- **Client certificates** (``--webhook-client-ca``): the TLS handshake requires a
  certificate signed by that CA; kube-apiserver presents one when its
  AdmissionConfiguration names a kubeconfig with a user for the webhook's host
  (``<service>.<namespace>.svc:<port>``). The CA file is read again when it changes. Optionally (``--webhook-client-name``) the
  certificate must also carry one of the given names (CN or DNS SAN): a cluster CA
  signs many clients' certificates, kubelets' among them.
- **One pod creation, consistent with itself**: ``kind`` and ``resource`` v1 Pod,
  operation CREATE, no subresource, the object a Pod, and ``request.namespace`` equal
  to the object's ``metadata.namespace`` (set from it when absent, as the API server
  does before admission). Anything else is answered 400 with a fixed message, before
  any handler reads any index.
- **Only the patch**: the answer carries the review's uid, ``allowed: true`` and, when
  there is one, a JSON patch of the pod's containers and grace period; never a
  warning or a status message (kopf would put a handler's exception text there), and
  never a denial (the webhook does not block pods).

What this does not do without client certificates: a request that is consistent
(namespace, labels and cluster name of another tenant, all guessable) is answered as
the API server's would be. The NetworkPolicy of the chart limits who can connect;
only the client certificate tells the API server from a tenant's pod.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import aiohttp.web
import kopf

logger = logging.getLogger(__name__)

#: JSON-patch paths the webhook may answer with (mutation.py changes nothing else)
PATCHABLE = ("/spec/containers", "/spec/terminationGracePeriodSeconds")
_POD_GVK = ("", "v1", "Pod")
_POD_GVR = ("", "v1", "pods")
#: The one message of a refused review: it says nothing of what the operator knows
NOT_A_POD_CREATION = "not a consistent admission review of a pod creation"


def review_problem(review: Any) -> str | None:
    """Why ``review`` is not a pod creation the API server could have sent (None: it
    is). Fills in the object's namespace from the request's when it has none."""
    request = review.get("request") if isinstance(review, dict) else None
    if not isinstance(request, dict):
        return "no request"
    kind, resource = request.get("kind"), request.get("resource")
    if not isinstance(kind, dict) or (kind.get("group"), kind.get("version"), kind.get("kind")) != _POD_GVK:
        return "kind is not v1 Pod"
    if not isinstance(resource, dict) or \
            (resource.get("group"), resource.get("version"), resource.get("resource")) != _POD_GVR:
        return "resource is not v1 pods"
    if request.get("operation") != "CREATE" or request.get("subResource"):
        return "not a CREATE of a pod"
    if not isinstance(request.get("uid"), str) or not request["uid"]:
        return "no uid"
    namespace, obj = request.get("namespace"), request.get("object")
    if not isinstance(namespace, str) or not namespace:
        return "no namespace"
    if not isinstance(obj, dict) or obj.get("kind", "Pod") != "Pod" or obj.get("apiVersion", "v1") != "v1":
        return "the object is not a v1 Pod"
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict):
        return "the object has no metadata"
    if meta.get("namespace") in (None, ""):
        meta["namespace"] = namespace  # as the API server sets it before admission
    elif meta["namespace"] != namespace:
        return "request.namespace and object.metadata.namespace differ"
    return None


def peer_names(sslpeer: Mapping[str, Any] | None) -> set[str]:
    """The common names and DNS names of a verified client certificate (``getpeercert()``)."""
    names: set[str] = set()
    for rdn in (sslpeer or {}).get("subject") or ():
        names.update(value for key, value in rdn if key == "commonName")
    names.update(value for kind, value in (sslpeer or {}).get("subjectAltName") or () if kind == "DNS")
    return names


def only_the_patch(review: Mapping[str, Any], answer: Mapping[str, Any]) -> dict[str, Any]:
    """kopf's answer cut down to the uid, ``allowed: true`` and the patch of the pod's
    containers and grace period. A handler that failed gets no patch (and no message)."""
    response = answer.get("response") or {}
    uid = review["request"]["uid"]
    minimal: dict[str, Any] = {"uid": uid, "allowed": True}
    if response.get("allowed") and response.get("patch"):
        ops = json.loads(base64.b64decode(response["patch"]))
        kept = [op for op in ops if any(op.get("path") == p or str(op.get("path", "")).startswith(p + "/")
                                        for p in PATCHABLE)]
        if len(kept) != len(ops):
            logger.warning("Admission %s: %d patch operation(s) outside the pod's containers dropped",
                           uid, len(ops) - len(kept))
        if kept:
            minimal["patch"] = base64.b64encode(json.dumps(kept).encode()).decode("ascii")
            minimal["patchType"] = "JSONPatch"
    elif not response.get("allowed"):
        logger.warning("Admission %s: a handler failed; the pod is admitted unchanged", uid)
    return {"apiVersion": review.get("apiVersion", "admission.k8s.io/v1"), "kind": "AdmissionReview",
            "response": minimal}


class AdmissionServer(kopf.WebhookServer):
    """:class:`kopf.WebhookServer` with the checks of the module docstring.

    ``client_ca``: clients must present a certificate it signed (the TLS handshake
    fails otherwise); ``client_names``: and one of these names must be in it.
    """

    def __init__(self, *, client_ca: str | None = None, client_names: Iterable[str] = (),
                 **kwargs: Any) -> None:
        if client_ca:
            kwargs.update(verify_mode=ssl.CERT_REQUIRED, verify_cafile=client_ca)
        elif client_names:
            raise ValueError("client names need a client CA to verify the certificates against")
        super().__init__(**kwargs)
        self.client_names = frozenset(client_names)

    async def _WebhookServer__sleep_forever_or_until_ssl_files_change(self) -> None:
        """kopf (pinned 1.45.2) serves until its certificate files change, then rebuilds its
        TLS context; the client CA is watched too, so that a rotated one (a mounted
        ConfigMap) is used without a restart. Overrides kopf's private method of that name."""
        paths = [str(p) for p in (self.certfile, self.pkeyfile, self.cafile, self.verify_cafile) if p]
        first = None
        while True:
            digest = hashlib.sha256()
            for path in paths:
                with open(path, "rb") as f:
                    digest.update(f.read())
            if first is None:
                first = digest.hexdigest()
            if digest.hexdigest() != first:
                return
            await asyncio.sleep(self.file_check_interval)

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async def checked(review: Any, *, sslpeer: Any = None, **kwargs: Any) -> Any:
            if self.client_names and not self.client_names & peer_names(sslpeer):
                logger.warning("Admission refused: the client certificate names none of %s",
                               ", ".join(sorted(self.client_names)))
                raise aiohttp.web.HTTPForbidden(reason="client certificate not accepted")
            problem = review_problem(review)
            if problem is not None:
                logger.warning("Admission refused: %s", problem)
                raise aiohttp.web.HTTPBadRequest(reason=NOT_A_POD_CREATION)
            answer = await fn(review, sslpeer=sslpeer, **kwargs)
            return only_the_patch(review, answer)

        async for client_config in super().__call__(checked):
            yield client_config
