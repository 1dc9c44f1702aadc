"""Watch-backed caches of the Dask objects the operator reads on every pass.

Every pass of every governed cluster used to list the cluster's scheduler pods, its
worker Deployments and pods, and read its DaskWorkerGroups: on a real API server
about 160 requests a minute per busy cluster and 36 per idle one (issue 16), enough
for API Priority and Fairness to throttle the operator and its neighbours. Now one
LIST and then one WATCH per kind fill a cache (:class:`Informer`) that the passes
read; a pass of an idle cluster asks the API nothing.

Why a list+watch of its own and not kopf indexes (which the policies and clusters
use): kopf never forgets an index entry of an object deleted while its watch was
down (a relist after 410 Gone, or a standby peer's pause): it feeds the relisted
objects to the index and drops nothing it no longer sees (kopf 1.45, reactor/
queueing.py); a deleted scheduler pod or Deployment would stay for good. Here a
relist replaces the cache. kopf also pauses its watches on a standby peer, where
restores owed by a formerly active replica still run: these caches stay live there.
And a cache here can tell a reader when it cannot vouch for what it holds.

Server-side label selectors keep the watches to Dask objects (``dask.org/cluster-name``
present: schedulers and workers; a worker pod's OOM kills and its lifetime are the
savings' (controllers/savings.py)); DaskWorkerGroups are all watched (groups a user
adds need not carry the label), one per cluster or so (a namespace with more than
MAX_PER_NAMESPACE of a kind is read from the API instead). Per object the cache keeps
a small tuple of what the operator reads (the records below), never the body: every
text in it is bounded (API names are; the rest is cut), so a tenant's many objects
cost at most a few hundred bytes each. Of pods, the last :data:`GONE_PER_CLUSTER`
that went are kept per cluster a while (:meth:`Informer.gone`), with when they went:
a worker's seconds end there.

**Staleness never makes the operator act on stale data**:

- Before the first LIST, while relisting, from a watch failure until the watch is
  resumed, and when the watch showed no sign of life (an event, a bookmark) for
  WATCH_FRESH seconds (a connection dead without a word), a cache is not *synced*; in
  a namespace where an object could not be kept, it vouches for nothing there; right
  after the operator's own write to an object (a group's replicas patch, a
  Deployment's deletion, also one whose answer never came) until the watch shows it,
  the object is *behind*. Either way the reader gets "cannot vouch" and asks the API,
  as before. Without that, the pass after a scale-down would see the group's old
  replicas, count one worker more than there is and retire another: the JSON-patch
  test on the replicas refuses the group write, but a retirement starts over RPC. A
  write the watch does not show within BEHIND_TTL makes the cache list anew: a missed
  write is never turned into trust.
- Otherwise a cache is behind the API by the watch's latency (milliseconds), as any
  read is a moment old when a pass acts on it, and the writes keep their
  preconditions (a Deployment is deleted with its uid as read, the replicas are
  patched with a ``test`` of the value read): a change someone else made in that
  moment fails the write, which is read again at the next pass.
- A look-up that would refuse something (the locator's ownership chain) trusts the
  cache only for what it finds; what it does not find is asked of the API.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from dask_memory_operator.kubeclient import ApiStatus, WatchHttp

logger = logging.getLogger(__name__)

CLUSTER_LABEL = "dask.org/cluster-name"
COMPONENT_LABEL = "dask.org/component"
GROUP_LABEL = "dask.org/workergroup-name"
#: Seconds a watch stays open (the server closes it; it is resumed from where it was)
WATCH_SECONDS = 120
#: Seconds since the watch last showed a sign of life (its start, an event, a
#: BOOKMARK: kube-apiserver sends one about every minute to a watch that takes them)
#: within which the cache vouches for what it holds: a watch on a connection that died
#: without a word (a hung TCP peer) shows no error, only silence
WATCH_FRESH = 70.0
#: Seconds without a byte after which a watch is taken for dead and resumed
WATCH_READ_TIMEOUT = 75.0
#: Seconds one LIST page may take: a hung LIST is tried again, not waited for
LIST_TIMEOUT = 60.0
#: Objects per page of a LIST
PAGE = 500
#: Seconds between tries after a failure, doubling up to RETRY_CAP, each cut by a
#: random part of up to a half (informers failing together do not retry together)
RETRY_BASE, RETRY_CAP = 1.0, 60.0
#: A watch that lasted this many seconds, or showed an event or a bookmark, was good:
#: the next failure waits RETRY_BASE again
HEALTHY_WATCH = 30.0
#: Seconds an object stays behind the operator's write before the write's event is
#: taken as missed: the cache is then listed anew (never trusted again without a LIST
#: started after the write)
BEHIND_TTL = 60.0
#: Records kept per namespace at most (of each kind): past that, the namespace's
#: objects are read from the API until the next LIST (a tenant's thousands of objects
#: do not grow the operator)
MAX_PER_NAMESPACE = 5000
#: Of each object: characters kept of a text, named container ports kept
MAX_TEXT = 253
MAX_PORTS = 16
#: Recent events remembered ((key, resourceVersion) of each, (key, uid) of deletions),
#: so that a write whose event came before the write's answer is not waited for
RECENT_EVENTS = 1024
#: Of a kind that keeps them: records of objects gone from the API kept per cluster
#: (the latest), and for how many seconds a cluster's are kept after its latest
GONE_PER_CLUSTER = 64
GONE_TTL = 3600.0


def _text(value: Any) -> str:
    return value[:MAX_TEXT] if isinstance(value, str) else ""


# --- records: what is kept of an object ------------------------------------------------


class Owner(NamedTuple):
    """An object's controller reference (``controller: true``)."""

    kind: str
    api_version: str
    name: str
    uid: str


