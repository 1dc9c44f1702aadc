"""Kubernetes Events about what the operator did to a scheduler, posted on both the
MemoryPolicy and the DaskCluster (``kubectl describe`` on either shows them).

Every Event goes through :data:`GATE` here, the one place that decides whether it
is posted, because the operator is shared by tenants and Events are an API write
each: a scheduler that keeps reporting (say) 1,000 aborted retirements on every
pass must not make the operator post 1,000 Events a second, nor fill etcd for
everyone. The callers post on transitions (a record's state change, not each pass
that sees it); the gate adds two rules whatever the caller does:

- **Deduplicated**: an Event the same as one posted on the same object less than
  :data:`REPEAT_AFTER` seconds ago (same reason and message) is not posted again.
- **Capped**: at most :data:`EVENTS_PER_WINDOW` Events about one DaskCluster (on the
  cluster or on its policy) in :data:`EVENT_WINDOW` seconds; past that, the others
  are counted and one ``EventsSuppressed`` warning on the cluster says how many,
  when the window ends; and at most :data:`EVENTS_PER_NAMESPACE` about all the
  objects of one namespace (a tenant with many clusters).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from kr8s.asyncio.objects import Event

from dask_memory_operator import kubeclient
from dask_memory_operator.api.memorypolicy import DASK_GROUP, DASK_VERSION
from dask_memory_operator.schedulers.outcome import Outcome

logger = logging.getLogger(__name__)

#: Characters of an Event's message kept (kopf's own limit)
MAX_MESSAGE = 1024
#: Events about one DaskCluster (or one policy, for the policy's own) per window
EVENTS_PER_WINDOW = 30
#: Events about all the objects of one namespace per window
EVENTS_PER_NAMESPACE = 120
#: Seconds of a window
EVENT_WINDOW = 60.0
#: Seconds before an Event the same as one posted (same object, reason, message) is
#: posted again
REPEAT_AFTER = 600.0
#: Posted Events remembered for deduplication (each is a key of ~100 bytes)
MAX_REMEMBERED = 10_000

#: (kind, namespace, name, uid) of an object
ObjectKey = tuple[str, str, str, str]


def _key(ref: Mapping[str, Any]) -> ObjectKey:
    meta = ref.get("metadata") or {}
    return (str(ref.get("kind", "")), str(meta.get("namespace", "")), str(meta.get("name", "")),
            str(meta.get("uid", "")))


@dataclass
class _Window:
    """The Events about one subject in the current window."""

    start: float
    #: The subject, for the summary Event
    ref: dict[str, Any]
    posted: int = 0
    suppressed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    summary: asyncio.TimerHandle | None = None


class EventGate:
    """Decides which Events are posted (see the module docstring). One per operator:
    its memory is bounded by MAX_REMEMBERED keys and one window per subject that
    had Events in the last window."""

    def __init__(self) -> None:
        self._recent: OrderedDict[tuple[ObjectKey, str, bytes], float] = OrderedDict()
        self._windows: dict[ObjectKey, _Window] = {}
        #: Summary tasks under way (kept referenced until done)
        self._tasks: set[asyncio.Task[None]] = set()

    def admit(self, obj: Mapping[str, Any], subject: Mapping[str, Any], reason: str, message: str) -> bool:
        """Whether an Event on ``obj`` about ``subject`` is to be posted now; counts it."""
        now = time.monotonic()
        key = (_key(obj), reason, hashlib.blake2b(message.encode(errors="replace"), digest_size=16).digest())
        last = self._recent.get(key)
        if last is not None and now - last < REPEAT_AFTER:
            return False  # the same Event, posted a moment ago: not news
        who = _key(subject)
        window = self._window(who, subject, now)
        tenant = self._window(("Namespace", who[1], who[1], ""), subject, now)
        if window.posted >= EVENTS_PER_WINDOW or tenant.posted >= EVENTS_PER_NAMESPACE:
            window.suppressed += 1
            window.reasons[reason] = window.reasons.get(reason, 0) + 1
            if window.summary is None:
                window.summary = self._schedule_summary(window, window.start + EVENT_WINDOW - now)
            return False
        window.posted += 1
        tenant.posted += 1
        self._recent[key] = now
        self._recent.move_to_end(key)
        while len(self._recent) > MAX_REMEMBERED:
            self._recent.popitem(last=False)
        return True

    def _window(self, who: ObjectKey, subject: Mapping[str, Any], now: float) -> _Window:
        window = self._windows.get(who)
        if window is None or now - window.start >= EVENT_WINDOW:
            if window is None and len(self._windows) >= MAX_REMEMBERED:
                self._prune(now)
            window = self._windows[who] = _Window(now, _ref_of(subject))
        return window

    def _prune(self, now: float) -> None:
        # a window's pending summary holds the window itself: it need not stay here
        for who in [w for w, win in self._windows.items() if now - win.start >= EVENT_WINDOW]:
            del self._windows[who]

    def _schedule_summary(self, window: _Window, delay: float) -> asyncio.TimerHandle | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a unit's direct call): nothing to post later
            return None
        return loop.call_later(max(0.0, delay), self._summarize, window)

    def _summarize(self, window: _Window) -> None:
        window.summary = None
        if not window.suppressed:
            return
        reasons = ", ".join(f"{r} ×{n}" for r, n in sorted(window.reasons.items())[:10])
        meta = window.ref["metadata"]
        message = (f"{window.suppressed} more Events about {window.ref['kind']} {meta['name']} "
                   f"suppressed: at most {EVENTS_PER_WINDOW} are posted per {EVENT_WINDOW:g}s ({reasons})")
        window.suppressed = 0
        window.reasons = {}
        task = asyncio.get_running_loop().create_task(
            _create(window.ref, "EventsSuppressed", message, "Warning"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


#: The operator's gate: every Event goes through it
GATE = EventGate()


def _ref_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    return {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
            "metadata": {k: meta.get(k) for k in ("namespace", "name", "uid")}}


def post(obj: Mapping[str, Any], reason: str, message: str, type_: str = "Normal",
         subject: Mapping[str, Any] | None = None) -> None:
    """An Event on ``obj`` from a kopf handler, about ``subject`` (the DaskCluster it
    concerns; ``obj`` itself by default), if the gate lets it through."""
    if not GATE.admit(obj, subject if subject is not None else obj, reason, message):
        return
    (kopf.warn if type_ == "Warning" else kopf.info)(obj, reason=reason, message=message)


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
        post(policy, "Degraded", f"DaskCluster {cluster['name']}: {outcome.message}", "Warning", subject=ref)
        post(ref, "MemoryPolicyDegraded", outcome.message, "Warning")


def post_actions(
    policy: Mapping[str, Any], cluster: Mapping[str, Any], outcome: Outcome
) -> dict[str, Any]:
    """An Event on the policy and one on the cluster for each change made; returns
    the cluster's reference for further Events."""
    meta = policy["metadata"]
    ref = dask_cluster_ref(meta["namespace"], cluster["name"], cluster["uid"])
    for action in outcome.actions:
        post(policy, "Applied", f"DaskCluster {cluster['name']}: {action}", subject=ref)
        post(ref, "MemoryPolicyApplied", f"MemoryPolicy {meta['name']}: {action}")
    return ref


async def post_from_background(ref: Mapping[str, Any], reason: str, message: str, type_: str = "Normal") -> None:
    """Post an Event from outside any kopf handler (kopf's ``kopf.info`` needs the
    per-object context that only handlers have), if the gate lets it through. The
    body is the one kopf posts, so ``kubectl describe`` shows both alike. A failure
    is logged, never raised: an Event is a report, not part of the work."""
    if GATE.admit(ref, ref, reason, message):
        await _create(ref, reason, message, type_)


async def _create(ref: Mapping[str, Any], reason: str, message: str, type_: str) -> None:
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
        await Event(body, api=await kubeclient.client()).create()
    except Exception as e:  # the report is lost, the work is done
        logger.warning("Could not post Event %s on %s %s: %s", reason, ref["kind"], meta["name"], e)
