"""
The Kubernetes API emulator, over real HTTP, with the clients the project uses:
raw HTTP (aiohttp), kubectl 1.32, kr8s, kopf, and dask-kubernetes' CRDs.
"""
from __future__ import annotations

import asyncio
import copy
import ipaddress
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import yaml

import dask_kubernetes
from dmo_devstack.apiserver import ApiServer
from dmo_devstack.emulator import human_duration, parse_label_selector
from dmo_devstack.emulator.services import next_free_ip

KUBECTL = '/usr/bin/kubectl'
DASK_CRDS = pathlib.Path(dask_kubernetes.__file__).parent / 'operator/deployment/helm/dask-kubernetes-operator/crds'

# A small CRD of our own with every schema feature the emulator handles.
WIDGET_CRD: dict[str, Any] = {
    'apiVersion': 'apiextensions.k8s.io/v1',
    'kind': 'CustomResourceDefinition',
    'metadata': {'name': 'widgets.example.com'},
    'spec': {
        'group': 'example.com',
        'scope': 'Namespaced',
        'names': {'plural': 'widgets', 'singular': 'widget', 'kind': 'Widget', 'shortNames': ['wdg']},
        'versions': [{
            'name': 'v1', 'served': True, 'storage': True,
            'subresources': {'status': {}},
            'additionalPrinterColumns': [
                {'name': 'Size', 'type': 'integer', 'jsonPath': '.spec.size'},
                {'name': 'Ready', 'type': 'string', 'jsonPath': '.status.conditions[?(@.type=="Ready")].status'},
                {'name': 'Age', 'type': 'date', 'jsonPath': '.metadata.creationTimestamp'},
            ],
            'schema': {'openAPIV3Schema': {
                'type': 'object',
                'properties': {
                    'spec': {
                        'type': 'object',
                        'required': ['size'],
                        'properties': {
                            'size': {'type': 'integer', 'minimum': 0, 'maximum': 10},
                            'mode': {'type': 'string', 'enum': ['fast', 'slow'], 'default': 'fast'},
                            'name': {'type': 'string', 'minLength': 1, 'maxLength': 8, 'pattern': '^[a-z]*$'},
                            'port': {'x-kubernetes-int-or-string': True},
                            'note': {'type': 'string', 'nullable': True},
                            'when': {'type': 'string', 'format': 'date-time'},
                            'tags': {'type': 'array', 'maxItems': 2, 'items': {'type': 'string'}},
                            'limits': {'type': 'object', 'additionalProperties': {'type': 'integer'}},
                            'extra': {'type': 'object', 'x-kubernetes-preserve-unknown-fields': True},
                            'nested': {'type': 'object', 'default': {},
                                       'properties': {'level': {'type': 'integer', 'default': 3}}},
                        },
                    },
                    'status': {'type': 'object', 'x-kubernetes-preserve-unknown-fields': True},
                },
            }},
        }],
    },
}
WIDGETS = '/apis/example.com/v1/namespaces/default/widgets'
CRDS = '/apis/apiextensions.k8s.io/v1/customresourcedefinitions'
DEPLOYMENTS = '/apis/apps/v1/namespaces/default/deployments'
SERVICES = '/api/v1/namespaces/default/services'
CONFIGMAPS = '/api/v1/namespaces/default/configmaps'
MERGE = {'Content-Type': 'application/merge-patch+json'}
JSONPATCH = {'Content-Type': 'application/json-patch+json'}
STRATEGIC = {'Content-Type': 'application/strategic-merge-patch+json'}


def widget(name: str, /, **spec: Any) -> dict[str, Any]:
    return {'apiVersion': 'example.com/v1', 'kind': 'Widget', 'metadata': {'name': name},
            'spec': {'size': 1, **spec}}


def deployment(name: str, **meta: Any) -> dict[str, Any]:
    return {'apiVersion': 'apps/v1', 'kind': 'Deployment', 'metadata': {'name': name, **meta}, 'spec': {
        'replicas': 1, 'selector': {'matchLabels': {'app': name}},
        'template': {'metadata': {'labels': {'app': name}}, 'spec': {'containers': [
            {'name': 'main', 'image': 'busybox', 'env': [{'name': 'A', 'value': '1'}]},
            {'name': 'side', 'image': 'busybox'}]}}}}


