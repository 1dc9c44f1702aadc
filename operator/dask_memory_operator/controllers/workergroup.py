"""A DaskWorkerGroup and its worker Deployments as the scaling controller sees them,
and the writes it makes:
delete one worker's Deployment, change the group's replicas, remember what it did.

The scale-down protocol (FACTS.md, "Living beside the dask-kubernetes operator"):
retire the worker, delete exactly its Deployment (with a precondition on its uid), then
lower ``spec.worker.replicas`` with a JSON-patch ``test`` on the old value. When
dask-kubernetes sees the new replicas it counts the Deployments left, finds nothing to
do, and retires nothing of its own choosing.

The **ledger** is an annotation on the group, written in the same JSON patch as the
replicas: the Deployments whose removal the replicas already account for, the
paused workers whose replacement was already added, and the Deployments of workers
that never connected, about to be deleted (written before the deletion). It is what makes the protocol
safe to repeat after the operator is killed between two of its steps: a Deployment
gone but not in the ledger still needs its replica taken off; one in the ledger does
not. Everything else the controller needs is in the scheduler plugin's records.

Reads: the controller reads groups, Deployments and pods from the operator's
watch-backed caches (:mod:`dask_memory_operator.watches`, the same records as here);
the reads here ask the API, for what a cache cannot vouch for. The writes' preconditions
(the uid, the ``test`` of the replicas) are what keeps a read a moment old from
deleting or overwriting anything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kr8s
from kr8s.asyncio.objects import new_class

from dask_memory_operator import kubeclient
from dask_memory_operator.api.memorypolicy import DASK_GROUP, DASK_VERSION, GROUP
from dask_memory_operator.watches import DeploymentRecord, PodRecord, deployment_record, pod_record

logger = logging.getLogger(__name__)

LEDGER_ANNOTATION = f"{GROUP}/scaling-ledger"
#: Names kept in each list of the ledger (the latest): enough for any retirement
#: still reported by a scheduler, small enough for an annotation
MAX_LEDGER_NAMES = 64
#: Characters of a ledger read from the API (it is in a user's namespace: bounded)
MAX_LEDGER_TEXT = 32_768

DaskWorkerGroup = new_class("DaskWorkerGroup", f"{DASK_GROUP}/{DASK_VERSION}", namespaced=True)
DASK_API = f"{DASK_GROUP}/{DASK_VERSION}"


@dataclass
class Ledger:
    """What the group's replicas already account for."""

    #: Deployments deleted by the operator whose replica was taken off
    removed: list[str] = field(default_factory=list)
    #: Paused workers whose replacement replica was added
    replacing: list[str] = field(default_factory=list)
    #: Deployments about to be deleted without a retirement (their worker never
    #: connected): written before the deletion, so that a restart finds them
    deleting: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, annotations: Mapping[str, str]) -> Ledger:
        """The ledger of an annotation; anything malformed reads as empty (and is
        logged): the worst that does is one replica taken off again by hand."""
        text = annotations.get(LEDGER_ANNOTATION)
        if not text:
            return cls()
        try:
            if len(text) > MAX_LEDGER_TEXT:
                raise ValueError("too long")
            data = json.loads(text)
            lists = [data.get(k, []) for k in ("removed", "replacing", "deleting")]
            if not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in lists):
                raise ValueError("not lists of names")
        # RecursionError: deep nesting, which fits within MAX_LEDGER_TEXT
        except (ValueError, AttributeError, RecursionError) as e:
            logger.warning("Ignoring a malformed %s annotation: %s", LEDGER_ANNOTATION, e)
            return cls()
        return cls(*[v[-MAX_LEDGER_NAMES:] for v in lists])

    def dump(self) -> str:
        return json.dumps({
            "removed": self.removed[-MAX_LEDGER_NAMES:],
            "replacing": self.replacing[-MAX_LEDGER_NAMES:],
            "deleting": self.deleting[-MAX_LEDGER_NAMES:],
        })


@dataclass
class WorkerGroup:
    """A DaskWorkerGroup as read at one moment (from the API, or the watch's cache:
    :func:`group_record` makes both)."""

    namespace: str
    name: str
    replicas: int
    ledger: Ledger
    has_annotations: bool
    #: metadata.resourceVersion as read: a group read without annotations is written
    #: only if nothing changed since (else adding the annotations map would replace
    #: annotations written meanwhile, e.g. dask-kubernetes' kopf state)
    resource_version: str = ""
    uid: str = ""
    #: spec.cluster
    cluster: str = ""


def group_record(body: Mapping[str, Any]) -> WorkerGroup:
    """What the controller reads of a DaskWorkerGroup (bounded: the ledger is)."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    replicas = (spec.get("worker") or {}).get("replicas", 0) if isinstance(spec.get("worker"), Mapping) else 0
    cluster = spec.get("cluster")
    return WorkerGroup(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        replicas=replicas if isinstance(replicas, int) and not isinstance(replicas, bool) else 0,
        ledger=Ledger.parse(meta.get("annotations") or {}),
        has_annotations=bool(meta.get("annotations")),
        resource_version=str(meta.get("resourceVersion", "")),
        uid=str(meta.get("uid", "")),
        cluster=cluster[:253] if isinstance(cluster, str) else "",
    )


def copy_of(group: WorkerGroup) -> WorkerGroup:
    """A pass's own copy of a cached group (a write updates the copy it made)."""
    return dataclasses.replace(group, ledger=Ledger(list(group.ledger.removed), list(group.ledger.replacing),
                                                    list(group.ledger.deleting)))


