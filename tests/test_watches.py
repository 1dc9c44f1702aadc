"""The operator's watch-backed caches (dask_memory_operator/watches.py), on the emulated
API over HTTP (no kubelet, no dask-kubernetes: the objects are written here): one
LIST then events, a relist that forgets what is gone, and the two ways staleness could
make the scaling controller act wrongly, which it must not: reading its own write's
object before the watch shows the write, and deleting from a cache a moment behind."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from dask_memory_operator.controllers.scaling import TAG, ClusterScaling, Pass, ScalingController
from dask_memory_operator.controllers.workergroup import Ledger, group_record
from dask_memory_operator.devstack.stack import LocalStack
from dask_memory_operator.watches import Watches, operator_kinds

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
    """``verb resource`` of the requests this test's kr8s client made after the
    ``since``-th audit event (kubectl, the test's writer, has an agent of its own): a
    watch counted when it opens, anything else when it is answered."""
    found = []
    for e in stack.audit_events()[since:]:
        if e.get("userAgent", "").startswith("kr8s") and \
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
