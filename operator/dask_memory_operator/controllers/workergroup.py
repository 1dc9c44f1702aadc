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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kr8s
import kr8s.asyncio
from kr8s.asyncio.objects import new_class

from dask_memory_operator.api.memorypolicy import DASK_GROUP, DASK_VERSION, GROUP

logger = logging.getLogger(__name__)

LEDGER_ANNOTATION = f"{GROUP}/scaling-ledger"
#: Names kept in each list of the ledger (the latest): enough for any retirement
#: still reported by a scheduler, small enough for an annotation
MAX_LEDGER_NAMES = 64
#: Characters of a ledger read from the API (it is in a user's namespace: bounded)
MAX_LEDGER_TEXT = 32_768

DaskWorkerGroup = new_class("DaskWorkerGroup", f"{DASK_GROUP}/{DASK_VERSION}", namespaced=True)


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
    """A DaskWorkerGroup and its worker Deployments, as read at one moment."""

    namespace: str
    name: str
    replicas: int
    ledger: Ledger
    has_annotations: bool
    #: metadata.resourceVersion as read: a group read without annotations is written
    #: only if nothing changed since (else adding the annotations map would replace
    #: annotations written meanwhile, e.g. dask-kubernetes' kopf state)
    resource_version: str = ""


async def read_group(namespace: str, name: str) -> WorkerGroup | None:
    """The group, or None when it does not exist."""
    try:
        group = await DaskWorkerGroup.get(name, namespace=namespace)
    except kr8s.NotFoundError:
        return None
    meta = group.raw.get("metadata", {})
    replicas = (group.raw.get("spec", {}).get("worker") or {}).get("replicas", 0)
    return WorkerGroup(
        namespace=namespace,
        name=name,
        replicas=int(replicas) if isinstance(replicas, int) else 0,
        ledger=Ledger.parse(meta.get("annotations") or {}),
        has_annotations=bool(meta.get("annotations")),
        resource_version=str(meta.get("resourceVersion", "")),
    )


async def cluster_deployments(namespace: str, cluster: str) -> dict[str, tuple[str, str]]:
    """name -> (worker group, uid) of every worker Deployment of the cluster that is
    not being deleted."""
    found = {}
    async for d in kr8s.asyncio.get(
        "deployments", namespace=namespace,
        label_selector={"dask.org/cluster-name": cluster, "dask.org/component": "worker"},
    ):
        if not d.metadata.get("deletionTimestamp"):
            labels = d.metadata.get("labels") or {}
            found[d.name] = (labels.get("dask.org/workergroup-name", ""), d.metadata["uid"])
    return found


async def delete_deployment(namespace: str, name: str, uid: str) -> bool:
    """Delete exactly that Deployment (the uid it had when read). False when it is
    gone already or another object holds the name now: nothing deleted twice."""
    api = await kr8s.asyncio.api()
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
    obj = await DaskWorkerGroup({"metadata": {"name": group.name, "namespace": group.namespace}})
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
    """Worker pods of the cluster (not being deleted) without the retirement hook:
    created while the webhook was down, or before a policy governed the cluster."""
    from dask_memory_operator.webhook.mutation import has_retirement_hook

    found = [
        pod.name
        async for pod in kr8s.asyncio.get(
            "pods", namespace=namespace,
            label_selector={"dask.org/cluster-name": cluster, "dask.org/component": "worker"},
        )
        if not pod.metadata.get("deletionTimestamp")
        and not any(has_retirement_hook(c) for c in pod.raw.get("spec", {}).get("containers") or ())
    ]
    return sorted(found)
