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
"""

from __future__ import annotations

import asyncio
from typing import Any

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
