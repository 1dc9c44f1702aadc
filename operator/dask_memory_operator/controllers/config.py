"""What `dask-memory-operator run` was told, as the controllers read it."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class WebhookConfig:
    """Where the admission webhook listens and which certificate it serves."""

    port: int
    address: str = "0.0.0.0"
    #: What the API server calls it by (a certificate name); default: the address
    host: str | None = None
    #: tls.crt, tls.key (ca.crt) from a Secret; None: self-signed (local use)
    cert_dir: str | None = None
    #: CA file client certificates must be signed by (the API server's); None: any client
    client_ca: str | None = None
    #: Names (CN or DNS SAN) one of which a client certificate must carry; empty: any
    client_names: tuple[str, ...] = ()


@dataclass
class OperatorConfig:
    """What `dask-memory-operator run` was told."""

    #: Dotted paths or glob patterns of policy classes a MemoryPolicy may name
    allowed_policy_classes: tuple[str, ...] = ()
    #: Seconds between level-triggered resyncs of every MemoryPolicy
    resync_interval: float = 10.0
    #: How deletion handles an unreachable scheduler: retries before giving up
    delete_retries: int = 3
    #: The admission webhook, if served
    webhook: WebhookConfig | None = None
    #: Run among peers (``--peering``: several replicas, one active): the webhook then
    #: reads what it needs from the API, not from the indexes of a replica that may be
    #: standing by (webhook/handlers.py)
    peered: bool = False
    #: ``--namespace-selector LABEL=VALUE``: only MemoryPolicies and DaskClusters in
    #: namespaces with this label are acted on (a cluster admin opts namespaces in;
    #: controllers/scope.py); None: every watched namespace
    namespace_selector: tuple[str, str] | None = None


#: A label key (optional DNS-subdomain prefix and "/") and value, as Kubernetes checks them
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_PREFIX = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_LABEL_KEY = re.compile(rf"^({_PREFIX}/)?{_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_NAME})?$")


def parse_selector(text: str) -> tuple[str, str]:
    """``LABEL=VALUE`` as (key, value); ValueError if not a valid label and value."""
    key, sep, value = text.partition("=")
    if not sep or not _LABEL_KEY.match(key) or len(key.rpartition("/")[0]) > 253 \
            or not _LABEL_VALUE.match(value):
        raise ValueError(f"not LABEL=VALUE with a Kubernetes label key and value: {text!r}")
    return key, value
