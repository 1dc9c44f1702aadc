"""
Deletion as a real kube-apiserver answers it: generation, response bodies, watch events.

Each test runs the emulator over real HTTP (see test_emulator.py for the helpers).
"""
from __future__ import annotations

import asyncio
from typing import Any

from test_emulator import CONFIGMAPS, SERVICES, WIDGETS, Http, holds, http, server, wait_for, widget, widgets

__all__ = ['http', 'server', 'widgets']  # fixtures used here
PODS = '/api/v1/namespaces/default/pods'


async def watch_until_deleted(http: Http, path: str, events: list[dict[str, Any]], **params: Any) -> None:
    """Collect a watch's events until a DELETED one (or the server's timeout)."""
    params = {'watch': 'true', 'timeoutSeconds': '10', **{k: str(v) for k, v in params.items()}}
    async with http.session.get(http.url + path, params=params) as resp:
        async for line in resp.content:
            if line.strip():
                events.append(__import__('json').loads(line))
                if events[-1]['type'] == 'DELETED':
                    return


async def test_generation_bumped_when_deletion_is_requested(widgets: Http) -> None:
    http = widgets
    status, w = await http.post(WIDGETS, {**widget('held'), 'metadata': {'name': 'held', 'finalizers': ['x.io/f']}})
    assert w['metadata']['generation'] == 1
    status, w = await http.delete(WIDGETS + '/held')
    # BeforeDelete/markAsDeleting bump metadata.generation once, as deletionTimestamp is set.
    assert status == 200 and w['metadata']['deletionTimestamp'] and w['metadata']['generation'] == 2
    status, again = await http.delete(WIDGETS + '/held')
    assert status == 200 and again['metadata']['generation'] == 2  # already deleting: no second bump
    # Kinds without a generation (ConfigMaps) get none.
    await http.post(CONFIGMAPS, {'metadata': {'name': 'held', 'finalizers': ['x.io/f']}})
    status, cm = await http.delete(CONFIGMAPS + '/held')
    assert status == 200 and 'generation' not in cm['metadata']
