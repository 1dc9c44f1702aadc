"""
The watch window: resourceVersions older than the kept events get 410 Expired, and
clients (a real kopf operator here) relist and go on.
"""
from __future__ import annotations

import asyncio
import pathlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml

from dmo_devstack.apiserver import ApiServer
from test_emulator import CONFIGMAPS, CRDS, WIDGET_CRD, WIDGETS, Http, holds, wait_for, widget

WINDOW = 3


@pytest.fixture
async def tiny_server() -> AsyncIterator[ApiServer]:
    """An emulator that keeps only WINDOW watch events."""
    async with ApiServer(watch_window=WINDOW) as srv:
        yield srv
        assert srv.emulator.errors == []


@pytest.fixture
async def tiny(tiny_server: ApiServer) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        yield Http(tiny_server.url, session)


async def churn(http: Http, prefix: str, count: int = WINDOW + 2) -> None:
    """Enough writes to move the window past every earlier resourceVersion."""
    for i in range(count):
        assert (await http.post(CONFIGMAPS, {'metadata': {'name': f'{prefix}-{i}'}}))[0] == 201


async def test_watch_and_continue_from_an_expired_resource_version(tiny: Http) -> None:
    http = tiny
    _, first = await http.post(CONFIGMAPS, {'metadata': {'name': 'first'}})
    old_rv = first['metadata']['resourceVersion']
    await churn(http, 'a')
    events: list[dict[str, Any]] = []
    await http.watch(CONFIGMAPS, events, resourceVersion=old_rv, timeoutSeconds=5)
    assert len(events) == 1 and events[0]['type'] == 'ERROR'
    error = events[0]['object']
    assert error['kind'] == 'Status' and error['code'] == 410 and error['reason'] == 'Expired'
    assert error['message'].startswith(f'too old resource version: {old_rv} (')
    # A recent resourceVersion still resumes.
    _, latest = await http.get(CONFIGMAPS)
    events = []
    await http.watch(CONFIGMAPS, events, resourceVersion=latest['metadata']['resourceVersion'], timeoutSeconds=0.3)
    assert events == []

    status, page = await http.get(CONFIGMAPS, limit=2)
    token = page['metadata']['continue']
    await churn(http, 'b')
    status, err = await http.get(CONFIGMAPS, limit=2, **{'continue': token})
    assert status == 410 and err['reason'] == 'Expired'
    assert err['message'].startswith('The provided continue parameter is too old to display a consistent list')
    # The token in the answer goes on, inconsistently, at the current resourceVersion.
    status, rest = await http.get(CONFIGMAPS, **{'continue': err['metadata']['continue']})
    assert status == 200 and [o['metadata']['name'] for o in rest['items']][0] == 'a-2'


async def test_kopf_relists_after_its_watch_expired(tiny_server: ApiServer, tiny: Http) -> None:
    import kopf

    http = tiny
    assert (await http.post(CRDS, WIDGET_CRD))[0] == 201
    registry = kopf.OperatorRegistry()
    seen: list[tuple[str | None, str, int]] = []

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=http.url)

    @kopf.on.event('example.com', 'v1', 'widgets', registry=registry)
    def event(type: str | None, name: str, spec: Any, **_: Any) -> None:
        seen.append((type, name, spec['size']))

    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 30
    settings.watching.client_timeout = 1  # kopf ends each stream itself: no bookmark moves it on
    settings.posting.enabled = False
    stop = asyncio.Event()
    task = asyncio.create_task(kopf.operator(registry=registry, settings=settings, stop_flag=stop,
                                             standalone=True, clusterwide=True))

    def widget_lists() -> int:
        return sum(1 for r in tiny_server.emulator._requests if r.url.path.endswith('/widgets') and 'watch' not in r.params)

    try:
        await http.post(WIDGETS, widget('w', size=1))
        await wait_for(lambda: holds(('ADDED', 'w', 1) in seen or (None, 'w', 1) in seen), timeout=20)
        lists_before = widget_lists()
        await churn(http, 'c')  # kopf's last widget resourceVersion leaves the window
        # kopf resumes from it, gets the 410 and lists again.
        await wait_for(lambda: holds(widget_lists() > lists_before), timeout=20)
        await http.patch(WIDGETS + '/w', {'spec': {'size': 2}})
        await wait_for(lambda: holds(('MODIFIED', 'w', 2) in seen), timeout=20)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=20)


async def test_watch_window_flag_of_the_server_command(tmp_path: pathlib.Path) -> None:
    kubeconfig = tmp_path / 'config'
    proc = await asyncio.create_subprocess_exec(
        sys.executable, '-m', 'dmo_devstack.apiserver', '--port', '0', '--kubeconfig',
        str(kubeconfig), '--watch-window', '1', stdout=asyncio.subprocess.DEVNULL)
    try:
        await wait_for(lambda: holds(kubeconfig.exists()), timeout=60)  # written once serving
        url = yaml.safe_load(kubeconfig.read_text())['clusters'][0]['cluster']['server']
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            http = Http(url, session)
            _, first = await http.post(CONFIGMAPS, {'metadata': {'name': 'first'}})
            await churn(http, 'x', 2)
            events: list[dict[str, Any]] = []
            await http.watch(CONFIGMAPS, events, resourceVersion=first['metadata']['resourceVersion'])
            assert [e['object']['code'] for e in events] == [410]
    finally:
        proc.terminate()
        assert await proc.wait() == 0


async def test_periodic_bookmarks_of_a_watch_that_takes_them() -> None:
    """As kube-apiserver's watch cache (about every minute, here every 0.1 s): a BOOKMARK
    with only the resourceVersion, also when nothing changes; none without
    allowWatchBookmarks."""
    async with ApiServer(bookmark_interval=0.1) as srv, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        http = Http(srv.url, session)
        _, listing = await http.get(CONFIGMAPS)
        rv = listing['metadata']['resourceVersion']
        events: list[dict[str, Any]] = []
        await http.watch(CONFIGMAPS, events, resourceVersion=rv, allowWatchBookmarks='true', timeoutSeconds=1)
        assert len(events) >= 3 and {e['type'] for e in events} == {'BOOKMARK'}
        assert events[0]['object'] == {'kind': 'ConfigMap', 'apiVersion': 'v1', 'metadata': {'resourceVersion': rv}}
        events = []
        await http.watch(CONFIGMAPS, events, resourceVersion=rv, timeoutSeconds=1)
        assert events == []
