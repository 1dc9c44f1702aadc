"""Wiring: every handler of the operator into one kopf registry, with its settings."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import kopf

from dask_memory_operator.api.memorypolicy import DASK_GROUP, DASK_VERSION, GROUP, PLURAL, VERSION
from dask_memory_operator.controllers.config import OperatorConfig, WebhookConfig
from dask_memory_operator.controllers.diffbase import BoundedDiffBaseStorage
from dask_memory_operator.controllers.scope import checked_at_each_tick, governed_or_gone, register_namespace_scope
from dask_memory_operator.controllers.daskcluster import (
    converge_changed_cluster,
    daskclusters_by_namespace,
    settle_owed_restores,
)
from dask_memory_operator.controllers.memorypolicy import (
    memorypolicies_by_namespace,
    reconcile_policy,
    restore_on_delete,
)
from dask_memory_operator.webhook.certs import write_webhook_certs
from dask_memory_operator.webhook.handlers import (
    CLUSTER_LABEL,
    COMPONENT_LABEL,
    HANDLER_ID,
    mutate_pod,
    mutate_pod_among_peers,
)
from dask_memory_operator.controllers.scaling import (
    ScalingController,
    daskautoscalers_by_cluster,
    scale_policy_clusters,
)
from dask_memory_operator.controllers.workergroup import group_record
from dask_memory_operator.watches import Watches, operator_kinds

#: Seconds between runs of each policy's scaling timer (each cluster's passes are
#: paced by its adaptive interval)
SCALING_TICK = 0.5


#: Seconds the operator's start waits for its caches' first LIST (passes read the API
#: for what a cache cannot vouch for: not waiting longer is only slower)
WATCHES_SYNC_TIMEOUT = 30.0


def operator_watches(namespaces: list[str], webhook: bool = False) -> Watches | None:
    """The caches of the Dask objects passes read (:mod:`dask_memory_operator.watches`):
    cluster-wide, or in each watched namespace; None (every read from the API) when a
    namespace is a pattern, which only kopf resolves. (``webhook`` is not used any
    more: worker pods are watched either way, for their OOM kills and worker-seconds.)"""
    if any(set(n) & set("*?[!") for n in namespaces):
        logging.getLogger(__name__).warning(
            "--namespace patterns: the Dask objects are read from the API on every pass (no watch-backed caches)")
        return None
    kinds = operator_kinds(group_record=group_record)
    return Watches(kinds, namespaces or None)


async def start_background_tasks(memo: kopf.Memo, **_: Any) -> None:
    """Tasks of the whole operator, not of one object: the caches' watches (filled
    before any handler runs: kopf starts its watches after the startup handlers), the
    owed restores, and the scaling controller, whose passes run as tasks of their own.
    kopf runs it again when it failed: the watches are started once (``Watches.start``)."""
    config: OperatorConfig = memo.config
    watches: Watches | None = getattr(memo, "watches", None)
    if watches is not None and not await watches.start(WATCHES_SYNC_TIMEOUT):
        logging.getLogger(__name__).warning("Some watches did not list within %gs: passes read the API meanwhile",
                                            WATCHES_SYNC_TIMEOUT)
    memo.scaling = ScalingController(memo.reconciler, check_hooks=config.webhook is not None, watches=watches)
    memo.background = [asyncio.create_task(settle_owed_restores(memo, config.resync_interval))]


async def stop_background_tasks(memo: kopf.Memo, **_: Any) -> None:
    scaling = getattr(memo, "scaling", None)
    passes = [s.task for s in scaling.clusters.values() if s.task] if scaling else []
    for task in [*getattr(memo, "background", ()), *passes]:
        task.cancel()
    await asyncio.gather(*passes, return_exceptions=True)
    await asyncio.gather(*getattr(memo, "background", ()), return_exceptions=True)
    watches = getattr(memo, "watches", None)
    try:
        await memo.reconciler.locator.close()
    finally:  # the watches end also when the locator's close fails
        if watches is not None:
            await watches.stop()


class _QuietScalingTimer(logging.Filter):
    """kopf logs every run of every timer; the scaling timer runs twice a second per
    policy, and what it does is logged (and posted as Events) by the controller."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timer 'scale' ")


