"""The server's ``/version`` is asked once per process (issue 16: 429 of 966 requests
of two busy clusters were ``GET /version``): kr8s asks it whenever its client is
awaited, so the operator's reads, writes and Events share one client, made once
(dask_memory_operator/kubeclient.py). On the emulated API over HTTP."""

from __future__ import annotations

from test_watches import NS, api  # noqa: F401  (the emulated API alone, a fixture)

from dask_memory_operator.controllers import workergroup
from dask_memory_operator.observability.events import dask_cluster_ref, post_from_background


async def test_the_server_version_is_asked_once(api):
    since = len(api.audit_events())
    for i in range(3):
        assert await workergroup.read_group(NS, "nope") is None
        assert await workergroup.cluster_deployments(NS, "c") == {}
        assert await workergroup.workers_without_hook(NS, "c") == []
        await post_from_background(dask_cluster_ref(NS, "c", "uid"), "Test", f"message {i}")
    asked = [e["requestURI"] for e in api.audit_events()[since:] if e["stage"] == "ResponseComplete"]
    assert len([u for u in asked if u.startswith("/version")]) == 1, asked
