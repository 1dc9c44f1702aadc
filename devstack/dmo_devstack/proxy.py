"""A userspace kube-proxy for the process kubelet: Service clusterIP:port to its EndpointSlices' endpoints.

In a cluster, kube-proxy makes a Service's ``clusterIP:port`` reach one of its ready
endpoints. Its first implementation, the userspace mode, did it with a listening
socket per Service port and a copy loop per connection, in round robin over the
endpoints; that is what this module does, on loopback.

The endpoints are kube-proxy's: those of EVERY EndpointSlice of the Service's
namespace labelled ``kubernetes.io/service-name: <service>``, whoever wrote it (the
endpoint controller for a Service with a selector, see kubelet.py, or anyone by hand,
for a Service with or without a selector), each Service port matched to the slice's
port of the same name, an endpoint used unless its ``conditions.ready`` is false. So a
slice written by hand that points at another namespace's pod IP is followed here as in
a real cluster (the CVE-2021-25740 class, which the operator's locator must not fall
for). Pods never hold a clusterIP: every Service port with a clusterIP is served here
(:func:`service_ports`), and the endpoints are looked up from the kubelet's watched
slices for each new connection, so the proxy follows pods as they come, go, and
become ready.

A Service port without a ready endpoint gets no listener, so connections are
refused, as kube-proxy's iptables mode rejects them (the userspace mode accepted and
closed them; clients such as Dask's take a refusal for "not up yet" and retry, a
reset for a failure); between the last endpoint going and the next ``sync`` a
connection is accepted and closed. An endpoint can be ready and still refuse: a
Dask scheduler whose readinessProbe is the dashboard's ``/health`` (dask-kubernetes'
documented one) answers it before its comm port listens. Through iptables the pod's
refusal reaches the client, which retries; here the connection is accepted already,
so the proxy retries for it (``REFUSED_RETRY_SECONDS``), then closes it.

Approximated: TCP only (no UDP or SCTP); IPv4 slices only; no ``sessionAffinity``,
no ``internalTrafficPolicy``/topology hints, no fallback to serving-terminating
endpoints; ExternalName and headless Services get nothing (as kube-proxy); one node.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

logger = logging.getLogger("dask_memory_operator.kubelet.proxy")

#: An address: (ip, port).
Address = tuple[str, int]
#: Gives the ready endpoints of one Service port, looked up per connection.
Endpoints = Callable[[], list[Address]]
#: Seconds to connect to an endpoint before trying the next.
CONNECT_TIMEOUT = 3.0
#: Bytes per read when copying.
CHUNK = 256 * 1024
#: Seconds a connection accepted while every endpoint refuses is held, trying them
#: again every step (see the module docstring).
REFUSED_RETRY_SECONDS = 10.0
REFUSED_RETRY_STEP = 0.1


#: The label tying an EndpointSlice to its Service, and the port a slice gives to a Service port.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def slice_endpoints(namespace: str, service: str, port_name: str,
                    slices: Iterable[Mapping[str, Any]]) -> list[Address]:
    """The ready endpoints of one Service port, from every slice labelled with the
    Service's name in its namespace (kube-proxy's EndpointSliceCache merges them all)."""
    found: set[Address] = set()
    for item in slices:
        meta = item.get("metadata") or {}
        if meta.get("namespace") != namespace or (meta.get("labels") or {}).get(SERVICE_NAME_LABEL) != service:
            continue
        if item.get("addressType") != "IPv4":
            continue
        for port in item.get("ports") or ():
            if (port.get("name") or "") != port_name or port.get("protocol", "TCP") != "TCP" \
                    or not isinstance(port.get("port"), int):
                continue
            for endpoint in item.get("endpoints") or ():
                if (endpoint.get("conditions") or {}).get("ready") is False:
                    continue  # unset means ready, as kube-proxy reads it
                for address in (endpoint.get("addresses") or ())[:1]:
                    found.add((address, port["port"]))
    return sorted(found)


def service_ports(services: Iterable[Mapping[str, Any]],
                  slices: Mapping[str, Mapping[str, Any]]) -> dict[Address, tuple[str, Endpoints]]:
    """Every TCP port of every Service with a clusterIP (not ExternalName, not headless)
    that has a ready endpoint, with a function giving its endpoints from ``slices`` (a
    cache kept current by a watch) at call time."""
    wanted: dict[Address, tuple[str, Endpoints]] = {}
    for svc in services:
        spec = svc.get("spec") or {}
        ip = spec.get("clusterIP")
        if not ip or ip == "None" or spec.get("type") == "ExternalName":
            continue
        namespace, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        for entry in spec.get("ports") or []:
            if entry.get("protocol", "TCP") != "TCP":
                continue
            port_name = entry.get("name") or ""

            def endpoints(namespace=namespace, name=name, port_name=port_name) -> list[Address]:
                return slice_endpoints(namespace, name, port_name, list(slices.values()))

            if endpoints():
                wanted[(ip, int(entry["port"]))] = (f"{namespace}/{name}", endpoints)
    return wanted


class _Listener:
    """One ``clusterIP:port``: accepts, picks an endpoint, copies both ways."""

    def __init__(self, address: Address, name: str, endpoints: Endpoints):
        self.address = address
        self.name = name
        self.endpoints = endpoints
        self.server: asyncio.base_events.Server | None = None
        self._turn = itertools.count()
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, *self.address)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()  # the listening socket closes at once; connections go on
        for task in self._connections:
            task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REFUSED_RETRY_SECONDS
        while True:
            upstream = await self._connect()
            if upstream is not None:
                break
            if loop.time() > deadline:
                logger.info("proxy %s %s:%d: no endpoint took the connection, closing it", self.name, *self.address)
                return
            await asyncio.sleep(REFUSED_RETRY_STEP)
        up_reader, up_writer = upstream
        try:
            await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
        finally:
            up_writer.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A connection to one of the ready endpoints, in round robin; None if all refuse."""
        candidates = self.endpoints()
        start = next(self._turn)
        for i in range(len(candidates)):
            ip, port = candidates[(start + i) % len(candidates)]
            try:
                return await asyncio.wait_for(asyncio.open_connection(ip, port), CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                logger.info("proxy %s: endpoint %s:%d refused (%s), trying the next", self.name, ip, port, exc)
        return None


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close the other side (as TCP would pass the FIN on)."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


class UserspaceProxy:
    """The listeners of all proxied Service ports."""

    def __init__(self) -> None:
        self.listeners: dict[Address, _Listener] = {}

    async def sync(self, wanted: Mapping[Address, tuple[str, Endpoints]]) -> bool:
        """Serve exactly ``wanted`` (address -> (service name, endpoints)); False when a
        listener could not bind yet (the address still in use), to be retried."""
        for address in [a for a in self.listeners if a not in wanted]:
            self.listeners.pop(address).close()
            logger.info("proxy: stopped %s:%d", *address)
        complete = True
        for address, (name, endpoints) in wanted.items():
            listener = self.listeners.get(address)
            if listener is not None:
                listener.endpoints = endpoints
                continue
            listener = _Listener(address, name, endpoints)
            try:
                await listener.start()
            except OSError as exc:
                logger.warning("proxy %s: cannot listen on %s:%d yet: %s", name, *address, exc)
                complete = False
                continue
            self.listeners[address] = listener
            logger.info("proxy %s: listening on %s:%d", name, *address)
        return complete

    def close(self) -> None:
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()