def owner_ref(obj: dict[str, Any]) -> dict[str, Any]:
    return {'apiVersion': obj['apiVersion'], 'kind': obj['kind'], 'name': obj['metadata']['name'],
            'uid': obj['metadata']['uid']}


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    """Poll a condition until it holds; fail at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f'condition not met within {timeout}s')
        await asyncio.sleep(0.05)


async def holds(value: bool) -> bool:
    """A synchronous condition for wait_for()."""
    return value


class Http:
    """A JSON client for the emulator's URL."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session

    async def request(self, method: str, path: str, body: Any = None,
                      headers: dict[str, str] | None = None, **params: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
        data = None if body is None else json.dumps(body)
        headers = {'Content-Type': 'application/json', **(headers or {})}
        async with self.session.request(method, self.url + path, data=data, headers=headers,
                                        params={k: str(v) for k, v in params.items()}) as resp:
            return resp.status, await resp.json(content_type=None), resp

    async def get(self, path: str, **params: Any) -> tuple[int, Any]:
        return (await self.request('GET', path, **params))[:2]

    async def post(self, path: str, body: Any, **params: Any) -> tuple[int, Any]:
        return (await self.request('POST', path, body, **params))[:2]

    async def put(self, path: str, body: Any, **params: Any) -> tuple[int, Any]:
        return (await self.request('PUT', path, body, **params))[:2]

    async def patch(self, path: str, body: Any, headers: dict[str, str] = MERGE, **params: Any) -> tuple[int, Any]:
        return (await self.request('PATCH', path, body, headers, **params))[:2]

    async def delete(self, path: str, body: Any = None, **params: Any) -> tuple[int, Any]:
        return (await self.request('DELETE', path, body, **params))[:2]

    async def gone(self, path: str) -> bool:
        return (await self.get(path))[0] == 404

    async def watch(self, path: str, events: list[dict[str, Any]], **params: Any) -> None:
        """Collect the events of one watch request until the server ends it."""
        params = {'watch': 'true', **{k: str(v) for k, v in params.items()}}
        async with self.session.get(self.url + path, params=params) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.strip():
                    events.append(json.loads(line))


@pytest.fixture
async def server() -> AsyncIterator[ApiServer]:
    async with ApiServer() as srv:
        yield srv
        assert srv.emulator.errors == []  # no request hit an emulator bug


@pytest.fixture
async def http(server: ApiServer) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        yield Http(server.url, session)


@pytest.fixture
async def widgets(http: Http) -> Http:
    status, _ = await http.post(CRDS, WIDGET_CRD)
    assert status == 201
    return http


# ---------------------------------------------------------------- metadata & errors


async def test_server_side_metadata(http: Http) -> None:
    status, cm = await http.post(CONFIGMAPS, {'metadata': {'name': 'a'}, 'data': {'k': 'v'}})
    assert status == 201
    meta = cm['metadata']
    assert meta['namespace'] == 'default' and 'generation' not in meta  # configmaps have none
    assert meta['uid'] and meta['creationTimestamp'].endswith('Z')
    assert cm['kind'] == 'ConfigMap' and cm['apiVersion'] == 'v1'

    status, dep = await http.post(DEPLOYMENTS, deployment('d'))
    assert dep['metadata']['generation'] == 1
    assert int(dep['metadata']['resourceVersion']) > int(meta['resourceVersion'])  # cluster-wide counter

    status, gen = await http.post(CONFIGMAPS, {'metadata': {'generateName': 'x-'}})
    assert status == 201 and gen['metadata']['name'].startswith('x-') and len(gen['metadata']['name']) == 7

    status, err = await http.post(CONFIGMAPS, {'metadata': {'name': 'a'}})
    assert status == 409
    assert err['kind'] == 'Status' and err['reason'] == 'AlreadyExists'
    assert err['message'] == 'configmaps "a" already exists'

    status, err = await http.get(DEPLOYMENTS + '/nope')
    assert status == 404 and err['reason'] == 'NotFound'
    assert err['message'] == 'deployments.apps "nope" not found'
    assert err['details'] == {'name': 'nope', 'group': 'apps', 'kind': 'deployments'}

    status, err = await http.post('/api/v1/namespaces/missing/configmaps', {'metadata': {'name': 'a'}})
    assert status == 404 and err['message'] == 'namespaces "missing" not found'

    status, err = await http.post(CONFIGMAPS, {'metadata': {'name': 'Bad_Name'}})
    assert status == 422 and err['reason'] == 'Invalid'
    assert err['details']['causes'][0]['field'] == 'metadata.name'
    for meta in ({'labels': {'app': 'not valid!'}}, {'labels': {'-bad': 'x'}}, {'labels': {'a': 'x' * 64}},
                 {'annotations': {'Bad.Prefix/x': 'y'}}, {'annotations': {'big': 'x' * 300_000}}):
        status, err = await http.post(CONFIGMAPS, {'metadata': {'name': 'labels', **meta}})
        assert status == 422 and err['details']['causes'][0]['field'] in ('metadata.labels', 'metadata.annotations')
    status, ok = await http.post(CONFIGMAPS, {'metadata': {'name': 'labels', 'labels': {'dask.org/cluster-name': 'c1',
                                                                                        'empty': ''}}})
    assert status == 201


async def test_generation_and_status_subresource(widgets: Http) -> None:
    http = widgets
    status, w = await http.post(WIDGETS, {**widget('w'), 'status': {'ignored': True}})
    assert status == 201 and 'status' not in w  # a status subresource: status is reset on create

    # The main endpoint ignores .status; metadata changes keep the generation.
    status, w = await http.patch(WIDGETS + '/w', {'status': {'a': 1}, 'metadata': {'labels': {'x': 'y'}}})
    assert status == 200 and 'status' not in w and w['metadata']['generation'] == 1
    # /status changes only .status and not the generation.
    status, w2 = await http.patch(WIDGETS + '/w/status', {'status': {'a': 1}, 'spec': {'size': 9}})
    assert w2['status'] == {'a': 1} and w2['spec']['size'] == 1 and w2['metadata']['generation'] == 1
    assert int(w2['metadata']['resourceVersion']) > int(w['metadata']['resourceVersion'])
    status, w3 = await http.patch(WIDGETS + '/w', {'spec': {'size': 2}})
    assert w3['metadata']['generation'] == 2 and w3['status'] == {'a': 1}

    # A no-op write changes nothing, not even the resourceVersion.
    status, w4 = await http.patch(WIDGETS + '/w', {'spec': {'size': 2}})
    assert w4['metadata']['resourceVersion'] == w3['metadata']['resourceVersion']

    # Without a status subresource (ConfigMaps have no status at all: use a DaskCluster-like CRD).
    crd = copy.deepcopy(WIDGET_CRD)
    crd['metadata']['name'] = 'gadgets.example.com'
    crd['spec']['names'] = {'plural': 'gadgets', 'kind': 'Gadget'}
    del crd['spec']['versions'][0]['subresources']
    assert (await http.post(CRDS, crd))[0] == 201
    gadgets = '/apis/example.com/v1/namespaces/default/gadgets'
    status, g = await http.post(gadgets, {**widget('g'), 'kind': 'Gadget', 'status': {'s': 1}})
    assert g['status'] == {'s': 1}
    status, g = await http.patch(gadgets + '/g', {'status': {'s': 2}})
    assert g['status'] == {'s': 2} and g['metadata']['generation'] == 2  # status is part of the object


async def test_patch_types_and_optimistic_concurrency(widgets: Http) -> None:
    http = widgets
    await http.post(WIDGETS, widget('w', extra={'k': 'scalar'}))
    # JSON patch with a passing and a failing test.
    status, w = await http.patch(WIDGETS + '/w', [{'op': 'test', 'path': '/spec/size', 'value': 1},
                                                 {'op': 'replace', 'path': '/spec/size', 'value': 2}], JSONPATCH)
    assert status == 200 and w['spec']['size'] == 2
    status, err = await http.patch(WIDGETS + '/w', [{'op': 'test', 'path': '/spec/size', 'value': 1}], JSONPATCH)
    assert status == 422 and err['reason'] == 'Invalid'
    # kopf's own pattern: a test on the resourceVersion.
    rv = w['metadata']['resourceVersion']
    status, _ = await http.patch(WIDGETS + '/w', [{'op': 'test', 'path': '/metadata/resourceVersion', 'value': rv},
                                                 {'op': 'add', 'path': '/metadata/finalizers', 'value': ['f']}],
                                 JSONPATCH)
    assert status == 200
    # Merge patch of a dict over a scalar; null removes.
    status, w = await http.patch(WIDGETS + '/w', {'spec': {'extra': {'k': {'deep': 1}}, 'note': None}})
    assert status == 200 and w['spec']['extra'] == {'k': {'deep': 1}}
    # Stale resourceVersion in PATCH and PUT bodies: 409 Conflict.
    status, err = await http.patch(WIDGETS + '/w', {'metadata': {'resourceVersion': rv}, 'spec': {'size': 3}})
    assert status == 409 and err['reason'] == 'Conflict'
    assert 'the object has been modified' in err['message']
    stale = copy.deepcopy(w)
    stale['metadata']['resourceVersion'] = rv
    assert (await http.put(WIDGETS + '/w', stale))[0] == 409
    # Custom resources refuse unconditional updates (PUT without a resourceVersion).
    unconditional = copy.deepcopy(w)
    del unconditional['metadata']['resourceVersion']
    status, err = await http.put(WIDGETS + '/w', unconditional)
    assert status == 422 and err['message'] == ('Widget.example.com "w" is invalid: metadata.resourceVersion: '
                                                'Invalid value: 0x0: must be specified for an update')
    # PUT with the current version replaces the object (and drops what is not sent).
    fresh = copy.deepcopy(w)
    fresh['spec'] = {'size': 4}
    status, w = await http.put(WIDGETS + '/w', fresh)
    assert status == 200 and w['spec'] == {'size': 4, 'mode': 'fast', 'nested': {'level': 3}}
    # Custom resources refuse strategic merge patches, as a real API server does.
    assert (await http.patch(WIDGETS + '/w', {'spec': {}}, STRATEGIC))[0] == 415

    # Strategic merge patch on a built-in kind: containers and env merged by name.
    await http.post(DEPLOYMENTS, deployment('d'))
    patch = {'spec': {'template': {'spec': {
        '$setElementOrder/containers': [{'name': 'main'}, {'name': 'side'}],
        'containers': [{'name': 'main', 'image': 'nginx', 'env': [{'name': 'B', 'value': '2'}]}]}}}}
    status, d = await http.patch(DEPLOYMENTS + '/d', patch, STRATEGIC)
    containers = d['spec']['template']['spec']['containers']
    assert [(c['name'], c['image']) for c in containers] == [('main', 'nginx'), ('side', 'busybox')]
    assert containers[0]['env'] == [{'name': 'A', 'value': '1'}, {'name': 'B', 'value': '2'}]
    assert d['metadata']['generation'] == 2
    patch = {'spec': {'template': {'spec': {'containers': [{'name': 'side', '$patch': 'delete'}]}}}}
    status, d = await http.patch(DEPLOYMENTS + '/d', patch, STRATEGIC)
    assert [c['name'] for c in d['spec']['template']['spec']['containers']] == ['main']


async def test_scale_subresource(http: Http) -> None:
    await http.post(DEPLOYMENTS, deployment('d'))
    status, scale = await http.get(DEPLOYMENTS + '/d/scale')
    assert scale['kind'] == 'Scale' and scale['spec']['replicas'] == 1 and scale['status']['selector'] == 'app=d'
    status, scale = await http.patch(DEPLOYMENTS + '/d/scale', {'spec': {'replicas': 4}})
    assert status == 200 and scale['spec']['replicas'] == 4
    assert (await http.get(DEPLOYMENTS + '/d'))[1]['spec']['replicas'] == 4
    assert (await http.get(CONFIGMAPS + '/x/scale'))[0] == 404


# ---------------------------------------------------------------- deletion


async def test_finalizers(http: Http) -> None:
    await http.post(CONFIGMAPS, {'metadata': {'name': 'f', 'finalizers': ['example.com/hold']}})
    status, cm = await http.delete(CONFIGMAPS + '/f')
    assert status == 200 and cm['metadata']['deletionTimestamp']
    assert (await http.get(CONFIGMAPS + '/f'))[0] == 200  # kept while finalizers remain
    status, err = await http.patch(CONFIGMAPS + '/f', {'metadata': {'finalizers': ['example.com/hold', 'new']}})
    assert status == 422 and 'no new finalizers' in err['message']
    status, _ = await http.patch(CONFIGMAPS + '/f', {'metadata': {'finalizers': None}})
    assert status == 200
    assert await http.gone(CONFIGMAPS + '/f')
    status, ok = await http.delete(CONFIGMAPS + '/f')
    assert status == 404

    # deletecollection with a label selector.
    for name, tier in [('a', 'x'), ('b', 'x'), ('c', 'y')]:
        await http.post(CONFIGMAPS, {'metadata': {'name': name, 'labels': {'tier': tier}}})
    status, _ = await http.delete(CONFIGMAPS, labelSelector='tier=x')
    assert status == 200
    names = [o['metadata']['name'] for o in (await http.get(CONFIGMAPS))[1]['items']]
    assert 'c' in names and 'a' not in names and 'b' not in names


async def test_pod_graceful_deletion(http: Http) -> None:
    pods = '/api/v1/namespaces/default/pods'
    pod = {'metadata': {'name': 'p'}, 'spec': {'nodeName': 'n1', 'containers': [{'name': 'c', 'image': 'x'}]}}
    status, p = await http.post(pods, pod)
    assert p['status']['phase'] == 'Pending'
    # Pod specs are immutable but for images (and a few more).
    status, p = await http.patch(pods + '/p', {'spec': {'containers': [{'name': 'c', 'image': 'y'}]}}, STRATEGIC)
    assert status == 200 and p['spec']['containers'][0]['image'] == 'y'
    status, err = await http.patch(pods + '/p', {'spec': {'nodeName': 'n2'}})
    assert status == 422 and 'pod updates may not change fields' in err['message']
    status, p = await http.delete(pods + '/p')
    assert status == 200 and p['metadata']['deletionGracePeriodSeconds'] == 30  # the kubelet's turn
    assert (await http.get(pods + '/p'))[0] == 200
    status, _ = await http.delete(pods + '/p', gracePeriodSeconds=0)
    assert await http.gone(pods + '/p')
    # An eviction (kubectl drain) is a graceful deletion too.
    await http.post(pods, {**pod, 'metadata': {'name': 'e'}})
    eviction = {'apiVersion': 'policy/v1', 'kind': 'Eviction', 'metadata': {'name': 'e'}}
    assert (await http.post(pods + '/e/eviction', eviction))[0] == 201
    assert (await http.get(pods + '/e'))[1]['metadata']['deletionTimestamp']
    # An unscheduled pod goes at once.
    await http.post(pods, {'metadata': {'name': 'q'}, 'spec': {'containers': [{'name': 'c', 'image': 'x'}]}})
    await http.delete(pods + '/q')
    assert await http.gone(pods + '/q')


async def test_garbage_collection(http: Http) -> None:
    _, owner = await http.post(CONFIGMAPS, {'metadata': {'name': 'owner'}})
    _, child = await http.post(DEPLOYMENTS, deployment('child', ownerReferences=[owner_ref(owner)]))
    _, grandchild = await http.post(CONFIGMAPS, {'metadata': {'name': 'grandchild',
                                                              'ownerReferences': [owner_ref(child)]}})
    _, held = await http.post(CONFIGMAPS, {'metadata': {'name': 'held', 'finalizers': ['x/y'],
                                                        'ownerReferences': [owner_ref(owner)]}})
    await http.delete(CONFIGMAPS + '/owner')
    await wait_for(lambda: http.gone(CONFIGMAPS + '/grandchild'))  # background cascade, recursive
    assert await http.gone(DEPLOYMENTS + '/child')
    status, held = await http.get(CONFIGMAPS + '/held')
    assert status == 200 and held['metadata']['deletionTimestamp']  # finalizers still respected

    # Orphan: dependents stay, without the reference.
    _, owner = await http.post(CONFIGMAPS, {'metadata': {'name': 'owner2'}})
    await http.post(CONFIGMAPS, {'metadata': {'name': 'orphan', 'ownerReferences': [owner_ref(owner)]}})
    await http.delete(CONFIGMAPS + '/owner2', {'propagationPolicy': 'Orphan'})
    assert await http.gone(CONFIGMAPS + '/owner2')
    status, orphan = await http.get(CONFIGMAPS + '/orphan')
    assert status == 200 and 'ownerReferences' not in orphan['metadata']

    # Foreground: the owner goes after its dependents.
    _, owner = await http.post(CONFIGMAPS, {'metadata': {'name': 'owner3'}})
    await http.post(CONFIGMAPS, {'metadata': {'name': 'dep3', 'ownerReferences': [owner_ref(owner)]}})
    status, o = await http.delete(CONFIGMAPS + '/owner3', propagationPolicy='Foreground')
    assert 'foregroundDeletion' in o['metadata']['finalizers']
    await wait_for(lambda: http.gone(CONFIGMAPS + '/owner3'))
    assert await http.gone(CONFIGMAPS + '/dep3')

    # A namespace goes after its contents.
    await http.post('/api/v1/namespaces', {'metadata': {'name': 'tmp'}})
    await http.post('/api/v1/namespaces/tmp/configmaps', {'metadata': {'name': 'x'}})
    status, ns = await http.delete('/api/v1/namespaces/tmp')
    assert ns['status']['phase'] == 'Terminating'
    await wait_for(lambda: http.gone('/api/v1/namespaces/tmp'))
    assert await http.gone('/api/v1/namespaces/tmp/configmaps/x')


# ---------------------------------------------------------------- lists & watches


def test_label_selector_parsing() -> None:
    reqs = parse_label_selector('a=1,b!=2,c in (x, y),d notin (z),e,!f')
    labels = {'a': '1', 'b': '3', 'c': 'y', 'e': ''}
    assert all(r.matches(labels) for r in reqs)
    assert not all(r.matches({**labels, 'f': '1'}) for r in reqs)
    assert not all(r.matches({**labels, 'c': 'q'}) for r in reqs)


async def test_lists_and_selectors(http: Http) -> None:
    for name, labels in [('a', {'app': 'x', 'tier': 'web'}), ('b', {'app': 'y'}), ('c', {})]:
        await http.post(CONFIGMAPS, {'metadata': {'name': name, 'labels': labels}})

    async def names(**params: Any) -> list[str]:
        status, listed = await http.get(CONFIGMAPS, **params)
        assert status == 200
        return [o['metadata']['name'] for o in listed['items']]

    status, listed = await http.get(CONFIGMAPS)
    assert listed['kind'] == 'ConfigMapList' and listed['apiVersion'] == 'v1'
    assert int(listed['metadata']['resourceVersion']) >= 3
    assert await names(labelSelector='app=x') == ['a']
    assert await names(labelSelector='app!=x') == ['b', 'c']
    assert await names(labelSelector='app in (x,y)') == ['a', 'b']
    assert await names(labelSelector='app notin (x)') == ['b', 'c']
    assert await names(labelSelector='tier') == ['a']
    assert await names(labelSelector='!app') == ['c']
    assert await names(fieldSelector='metadata.name=b') == ['b']
    assert await names(fieldSelector='metadata.name!=b') == ['a', 'c']
    assert await names(fieldSelector='metadata.namespace=default,metadata.name=c') == ['c']
    status, err = await http.get(CONFIGMAPS, fieldSelector='data.k=v')
    assert status == 400 and 'field label not supported' in err['message']
    # Paging with limit/continue, as kubectl, kr8s and kopf use it.
    status, page = await http.get(CONFIGMAPS, limit=2)
    assert [o['metadata']['name'] for o in page['items']] == ['a', 'b']
    assert page['metadata']['remainingItemCount'] == 1
    await http.post(CONFIGMAPS, {'metadata': {'name': 'd'}})
    status, page2 = await http.get(CONFIGMAPS, limit=2, **{'continue': page['metadata']['continue']})
    assert [o['metadata']['name'] for o in page2['items']] == ['c', 'd'] and 'continue' not in page2['metadata']
    assert page2['metadata']['resourceVersion'] == page['metadata']['resourceVersion']
    assert (await http.get(CONFIGMAPS, **{'continue': 'garbage'}))[0] == 400
    await http.delete(CONFIGMAPS + '/d')
    # Cluster-wide list across namespaces.
    status, listed = await http.get('/api/v1/configmaps')
    assert len(listed['items']) == 3


async def test_watch_semantics(http: Http) -> None:
    _, a = await http.post(CONFIGMAPS, {'metadata': {'name': 'a', 'labels': {'app': 'x'}}})
    start_rv = a['metadata']['resourceVersion']
    await http.patch(CONFIGMAPS + '/a', {'data': {'k': '1'}})
    await http.post(CONFIGMAPS, {'metadata': {'name': 'b'}})

    # From a resourceVersion: only later events, and the server ends at timeoutSeconds.
    events: list[dict[str, Any]] = []
    await http.watch(CONFIGMAPS, events, resourceVersion=start_rv, timeoutSeconds=1, allowWatchBookmarks='true')
    assert [(e['type'], e['object']['metadata'].get('name')) for e in events] == [
        ('MODIFIED', 'a'), ('ADDED', 'b'), ('BOOKMARK', None)]  # a bookmark at the timeout, as asked
    assert events[-1]['object']['metadata']['resourceVersion'] == events[-2]['object']['metadata']['resourceVersion']

    # Without one: the current state as ADDED, then live events, filtered by selectors.
    events = []
    task = asyncio.create_task(http.watch(CONFIGMAPS, events, labelSelector='app=x', timeoutSeconds=3))
    await wait_for(lambda: holds(bool(events)))
    await http.patch(CONFIGMAPS + '/b', {'metadata': {'labels': {'app': 'x'}}})  # enters the selector
    await http.patch(CONFIGMAPS + '/a', {'metadata': {'labels': {'app': 'z'}}})  # leaves it
    await http.delete(CONFIGMAPS + '/b')
    await task
    assert [(e['type'], e['object']['metadata']['name']) for e in events] == [
        ('ADDED', 'a'), ('ADDED', 'b'), ('DELETED', 'a'), ('DELETED', 'b')]

    # Field selector on a single object (kubectl wait's pattern).
    events = []
    await http.watch(CONFIGMAPS, events, fieldSelector='metadata.name=a', timeoutSeconds=0.5)
    assert [e['object']['metadata']['name'] for e in events] == ['a']


async def test_watch_expired_and_shutdown_ends_streams(server: ApiServer, http: Http) -> None:
    await http.post(CONFIGMAPS, {'metadata': {'name': 'a'}})
    server.emulator._events.clear()  # as if the log had been trimmed long ago
    events: list[dict[str, Any]] = []
    await http.watch(CONFIGMAPS, events, resourceVersion='1')
    assert events[0]['type'] == 'ERROR' and events[0]['object']['code'] == 410

    # A watch without a timeout ends (EOF) when the server stops: nothing hangs.
    async with ApiServer() as other:
        events = []
        task = asyncio.create_task(Http(other.url, http.session).watch(CONFIGMAPS, events))
        await wait_for(lambda: holds(len(other.emulator._requests) > 0))
    await asyncio.wait_for(task, timeout=10)  # a guard against a hang, not a timing assertion


# ---------------------------------------------------------------- discovery


async def test_discovery(widgets: Http) -> None:
    http = widgets
    for path in ('/version', '/version/'):
        status, version = await http.get(path)
        assert status == 200 and version['major'] == '1'
    for path in ('/api', '/api/'):
        status, api = await http.get(path)
        assert api['kind'] == 'APIVersions' and api['versions'] == ['v1']
    status, core = await http.get('/api/v1/')
    names = {r['name']: r for r in core['resources']}
    assert names['namespaces']['namespaced'] is False and 'pods/status' in names
    status, groups = await http.get('/apis')
    group_names = [g['name'] for g in groups['groups']]
    assert 'apps' in group_names and 'example.com' in group_names
    status, group = await http.get('/apis/example.com')
    assert group['preferredVersion']['version'] == 'v1'
    status, resources = await http.get('/apis/example.com/v1')
    widget_res = next(r for r in resources['resources'] if r['name'] == 'widgets')
    assert widget_res['shortNames'] == ['wdg'] and widget_res['kind'] == 'Widget' and widget_res['namespaced']
    assert 'widgets/status' in {r['name'] for r in resources['resources']}
    status, crd = await http.get(CRDS + '/widgets.example.com')
    assert {c['type']: c['status'] for c in crd['status']['conditions']}['Established'] == 'True'
    assert (await http.get('/nonexistent'))[0] == 404
    async with http.session.get(http.url + '/readyz') as resp:
        assert resp.status == 200 and await resp.text() == 'ok'
    status, root = await http.get('/')
    assert status == 200 and '/apis' in root['paths']
    status, apps = await http.get('/apis/apps/v1')
    assert any(r['name'] == 'deployments/scale' for r in apps['resources'])
    # Deleting the CRD removes its objects, then the resource.
    await http.post(WIDGETS, widget('w'))
    await http.delete(CRDS + '/widgets.example.com')
    await wait_for(lambda: http.gone('/apis/example.com/v1'))
    assert (await http.get(WIDGETS))[0] == 404


async def test_crd_serves_its_storage_version(http: Http) -> None:
    crd = copy.deepcopy(WIDGET_CRD)
    v1 = crd['spec']['versions'][0]
    v2 = copy.deepcopy(v1)
    v2['name'], v1['storage'] = 'v2', False
    crd['spec']['versions'].append(v2)
    assert (await http.post(CRDS, crd))[0] == 201
    # Conversion between versions is not emulated: only the storage version is served.
    status, w = await http.post(WIDGETS.replace('/v1/', '/v2/'), {**widget('w'), 'apiVersion': 'example.com/v2'})
    assert status == 201 and w['apiVersion'] == 'example.com/v2'
    assert (await http.get(WIDGETS))[0] == 404
    status, group = await http.get('/apis/example.com')
    assert [v['version'] for v in group['versions']] == ['v2']


# ---------------------------------------------------------------- schema validation


async def test_schema_validation_defaults_and_pruning(widgets: Http) -> None:
    http = widgets
    status, w = await http.post(WIDGETS, widget('ok', port='http', note=None, when='2026-01-02T03:04:05Z', extra={'any': {'thing': 1}},
                                                limits={'cpu': 2}, unknown=1))
    assert status == 201
    spec = w['spec']
    assert spec['mode'] == 'fast' and spec['nested'] == {'level': 3}  # defaults
    assert spec['port'] == 'http' and spec['note'] is None and spec['extra'] == {'any': {'thing': 1}}
    assert 'unknown' not in spec  # pruned

    status, err, resp = await http.request('POST', WIDGETS, widget('warn', unknown=1))
    assert status == 201 and resp.headers['Warning'] == '299 - "unknown field \\"spec.unknown\\""'
    status, err = await http.post(WIDGETS, widget('strict', unknown=1), fieldValidation='Strict')
    assert status == 400 and err['reason'] == 'BadRequest'
    assert 'strict decoding error: unknown field "spec.unknown"' in err['message']

    status, err = await http.post(WIDGETS, widget('bad', mode='foo'))
    assert status == 422 and err['reason'] == 'Invalid'
    assert err['message'] == ('Widget.example.com "bad" is invalid: spec.mode: Unsupported value: "foo": '
                              'supported values: "fast", "slow"')
    assert err['details']['causes'] == [{'reason': 'FieldValueNotSupported', 'field': 'spec.mode',
                                         'message': 'Unsupported value: "foo": supported values: "fast", "slow"'}]

    cases = {
        'spec.size: Invalid value: 11: spec.size in body should be less than or equal to 10': {'size': 11},
        'spec.size: Invalid value: -1: spec.size in body should be greater than or equal to 0': {'size': -1},
        'spec.size: Invalid value: "string": spec.size in body must be of type integer: "string"': {'size': 'x'},
        'spec.size: Required value': {'size': None},
        'spec.name: Invalid value: "": spec.name in body should be at least 1 chars long': {'name': ''},
        'spec.name: Too long: may not be more than 8 bytes': {'name': 'abcdefghij'},
        "spec.name: Invalid value: \"A\": spec.name in body should match '^[a-z]*$'": {'name': 'A'},
        'spec.tags: Too many: 3: must have at most 2 items': {'tags': ['a', 'b', 'c']},
        'spec.when: Invalid value: "soon": spec.when in body must be of type date-time: "soon"': {'when': 'soon'},
        'spec.limits.cpu: Invalid value: "string": spec.limits.cpu in body must be of type integer: "string"':
            {'limits': {'cpu': 'x'}},
        'spec.port: Invalid value: "boolean": spec.port in body must be of type integer or string: "boolean"':
            {'port': True},
    }
    for expected, spec in cases.items():
        body = widget('bad', **spec)
        body['spec'] = {k: v for k, v in body['spec'].items() if v is not None}
        status, err = await http.post(WIDGETS, body)
        assert status == 422, expected
        assert err['message'] == f'Widget.example.com "bad" is invalid: {expected}'

    # Several errors at once, in brackets; and on update (PATCH) too.
    status, err = await http.post(WIDGETS, widget('bad', size=11, mode='foo'))
    assert err['message'].startswith('Widget.example.com "bad" is invalid: [') and len(err['details']['causes']) == 2
    status, err = await http.patch(WIDGETS + '/ok', {'spec': {'size': 99}})
    assert status == 422 and (await http.get(WIDGETS + '/ok'))[1]['spec']['size'] == 1

    # A CRD with a broken schema is refused.
    crd = copy.deepcopy(WIDGET_CRD)
    crd['metadata']['name'] = 'things.example.com'
    crd['spec']['names'] = {'plural': 'things', 'kind': 'Thing'}
    crd['spec']['versions'][0]['schema']['openAPIV3Schema']['properties']['spec']['properties']['size']['type'] = 'int'
    status, err = await http.post(CRDS, crd)
    assert status == 422 and err['details']['causes'][0]['field'] == \
        'spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[size].type'


# ---------------------------------------------------------------- services & tables


async def test_endpointslices_are_served(http: Http) -> None:
    """discovery.k8s.io/v1 EndpointSlices, as the local stack's endpoint controller and
    kube-proxy (and a tenant writing one by hand) use them: create, list by the
    service-name label, delete, with the API server's status codes; a Service's
    deletion takes the slices it owns."""
    slices = '/apis/discovery.k8s.io/v1/namespaces/default/endpointslices'
    status, svc = await http.post(SERVICES, {'metadata': {'name': 'web'}, 'spec': {'ports': [{'port': 80}]}})
    body = {'apiVersion': 'discovery.k8s.io/v1', 'kind': 'EndpointSlice',
            'metadata': {'generateName': 'web-', 'labels': {'kubernetes.io/service-name': 'web'},
                         'ownerReferences': [{'apiVersion': 'v1', 'kind': 'Service', 'name': 'web',
                                              'uid': svc['metadata']['uid'], 'controller': True}]},
            'addressType': 'IPv4', 'ports': [{'name': '', 'port': 80, 'protocol': 'TCP'}],
            'endpoints': [{'addresses': ['127.2.0.9'], 'conditions': {'ready': True}}]}
    status, made = await http.post(slices, body)
    assert status == 201 and made['metadata']['name'].startswith('web-')
    status, listed = await http.get(slices, labelSelector='kubernetes.io/service-name=web')
    assert status == 200 and [i['metadata']['name'] for i in listed['items']] == [made['metadata']['name']]
    status, err = await http.post(slices, {**body, 'metadata': {'name': made['metadata']['name']}})
    assert status == 409 and err['reason'] == 'AlreadyExists'
    status, err = await http.post(slices, {k: v for k, v in body.items() if k != 'addressType'})
    assert status == 422
    status, _ = await http.delete(f'{SERVICES}/web')
    for _ in range(100):  # the garbage collector runs in the background
        status, _ = await http.get(f'{slices}/{made["metadata"]["name"]}')
        if status == 404:
            break
        await asyncio.sleep(0.05)
    assert status == 404


async def test_service_cluster_ip(http: Http) -> None:
    svc = {'metadata': {'name': 's'}, 'spec': {'ports': [{'name': 'tcp-comm', 'port': 8786}]}}
    ports = {'ports': [{'port': 80}]}  # a Service that is not headless needs ports
    status, s = await http.post(SERVICES, svc)
    ip = s['spec']['clusterIP']
    assert ipaddress.ip_address(ip) in ipaddress.ip_network('127.1.0.0/16')
    assert s['spec']['clusterIPs'] == [ip] and s['spec']['ports'][0]['targetPort'] == 8786
    status, s2 = await http.post(SERVICES, {**svc, 'metadata': {'name': 's2'}})
    assert s2['spec']['clusterIP'] != ip
    status, h = await http.post(SERVICES, {'metadata': {'name': 'h'}, 'spec': {'clusterIP': 'None'}})
    assert h['spec']['clusterIP'] == 'None'
    status, err = await http.patch(SERVICES + '/s', {'spec': {'clusterIP': '127.1.9.9'}})
    assert status == 422 and err['details']['causes'][0]['field'] == 'spec.clusterIPs[0]'
    status, s = await http.patch(SERVICES + '/s', {'spec': {'clusterIP': None, 'type': 'ClusterIP'}})
    assert s['spec']['clusterIP'] == ip  # kept when omitted
    status, err = await http.post(SERVICES, {'metadata': {'name': 'taken'}, 'spec': {'clusterIP': ip, **ports}})
    assert status == 422 and 'provided IP is already allocated' in err['message']
    status, err = await http.post(SERVICES, {'metadata': {'name': 'out'}, 'spec': {'clusterIP': '10.0.0.1', **ports}})
    assert status == 422 and 'not in the valid range' in err['message']
    # A failed create does not keep an address; a deletion releases it.
    assert (await http.post(SERVICES, {'metadata': {'name': 's'}, 'spec': ports}))[0] == 409
    await http.delete(SERVICES + '/s')
    status, again = await http.post(SERVICES, {'metadata': {'name': 'again'}, 'spec': {'clusterIP': ip, **ports}})
    assert status == 201 and again['spec']['clusterIP'] == ip


async def test_service_cidr_is_configurable() -> None:
    async with ApiServer(service_cidr='127.7.0.0/24') as server, aiohttp.ClientSession() as session:
        status, s = await Http(server.url, session).post(SERVICES, {'metadata': {'name': 's'},
                                                                   'spec': {'ports': [{'port': 80}]}})
        assert s['spec']['clusterIP'].startswith('127.7.0.')


async def test_cluster_ips_are_picked_at_random_from_the_upper_band_first() -> None:
    """As kube-apiserver's allocator: the lower 16 addresses of a /24 are kept for static
    clusterIPs while the upper band has room, and a released address is not simply the
    next one handed out (the lowest-free scan that did so let a new scheduler Service
    inherit the address the proxy still routed to a deleted one)."""
    async with ApiServer(service_cidr='127.7.0.0/24') as server, aiohttp.ClientSession() as session:
        http = Http(server.url, session)
        ips = []
        for i in range(40):
            status, s = await http.post(SERVICES, {'metadata': {'name': f's{i}'}, 'spec': {'ports': [{'port': 80}]}})
            ips.append(int(s['spec']['clusterIP'].rsplit('.', 1)[1]))
        assert min(ips) > 16
        assert ips != sorted(ips)
    # the lower band once the upper one is full
    assert next_free_ip(ipaddress.ip_network('10.0.0.0/24'), {f'10.0.0.{h}' for h in range(17, 255)}) in \
        {f'10.0.0.{h}' for h in range(1, 17)}
    assert next_free_ip(ipaddress.ip_network('10.0.0.0/30'), {'10.0.0.1', '10.0.0.2'}) is None


async def test_table_output(widgets: Http) -> None:
    http = widgets
    await http.post(WIDGETS, widget('w', size=3))
    await http.patch(WIDGETS + '/w/status', {'status': {'conditions': [{'type': 'Ready', 'status': 'True'}]}})
    accept = {'Accept': 'application/json;as=Table;v=v1;g=meta.k8s.io,application/json'}
    status, table, _ = await http.request('GET', WIDGETS, headers=accept)
    assert table['kind'] == 'Table' and table['apiVersion'] == 'meta.k8s.io/v1'
    assert [c['name'] for c in table['columnDefinitions']] == ['Name', 'Size', 'Ready', 'Age']
    assert table['rows'][0]['cells'][:3] == ['w', 3, 'True']
    assert table['rows'][0]['object']['metadata']['name'] == 'w'
    status, table, _ = await http.request('GET', CONFIGMAPS, headers=accept)
    assert [c['name'] for c in table['columnDefinitions']] == ['Name', 'Age']
    # kubectl get -w: one-row tables, column definitions in the first event only.
    await http.post(WIDGETS, widget('w2', size=4))
    events: list[dict[str, Any]] = []
    async with http.session.get(http.url + WIDGETS, headers=accept,
                                params={'watch': 'true', 'timeoutSeconds': '0.3'}) as resp:
        events = [json.loads(line) async for line in resp.content if line.strip()]
    assert [e['object']['kind'] for e in events] == ['Table', 'Table']
    assert [e['object']['rows'][0]['cells'][:2] for e in events] == [['w', 3], ['w2', 4]]
    assert len(events[0]['object']['columnDefinitions']) == 4 and events[1]['object']['columnDefinitions'] == []
    # The kinds one looks at in the sandbox have kubectl's usual columns.
    await http.post(SERVICES, {'metadata': {'name': 's'}, 'spec': {'ports': [{'port': 8786}]}})
    status, table, _ = await http.request('GET', SERVICES + '/s', headers=accept)
    cells = dict(zip([c['name'] for c in table['columnDefinitions']], table['rows'][0]['cells']))
    assert cells['Type'] == 'ClusterIP' and cells['Port(s)'] == '8786/TCP' and cells['Cluster-IP'].startswith('127.1.')
    pod = {'metadata': {'name': 'p'}, 'spec': {'containers': [{'name': 'c', 'image': 'x'}]}}
    await http.post('/api/v1/namespaces/default/pods', pod)
    status, table, _ = await http.request('GET', '/api/v1/namespaces/default/pods', headers=accept)
    assert table['rows'][0]['cells'][:3] == ['p', '0/1', 'Pending']


def test_human_duration() -> None:
    assert [human_duration(s) for s in (5, 150, 700, 3 * 3600 + 60, 30 * 3600, 3 * 86400)] == \
        ['5s', '2m30s', '11m', '3h1m', '30h', '3d']


# ---------------------------------------------------------------- dask-kubernetes' CRDs


def dask_cluster(name: str, replicas: Any = 2) -> dict[str, Any]:
    container = {'name': 'c', 'image': 'ghcr.io/dask/dask:latest', 'args': ['dask-scheduler']}
    return {'apiVersion': 'kubernetes.dask.org/v1', 'kind': 'DaskCluster', 'metadata': {'name': name},
            'spec': {'worker': {'replicas': replicas, 'spec': {'containers': [container]}},
                     'scheduler': {'spec': {'containers': [container]},
                                   'service': {'ports': [{'name': 'tcp-comm', 'port': 8786}]}}}}


async def test_dask_kubernetes_crds() -> None:
    async with ApiServer(crd_dirs=[DASK_CRDS]) as server, aiohttp.ClientSession() as session:
        http = Http(server.url, session)
        # The CRDs from the folder are served; applying them again replaces them.
        kinds = {t['kind'] for t in (await http.get('/apis/kubernetes.dask.org/v1'))[1]['resources']}
        assert {'DaskCluster', 'DaskWorkerGroup', 'DaskAutoscaler', 'DaskJob'} <= kinds
        await server.apply_files(sorted(DASK_CRDS.glob('*.yaml')))
        clusters = '/apis/kubernetes.dask.org/v1/namespaces/default/daskclusters'
        groups = '/apis/kubernetes.dask.org/v1/namespaces/default/daskworkergroups'
        status, cluster = await http.post(clusters, dask_cluster('c1'))
        assert status == 201, cluster
        status, err = await http.post(clusters, dask_cluster('c2', replicas='two'))
        assert status == 422 and err['details']['causes'][0]['field'] == 'spec.worker.replicas'
        # The worker group's scale subresource.
        group = {'apiVersion': 'kubernetes.dask.org/v1', 'kind': 'DaskWorkerGroup',
                 'metadata': {'name': 'c1-default', 'ownerReferences': [owner_ref(cluster)]},
                 'spec': {'cluster': 'c1', 'worker': dask_cluster('x')['spec']['worker']}}
        status, group = await http.post(groups, group)
        assert status == 201, group
        status, scale = await http.patch(groups + '/c1-default/scale', {'spec': {'replicas': 5}})
        assert scale['spec']['replicas'] == 5
        assert (await http.get(groups + '/c1-default'))[1]['spec']['worker']['replicas'] == 5
        # Deleting the cluster deletes what the operator made for it.
        await http.post(DEPLOYMENTS, deployment('c1-scheduler', ownerReferences=[owner_ref(cluster)]))
        await http.post(SERVICES, {'metadata': {'name': 'c1-scheduler', 'ownerReferences': [owner_ref(cluster)]},
                                   'spec': {'ports': [{'port': 8786}]}})
        await http.post(DEPLOYMENTS, deployment('c1-default-worker-0a', ownerReferences=[owner_ref(group)]))
        await http.delete(clusters + '/c1')
        await wait_for(lambda: http.gone(DEPLOYMENTS + '/c1-default-worker-0a'))
        for path in (DEPLOYMENTS + '/c1-scheduler', SERVICES + '/c1-scheduler', groups + '/c1-default'):
            assert await http.gone(path)
        assert server.emulator.errors == []


# ---------------------------------------------------------------- kr8s


async def test_kr8s(server: ApiServer) -> None:
    import kr8s.asyncio
    from kr8s.asyncio.objects import ConfigMap

    api = await kr8s.asyncio.api(url=server.url)
    assert (await api.version())['major'] == '1'
    cm = await ConfigMap({'metadata': {'name': 'k', 'labels': {'app': 'k'}}, 'data': {'a': '1'}}, api=api)
    await cm.create()
    assert cm.metadata.uid
    await cm.patch({'data': {'b': '2'}})
    assert cm.raw['data'] == {'a': '1', 'b': '2'}
    got = await ConfigMap.get('k', namespace='default', api=api)
    assert got.raw['data'] == {'a': '1', 'b': '2'}
    await ConfigMap({'metadata': {'name': 'other'}}, api=api).create()
    listed = [o.name async for o in api.get('configmaps', namespace='default', label_selector={'app': 'k'})]
    assert listed == ['k']
    # More than kr8s' page size (100): it follows the continue token.
    for i in range(120):
        await ConfigMap({'metadata': {'name': f'many-{i:03}', 'labels': {'many': 'yes'}}}, api=api).create()
    many = [o.name async for o in api.get('configmaps', namespace='default', label_selector='many=yes')]
    assert many == [f'many-{i:03}' for i in range(120)]

    seen: list[tuple[str, str]] = []

    async def watch() -> None:
        async for event, obj in api.watch('configmaps', namespace='default', label_selector='app=k'):
            seen.append((event, obj.name))
            if event == 'DELETED':
                return

    task = asyncio.create_task(watch())
    await wait_for(lambda: holds(bool(seen)))
    await cm.delete()
    await asyncio.wait_for(task, timeout=10)
    assert seen == [('ADDED', 'k'), ('DELETED', 'k')]
    assert not await cm.exists()


# ---------------------------------------------------------------- kopf


async def test_kopf_operator(widgets: Http) -> None:
    import kopf

    http = widgets
    url = http.url
    registry = kopf.OperatorRegistry()
    calls: dict[str, list[Any]] = {'create': [], 'update': [], 'delete': [], 'timer': []}

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url)

    @kopf.on.create('example.com', 'v1', 'widgets', id='created', registry=registry)
    def created(spec: Any, **_: Any) -> dict[str, Any]:
        calls['create'].append(spec['size'])
        return {'seen': spec['size']}  # kopf writes it to status.created

    @kopf.on.update('example.com', 'v1', 'widgets', registry=registry)
    def updated(old: Any, new: Any, **_: Any) -> None:
        calls['update'].append((old['spec']['size'], new['spec']['size']))

    @kopf.on.delete('example.com', 'v1', 'widgets', registry=registry)
    def deleted(**_: Any) -> None:
        calls['delete'].append(1)

    @kopf.timer('example.com', 'v1', 'widgets', interval=0.2, registry=registry)
    async def timer(patch: Any, **_: Any) -> None:
        calls['timer'].append(1)
        patch.status['ticks'] = len(calls['timer'])

    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 2
    settings.watching.client_timeout = 5
    settings.posting.enabled = False
    stop = asyncio.Event()
    task = asyncio.create_task(kopf.operator(registry=registry, settings=settings, stop_flag=stop,
                                             standalone=True, clusterwide=True))
    try:
        await http.post(WIDGETS, widget('k', size=2))

        async def status_has(key: str) -> bool:
            return key in ((await http.get(WIDGETS + '/k'))[1].get('status') or {})

        await wait_for(lambda: status_has('created'), timeout=20)
        assert calls['create'] == [2]
        status, w = await http.get(WIDGETS + '/k')
        assert w['status']['created'] == {'seen': 2} and w['metadata']['finalizers']

        await http.patch(WIDGETS + '/k', {'spec': {'size': 3}})
        await wait_for(lambda: holds(bool(calls['update'])), timeout=20)
        assert calls['update'] == [(2, 3)]
        await wait_for(lambda: status_has('ticks'), timeout=20)

        await http.delete(WIDGETS + '/k')
        await wait_for(lambda: http.gone(WIDGETS + '/k'), timeout=20)
        assert calls['create'] == [2] and calls['update'] == [(2, 3)] and calls['delete'] == [1]
        assert len(calls['timer']) >= 1
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=20)


