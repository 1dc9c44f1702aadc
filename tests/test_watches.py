"""The operator's watch-backed caches (dask_memory_operator/watches.py), on the emulated
API over HTTP (no kubelet, no dask-kubernetes: the objects are written here): one
LIST then events, a relist that forgets what is gone, and the ways staleness could
make the scaling controller act wrongly, which it must not: reading its own write's
object before the watch shows the write (also a write whose answer was lost, or whose
event never came), a deletion undone by a LIST begun before it, deleting from a cache a
moment behind, a watch whose connection died without a word. And the ways one
namespace could break the caches of all: a 403, an object the cache cannot keep, too
many objects."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlparse

import httpx
import kopf
import pytest

from dask_memory_operator import kubeclient
from dask_memory_operator import watches as watches_module
from dask_memory_operator.controllers.registry import stop_background_tasks
from dask_memory_operator.controllers.scaling import TAG, ClusterScaling, Pass, ScalingController
from dask_memory_operator.controllers.workergroup import Ledger, group_record
from dmo_devstack.apiserver import ApiServer, write_kubeconfig
from dmo_devstack.stack import LocalStack
from dask_memory_operator.watches import CLUSTER_LABEL, Kind, Watches, deployment_record, operator_kinds

NS = "ns"
LABELS = {"dask.org/cluster-name": "c", "dask.org/component": "worker", "dask.org/workergroup-name": "c-default"}


@pytest.fixture
def api(tmp_path, monkeypatch) -> Iterator[LocalStack]:
    """The emulated API alone; this test's kr8s client is the only one with its agent."""
    with LocalStack(tmp_path, dask_operator=False, kubelet=False) as stack:
        monkeypatch.setenv("KUBECONFIG", str(stack.kubeconfig))
        stack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        yield stack


def kinds(*plurals: str) -> list[Any]:
    return [k for k in operator_kinds(group_record=group_record) if k.plural in plurals]


def deployment(stack: LocalStack, name: str) -> str:
    """A worker Deployment of cluster c, as dask-kubernetes makes one; returns its uid."""
    stack.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": LABELS},
                 "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                          "template": {"metadata": {"labels": {"app": name}},
                                       "spec": {"containers": [{"name": "w", "image": "dask"}]}}}},
                namespace=NS)
    return stack.get_json(f"/apis/apps/v1/namespaces/{NS}/deployments/{name}")["metadata"]["uid"]


def group(stack: LocalStack, replicas: int) -> None:
    stack.apply({"apiVersion": "kubernetes.dask.org/v1", "kind": "DaskWorkerGroup",
                 "metadata": {"name": "c-default", "labels": {"dask.org/cluster-name": "c"}},
                 "spec": {"cluster": "c", "worker": {"replicas": replicas, "spec": {"containers": [
                     {"name": "worker", "image": "dask"}]}}}}, namespace=NS)


def my_requests(stack: LocalStack, since: int) -> list[str]:
    """``verb resource`` of the requests this test's clients (kr8s, the watches' own)
    made after the ``since``-th audit event (kubectl, the test's writer, has an agent of
    its own): a watch counted when it opens, anything else when it is answered."""
    found = []
    for e in stack.audit_events()[since:]:
        if e.get("userAgent", "").startswith(("kr8s", "dask-memory-operator")) and \
                e["stage"] == ("ResponseStarted" if e["verb"] == "watch" else "ResponseComplete"):
            found.append(f"{e['verb']} {(e.get('objectRef') or {}).get('resource') or e['requestURI']}")
    return found


async def until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class FakeReconciler:
    rpc_timeout = 1.0


async def test_one_list_then_the_watch_keeps_the_cache(api):
    """A Deployment created and then deleted from outside is seen by the cache from
    the watch's events: one LIST and one WATCH in all, whatever happens after."""
    since = len(api.audit_events())
    watches = Watches(kinds("deployments"))
    assert await watches.start(10)
    try:
        assert watches.of_cluster("deployments", NS, "c") == []
        uid = deployment(api, "c-default-worker-a")
        await until(lambda: [d.uid for d in watches.of_cluster("deployments", NS, "c")] == [uid], "the ADDED event")
        vouched, found = watches.get("deployments", NS, "c-default-worker-a")
        assert vouched and found.group == "c-default" and found.component == "worker"
        api.kubectl("delete", "deployment", "c-default-worker-a", "-n", NS)
        await until(lambda: watches.of_cluster("deployments", NS, "c") == [], "the DELETED event")
        assert watches.get("deployments", NS, "c-default-worker-a") == (True, None)
    finally:
        await watches.stop()
    assert [r for r in my_requests(api, since) if "version" not in r] == ["list deployments", "watch deployments"]


