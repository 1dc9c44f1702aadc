"""Kubernetes Events about what the operator did to a scheduler, posted on both the
MemoryPolicy and the DaskCluster (``kubectl describe`` on either shows them)."""

from __future__ import annotations

import datetime
import logging
import socket
from collections.abc import Mapping
from typing import Any

import kopf
from kr8s.asyncio.objects import Event

from dask_memory_operator.api.memorypolicy import DASK_GROUP, DASK_VERSION
from dask_memory_operator.schedulers.converge import Outcome

logger = logging.getLogger(__name__)

#: Characters of an Event's message kept (kopf's own limit)
MAX_MESSAGE = 1024


def dask_cluster_ref(namespace: str, name: str, uid: str) -> dict[str, Any]:
    """A body kopf can post an Event about."""
    return {
        "apiVersion": f"{DASK_GROUP}/{DASK_VERSION}",
        "kind": "DaskCluster",
        "metadata": {"namespace": namespace, "name": name, "uid": uid},
    }


def post_outcome(
    policy: kopf.Body,
    cluster: Mapping[str, Any],
    outcome: Outcome,
    previous: Mapping[str, Any],
) -> None:
    """Events on the policy and the cluster: every change, and each new degradation."""
    ref = post_actions(policy, cluster, outcome)
    was = next((e for e in previous.get("clusters") or () if e.get("name") == cluster["name"]), {})
    if outcome.state == "Degraded" and (was.get("state") != "Degraded" or was.get("message") != outcome.message):
        kopf.warn(policy, reason="Degraded", message=f"DaskCluster {cluster['name']}: {outcome.message}")
        kopf.warn(ref, reason="MemoryPolicyDegraded", message=outcome.message)


def post_actions(
    policy: Mapping[str, Any], cluster: Mapping[str, Any], outcome: Outcome
) -> dict[str, Any]:
    """An Event on the policy and one on the cluster for each change made; returns
    the cluster's reference for further Events."""
    meta = policy["metadata"]
    ref = dask_cluster_ref(meta["namespace"], cluster["name"], cluster["uid"])
    for action in outcome.actions:
        kopf.info(policy, reason="Applied", message=f"DaskCluster {cluster['name']}: {action}")
        kopf.info(ref, reason="MemoryPolicyApplied", message=f"MemoryPolicy {meta['name']}: {action}")
    return ref


async def post_from_background(ref: Mapping[str, Any], reason: str, message: str, type_: str = "Normal") -> None:
    """Post an Event from outside any kopf handler (kopf's ``kopf.info`` needs the
    per-object context that only handlers have). The body is the one kopf posts, so
    ``kubectl describe`` shows both alike. A failure is logged, never raised: an
    Event is a report, not part of the work."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    meta = ref["metadata"]
    if len(message) > MAX_MESSAGE:  # as kopf cuts them: the API server refuses longer
        message = message[: MAX_MESSAGE // 2 - 3] + " … " + message[-(MAX_MESSAGE // 2 - 3):]
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"namespace": meta["namespace"], "generateName": "kopf-event-"},
        "action": "Action?",
        "type": type_,
        "reason": reason,
        "message": message,
        "reportingComponent": "kopf",
        "reportingInstance": socket.gethostname(),  # in a pod: the pod's name
        "source": {"component": "kopf"},
        "involvedObject": {
            "apiVersion": ref["apiVersion"], "kind": ref["kind"], "namespace": meta["namespace"],
            "name": meta["name"], "uid": meta["uid"],
        },
        "firstTimestamp": now,
        "lastTimestamp": now,
        "eventTime": now,
    }
    try:
        await (await Event(body)).create()
    except Exception as e:  # the report is lost, the work is done
        logger.warning("Could not post Event %s on %s %s: %s", reason, ref["kind"], meta["name"], e)