def configure_operator(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Our own annotation keys and finalizer: never collide with dask-kubernetes'
    # kopf.zalando.org/last-handled-configuration on shared objects.
    settings.persistence.finalizer = f"{GROUP}/restore-schedulers"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    # bounded: a large spec is kept as a digest, so that no patch of kopf's passes the
    # API server's 256 KiB of annotations (controllers/diffbase.py)
    settings.persistence.diffbase_storage = BoundedDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    logging.getLogger("kopf.objects").addFilter(_QuietScalingTimer())
    # A policy deleted while its resync timer runs waits for the timer to exit; kopf
    # looks again only after this many seconds (60 by default: a minute-long delete)
    settings.background.cancellation_polling = 0.5
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90
    settings.networking.request_timeout = 30
    # Peers meet in a ClusterKopfPeering only, also when watching some namespaces: kopf
    # would otherwise peer (and pause on) a KopfPeering in each watched namespace, which
    # that namespace's tenant can write (issue 15, case 4). Startup handlers run before
    # kopf spawns its peering tasks (reactor/orchestration.py); standalone ignores it.
    settings.peering.clusterwide = True
    hook = memo.config.webhook if memo.config else None
    if hook is not None:
        settings.admission.server = webhook_server(hook)


def webhook_server(hook: WebhookConfig) -> kopf.WebhookServer:
    """kopf's HTTPS server with the mounted certificate (kopf reloads changed files),
    or, for local use, one made now for the host and address (its CA is logged as
    where to find the caBundle)."""
    cert_dir = hook.cert_dir
    if not cert_dir:
        cert_dir = tempfile.mkdtemp(prefix="dask-memory-operator-webhook-")
        names = [n for n in (hook.host, "localhost") if n and not _is_ip(n)]
        ips = [n for n in (hook.host, hook.address, "127.0.0.1") if n and _is_ip(n) and n != "0.0.0.0"]
        write_webhook_certs(Path(cert_dir), names, ips)
        logging.getLogger(__name__).info("Webhook certificate made for %s; its CA: %s/ca.crt",
                                         ", ".join(names + ips), cert_dir)
    files = {"certfile": os.path.join(cert_dir, "tls.crt"), "pkeyfile": os.path.join(cert_dir, "tls.key")}
    if os.path.exists(os.path.join(cert_dir, "ca.crt")):
        files["cafile"] = os.path.join(cert_dir, "ca.crt")
    # kopf's server, answering only the API server's pod creations (webhook/server.py)
    from dask_memory_operator.webhook.server import AdmissionServer

    return AdmissionServer(addr=hook.address, port=hook.port, host=hook.host, client_ca=hook.client_ca,
                           client_names=hook.client_names, **files)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod its service account, elsewhere the kubeconfig (KUBECONFIG or
    ~/.kube/config): kopf's own logins, no client library needed."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    """All handlers, with the intervals ``config`` asks for."""
    registry = kopf.OperatorRegistry()
    policy = (GROUP, VERSION, PLURAL)
    cluster = (DASK_GROUP, DASK_VERSION, "daskclusters")

    kopf.on.startup(registry=registry)(configure_operator)
    kopf.on.startup(registry=registry)(start_background_tasks)
    kopf.on.cleanup(registry=registry)(stop_background_tasks)
    kopf.on.login(registry=registry)(login)
    kopf.index(*cluster, registry=registry)(daskclusters_by_namespace)
    kopf.index(*policy, registry=registry)(memorypolicies_by_namespace)
    kopf.index(DASK_GROUP, DASK_VERSION, "daskautoscalers", registry=registry)(daskautoscalers_by_cluster)
    # --namespace-selector: every handler that acts is filtered (controllers/scope.py)
    governed = register_namespace_scope(registry, config.namespace_selector)
    kopf.on.event(*cluster, registry=registry, when=governed_or_gone(governed))(converge_changed_cluster)

    for decorate in (kopf.on.create, kopf.on.update, kopf.on.resume):
        decorate(*policy, registry=registry, id=f"reconcile_on_{decorate.__name__}", when=governed)(reconcile_policy)
    kopf.timer(*policy, registry=registry, interval=config.resync_interval, id="resync",
               when=governed)(checked_at_each_tick(reconcile_policy, governed))
    kopf.timer(*policy, registry=registry, interval=SCALING_TICK, id="scale",
               when=governed)(checked_at_each_tick(scale_policy_clusters, governed))
    kopf.on.delete(*policy, registry=registry, when=governed)(restore_on_delete)
    if config.webhook is not None:
        # among peers, a standby replica answers too: from the API, not its paused indexes
        mutate = mutate_pod_among_peers if config.peered else mutate_pod
        kopf.on.mutate("v1", "pods", registry=registry, id=HANDLER_ID, operations=["CREATE"],
                       ignore_failures=True, side_effects=False,
                       labels={CLUSTER_LABEL: kopf.PRESENT, COMPONENT_LABEL: kopf.PRESENT})(mutate)
    return registry