async def test_a_relist_forgets_what_was_deleted_meanwhile(api):
    """What kopf's indexes do not do: an object deleted while nothing watched is gone
    from the cache once it is listed again (a 410 relist, a watch that was down)."""
    deployment(api, "c-default-worker-a")
    watches = Watches(kinds("deployments"))
    informer = watches.informer("deployments", NS)
    await informer.refresh()
    assert [d.name for d in watches.of_cluster("deployments", NS, "c")] == ["c-default-worker-a"]
    api.kubectl("delete", "deployment", "c-default-worker-a", "-n", NS)
    await informer.refresh()
    assert watches.of_cluster("deployments", NS, "c") == []


async def test_a_cache_not_synced_vouches_for_nothing(api):
    deployment(api, "c-default-worker-a")
    watches = Watches(kinds("deployments"))
    assert watches.of_cluster("deployments", NS, "c") is None
    assert watches.get("deployments", NS, "c-default-worker-a") == (False, None)
    controller = ScalingController(FakeReconciler(), watches=watches)
    # the pass reads the API instead
    assert list(await controller._deployments(NS, "c")) == ["c-default-worker-a"]


async def test_the_pass_after_the_operators_write_does_not_read_the_old_group(api):
    """A cache that never follows its watch (one LIST, then nothing): after the
    controller's replicas patch the group is read from the API, not from the cache
    still holding the replicas of before (the pass would count a worker that is gone
    and retire one more)."""
    group(api, 3)
    watches = Watches(kinds("daskworkergroups"))
    await watches.informer("daskworkergroups", NS).refresh()
    controller = ScalingController(FakeReconciler(), watches=watches)
    since = len(api.audit_events())
    read = await controller._group(NS, "c-default")
    assert read.replicas == 3 and my_requests(api, since) == []  # from the cache
    assert await controller._set_replicas(read, 2, Ledger(["c-default-worker-a"]))
    assert watches.get("daskworkergroups", NS, "c-default") == (False, None)  # behind the write
    since = len(api.audit_events())
    again = await controller._group(NS, "c-default")
    assert again.replicas == 2 and again.ledger.removed == ["c-default-worker-a"]
    assert my_requests(api, since) == ["list daskworkergroups"]
    # once the cache shows the write, it is trusted again
    await watches.informer("daskworkergroups", NS).refresh()
    assert watches.get("daskworkergroups", NS, "c-default")[1].replicas == 2


async def test_a_stale_cache_deletes_nothing(api):
    """The retired worker's Deployment was deleted and its name taken by a new one
    since the cache was filled: deleting by the cached uid deletes nothing."""
    old = deployment(api, "c-default-worker-a")
    watches = Watches(kinds("deployments"))
    await watches.informer("deployments", NS).refresh()
    api.kubectl("delete", "deployment", "c-default-worker-a", "-n", NS)
    new = deployment(api, "c-default-worker-a")
    assert new != old
    controller = ScalingController(FakeReconciler(), watches=watches)
    deployments = await controller._deployments(NS, "c")
    assert deployments == {"c-default-worker-a": ("c-default", old)}  # stale, and vouched for
    done = {"worker": "c-default-worker-a", "state": "done", "requested": f"{TAG}: c-default from 2 to 1",
            "seconds": 1.0}
    p = Pass(NS, "c", "uid", "tcp://127.0.0.1:1", {"retirements": [done]}, deployments, {}, {"cluster": "c"})
    await controller._finish_retirements(p, ClusterScaling())
    assert api.get_json(f"/apis/apps/v1/namespaces/{NS}/deployments/c-default-worker-a")["metadata"]["uid"] == new



# --- a connection that hangs or loses answers; the API in this process -------------------


class Proxy:
    """A TCP proxy to the API server that can go silent (:meth:`freeze`: its open
    connections stay open and nothing passes, as behind a peer that hung without a word)
    or lose answers (:attr:`lose_answers`: the request reaches the server, the client
    sees its connection drop before the answer: the write's outcome is unknown)."""

    def __init__(self, upstream: str):
        self.upstream = urlparse(upstream)
        self.lose_answers = False
        self._connections: list[dict[str, Any]] = []
        self._closed = asyncio.Event()

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._closed.set()
        self._server.close()
        for conn in self._connections:
            for writer in conn["writers"]:
                writer.close()

    def freeze(self) -> None:
        for conn in self._connections:
            conn["hung"] = True

    def kubeconfig(self, path: Path) -> Path:
        write_kubeconfig(path, self.url)
        return path

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.upstream.hostname, self.upstream.port)
        conn = {"hung": False, "writers": [writer, up_writer]}
        self._connections.append(conn)
        await asyncio.gather(self._pump(reader, up_writer, conn, False), self._pump(up_reader, writer, conn, True),
                             return_exceptions=True)
        for w in conn["writers"]:
            w.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, conn: dict[str, Any],
                    answers: bool) -> None:
        while data := await source.read(65536):
            if conn["hung"]:
                await self._closed.wait()
                return
            if answers and self.lose_answers:
                for w in conn["writers"]:
                    w.close()
                return
            sink.write(data)
            await sink.drain()
        sink.close()


