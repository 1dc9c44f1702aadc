"""Finding a DaskCluster's scheduler: its own pod, never a name a tenant can redirect.

dask-kubernetes publishes the scheduler as the Service ``{cluster}-scheduler``, port
``tcp-comm``. The operator does not go through that Service. Kubernetes routes a
Service's name and clusterIP to the endpoints of every EndpointSlice labelled
``kubernetes.io/service-name: <svc>``, and whoever owns the namespace can write such a
slice by hand, pointing at another namespace's pod IP (the CVE-2021-25740 class): the
operator would then configure, read and retire the workers of another tenant's
scheduler. Checking the Service's type and selector does not help; the slices decide.

So the locator asks the API for the scheduler pod itself and connects to its pod IP:

- the pods of the cluster's namespace labelled ``dask.org/cluster-name=<cluster>``,
  ``dask.org/component=scheduler`` (one LIST, bounded by ``MAX_SCHEDULER_PODS``), not
  being deleted, phase Running, condition Ready;
- owned through the DaskCluster's own objects, as dask-kubernetes and the Deployment
  controller make them: Pod -> ReplicaSet -> Deployment ``<cluster>-scheduler`` ->
  DaskCluster ``<cluster>``, each link the owner's controller reference, matched by uid.
  The local stack's process kubelet makes pods straight from Deployments (no
  ReplicaSet), so Pod -> Deployment is accepted too; both are objects of the same
  namespace, so neither admits a pod the other would refuse from another namespace;
- not ``hostNetwork`` (its "pod IP" is the node's, where anything on the node listens);
- the port: the container port named ``tcp-comm``, else the Service's ``tcp-comm``
  ``targetPort`` (a number, or a container port name) on that same pod: the Service
  may choose the port, never the address.

What is trusted: the API server, and the ``status.podIP`` the node's kubelet writes
(tenants do not get ``pods/status``). Not trusted: Services, EndpointSlices, DNS, and
anything else a tenant writes. A tenant's own scheduler pod may of course forward what
it receives anywhere its network allows; NetworkPolicies keep it from reaching other
tenants' schedulers.

Reads: each contact looks the cluster's scheduler pods up in the operator's watch of
pods (:mod:`dask_memory_operator.watches`), or, when that cache cannot vouch for them
(not synced yet, its watch down) or there is none, lists them (one LIST, as the
Service was read once before). Pod IPs are reused, so a remembered address could by
now be another tenant's pod: a pod stops being a candidate with the event that marks
it deleted, long before its IP is free. The ownership chain (ReplicaSet, Deployment,
DaskCluster) and the port are checked once per scheduler pod (by uid) and kept until
:meth:`SchedulerLocator.forget`, which the reconciler calls when the scheduler was
unreachable: the ReplicaSet, Deployment and Service from the caches when they hold
the very object (by uid), from the API otherwise (a refusal is remembered, so it must
not come from a cache a moment behind); the DaskCluster from the API.

The mode (``--scheduler-access``) is explicit, never a chain of silent fallbacks:

- ``pod-ip``: straight to the pod IP (in the cluster, or wherever pod IPs are
  routable, as on the local stack).
- ``port-forward``: from a laptop, through the API server (kr8s port-forward) to that
  pod, one forward per scheduler pod, kept open and reused.
- ``auto``: ``pod-ip`` when running in a pod, ``port-forward`` otherwise.
- ``dns`` and ``cluster-ip`` are the names of the old modes that went through the
  Service; both are kept so that existing command lines still start, and both now
  mean ``pod-ip`` (with a warning).
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal

import httpx
import kr8s
from kr8s.asyncio.objects import Pod

from dask_memory_operator import kubeclient
from dask_memory_operator.watches import (
    Owner,
    PodRecord,
    ServiceRecord,
    Watches,
    deployment_record,
    owned_record,
    pod_record,
    service_record,
)

logger = logging.getLogger(__name__)

AccessMode = Literal["auto", "pod-ip", "port-forward", "dns", "cluster-ip"]
#: The modes and what the deprecated names now stand for.
MODES = ("auto", "pod-ip", "port-forward")
DEPRECATED_MODES = {"dns": "pod-ip", "cluster-ip": "pod-ip"}
COMM_PORT_NAME = "tcp-comm"
#: At most this many pods labelled as one cluster's scheduler are looked at (one
#: page); more is a namespace's own mess, reported on its cluster.
MAX_SCHEDULER_PODS = 16
#: Of those, the newest checked for ownership (a replacement has two for a while)
MAX_CHECKED_PODS = 2
#: Refused pods remembered by (uid, resourceVersion)
MAX_REMEMBERED_REFUSALS = 1024
DASK_GROUP = "kubernetes.dask.org"


class SchedulerServiceMissing(LookupError):
    """The cluster has no running scheduler pod (yet): being created or restarted."""


class SchedulerAccessError(RuntimeError):
    """The API server would not tell where the scheduler is (forbidden, unavailable),
    the only scheduler pods there are cannot be trusted (not owned by the DaskCluster,
    hostNetwork), or a port-forward could not be opened. Degrades one cluster, like
    an unreachable scheduler."""


def scheduler_service_name(cluster: str) -> str:
    return f"{cluster}-scheduler"


def scheduler_deployment_name(cluster: str) -> str:
    return f"{cluster}-scheduler"


#: Labels dask-kubernetes gives a cluster's scheduler pod
def scheduler_pod_labels(cluster: str) -> dict[str, str]:
    return {"dask.org/cluster-name": cluster, "dask.org/component": "scheduler"}


def in_cluster() -> bool:
    return "KUBERNETES_SERVICE_HOST" in os.environ


class SchedulerLocator:
    """Turns (namespace, cluster) into a ``tcp://`` address of the cluster's own scheduler pod."""

    mode: Literal["pod-ip", "port-forward"]
    #: Scheduler pods checked, by (namespace, cluster): (pod uid, pod IP, port).
    _verified: dict[tuple[str, str], tuple[str, str, int]]
    #: Why a pod was refused, by (uid, resourceVersion): not asked again until it changes
    _refused: dict[tuple[str, str], str]
    #: Open port-forwards by (namespace, cluster): (pod uid, forward, local port).
    _forwards: dict[tuple[str, str], tuple[str, Any, int]]

    def __init__(self, mode: AccessMode = "auto", watches: Watches | None = None):
        if mode in DEPRECATED_MODES:
            logger.warning("--scheduler-access %s is deprecated: the operator connects to the scheduler "
                           "pod's own IP (%s), never through its Service", mode, DEPRECATED_MODES[mode])
            mode = DEPRECATED_MODES[mode]
        if mode == "auto":
            mode = "pod-ip" if in_cluster() else "port-forward"
        if mode not in ("pod-ip", "port-forward"):
            raise ValueError(f"unknown scheduler access mode {mode!r}")
        self.mode = mode
        #: The operator's caches of pods, Deployments, ReplicaSets and Services (None:
        #: every read from the API)
        self.watches = watches
        self._verified = {}
        self._refused = {}
        self._forwards = {}
        #: A lock per cluster while a contact looks its scheduler up (dropped by itself
        #: once no contact holds or waits for it)
        self._checking: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()

    async def address(self, namespace: str, cluster: str) -> str:
        pod, port = await self.scheduler_pod(namespace, cluster)
        if self.mode == "pod-ip":
            return f"tcp://[{pod.ip}]:{port}" if ":" in pod.ip else f"tcp://{pod.ip}:{port}"
        return f"tcp://127.0.0.1:{await self._forward(namespace, cluster, pod, port)}"

    async def scheduler_pod(self, namespace: str, cluster: str) -> tuple[PodRecord, int]:
        """The cluster's running scheduler pod, owned by its DaskCluster, and the port
        of its comm; SchedulerServiceMissing when there is none (yet), SchedulerAccessError
        when the only candidates are refused or the API cannot be read."""
        key = (namespace, cluster)
        lock = self._checking.get(key)
        if lock is None:
            lock = self._checking[key] = asyncio.Lock()
        # one contact checks a new pod; the others (a resync and a scaling pass start
        # together) find it checked
        async with lock:
            return await self._scheduler_pod(namespace, cluster)

    async def _scheduler_pod(self, namespace: str, cluster: str) -> tuple[PodRecord, int]:
        key = (namespace, cluster)
        pods = await self._scheduler_pods(namespace, cluster)
        candidates = [p for p in pods if p.cluster == cluster and p.component == "scheduler" and p.ready]
        # The newest first: during a replacement, the new scheduler is the one to configure.
        candidates.sort(key=lambda p: p.created, reverse=True)
        refusals = []
        # A tenant may add look-alike pods: only the newest few are checked, and a
        # refusal is remembered until the pod changes, so they cost no reads per contact
        for pod in candidates[:MAX_CHECKED_PODS]:
            known = self._verified.get(key)
            if known is not None and known[:2] == (pod.uid, pod.ip):
                return pod, known[2]
            stamp = (pod.uid, pod.resource_version)
            reason = self._refused.get(stamp)
            if reason is None:
                reason = await self._refusal(namespace, cluster, pod)
                if reason is not None:
                    if len(self._refused) >= MAX_REMEMBERED_REFUSALS:
                        self._refused.clear()
                    self._refused[stamp] = reason
            if reason is None:
                port = await self._comm_port(namespace, cluster, pod)
                self._verified[key] = (pod.uid, pod.ip, port)
                return pod, port
            refusals.append(f"pod {pod.name}: {reason}")
        self._verified.pop(key, None)
        if refusals:
            raise SchedulerAccessError(
                f"no trusted scheduler pod of DaskCluster {namespace}/{cluster}: " + "; ".join(refusals[:3]))
        raise SchedulerServiceMissing(
            f"no running scheduler pod of DaskCluster {namespace}/{cluster} owned by DaskCluster {cluster} "
            "(scheduler not created or not ready yet?)")

    async def _scheduler_pods(self, namespace: str, cluster: str) -> list[PodRecord]:
        """The pods labelled as the cluster's scheduler: from the cache, else one LIST."""
        cached = self.watches.of_cluster("pods", namespace, cluster) if self.watches else None
        if cached is not None:
            pods = [p for p in cached if p.component == "scheduler"]
            if len(pods) > MAX_SCHEDULER_PODS:
                raise SchedulerAccessError(f"more than {MAX_SCHEDULER_PODS} objects are the scheduler pods "
                                           f"of DaskCluster {namespace}/{cluster}: refused")
            return pods
        selector = ",".join(f"{k}={v}" for k, v in scheduler_pod_labels(cluster).items())
        items = await self._list("v1", namespace, "pods", {"labelSelector": selector, "limit": MAX_SCHEDULER_PODS},
                                 f"the scheduler pods of DaskCluster {namespace}/{cluster}")
        return [pod_record(p) for p in items]

    async def _refusal(self, namespace: str, cluster: str, pod: PodRecord) -> str | None:
        """Why the pod is not the cluster's own scheduler; None when it is."""
        if pod.host_network:
            return "uses hostNetwork (its IP is the node's): refused"
        ref = pod.owner
        if ref is not None and ref.kind == "ReplicaSet" and ref.api_version == "apps/v1":
            replicaset = await self._owner("apps/v1", namespace, "replicasets", ref, owned_record)
            if replicaset is None:
                return f"its ReplicaSet {ref.name} is gone"
            ref = replicaset.owner
        deployment_name = scheduler_deployment_name(cluster)
        if ref is None or ref.kind != "Deployment" or ref.api_version != "apps/v1" or ref.name != deployment_name:
            return f"not controlled by Deployment {deployment_name}: refused"
        deployment = await self._owner("apps/v1", namespace, "deployments", ref, deployment_record)
        if deployment is None:
            return f"its Deployment {deployment_name} is gone"
        ref = deployment.owner
        if ref is None or ref.kind != "DaskCluster" or ref.api_version.split("/")[0] != DASK_GROUP \
                or ref.name != cluster:
            return f"Deployment {deployment_name} is not controlled by DaskCluster {cluster}: refused"
        if await self._owner(f"{DASK_GROUP}/v1", namespace, "daskclusters", ref, owned_record) is None:
            return f"Deployment {deployment_name} belongs to a DaskCluster {cluster} that is gone"
        return None

    async def _owner(self, version: str, namespace: str, plural: str, ref: Owner,
                     record: Callable[[Mapping[str, Any]], Any]) -> Any:
        """The object ``ref`` names, if it is the one of that uid; None when not. The
        cache is trusted for what it finds; what it does not is asked of the API (a
        refusal is remembered: it must not come from a cache a moment behind)."""
        if self.watches is not None:
            vouched, found = self.watches.get(plural, namespace, ref.name)
            if vouched and found is not None and found.uid == ref.uid:
                return found
        obj = await self._get(version, namespace, plural, ref.name)
        found = record(obj) if obj is not None else None
        return found if found is not None and found.uid == ref.uid else None

    async def _comm_port(self, namespace: str, cluster: str, pod: PodRecord) -> int:
        port = pod.port(COMM_PORT_NAME)
        if port is not None:
            return port
        # No named port in the pod: the Service says which of the pod's ports it is.
        name = scheduler_service_name(cluster)
        service = await self._service(namespace, name)
        if service is None:
            raise SchedulerServiceMissing(
                f"scheduler pod {pod.name} has no port named {COMM_PORT_NAME} "
                f"and Service {namespace}/{name} is not found")
        if service.comm_target is None:
            raise SchedulerServiceMissing(f"Service {name} has no port named {COMM_PORT_NAME}")
        port = pod.port(service.comm_target)
        if port is None:
            raise SchedulerServiceMissing(
                f"scheduler pod {pod.name} has no port {service.comm_target} "
                f"(the targetPort of Service {name}'s {COMM_PORT_NAME})")
        return port

    async def _service(self, namespace: str, name: str) -> ServiceRecord | None:
        if self.watches is not None:
            vouched, found = self.watches.get("services", namespace, name)
            if vouched and found is not None:
                return found
        obj = await self._get("v1", namespace, "services", name)
        return service_record(obj) if obj is not None else None

    async def _list(self, version: str, namespace: str, plural: str, params: dict[str, Any],
                    what: str) -> list[dict[str, Any]]:
        """One page of a namespaced LIST; more than ``params["limit"]`` is refused."""
        base = "/apis" if "/" in version else "/api"
        try:
            api = await kubeclient.client()
            async with api.call_api("GET", version=version, base=base, namespace=namespace,
                                    url=plural, params=params) as response:
                data = response.json()
        except (kr8s.ServerError, kr8s.APITimeoutError, httpx.HTTPError, OSError) as e:
            raise SchedulerAccessError(f"cannot read {what}: {e}") from None
        if (data.get("metadata") or {}).get("continue"):
            raise SchedulerAccessError(f"more than {params['limit']} objects are {what}: refused")
        return [item for item in data.get("items") or () if isinstance(item, dict)]

    async def _get(self, version: str, namespace: str, plural: str, name: str) -> dict[str, Any] | None:
        """One object by name (a LIST with a field selector, as kr8s reads by name and the
        chart's RBAC grants), None when there is none."""
        items = await self._list(version, namespace, plural,
                                 {"fieldSelector": f"metadata.name={name}", "limit": 1},
                                 f"{plural} {namespace}/{name}")
        return next((i for i in items if (i.get("metadata") or {}).get("name") == name), None)

    async def _forward(self, namespace: str, cluster: str, pod: PodRecord, port: int) -> int:
        key = (namespace, cluster)
        known = self._forwards.get(key)
        if known is not None:
            if known[0] == pod.uid:
                return known[2]
            await self.forget(namespace, cluster)  # the scheduler pod was replaced
        try:
            target = Pod({"metadata": {"name": pod.name, "namespace": namespace}}, api=await kubeclient.client())
            forward = target.portforward(port, local_port="auto")
            local_port = await forward.start()
        except (kr8s.ServerError, kr8s.APITimeoutError, httpx.HTTPError, OSError) as e:
            raise SchedulerAccessError(
                f"cannot port-forward to scheduler pod {namespace}/{pod.name}: {e}") from None
        self._forwards[key] = (pod.uid, forward, local_port)
        return local_port

    async def forget(self, namespace: str, cluster: str) -> None:
        """Drop what is known of the cluster's scheduler pod (and its port-forward),
        e.g. after it was unreachable: the next contact looks it up again."""
        self._verified.pop((namespace, cluster), None)
        known = self._forwards.pop((namespace, cluster), None)
        if known is not None:
            await known[1].stop()

    async def close(self) -> None:
        for _, forward, _ in self._forwards.values():
            await forward.stop()
        self._forwards.clear()
        self._verified.clear()
