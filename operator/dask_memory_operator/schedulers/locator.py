"""Finding a DaskCluster's scheduler from wherever the operator runs.

dask-kubernetes exposes the scheduler through the Service ``{cluster}-scheduler``,
port ``tcp-comm``. How to reach that Service depends on where the operator runs, and
the choice is explicit (``--scheduler-access``), never a chain of silent fallbacks:

- ``dns``: in the cluster, through the Service's DNS name.
- ``cluster-ip``: straight to the Service's clusterIP (the local sandbox, or a
  laptop with a route into the service network).
- ``port-forward``: from a laptop, through the API server (kr8s port-forward), one
  forward per Service, kept open and reused.
- ``auto``: ``dns`` when running in a pod, ``port-forward`` otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import httpx
import kr8s.asyncio
from kr8s.asyncio.objects import Service

AccessMode = Literal["auto", "dns", "cluster-ip", "port-forward"]
COMM_PORT_NAME = "tcp-comm"


class SchedulerServiceMissing(LookupError):
    """The cluster has no scheduler Service (yet), or it has no tcp-comm port."""


class SchedulerAccessError(RuntimeError):
    """The API server would not tell where the scheduler is (forbidden, unavailable),
    or a port-forward could not be opened. Degrades one cluster, like an
    unreachable scheduler."""


def scheduler_service_name(cluster: str) -> str:
    return f"{cluster}-scheduler"


def comm_port(service: Mapping[str, Any]) -> Mapping[str, Any]:
    """The Service's ``tcp-comm`` port entry."""
    for port in service.get("spec", {}).get("ports") or ():
        if port.get("name") == COMM_PORT_NAME:
            return port
    name = service.get("metadata", {}).get("name")
    raise SchedulerServiceMissing(f"Service {name} has no port named {COMM_PORT_NAME}")


#: Labels dask-kubernetes gives a cluster's scheduler pod; the Service must select them
def scheduler_pod_labels(cluster: str) -> dict[str, str]:
    return {"dask.org/cluster-name": cluster, "dask.org/component": "scheduler"}


def check_routes_to_own_scheduler(service: Mapping[str, Any], cluster: str) -> None:
    """The Service is written by whoever owns the namespace: it must lead to this
    cluster's scheduler pods, in its own namespace, and nowhere else. An
    ExternalName Service, or one without that selector (its endpoints written by
    hand), could send the operator to another tenant's scheduler."""
    spec = service.get("spec") or {}
    name = service.get("metadata", {}).get("name")
    if spec.get("type") == "ExternalName":
        raise SchedulerAccessError(f"Service {name} is of type ExternalName: refused")
    selector = spec.get("selector") or {}
    wanted = scheduler_pod_labels(cluster)
    if any(selector.get(k) != v for k, v in wanted.items()):
        raise SchedulerAccessError(
            f"Service {name} does not select the cluster's scheduler pods "
            f"({', '.join(f'{k}={v}' for k, v in wanted.items())}): refused"
        )


async def _target_port(service: Service, port_spec: Mapping[str, Any]) -> int:
    """The container port behind a Service port (``targetPort`` may name it)."""
    target = port_spec.get("targetPort", port_spec["port"])
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    for pod in await service.ready_pods():
        for container in pod.raw["spec"]["containers"]:
            for port in container.get("ports") or ():
                if port.get("name") == target:
                    return int(port["containerPort"])
    raise SchedulerServiceMissing(
        f"no ready pod of Service {service.namespace}/{service.name} has a port named {target}"
    )


def in_cluster() -> bool:
    return "KUBERNETES_SERVICE_HOST" in os.environ


class SchedulerLocator:
    """Turns (namespace, cluster) into a ``tcp://`` address the operator can reach."""

    mode: AccessMode
    #: Open port-forwards by (namespace, service name, port), for port-forward mode
    _forwards: dict[tuple[str, str, int], tuple[Any, int]]

    def __init__(self, mode: AccessMode = "auto"):
        if mode == "auto":
            mode = "dns" if in_cluster() else "port-forward"
        self.mode = mode
        self._forwards = {}

    async def _get_service(self, namespace: str, cluster: str) -> Service:
        name = scheduler_service_name(cluster)
        try:
            return await Service.get(name, namespace=namespace)
        except kr8s.NotFoundError:
            raise SchedulerServiceMissing(
                f"Service {namespace}/{name} not found (scheduler not created yet?)"
            ) from None
        except (kr8s.ServerError, kr8s.APITimeoutError, httpx.HTTPError, OSError) as e:
            raise SchedulerAccessError(f"cannot read Service {namespace}/{name}: {e}") from None

    async def address(self, namespace: str, cluster: str) -> str:
        service = await self._get_service(namespace, cluster)
        check_routes_to_own_scheduler(service.raw, cluster)
        port_spec = comm_port(service.raw)
        port = int(port_spec["port"])
        name = service.name
        if self.mode == "dns":
            return f"tcp://{name}.{namespace}.svc:{port}"
        if self.mode == "cluster-ip":
            ip = service.raw.get("spec", {}).get("clusterIP")
            if not ip or ip == "None":
                raise SchedulerServiceMissing(f"Service {namespace}/{name} has no clusterIP")
            return f"tcp://{ip}:{port}"
        return f"tcp://127.0.0.1:{await self._forward(service, namespace, port_spec)}"

    async def _forward(self, service: Service, namespace: str, port_spec: Mapping[str, Any]) -> int:
        key = (namespace, service.name, int(port_spec["port"]))
        if key in self._forwards:
            return self._forwards[key][1]
        try:
            # kr8s forwards to a ready pod of the Service: the pod's port is wanted
            forward = service.portforward(await _target_port(service, port_spec), local_port="auto")
            local_port = await forward.start()
        except (kr8s.ServerError, kr8s.APITimeoutError, httpx.HTTPError, OSError) as e:
            raise SchedulerAccessError(f"cannot port-forward to Service {namespace}/{service.name}: {e}") from None
        self._forwards[key] = (forward, local_port)
        return local_port

    async def forget(self, namespace: str, cluster: str) -> None:
        """Drop a cached port-forward, e.g. after the scheduler was unreachable."""
        for key in [k for k in self._forwards if k[:2] == (namespace, scheduler_service_name(cluster))]:
            forward, _ = self._forwards.pop(key)
            await forward.stop()

    async def close(self) -> None:
        for forward, _ in self._forwards.values():
            await forward.stop()
        self._forwards.clear()