def controller_of(meta: Mapping[str, Any]) -> Owner | None:
    """The ownerReference with ``controller: true`` (the API allows at most one)."""
    for ref in meta.get("ownerReferences") or ():
        if isinstance(ref, Mapping) and ref.get("controller"):
            return Owner(_text(ref.get("kind")), _text(ref.get("apiVersion")), _text(ref.get("name")),
                         _text(ref.get("uid")))
    return None


class PodRecord(NamedTuple):
    namespace: str
    name: str
    uid: str
    resource_version: str
    created: str
    cluster: str
    component: str
    #: Running, condition Ready, a pod IP, not being deleted
    ready: bool
    ip: str
    host_network: bool
    deleting: bool
    owner: Owner | None
    #: (name, containerPort) of the containers' named ports
    ports: tuple[tuple[str, int], ...]
    #: A worker pod with the retirement preStop hook (in any container)
    hook: bool
    # Of the worker container (the one named "worker", or the first), for the savings'
    # OOM kills and worker-seconds (controllers/savings.py):
    #: dask.org/workergroup-name
    group: str = ""
    #: The Dask worker's name: its DASK_WORKER_NAME (dask-kubernetes sets the
    #: Deployment's name), else the Deployment's name from the owner ReplicaSet's
    worker: str = ""
    #: resources.limits.memory in bytes (0: none, or not a quantity understood)
    memory_limit: int = 0
    restarts: int = 0
    #: (reason, finishedAt) of the container's latest end: ``state.terminated``, else
    #: ``lastState.terminated``; None if it never ended
    last_exit: tuple[str, str] | None = None
    #: finishedAt of a pod whose containers ended for good (Succeeded or Failed); ""
    ended: str = ""

    def port(self, name: int | str) -> int | None:
        """A numeric port as it is, or the containerPort of that name."""
        if isinstance(name, int) or str(name).isdigit():
            return int(name)
        return next((p for n, p in self.ports if n == name), None)


def is_running_and_ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    ready = any(isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or ())
    return (status.get("phase") == "Running" and ready and bool(status.get("podIP"))
            and not (pod.get("metadata") or {}).get("deletionTimestamp"))


def pod_record(pod: Mapping[str, Any]) -> PodRecord:
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    labels = meta.get("labels") or {}
    containers = [c for c in spec.get("containers") or () if isinstance(c, Mapping)]
    component = _text(labels.get(COMPONENT_LABEL))
    return PodRecord(
        namespace=_text(meta.get("namespace")), name=_text(meta.get("name")), uid=_text(meta.get("uid")),
        resource_version=_text(meta.get("resourceVersion")), created=_text(meta.get("creationTimestamp")),
        cluster=_text(labels.get(CLUSTER_LABEL)), component=component, ready=is_running_and_ready(pod),
        ip=_text((pod.get("status") or {}).get("podIP")), host_network=bool(spec.get("hostNetwork")),
        deleting=bool(meta.get("deletionTimestamp")), owner=controller_of(meta), ports=_named_ports(containers),
        hook=component == "worker" and _hooked(containers),
        **(_worker_fields(pod, containers) if component == "worker" else {}),
    )


