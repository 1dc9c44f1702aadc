"""The operator's one kr8s client: the server's ``/version`` asked once per process.

kr8s makes its client by awaiting it, and awaiting it asks the server for its
``/version``: ``kr8s.asyncio.api()`` does at every call (it returns the instance it
keeps, awaited again), and so does every object built without ``api=`` when awaited
or read (``DaskWorkerGroup.get``, ``await Event(body)``, ``kr8s.asyncio.get``). On a
real server that was 429 of the 966 requests of two busy clusters in three minutes
(issue 16). Everything the operator asks through kr8s goes through :func:`client`,
made once per event loop (a process has one; tests have one per test) and kept.

Credentials that expire are not a reason to make a new one: kr8s' client signs in
again by itself when the server answers 401.

The watch-backed caches list and watch through a client of their own
(:class:`WatchHttp`), not kr8s': see there why.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import kr8s.asyncio

#: The client of the running event loop, as a task (concurrent first callers share it)
_made: tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = None


async def client() -> Any:
    """The ``kr8s.asyncio.Api`` of this event loop (KUBECONFIG, or the pod's service
    account), made at the first call; a first call that failed is tried again."""
    global _made
    loop = asyncio.get_running_loop()
    if _made is None or _made[0] is not loop or _failed(_made[1]):
        _made = (loop, loop.create_task(kr8s.asyncio.api(), name="kr8s client"))
    # shielded: a caller cancelled while it is made does not cancel it for the others
    return await asyncio.shield(_made[1])


def _failed(task: asyncio.Task[Any]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


# --- the watches' own HTTP client --------------------------------------------------------

#: Connections kept beyond one per watch stream: the LISTs (one at a time per informer,
#: few at once in practice)
LIST_CONNECTIONS = 8
#: Seconds to connect, to send a request, to wait for a free connection of the pool
CONNECT_TIMEOUT = 10.0
#: Seconds between two reloads of the credentials after 401 (a token that expired)
REAUTH_INTERVAL = 10.0


class ApiStatus(Exception):
    """The API answered a list or watch with an error status (``code``: 403, 410, ...)."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class WatchHttp:
    """The HTTP client of the watch-backed caches (:mod:`dask_memory_operator.watches`),
    apart from the kr8s client of everything else.

    Why apart: kr8s signs in again and *replaces its one session* on a 401 or a 403
    (kr8s/_api.py, ``call_api``), which closes every stream of that session: one
    namespace refusing a LIST would break every watch and every write in flight, and
    again at each retry. Its pool (httpx's 100 connections, no timeout) would also
    fill with long-lived watch streams (five per watched namespace), leaving the
    writes waiting. Here a 403 is an answer for the caller (its cache is not synced),
    never a reason to sign in again; a 401 reloads the credentials (a token that
    expired, at most every REAUTH_INTERVAL seconds) for the requests after it; the pool
    holds a connection for each stream and a few LISTs; every request has timeouts.
    """

    def __init__(self, streams: int):
        self.streams = streams
        self._session: httpx.AsyncClient | None = None
        self._auth: Any = None
        self._lock = asyncio.Lock()
        self._reauthenticated = 0.0

    async def _client(self) -> httpx.AsyncClient:
        async with self._lock:
            if self._session is None:
                # credentials of their own (KUBECONFIG, or the pod's service account, as
                # kr8s.asyncio.api()): reloading them leaves the kr8s client alone
                from kr8s._auth import KubeAuth

                self._auth = await KubeAuth()
                connections = self.streams + LIST_CONNECTIONS
                self._session = httpx.AsyncClient(
                    base_url=self._auth.server, headers=self._headers(), verify=await self._auth.ssl_context(),
                    proxy=self._auth.proxy, follow_redirects=True, timeout=httpx.Timeout(CONNECT_TIMEOUT),
                    limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))
            return self._session

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": "dask-memory-operator (watches)", "Accept": "application/json"}
        if self._auth.token:
            headers["Authorization"] = f"Bearer {self._auth.token}"
        return headers

    @contextlib.asynccontextmanager
    async def get(self, path: str, params: dict[str, Any], read_timeout: float,
                  stream: bool = False) -> AsyncIterator[httpx.Response]:
        """GET ``path``; an error status raises :class:`ApiStatus` (its body read)."""
        session = await self._client()
        timeout = httpx.Timeout(CONNECT_TIMEOUT, read=read_timeout)
        extensions = {"sni_hostname": self._auth.tls_server_name} if self._auth.tls_server_name else None
        request = session.build_request("GET", path, params=params, timeout=timeout, extensions=extensions)
        response = await session.send(request, stream=stream)
        try:
            if response.is_error:
                await response.aread()
                await self._refused(response)
            yield response
        finally:
            await response.aclose()

    async def _refused(self, response: httpx.Response) -> None:
        if response.status_code == 401:
            await self._reauthenticate()
        try:
            message = str(response.json().get("message"))
        except (ValueError, AttributeError):
            message = response.text
        raise ApiStatus(response.status_code, message[:300])

    async def _reauthenticate(self) -> None:
        if time.monotonic() - self._reauthenticated < REAUTH_INTERVAL:
            return
        self._reauthenticated = time.monotonic()
        await self._auth.reauthenticate()
        if self._session is not None:
            self._session.headers.update(self._headers())  # for the requests after this one

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.aclose()
            self._session = None