# ---------------------------------------------------------------- kubectl (server as a subprocess)


@pytest.fixture(scope='module')
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    path = tmp_path_factory.mktemp('kube') / 'config'
    proc = subprocess.Popen([sys.executable, '-m', 'dmo_devstack.apiserver', '--port', '0',
                             '--kubeconfig', str(path), '--crds', str(DASK_CRDS)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not path.exists():  # written once serving, atomically
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ''
            assert time.monotonic() < deadline, 'the API server did not start'
            time.sleep(0.05)
        config = yaml.safe_load(path.read_text())
        assert config['clusters'][0]['cluster']['server'].startswith('http://127.0.0.1:')
        assert config['contexts'][0]['context']['namespace'] == 'default'
        yield path
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, output  # a clean exit on SIGTERM


def kubectl_env(kubeconfig: pathlib.Path) -> dict[str, str]:
    # A discovery cache of its own: ports are reused across runs.
    return {**os.environ, 'KUBECONFIG': str(kubeconfig), 'KUBECACHEDIR': str(kubeconfig.parent / 'cache')}


def kubectl(kubeconfig: pathlib.Path, *args: str, input: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([KUBECTL, *args], input=input, capture_output=True, text=True, timeout=60,
                            env=kubectl_env(kubeconfig))
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_kubectl_apply_get_and_errors(kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> None:
    (tmp_path / 'crd.yaml').write_text(yaml.safe_dump(WIDGET_CRD))
    assert 'created' in kubectl(kubeconfig, 'apply', '-f', str(tmp_path / 'crd.yaml')).stdout
    assert 'unchanged' in kubectl(kubeconfig, 'apply', '-f', str(tmp_path / 'crd.yaml')).stdout

    (tmp_path / 'w.yaml').write_text(yaml.safe_dump(widget('w1', size=3)))
    assert 'created' in kubectl(kubeconfig, 'apply', '-f', str(tmp_path / 'w.yaml')).stdout
    (tmp_path / 'w.yaml').write_text(yaml.safe_dump(widget('w1', size=4)))
    assert 'configured' in kubectl(kubeconfig, 'apply', '-f', str(tmp_path / 'w.yaml')).stdout

    out = kubectl(kubeconfig, 'get', 'wdg').stdout.split('\n')
    assert out[0].split() == ['NAME', 'SIZE', 'READY', 'AGE'] and out[1].split()[:2] == ['w1', '4']
    obj = yaml.safe_load(kubectl(kubeconfig, 'get', 'widget', 'w1', '-o', 'yaml').stdout)
    assert obj['spec'] == {'size': 4, 'mode': 'fast', 'nested': {'level': 3}} and obj['metadata']['generation'] == 2
    listed = json.loads(kubectl(kubeconfig, 'get', 'widgets.example.com', '-o', 'json').stdout)
    assert [o['metadata']['name'] for o in listed['items']] == ['w1']
    assert kubectl(kubeconfig, 'get', 'wdg', 'w1', '-o', 'jsonpath={.spec.mode}').stdout == 'fast'

    (tmp_path / 'bad.yaml').write_text(yaml.safe_dump(widget('w2', size=30, mode='foo')))
    bad = kubectl(kubeconfig, 'apply', '-f', str(tmp_path / 'bad.yaml'), check=False)
    assert bad.returncode != 0
    assert 'The Widget "w2" is invalid' in bad.stderr
    assert 'spec.mode: Unsupported value: "foo": supported values: "fast", "slow"' in bad.stderr
    assert 'spec.size: Invalid value: 30: spec.size in body should be less than or equal to 10' in bad.stderr

    (tmp_path / 'unknown.yaml').write_text(yaml.safe_dump(widget('w3', foo=1)))
    unknown = kubectl(kubeconfig, 'apply', '-f', str(tmp_path / 'unknown.yaml'), check=False)
    assert unknown.returncode != 0 and 'unknown field "spec.foo"' in unknown.stderr

    missing = kubectl(kubeconfig, 'get', 'wdg', 'nope', check=False)
    assert 'widgets.example.com "nope" not found' in missing.stderr


def test_kubectl_deployment_and_verbs(kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> None:
    manifest = tmp_path / 'dep.yaml'
    manifest.write_text(yaml.safe_dump(deployment('web')))
    kubectl(kubeconfig, 'apply', '-f', str(manifest))
    changed = deployment('web')
    changed['spec']['template']['spec']['containers'][0]['image'] = 'nginx'
    manifest.write_text(yaml.safe_dump(changed))
    kubectl(kubeconfig, 'apply', '-f', str(manifest))
    images = kubectl(kubeconfig, 'get', 'deploy', 'web', '-o', 'jsonpath={.spec.template.spec.containers[*].image}')
    assert images.stdout == 'nginx busybox'

    kubectl(kubeconfig, 'label', 'deploy', 'web', 'tier=front')
    kubectl(kubeconfig, 'annotate', 'deploy', 'web', 'note=hi')
    assert kubectl(kubeconfig, 'get', 'deploy', '-l', 'tier in (front)', '-o', 'name').stdout.split() == \
        ['deployment.apps/web']
    assert kubectl(kubeconfig, 'get', 'deploy', '-l', 'tier!=front', '-o', 'name').stdout.split() == []
    kubectl(kubeconfig, 'patch', 'deploy', 'web', '--type=merge', '-p', '{"spec":{"replicas":5}}')
    kubectl(kubeconfig, 'patch', 'deploy', 'web', '--type=json',
            '-p', '[{"op":"test","path":"/spec/replicas","value":5},{"op":"replace","path":"/spec/replicas","value":6}]')
    failed = kubectl(kubeconfig, 'patch', 'deploy', 'web', '--type=json',
                     '-p', '[{"op":"test","path":"/spec/replicas","value":1}]', check=False)
    assert failed.returncode != 0 and 'The request is invalid' in failed.stderr
    obj = json.loads(kubectl(kubeconfig, 'get', 'deploy', 'web', '-o', 'json').stdout)
    assert obj['spec']['replicas'] == 6 and obj['metadata']['annotations']['note'] == 'hi'
    kubectl(kubeconfig, 'scale', 'deploy', 'web', '--replicas=2')
    assert kubectl(kubeconfig, 'get', 'deploy', 'web', '-o', 'jsonpath={.spec.replicas}').stdout == '2'
    assert 'deleted' in kubectl(kubeconfig, 'delete', 'deploy', 'web').stdout
    assert kubectl(kubeconfig, 'get', 'deploy', '-o', 'name').stdout == ''


def test_kubectl_scale_and_wait(kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> None:
    group = {'apiVersion': 'kubernetes.dask.org/v1', 'kind': 'DaskWorkerGroup', 'metadata': {'name': 'g1'},
             'spec': {'cluster': 'c1', 'worker': dask_cluster('x')['spec']['worker']}}
    kubectl(kubeconfig, 'apply', '-f', '-', input=yaml.safe_dump(group))
    kubectl(kubeconfig, 'scale', 'daskworkergroup', 'g1', '--replicas=5')
    assert kubectl(kubeconfig, 'get', 'daskworkergroup', 'g1',
                   '-o', 'jsonpath={.spec.worker.replicas}').stdout == '5'

    kubectl(kubeconfig, 'apply', '-f', '-', input=yaml.safe_dump(WIDGET_CRD))
    kubectl(kubeconfig, 'apply', '-f', '-', input=yaml.safe_dump(widget('ready', size=1)))
    waiter = subprocess.Popen([KUBECTL, 'wait', 'wdg/ready', '--for=condition=Ready', '--timeout=30s'],
                              env=kubectl_env(kubeconfig),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kubectl(kubeconfig, 'patch', 'wdg', 'ready', '--subresource=status', '--type=merge',
            '-p', '{"status":{"conditions":[{"type":"Ready","status":"True"}]}}')
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and 'condition met' in out, err
    kubectl(kubeconfig, 'wait', 'wdg/ready', '--for=jsonpath={.spec.size}=1', '--timeout=10s')
    timeout = kubectl(kubeconfig, 'wait', 'wdg/ready', '--for=jsonpath={.spec.size}=2', '--timeout=1s', check=False)
    assert timeout.returncode != 0
    kubectl(kubeconfig, 'delete', 'wdg', 'ready')
    kubectl(kubeconfig, 'wait', 'wdg/ready', '--for=delete', '--timeout=10s')


def test_kubectl_get_events_columns(kubeconfig: pathlib.Path) -> None:
    import urllib.request
    server = yaml.safe_load(kubeconfig.read_text())['clusters'][0]['cluster']['server']
    now = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
    event = {'metadata': {'name': 'p1.started'}, 'type': 'Normal', 'reason': 'Started',
             'message': 'Started container main ', 'involvedObject': {'kind': 'Pod', 'name': 'p1',
                                                                      'namespace': 'default'},
             'source': {'component': 'kubelet', 'host': 'node-1'}, 'count': 3,
             'firstTimestamp': now, 'lastTimestamp': now}
    request = urllib.request.Request(server + '/api/v1/namespaces/default/events', data=json.dumps(event).encode(),
                                     headers={'Content-Type': 'application/json'}, method='POST')
    assert urllib.request.urlopen(request).status == 201
    lines = kubectl(kubeconfig, 'get', 'events').stdout.splitlines()
    # kube-apiserver's Event printer: LAST SEEN, TYPE, REASON, OBJECT, MESSAGE (the rest with -o wide).
    assert lines[0].split() == ['LAST', 'SEEN', 'TYPE', 'REASON', 'OBJECT', 'MESSAGE']
    assert lines[1].split()[1:] == ['Normal', 'Started', 'pod/p1', 'Started', 'container', 'main']
    wide = kubectl(kubeconfig, 'get', 'events', '-o', 'wide').stdout.splitlines()
    assert wide[0].split()[-6:] == ['SOURCE', 'MESSAGE', 'FIRST', 'SEEN', 'COUNT', 'NAME']
    assert wide[1].split()[-2:] == ['3', 'p1.started'] and 'kubelet, node-1' in wide[1]