def _worker_fields(pod: Mapping[str, Any], containers: list[Mapping[str, Any]]) -> dict[str, Any]:
    """What the savings read of a worker pod (see PodRecord)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    labels = meta.get("labels") or {}
    main = next((c for c in containers if c.get("name") == "worker"), containers[0] if containers else {})
    cstatus = next((c for c in status.get("containerStatuses") or ()
                    if isinstance(c, Mapping) and c.get("name") == main.get("name")), {})
    terminated = ((cstatus.get("state") or {}).get("terminated")
                  or (cstatus.get("lastState") or {}).get("terminated"))
    last_exit = None
    if isinstance(terminated, Mapping):
        last_exit = (_text(terminated.get("reason")), _text(terminated.get("finishedAt")))
    ended = ""
    if status.get("phase") in ("Succeeded", "Failed"):
        ended = _text(((cstatus.get("state") or {}).get("terminated") or {}).get("finishedAt")) \
            or _text(meta.get("deletionTimestamp")) or "?"
    restarts = cstatus.get("restartCount")
    return {
        "group": _text(labels.get(GROUP_LABEL)),
        "worker": _worker_name(meta, main),
        "memory_limit": parse_quantity(((main.get("resources") or {}).get("limits") or {}).get("memory")),
        "restarts": restarts if isinstance(restarts, int) and not isinstance(restarts, bool) else 0,
        "last_exit": last_exit,
        "ended": ended,
    }


def _worker_name(meta: Mapping[str, Any], container: Mapping[str, Any]) -> str:
    for env in container.get("env") or ():
        if isinstance(env, Mapping) and env.get("name") == "DASK_WORKER_NAME":
            value = env.get("value")
            if isinstance(value, str) and value and "$(" not in value:
                return _text(value)
    owner = controller_of(meta)
    template = (meta.get("labels") or {}).get("pod-template-hash")
    if owner is not None and owner.kind == "ReplicaSet" and isinstance(template, str) \
            and owner.name.endswith(f"-{template}"):
        return owner.name.removesuffix(f"-{template}")
    return _text(meta.get("name"))


_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "m": 1e-3}


def parse_quantity(value: Any) -> int:
    """Bytes of a Kubernetes memory quantity ("400Mi", "1.5G", "1e9", 1000); 0 when
    absent or not understood (never raises: it comes from a tenant's pod)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, (int, float)):
        return max(0, int(value))
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        return 0
    number, factor = value, 1.0
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if value.endswith(suffix) and not value.endswith(f"e{suffix}"):
            number, factor = value[: -len(suffix)], _SUFFIXES[suffix]
            break
    try:
        amount = float(number) * factor
    except ValueError:
        return 0
    return int(amount) if 0 <= amount < 2**63 else 0


def _named_ports(containers: Iterable[Mapping[str, Any]]) -> tuple[tuple[str, int], ...]:
    ports = [(_text(p.get("name")), p["containerPort"]) for c in containers for p in c.get("ports") or ()
             if isinstance(p, Mapping) and p.get("name") and isinstance(p.get("containerPort"), int)]
    return tuple(ports[:MAX_PORTS])


def _hooked(containers: list[Mapping[str, Any]]) -> bool:
    from dask_memory_operator.webhook.mutation import has_retirement_hook

    return any(has_retirement_hook(c) for c in containers)


class DeploymentRecord(NamedTuple):
    namespace: str
    name: str
    uid: str
    resource_version: str
    cluster: str
    component: str
    #: dask.org/workergroup-name (a worker Deployment's group)
    group: str
    deleting: bool
    owner: Owner | None


def deployment_record(deployment: Mapping[str, Any]) -> DeploymentRecord:
    meta = deployment.get("metadata") or {}
    labels = meta.get("labels") or {}
    return DeploymentRecord(
        namespace=_text(meta.get("namespace")), name=_text(meta.get("name")), uid=_text(meta.get("uid")),
        resource_version=_text(meta.get("resourceVersion")), cluster=_text(labels.get(CLUSTER_LABEL)),
        component=_text(labels.get(COMPONENT_LABEL)), group=_text(labels.get(GROUP_LABEL)),
        deleting=bool(meta.get("deletionTimestamp")), owner=controller_of(meta),
    )


class Owned(NamedTuple):
    """What the locator reads of a ReplicaSet or a DaskCluster: who it is, who owns it."""

    namespace: str
    name: str
    uid: str
    resource_version: str
    cluster: str
    owner: Owner | None


def owned_record(obj: Mapping[str, Any]) -> Owned:
    meta = obj.get("metadata") or {}
    return Owned(_text(meta.get("namespace")), _text(meta.get("name")), _text(meta.get("uid")),
                 _text(meta.get("resourceVersion")), _text((meta.get("labels") or {}).get(CLUSTER_LABEL)),
                 controller_of(meta))


class ServiceRecord(NamedTuple):
    namespace: str
    name: str
    uid: str
    resource_version: str
    cluster: str
    #: The ``tcp-comm`` port's targetPort (or port), None when it has no such port
    comm_target: int | str | None


def service_record(service: Mapping[str, Any]) -> ServiceRecord:
    meta = service.get("metadata") or {}
    target = None
    for port in (service.get("spec") or {}).get("ports") or ():
        if isinstance(port, Mapping) and port.get("name") == "tcp-comm":
            value = port.get("targetPort", port.get("port"))
            target = value if isinstance(value, int) else _text(value) or None
            break
    return ServiceRecord(_text(meta.get("namespace")), _text(meta.get("name")), _text(meta.get("uid")),
                         _text(meta.get("resourceVersion")), _text((meta.get("labels") or {}).get(CLUSTER_LABEL)),
                         target)


# --- one watched kind ----------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A kind the operator watches: where it is served, which objects, what is kept."""

    version: str
    plural: str
    #: Label selector of the LIST and WATCH ("" for every object)
    selector: str
    #: The record kept of an object (a small tuple with namespace, name, uid,
    #: resource_version and cluster)
    extract: Callable[[Mapping[str, Any]], Any]
    #: Keep the last records of objects that went, with when (Informer.gone)
    keep_gone: bool = False

    @property
    def base(self) -> str:
        return "/apis" if "/" in self.version else "/api"


@dataclass
class _Behind:
    """An object the operator wrote, until the watch shows the write."""

    #: The object's resourceVersion after the write (None for a deletion, and for a
    #: write whose outcome is unknown: only a LIST started later settles that)
    resource_version: str | None
    #: The uid deleted (None for a write)
    uid: str | None
    #: The LIST count when it was noted: a LIST started later shows the write
    lists: int
    since: float


class _Relist(Exception):
    """The cache must be made anew by a LIST: 410 Gone (the watch's resourceVersion is
    too old), or a write of the operator the watch never showed."""


Key = tuple[str, str]


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _key(obj: Mapping[str, Any]) -> Key:
    meta = _metadata(obj)
    return _text(meta.get("namespace")), _text(meta.get("name"))


def _backoff(failures: int) -> float:
    return min(RETRY_CAP, RETRY_BASE * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


class _Store:
    """What one informer holds: the records by key and by (namespace, cluster), and
    the namespaces it cannot vouch for (an object there it could not make a record of;
    more objects there than MAX_PER_NAMESPACE). A LIST fills a new one, swapped in
    whole, so that a LIST that fails leaves the cache as it was."""

    def __init__(self) -> None:
        self.objects: dict[Key, Any] = {}
        #: (namespace, cluster) -> name -> record, of the objects naming a cluster
        self.by_cluster: dict[Key, dict[str, Any]] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        #: namespace -> names of the objects that the extractor refused
        self.refused: dict[str, set[str]] = {}
        #: namespaces past MAX_PER_NAMESPACE (nothing kept of them)
        self.full: set[str] = set()

    def vouches_for(self, namespace: str) -> bool:
        return namespace not in self.full and namespace not in self.refused

    def put(self, record: Any) -> None:
        key = (record.namespace, record.name)
        self.drop(key)
        if record.namespace in self.full:
            return
        self.objects[key] = record
        self.counts[record.namespace] += 1
        if record.cluster:
            self.by_cluster.setdefault((record.namespace, record.cluster), {})[record.name] = record
        if self.counts[record.namespace] > MAX_PER_NAMESPACE:
            self._overflow(record.namespace)

    def drop(self, key: Key) -> None:
        old = self.objects.pop(key, None)
        if old is None:
            return
        self.counts[old.namespace] -= 1
        if old.cluster:
            members = self.by_cluster.get((old.namespace, old.cluster))
            if members is not None:
                members.pop(old.name, None)
                if not members:
                    del self.by_cluster[(old.namespace, old.cluster)]

    def refuse(self, key: Key) -> bool:
        """The object at ``key`` has no record; True when it had one until now."""
        self.drop(key)
        names = self.refused.setdefault(key[0], set())
        new = key[1] not in names
        names.add(key[1])
        return new

    def accept(self, key: Key) -> None:
        names = self.refused.get(key[0])
        if names is not None:
            names.discard(key[1])
            if not names:
                del self.refused[key[0]]

    def _overflow(self, namespace: str) -> None:
        logger.warning("More than %d objects of one kind in namespace %s: read from the API until the next LIST",
                       MAX_PER_NAMESPACE, namespace)
        for key in [k for k in self.objects if k[0] == namespace]:
            self.drop(key)
        self.full.add(namespace)


class Informer:
    """The cache of one kind in one namespace (None: all), kept by list+watch.

    It vouches for what it holds (:attr:`synced`) only after a LIST, while its watch
    (or the LIST just done) showed a sign of life within WATCH_FRESH seconds, and not
    for a namespace where it could not keep every object, nor for an object behind the
    operator's own write."""

    def __init__(self, kind: Kind, namespace: str | None, http: WatchHttp):
        self.kind = kind
        self.namespace = namespace
        self._http = http
        self._store = _Store()
        self._behind: dict[Key, _Behind] = {}
        self._recent: collections.OrderedDict[tuple[Key, str, str], None] = collections.OrderedDict()
        #: A LIST under way
        self._listing = False
        #: Where the cache is as of (the LIST's or the last event's resourceVersion); None: to be listed
        self._version: str | None = None
        #: Listed, and the watch open or about to be resumed
        self._live = False
        #: When the server last showed the watch (or the LIST) alive
        self._heard = 0.0
        #: When the current watch opened (None: none since the last try)
        self._opened: float | None = None
        #: Ends the current watch from outside (:meth:`_restart`)
        self._interrupt: asyncio.Timeout | None = None
        #: What the last failure logged was (logged once, until it is over)
        self._failing: str | None = None
        #: (namespace, cluster) -> the latest (wall time gone, record) of its objects
        self._gone: dict[Key, collections.deque[tuple[float, Any]]] = {}
        self._next_gone_prune = 0.0
        self._ever_synced: asyncio.Event | None = None
        #: LISTs started, events applied, events and bookmarks received (for tests and the benchmark)
        self.lists = 0
        self.events = 0
        self.signs = 0

    # -- reading ------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self._live and time.monotonic() - self._heard <= WATCH_FRESH

    def get(self, namespace: str, name: str) -> tuple[bool, Any]:
        """(vouched, record or None): not vouched when not synced, in a namespace it
        cannot vouch for, or when the object is behind the operator's write (the
        caller asks the API)."""
        key = (namespace, name)
        if not self._vouches_for(namespace) or self._is_behind(key):
            return False, None
        return True, self._store.objects.get(key)

    def of_cluster(self, namespace: str, cluster: str) -> list[Any] | None:
        """The records of the objects labelled as the cluster's, None when not vouched."""
        if not self._vouches_for(namespace):
            return None
        members = self._store.by_cluster.get((namespace, cluster), {})
        if any(self._is_behind(k) for k in list(self._behind) if k[0] == namespace and k[1] in members):
            return None
        return list(members.values())

    def _vouches_for(self, namespace: str) -> bool:
        return self.synced and self._store.vouches_for(namespace)

    def gone(self, namespace: str, cluster: str, since: float) -> list[tuple[float, Any]]:
        """(wall time, last record) of the cluster's objects that left the API (their
        deletion seen, or not found by a relist) after ``since`` (wall time), oldest
        first; only of a kind that keeps them, the latest GONE_PER_CLUSTER."""
        return [(t, r) for t, r in self._gone.get((namespace, cluster), ()) if t > since]

    def _went(self, record: Any, when: float) -> None:
        if not self.kind.keep_gone or not record.cluster:
            return
        key = (record.namespace, record.cluster)
        gone = self._gone.get(key)
        if gone is None:
            gone = self._gone[key] = collections.deque(maxlen=GONE_PER_CLUSTER)
        gone.append((when, record))
        if when >= self._next_gone_prune:  # at most once a minute: clusters long quiet go
            self._next_gone_prune = when + 60.0
            for k in [k for k, d in self._gone.items() if d[-1][0] < when - GONE_TTL]:
                del self._gone[k]

    async def wait_synced(self, timeout: float) -> bool:
        """Whether it synced (once) within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._first_sync().wait()
        except TimeoutError:
            return False
        return True

    async def refresh(self) -> None:
        """List now: the cache is what the LIST finds (for a cache that is not
        watching, e.g. in tests; :meth:`run` lists by itself)."""
        await self._list()

    def _first_sync(self) -> asyncio.Event:
        if self._ever_synced is None:
            self._ever_synced = asyncio.Event()
        return self._ever_synced

    # -- the operator's own writes -------------------------------------------------------

    def wrote(self, namespace: str, name: str, resource_version: str | None) -> None:
        """The operator changed the object, which now has ``resource_version`` (None:
        the write's outcome is unknown, a timeout or a connection lost)."""
        key = (namespace, name)
        stored = self._store.objects.get(key)
        if resource_version is not None and (
                (stored is not None and stored.resource_version == resource_version)
                or (key, "rv", resource_version) in self._recent):
            return  # the watch was quicker than the write's answer
        self._behind[key] = _Behind(resource_version, None, self.lists, time.monotonic())

    def deleted(self, namespace: str, name: str, uid: str) -> None:
        """The operator deleted (or may have deleted) the object that had ``uid``:
        noted while the cache holds it, and also when it does not but a LIST is under
        way, which began before the deletion and may bring it back."""
        key = (namespace, name)
        stored = self._store.objects.get(key)
        if (key, "uid", uid) in self._recent:
            return  # the watch showed the deletion already
        if self._listing or (stored is not None and stored.uid == uid):
            self._behind[key] = _Behind(None, uid, self.lists, time.monotonic())

    def _is_behind(self, key: Key) -> bool:
        behind = self._behind.get(key)
        if behind is None:
            return False
        if time.monotonic() - behind.since > BEHIND_TTL and self._live:
            logger.warning("%s %s/%s: the watch did not show the operator's write within %gs; listing again",
                           self.kind.plural, *key, BEHIND_TTL)
            self._restart()
        return True

    def _restart(self) -> None:
        """Vouch for nothing until a new LIST, and end the watch so that it comes."""
        self._live = False
        self._version = None
        if self._interrupt is not None:
            self._interrupt.reschedule(asyncio.get_running_loop().time())

    def _settle(self, key: Key) -> None:
        """Drop the key's behind mark once the cache shows the write."""
        behind = self._behind.get(key)
        if behind is None:
            return
        stored = self._store.objects.get(key)
        if behind.uid is not None:
            done = stored is None or stored.uid != behind.uid
        elif behind.resource_version is not None:
            done = stored is None or stored.resource_version == behind.resource_version
        else:
            done = False  # an outcome unknown: only a LIST started later tells
        if done:
            del self._behind[key]

    # -- keeping it -------------------------------------------------------------------

    def _keep(self, store: _Store, obj: Mapping[str, Any]) -> None:
        """The object's record into ``store``; an object it cannot be made of is left
        out, and its namespace not vouched for (the operator never fails on one)."""
        key = _key(obj)
        try:
            record = self.kind.extract(obj)
        except Exception as e:
            if store.refuse(key):
                logger.warning("%s %s/%s left out of the cache (%s: %s); its namespace is read from the API",
                               self.kind.plural, *key, type(e).__name__, str(e)[:200])
            return
        store.accept(key)
        store.put(record)

    def _apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        key, meta = _key(obj), _metadata(obj)
        if kind == "DELETED":
            uid = _text(meta.get("uid"))
            stored = self._store.objects.get(key)
            if stored is not None and stored.uid == uid:
                self._store.drop(key)
                # its last state (a pod's final container status) with when it went
                self._went(self._last_record(obj, stored), time.time())
            self._store.accept(key)
            self._remember((key, "uid", uid))
        else:
            self._keep(self._store, obj)
        self._remember((key, "rv", _text(meta.get("resourceVersion"))))
        self._settle(key)
        self.events += 1

    def _last_record(self, obj: Mapping[str, Any], stored: Any) -> Any:
        """The record of a deleted object as the deletion shows it (a pod's final
        container status), for a kind that keeps them; else the stored one."""
        if not self.kind.keep_gone:
            return stored
        try:
            return self.kind.extract(obj)
        except Exception:
            return stored

    def _remember(self, token: tuple[Key, str, str]) -> None:
        self._recent[token] = None
        while len(self._recent) > RECENT_EVENTS:
            self._recent.popitem(last=False)

    def _replace(self, store: _Store, listed: int) -> None:
        """The cache is what a LIST (the ``listed``-th) found, nothing else."""
        before = self._store.objects if self.kind.keep_gone and self.lists > 1 else {}
        self._store = store
        now = time.time()
        for key, record in before.items():  # gone while the watch was down
            found = store.objects.get(key)
            if found is None or found.uid != record.uid:
                self._went(record, now)
        for key in [k for k, b in self._behind.items() if b.lists < listed]:
            del self._behind[key]  # a LIST started after the write shows it
        for key in list(self._behind):
            self._settle(key)

    # -- the list+watch loop ----------------------------------------------------------

    async def run(self) -> None:
        """List, then watch, for ever. A watch that ends (the server's timeout, a
        network failure) is resumed from where it got to: only 410 Gone, or a write
        of the operator never shown, lists again. After a failure, or a watch the
        server ended at once, it waits longer each time until a watch is good."""
        failures = 0
        while True:
            self._opened, signs = None, self.signs
            try:
                if self._version is None:
                    await self._list()
                await self._watch()
                error = None
            except asyncio.CancelledError:
                self._live = False
                raise
            except Exception as e:  # the API down, a refusal: readers ask the API meanwhile
                error = e
            if isinstance(error, _Relist) or (isinstance(error, ApiStatus) and error.code == 410):
                self._restart()
            good = self._opened is not None and (
                time.monotonic() - self._opened >= HEALTHY_WATCH or self.signs > signs)
            if good:
                failures = 0
                self._recovered()
                if error is None or self._version is None:
                    continue  # resumed (or listed) at once
            self._live = False
            failures += 1
            delay = _backoff(failures)
            self._failed(error, delay)
            await asyncio.sleep(delay)

    def _failed(self, error: Exception | None, delay: float) -> None:
        """Logged once (a warning) until it is over or changes, not at every try."""
        what = ("the server ended the watch at once" if error is None
                else f"{type(error).__name__}: {str(error)[:300]}")
        kind = f"{type(error).__name__} {getattr(error, 'code', '')}"
        where = f"{self.kind.plural}{f' in {self.namespace}' if self.namespace else ''}"
        (logger.warning if kind != self._failing else logger.debug)(
            "Watching %s failed (%s); readers ask the API; again in %.1fs", where, what, delay)
        self._failing = kind

    def _recovered(self) -> None:
        if self._failing is not None:
            logger.info("Watching %s%s again", self.kind.plural, f" in {self.namespace}" if self.namespace else "")
            self._failing = None

    def _path(self) -> str:
        scope = f"/namespaces/{self.namespace}" if self.namespace else ""
        return f"{self.kind.base}/{self.kind.version}{scope}/{self.kind.plural}"

    def _selector(self) -> dict[str, str]:
        return {"labelSelector": self.kind.selector} if self.kind.selector else {}

    async def _list(self) -> None:
        """Page by page into a new store (each page's bodies dropped once it is
        records), swapped in at the end."""
        self._live, self._listing = False, True
        self.lists += 1
        listed = self.lists
        store, version, token = _Store(), "", ""
        try:
            while True:
                page = await self._page({"limit": PAGE, **({"continue": token} if token else {}), **self._selector()})
                for obj in page.get("items") or ():
                    if isinstance(obj, Mapping):
                        self._keep(store, obj)
                meta = _metadata(page)
                version = version or str(meta.get("resourceVersion") or "")
                token = str(meta.get("continue") or "")
                if not token:
                    break
        finally:
            self._listing = False
        self._replace(store, listed)
        self._version, self._live, self._heard = version, True, time.monotonic()
        self._first_sync().set()

    async def _page(self, params: dict[str, Any]) -> Mapping[str, Any]:
        async with asyncio.timeout(LIST_TIMEOUT), \
                self._http.get(self._path(), params, read_timeout=LIST_TIMEOUT) as response:
            page = response.json()
        if not isinstance(page, Mapping):
            raise ValueError(f"a LIST answered {type(page).__name__}")
        return page

    async def _watch(self) -> None:
        """One watch from where the cache is until the server ends it (or
        :meth:`_restart` does: :class:`_Relist`)."""
        params = {"watch": "true", "allowWatchBookmarks": "true", "resourceVersion": self._version,
                  "timeoutSeconds": WATCH_SECONDS, **self._selector()}
        interrupt = self._interrupt = asyncio.timeout(None)
        try:
            async with interrupt, self._http.get(self._path(), params, read_timeout=WATCH_READ_TIMEOUT,
                                                 stream=True) as response:
                self._opened = self._heard = time.monotonic()
                self._live = True
                async for line in response.aiter_lines():
                    if line.strip():
                        self._event(json.loads(line))
        except TimeoutError:
            if interrupt.expired():
                raise _Relist("restarted") from None
            raise
        finally:
            self._interrupt = None

    def _event(self, event: Any) -> None:
        if not isinstance(event, Mapping):
            raise ValueError(f"a watch event of type {type(event).__name__}")
        kind, obj = event.get("type"), event.get("object")
        obj = obj if isinstance(obj, Mapping) else {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Relist("410 Gone")
            raise RuntimeError(f"watch error: {str(obj.get('message'))[:200]}")
        self._heard = time.monotonic()
        self.signs += 1
        version = _metadata(obj).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._apply(kind, obj)
        if version:
            self._version = str(version)


# --- the operator's caches -------------------------------------------------------------


def operator_kinds(group_record: Callable[[Mapping[str, Any]], Any]) -> list[Kind]:
    """What the operator watches: Dask pods (schedulers, to find them; workers, for
    their OOM kills, their worker-seconds and, with the webhook, their hooks: the
    pods that went are kept a while, for the worker-seconds), Deployments,
    ReplicaSets and Services, and every DaskWorkerGroup (kept as ``group_record``
    makes it)."""
    dask = CLUSTER_LABEL
    return [
        Kind("v1", "pods", dask, pod_record, keep_gone=True),
        Kind("apps/v1", "deployments", dask, deployment_record),
        Kind("apps/v1", "replicasets", dask, owned_record),
        Kind("v1", "services", dask, service_record),
        # no selector: a group a user adds need not carry the cluster label; what a
        # namespace holds is bounded by MAX_PER_NAMESPACE
        Kind("kubernetes.dask.org/v1", "daskworkergroups", "", group_record),
    ]


class Watches:
    """The operator's caches: each kind cluster-wide, or in each watched namespace,
    listed and watched through one HTTP client of their own (:class:`WatchHttp`)."""

    def __init__(self, kinds: Iterable[Kind], namespaces: Iterable[str] | None = None):
        scopes: list[str | None] = list(namespaces) if namespaces is not None else [None]
        kinds = list(kinds)
        self.http = WatchHttp(streams=len(kinds) * len(scopes))
        self.informers: dict[tuple[str, str | None], Informer] = {
            (kind.plural, ns): Informer(kind, ns, self.http) for kind in kinds for ns in scopes}
        self._tasks: list[asyncio.Task[None]] = []

    def informer(self, plural: str, namespace: str) -> Informer | None:
        return self.informers.get((plural, namespace)) or self.informers.get((plural, None))

    def get(self, plural: str, namespace: str, name: str) -> tuple[bool, Any]:
        """(vouched, record or None) of one object; see :meth:`Informer.get`."""
        informer = self.informer(plural, namespace)
        return informer.get(namespace, name) if informer is not None else (False, None)

    def of_cluster(self, plural: str, namespace: str, cluster: str) -> list[Any] | None:
        informer = self.informer(plural, namespace)
        return informer.of_cluster(namespace, cluster) if informer is not None else None

    def gone(self, plural: str, namespace: str, cluster: str, since: float) -> list[tuple[float, Any]]:
        informer = self.informer(plural, namespace)
        return informer.gone(namespace, cluster, since) if informer is not None else []

    def wrote(self, plural: str, namespace: str, name: str, resource_version: str | None) -> None:
        """See :meth:`Informer.wrote` (``resource_version`` None: outcome unknown)."""
        informer = self.informer(plural, namespace)
        if informer is not None:
            informer.wrote(namespace, name, resource_version)

    def deleted(self, plural: str, namespace: str, name: str, uid: str) -> None:
        informer = self.informer(plural, namespace)
        if informer is not None:
            informer.deleted(namespace, name, uid)

    async def start(self, timeout: float) -> bool:
        """Start every watch (once: a startup handler tried again finds them running);
        True when all listed within ``timeout`` seconds (until then, and for those that
        did not, readers ask the API)."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(i.run(), name=f"watch {p}{f' in {ns}' if ns else ''}")
                           for (p, ns), i in self.informers.items()]
        synced = await asyncio.gather(*(i.wait_synced(timeout) for i in self.informers.values()))
        return all(synced)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.http.aclose()