@pytest.fixture
async def live(tmp_path, monkeypatch) -> AsyncIterator[tuple[ApiServer, Proxy]]:
    """The emulated API in this process (a BOOKMARK every 0.1 s to a watch that takes
    them), the operator's clients reaching it through a :class:`Proxy`."""
    async with ApiServer(bookmark_interval=0.1) as server, Proxy(server.url) as proxy:
        monkeypatch.setenv("KUBECONFIG", str(proxy.kubeconfig(tmp_path / "kubeconfig")))
        await write(server, "POST", "/api/v1/namespaces", {"metadata": {"name": NS}})
        yield server, proxy


async def write(server: ApiServer, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """A write of someone else's, straight to the API (not through the proxy)."""
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.request(method, path, json=body)
        response.raise_for_status()
        return response.json()


def deployment_body(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": LABELS},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "w", "image": "dask"}]}}}}


def names(records: list[Any] | None) -> list[str] | None:
    return None if records is None else sorted(r.name for r in records)


# --- the operator's own writes ------------------------------------------------------------


async def test_a_write_never_shown_is_never_trusted_again(api, monkeypatch):
    """The cache does not follow its watch (one LIST, then nothing): past BEHIND_TTL the
    group the controller wrote is still not vouched for (it was, with the replicas of
    before the write); only a LIST shows it again."""
    monkeypatch.setattr(watches_module, "BEHIND_TTL", 0.2)
    group(api, 3)
    watches = Watches(kinds("daskworkergroups"))
    informer = watches.informer("daskworkergroups", NS)
    await informer.refresh()
    controller = ScalingController(FakeReconciler(), watches=watches)
    assert await controller._set_replicas(await controller._group(NS, "c-default"), 2, Ledger(["w"]))
    written = time.monotonic()
    await until(lambda: time.monotonic() - written > 2 * watches_module.BEHIND_TTL, "the TTL past")
    assert watches.get("daskworkergroups", NS, "c-default") == (False, None)
    assert not informer.synced
    await informer.refresh()
    assert watches.get("daskworkergroups", NS, "c-default")[1].replicas == 2


async def test_a_write_whose_event_never_comes_lists_and_watches_anew(api, monkeypatch):
    """A write the watch never shows (a resourceVersion no event has): past BEHIND_TTL
    the informer lists again, and what that LIST shows is vouched for."""
    monkeypatch.setattr(watches_module, "BEHIND_TTL", 0.2)
    deployment(api, "c-default-worker-a")
    watches = Watches(kinds("deployments"))
    assert await watches.start(10)
    informer = watches.informer("deployments", NS)
    try:
        watches.wrote("deployments", NS, "c-default-worker-a", "999999")
        assert watches.get("deployments", NS, "c-default-worker-a") == (False, None)
        await until(lambda: watches.get("deployments", NS, "c-default-worker-a")[0], "vouched for after a LIST")
        assert informer.lists == 2
    finally:
        await watches.stop()


async def test_a_write_whose_answer_is_lost_is_not_read_from_the_cache(api, tmp_path, monkeypatch):
    """The replicas patch reaches the API but its answer is lost (the connection drops):
    the pass after it reads the group from the API, which shows the write."""
    group(api, 3)
    async with Proxy(api.api_url) as proxy:
        monkeypatch.setenv("KUBECONFIG", str(proxy.kubeconfig(tmp_path / "proxied")))
        watches = Watches(kinds("daskworkergroups"))
        await watches.informer("daskworkergroups", NS).refresh()
        controller = ScalingController(FakeReconciler(), watches=watches)
        read = await controller._group(NS, "c-default")
        await kubeclient.client()  # (made now: its /version is not what is lost)
        proxy.lose_answers = True
        with pytest.raises(httpx.TransportError):
            await controller._set_replicas(read, 2, Ledger(["c-default-worker-a"]))
        proxy.lose_answers = False
        assert api.get_json(f"/apis/kubernetes.dask.org/v1/namespaces/{NS}/daskworkergroups/c-default")[
            "spec"]["worker"]["replicas"] == 2
        assert watches.get("daskworkergroups", NS, "c-default") == (False, None)
        assert (await controller._group(NS, "c-default")).replicas == 2
        await watches.stop()


async def test_a_list_begun_before_the_operators_delete_does_not_bring_it_back(api, monkeypatch):
    """A LIST pages through the Deployments; between its pages the controller deletes
    one the LIST already returned (read from the API: the cache was not synced). The
    cache the LIST makes holds it, but does not vouch for it."""
    monkeypatch.setattr(watches_module, "PAGE", 1)
    uid = deployment(api, "c-default-worker-a")
    deployment(api, "c-default-worker-b")
    watches = Watches(kinds("deployments"))
    informer = watches.informer("deployments", NS)
    controller = ScalingController(FakeReconciler(), watches=watches)
    page = informer._page

    async def page_then_delete(params: dict[str, Any]) -> Any:
        found = await page(params)
        if "continue" not in params:
            assert await controller._delete(NS, "c-default-worker-a", uid)
        return found

    monkeypatch.setattr(informer, "_page", page_then_delete)
    await informer.refresh()
    assert watches.get("deployments", NS, "c-default-worker-a") == (False, None)
    assert watches.of_cluster("deployments", NS, "c") is None
    assert list(await controller._deployments(NS, "c")) == ["c-default-worker-b"]  # from the API


# --- a watch that is down, silent, or refused ---------------------------------------------


async def test_a_silent_watch_vouches_for_nothing_then_resumes(live, monkeypatch, caplog):
    """Bookmarks keep an idle watch vouched for past WATCH_FRESH; a connection that
    goes silent is not vouched for past it, and the watch, ended by its read timeout, is
    resumed from where it was (no LIST) and shows what changed meanwhile."""
    server, proxy = live
    caplog.set_level(logging.INFO, logger="dask_memory_operator.watches")
    monkeypatch.setattr(watches_module, "WATCH_FRESH", 1.5)
    monkeypatch.setattr(watches_module, "WATCH_READ_TIMEOUT", 2.5)
    watches = Watches(kinds("deployments"))
    assert await watches.start(10)
    informer = watches.informer("deployments", NS)
    try:
        await until(lambda: informer.signs >= 20, "two seconds of bookmarks")
        assert informer.synced and watches.of_cluster("deployments", NS, "c") == []
        proxy.freeze()
        await write(server, "POST", f"/apis/apps/v1/namespaces/{NS}/deployments", deployment_body("c-default-worker-a"))
        await until(lambda: not informer.synced, "the silent watch not vouched for")
        assert watches.of_cluster("deployments", NS, "c") is None
        assert "failed" not in caplog.text  # by its silence, before its read timeout
        await until(lambda: names(watches.of_cluster("deployments", NS, "c")) == ["c-default-worker-a"],
                    "the resumed watch's event")
        assert informer.lists == 1
    finally:
        await watches.stop()


async def test_a_refusal_in_one_namespace_leaves_the_others_alone(api, monkeypatch, caplog):
    """The operator may list Deployments in NS only: the watch in "other" is refused
    (403) again and again, logged once; the watch in NS goes on (its LIST once, its
    events seen): no signing in again that would break the connections it shares."""
    monkeypatch.setattr(watches_module, "RETRY_BASE", 0.05)
    monkeypatch.setattr(watches_module, "RETRY_CAP", 0.2)
    caplog.set_level(logging.DEBUG, logger="dask_memory_operator.watches")
    api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
    api.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "watch"},
               "rules": [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["list", "watch"]}]},
              namespace=NS)
    api.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "watch"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "watch"},
               "subjects": [{"kind": "ServiceAccount", "name": "watcher", "namespace": NS}]}, namespace=NS)
    kubeconfig, _ = api.service_account_kubeconfig(NS, "watcher", cluster_role="none-at-all")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    watches = Watches(kinds("deployments"), namespaces=[NS, "other"])
    mine, other = watches.informer("deployments", NS), watches.informer("deployments", "other")
    await watches.start(1)
    try:
        await until(lambda: mine.synced and other.lists >= 5, "five refused LISTs")
        uid = deployment(api, "c-default-worker-a")
        await until(lambda: [d.uid for d in watches.of_cluster("deployments", NS, "c") or ()] == [uid], "the event")
        assert mine.lists == 1 and not other.synced and watches.of_cluster("deployments", "other", "c") is None
    finally:
        await watches.stop()
    refusals = [r for r in caplog.records if "in other" in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(refusals) == 1 and "403" in refusals[0].getMessage()


# --- what the cache cannot keep -----------------------------------------------------------


def picky(deployment: Any) -> Any:
    """A record maker that cannot make one of the Deployment named "bad"."""
    if deployment["metadata"]["name"] == "bad":
        raise KeyError("what it needs")
    return deployment_record(deployment)


async def test_an_object_it_cannot_keep_leaves_only_its_namespace_unvouched(api):
    api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
    for name, namespace in (("bad", "other"), ("c-default-worker-a", NS)):
        api.apply({"apiVersion": "apps/v1", "kind": "Deployment", **deployment_body(name)}, namespace=namespace)
    watches = Watches([Kind("apps/v1", "deployments", CLUSTER_LABEL, picky)])
    assert await watches.start(10)
    try:
        assert names(watches.of_cluster("deployments", NS, "c")) == ["c-default-worker-a"]
        assert watches.of_cluster("deployments", "other", "c") is None
        assert watches.get("deployments", "other", "bad") == (False, None)
        api.kubectl("delete", "deployment", "bad", "-n", "other")
        await until(lambda: watches.of_cluster("deployments", "other", "c") == [], "other vouched for again")
    finally:
        await watches.stop()


async def test_a_namespace_past_the_cap_is_read_from_the_api(api, monkeypatch):
    monkeypatch.setattr(watches_module, "MAX_PER_NAMESPACE", 2)
    api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
    for name in ("c-default-worker-a", "c-default-worker-b", "c-default-worker-c"):
        api.apply({"apiVersion": "apps/v1", "kind": "Deployment", **deployment_body(name)}, namespace="other")
    deployment(api, "c-default-worker-a")
    watches = Watches(kinds("deployments"))
    await watches.informer("deployments", NS).refresh()
    assert names(watches.of_cluster("deployments", NS, "c")) == ["c-default-worker-a"]
    assert watches.of_cluster("deployments", "other", "c") is None


# --- starting and stopping ----------------------------------------------------------------


async def test_started_once_and_stopped_also_when_the_locator_fails_to_close(api):
    """kopf runs a startup handler that failed again: the second start starts nothing
    more. The operator's stop ends the watches also when closing the locator fails."""
    watches = Watches(kinds("deployments"))
    informer = watches.informer("deployments", NS)
    assert await watches.start(10) and await watches.start(10)
    assert informer.lists == 1 and len(watches._tasks) == 1

    class Locator:
        async def close(self) -> None:
            raise RuntimeError("port-forward gone wrong")

    memo = kopf.Memo(watches=watches, reconciler=SimpleNamespace(locator=Locator()))
    with pytest.raises(RuntimeError):
        await stop_background_tasks(memo)
    assert watches._tasks == [] and not informer.synced


def worker_pod(stack: LocalStack, name: str) -> None:
    """A worker pod of cluster c with a memory limit (no kubelet runs it)."""
    stack.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": LABELS},
                 "spec": {"containers": [{"name": "worker", "image": "dask",
                                          "env": [{"name": "DASK_WORKER_NAME", "value": f"{name}-w"}],
                                          "resources": {"limits": {"memory": "1Gi"}}}]}}, namespace=NS)


