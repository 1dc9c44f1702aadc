"""The process kubelet's userspace kube-proxy (dmo_devstack.proxy), on loopback."""

from __future__ import annotations

import asyncio
import socket

from dmo_devstack import proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_ready_endpoint_that_refuses_at_first_is_tried_again_for_the_client(monkeypatch):
    """A Dask scheduler is Ready by its dashboard's /health before its comm port
    listens. Through iptables its refusal reaches the client, which retries; the
    userspace proxy has accepted the connection already, so it retries for it."""
    monkeypatch.setattr(proxy, "REFUSED_RETRY_STEP", 0.05)
    backend_port = free_port()
    listener = proxy._Listener(("127.0.0.1", free_port()), "ns/svc", lambda: [("127.0.0.1", backend_port)])
    await listener.start()
    try:
        reader, writer = await asyncio.open_connection(*listener.address)
        writer.write(b"hello")
        await asyncio.sleep(0.3)  # the proxy is trying the refusing endpoint meanwhile

        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.read(5))
            await w.drain()
            w.close()

        backend = await asyncio.start_server(echo, "127.0.0.1", backend_port)
        try:
            assert await asyncio.wait_for(reader.read(5), 5) == b"hello"
        finally:
            writer.close()
            backend.close()
    finally:
        listener.close()


async def test_a_connection_no_endpoint_takes_is_closed_after_the_retries(monkeypatch):
    monkeypatch.setattr(proxy, "REFUSED_RETRY_SECONDS", 0.3)
    monkeypatch.setattr(proxy, "REFUSED_RETRY_STEP", 0.05)
    listener = proxy._Listener(("127.0.0.1", free_port()), "ns/svc", lambda: [("127.0.0.1", free_port())])
    await listener.start()
    try:
        reader, writer = await asyncio.open_connection(*listener.address)
        assert await asyncio.wait_for(reader.read(1), 5) == b""  # closed, not hung
        writer.close()
    finally:
        listener.close()