async def read_group(namespace: str, name: str) -> WorkerGroup | None:
    """The group from the API, or None when it does not exist (a LIST by name, as
    kr8s reads by name and the chart grants)."""
    items = await _list(DASK_API, namespace, "daskworkergroups", {"fieldSelector": f"metadata.name={name}"})
    found = [i for i in items if (i.get("metadata") or {}).get("name") == name]
    return group_record(found[0]) if found else None


async def cluster_deployments(namespace: str, cluster: str) -> dict[str, tuple[str, str]]:
    """name -> (worker group, uid) of every worker Deployment of the cluster that is
    not being deleted, from the API."""
    items = await _list("apps/v1", namespace, "deployments", {"labelSelector": _worker_selector(cluster)})
    return worker_deployments([deployment_record(d) for d in items])


def worker_deployments(records: list[DeploymentRecord]) -> dict[str, tuple[str, str]]:
    """name -> (worker group, uid) of the worker Deployments not being deleted."""
    return {d.name: (d.group, d.uid) for d in records if d.component == "worker" and not d.deleting}


def _worker_selector(cluster: str) -> str:
    return f"dask.org/cluster-name={cluster},dask.org/component=worker"


async def _list(version: str, namespace: str, plural: str, params: dict[str, str]) -> list[dict[str, Any]]:
    api = await kubeclient.client()
    base = "/apis" if "/" in version else "/api"
    async with api.call_api("GET", version=version, base=base, namespace=namespace, url=plural,
                            params=params) as response:
        return [i for i in response.json().get("items") or () if isinstance(i, dict)]


async def delete_deployment(namespace: str, name: str, uid: str) -> bool:
    """Delete exactly that Deployment (the uid it had when read). False when it is
    gone already or another object holds the name now: nothing deleted twice."""
    api = await kubeclient.client()
    body = {"propagationPolicy": "Background", "preconditions": {"uid": uid}}
    try:
        async with api.call_api(
            "DELETE", version="apps/v1", base="/apis", namespace=namespace,
            url=f"deployments/{name}", content=json.dumps(body),
        ):
            return True
    except kr8s.ServerError as e:
        if e.response is not None and e.response.status_code in (404, 409):
            return False
        raise


async def set_replicas(group: WorkerGroup, replicas: int, ledger: Ledger) -> bool:
    """``spec.worker.replicas`` from the value read to ``replicas``, and the ledger,
    in one JSON patch that tests the old value. False when someone changed the
    replicas meanwhile, or changed anything when the group had no annotations (the
    caller reads the group again next time)."""
    key = LEDGER_ANNOTATION.replace("~", "~0").replace("/", "~1")
    ops: list[dict[str, Any]] = [
        {"op": "test", "path": "/spec/worker/replicas", "value": group.replicas},
        {"op": "replace", "path": "/spec/worker/replicas", "value": replicas},
    ]
    if group.has_annotations:
        ops.append({"op": "add", "path": f"/metadata/annotations/{key}", "value": ledger.dump()})
    else:
        if group.resource_version:
            ops.insert(0, {"op": "test", "path": "/metadata/resourceVersion", "value": group.resource_version})
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {LEDGER_ANNOTATION: ledger.dump()}})
    obj = DaskWorkerGroup({"metadata": {"name": group.name, "namespace": group.namespace}},
                          api=await kubeclient.client())
    try:
        await obj.patch(ops, type="json")
    except kr8s.ServerError as e:
        if e.response is not None and e.response.status_code in (409, 422):
            return False
        raise
    group.replicas, group.ledger, group.has_annotations = replicas, ledger, True
    group.resource_version = str(obj.metadata.get("resourceVersion", ""))
    return True


async def workers_without_hook(namespace: str, cluster: str) -> list[str]:
    """Worker pods of the cluster (not being deleted) without the retirement hook,
    from the API: created while the webhook was down, or before a policy governed
    the cluster."""
    items = await _list("v1", namespace, "pods", {"labelSelector": _worker_selector(cluster)})
    return unhooked_workers([pod_record(p) for p in items])


async def worker_pods(namespace: str, cluster: str) -> list[PodRecord]:
    """The cluster's worker pods from the API, as the pods cache keeps them."""
    items = await _list("v1", namespace, "pods", {"labelSelector": _worker_selector(cluster)})
    return [pod_record(p) for p in items]


def unhooked_workers(pods: list[PodRecord]) -> list[str]:
    """The names of the worker pods (not being deleted) without the retirement hook, sorted."""
    return sorted(p.name for p in pods if p.component == "worker" and not p.hook and not p.deleting)