async def test_pods_that_go_are_kept_a_while_with_when(api):
    """The savings count a worker pod's seconds until it went: the pods cache keeps the
    last record of each pod that went, from its deletion event or from a relist that
    no longer finds it, with when."""
    import time

    watches = Watches(kinds("pods"))
    informer = watches.informer("pods", NS)
    assert await watches.start(10)
    try:
        worker_pod(api, "p1")
        await until(lambda: watches.of_cluster("pods", NS, "c"), "the pod")
        [p1] = watches.of_cluster("pods", NS, "c")
        assert (p1.worker, p1.group, p1.memory_limit, p1.restarts, p1.last_exit) == ("p1-w", "c-default", 2**30, 0, None)
        before = time.time()
        api.kubectl("delete", "pod", "p1", "-n", NS, "--grace-period=0", "--force")
        await until(lambda: watches.gone("pods", NS, "c", 0), "the pod gone")
        [(when, record)] = watches.gone("pods", NS, "c", 0)
        assert record.name == "p1" and before - 1 <= when <= time.time()
        assert watches.gone("pods", NS, "c", when) == []
    finally:
        await watches.stop()
    worker_pod(api, "p2")
    await informer.refresh()
    api.kubectl("delete", "pod", "p2", "-n", NS, "--grace-period=0", "--force")
    await informer.refresh()  # nothing watched in between: the relist finds it gone
    assert [r.name for _, r in watches.gone("pods", NS, "c", 0)] == ["p1", "p2"]
