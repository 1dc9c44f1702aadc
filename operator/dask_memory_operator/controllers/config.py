"""What `dask-memory-operator run` was told, as the controllers read it."""

from __future__ import annotations

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
