"""A userspace kube-proxy for the process kubelet: Service clusterIP:port to pod IP:targetPort.

In a cluster, kube-proxy makes a Service's ``clusterIP:port`` reach one of its ready
endpoints' ``podIP:targetPort``. Its first implementation, the userspace mode,
did it with a listening socket per Service port and a copy loop per connection, in
round robin over the endpoints; that is what this module does, on loopback.

The process kubelet lets one pod selected by a Service take the Service's clusterIP
as its pod IP (a dask scheduler binds ``<clusterIP>:8786`` itself; see kubelet.py).
Every other Service port gets a listener here: Services whose clusterIP another
Service's pod holds (the operator's metrics Service next to its webhook Service), a
port whose ``targetPort`` differs from ``port`` (443 to 9443), Services with several
pods. The kubelet tells :meth:`UserspaceProxy.sync` which ``(clusterIP, port)`` to
serve and, per listener, a function giving the current endpoints; it is called for
each new connection, so the proxy follows pods as they come, go, and become ready.

A Service port without a ready endpoint gets no listener (the kubelet leaves it out
of ``sync``), so connections are refused, as kube-proxy's iptables mode rejects
them (the userspace mode accepted and closed them; clients such as Dask's take a
refusal for "not up yet" and retry, a reset for a failure); between the last
endpoint going and the next ``sync`` a connection is accepted and closed.

Approximated: TCP only (no UDP or SCTP); no ``sessionAffinity``; endpoints come from
the kubelet's own pods, not from EndpointSlices (the emulator runs no endpoint
controller, and there is one node); Services without a selector are not proxied.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping

logger = logging.getLogger("dask_memory_operator.kubelet.proxy")

#: An address: (ip, port).
Address = tuple[str, int]
#: Gives the ready endpoints of one Service port, looked up per connection.
Endpoints = Callable[[], list[Address]]
#: Seconds to connect to an endpoint before trying the next.
CONNECT_TIMEOUT = 3.0
#: Bytes per read when copying.
CHUNK = 256 * 1024


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
        candidates = self.endpoints()
        if not candidates:
            logger.info("proxy %s %s:%d: no ready endpoint, closing the connection", self.name, *self.address)
            return
        start = next(self._turn)
        for i in range(len(candidates)):
            ip, port = candidates[(start + i) % len(candidates)]
            try:
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(ip, port), CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                logger.info("proxy %s: endpoint %s:%d refused (%s), trying the next", self.name, ip, port, exc)
                continue
            try:
                await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
            finally:
                up_writer.close()
            return


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
