"""
Deletion as a real kube-apiserver answers it: generation, response bodies, watch events.

Each test runs the emulator over real HTTP (see test_emulator.py for the helpers).
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

from test_emulator import CONFIGMAPS, SERVICES, WIDGETS, Http, http, server, widget, widgets

__all__ = ['http', 'server', 'widgets']  # fixtures used here
PODS = '/api/v1/namespaces/default/pods'


async def watch_until_deleted(http: Http, path: str, events: list[dict[str, Any]], **params: Any) -> None:
    """Collect a watch's events until a DELETED one (or the server's timeout)."""
    params = {'watch': 'true', 'timeoutSeconds': '10', **{k: str(v) for k, v in params.items()}}
    async with http.session.get(http.url + path, params=params) as resp:
        async for line in resp.content:
            if line.strip():
                events.append(json.loads(line))
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


async def test_delete_answers_as_the_registry_does(widgets: Http) -> None:
    http = widgets
    # Most kinds: a Status naming what was deleted (finalizeDelete).
    _, cm = await http.post(CONFIGMAPS, {'metadata': {'name': 'c'}})
    status, body = await http.delete(CONFIGMAPS + '/c')
    assert status == 200 and body['kind'] == 'Status' and body['status'] == 'Success'
    assert body['details'] == {'name': 'c', 'group': '', 'kind': 'configmaps', 'uid': cm['metadata']['uid']}
    await http.post(WIDGETS, widget('w'))
    status, body = await http.delete(WIDGETS + '/w')
    assert status == 200 and body['kind'] == 'Status' and body['details']['kind'] == 'widgets'
    # Pods and Services (ReturnDeletedObject): the deleted object itself.
    _, svc = await http.post(SERVICES, {'metadata': {'name': 's'}, 'spec': {'ports': [{'port': 80}]}})
    status, body = await http.delete(SERVICES + '/s')
    assert status == 200 and body['kind'] == 'Service' and body['metadata']['uid'] == svc['metadata']['uid']
    await http.post(PODS, {'metadata': {'name': 'p'}, 'spec': {'containers': [{'name': 'c', 'image': 'x'}]}})
    status, body = await http.delete(PODS + '/p')  # not on a node: deleted at once
    assert status == 200 and body['kind'] == 'Pod' and await http.gone(PODS + '/p')
    # Held by finalizers: the object, with its deletionTimestamp, whatever the kind.
    await http.post(CONFIGMAPS, {'metadata': {'name': 'held', 'finalizers': ['x.io/f']}})
    status, body = await http.delete(CONFIGMAPS + '/held')
    assert status == 200 and body['kind'] == 'ConfigMap' and body['metadata']['deletionTimestamp']


async def test_removing_the_last_finalizer_deletes_without_a_modified_event(widgets: Http) -> None:
    http = widgets
    await http.post(WIDGETS, {**widget('w'), 'metadata': {'name': 'w', 'finalizers': ['x.io/f']}})
    status, deleting = await http.delete(WIDGETS + '/w')
    events: list[dict[str, Any]] = []
    task = asyncio.create_task(watch_until_deleted(
        http, WIDGETS, events, resourceVersion=deleting['metadata']['resourceVersion']))
    status, body = await http.patch(WIDGETS + '/w', {'metadata': {'finalizers': None}})
    # The update is not stored: the object is deleted (Store.Update -> deleteWithoutFinalizers),
    # the answer is the object as requested, and watchers see one DELETED event.
    assert status == 200 and 'finalizers' not in body['metadata']
    await asyncio.wait_for(task, timeout=10)
    assert [e['type'] for e in events] == ['DELETED']
    gone = events[0]['object']
    assert gone['metadata']['finalizers'] == ['x.io/f']  # the last stored state...
    assert int(gone['metadata']['resourceVersion']) > int(deleting['metadata']['resourceVersion'])  # ...at a new RV
    assert await http.gone(WIDGETS + '/w')


async def test_garbage_collector_finalizer_removal_deletes_without_a_modified_event(http: Http) -> None:
    _, owner = await http.post(CONFIGMAPS, {'metadata': {'name': 'owner'}})
    ref = {'apiVersion': 'v1', 'kind': 'ConfigMap', 'name': 'owner', 'uid': owner['metadata']['uid']}
    await http.post(CONFIGMAPS, {'metadata': {'name': 'dep', 'ownerReferences': [ref]}})
    status, deleting = await http.delete(CONFIGMAPS + '/owner', propagationPolicy='Foreground')
    assert deleting['metadata']['finalizers'] == ['foregroundDeletion']
    events: list[dict[str, Any]] = []
    await watch_until_deleted(http, CONFIGMAPS, events, resourceVersion=deleting['metadata']['resourceVersion'],
                              fieldSelector='metadata.name=owner')
    assert [e['type'] for e in events] == ['DELETED']
