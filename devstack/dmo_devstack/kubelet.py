"""A process kubelet: runs the pods of Deployments, and bare Pods, as local processes.

The local stack has an emulated Kubernetes API but no nodes. This module stands in
for what a node (kubelet, kube-proxy) and the Deployment controller do, just enough
for dask-kubernetes' clusters and this project's operator (from its Helm chart) to
become real processes on this machine:

- It list-watches ``apps/v1`` Deployments, Services, Pods, Secrets and ConfigMaps in
  all namespaces through kr8s (the client dask-kubernetes uses) and reconciles: a
  Deployment with ``spec.replicas = n`` gets ``n`` pods, each a Pod object (labels of
  the template, ownerReference to the Deployment, ``spec.nodeName``) and a local
  process for its container. ``.status`` of the Deployment (replicas, readyReplicas,
  availableReplicas, updatedReplicas, observedGeneration) is kept up to date. A
  change of the pod template replaces the pods (the ``Recreate`` strategy: the
  old pods are gone before the new ones start, so that a scheduler never runs twice).
- Pods made by others (no Deployment controls them: a bare Pod, a ``helm test`` hook,
  a DaskJob's runner) are run too, when not bound to another node and not finished.
  There is no scheduler and the API has no ``pods/binding``, so they stay unbound:
  their deletion is immediate in the API, and the kubelet then stops the process
  with the pod's grace period. Their Pod object stays when the container ends.
- Every Pod's ``status``: ``phase`` Pending (volumes, ContainerCreating) → Running →
  Succeeded/Failed, ``startTime``, ``podIP``, ``Ready``/``ContainersReady``
  conditions (reason PodCompleted once ended), ``containerStatuses[]`` with
  ``restartCount``, ``state`` (waiting ContainerCreating/CrashLoopBackOff, running,
  terminated ``{exitCode, reason: Completed|Error, startedAt, finishedAt}``) and
  ``lastState``. ``restartPolicy`` Always restarts the container with a back-off
  (restarts are counted), OnFailure only after a non-zero exit, Never not at all; a
  process killed by signal N exits with 128+N, as a runtime reports it.
- A container is started like a kubelet starts it: its env (``value`` and
  ``valueFrom.fieldRef``), ``$(VAR)`` expansion in command and args, and on deletion
  or scale down the ``preStop`` exec hook, SIGTERM, and SIGKILL of the whole process
  group once ``terminationGracePeriodSeconds`` (default 30) have passed. Deleting a
  Pod object stops its process and the Deployment gets a new pod.
- Volumes (Secret, ConfigMap, emptyDir, hostPath) and service-account credentials
  (a bound token through the TokenRequest API, when the API serves it and
  ``automountServiceAccountToken`` of the pod, else of its ServiceAccount, is not
  false) are set up before the container starts, in ``<state-dir>/pods/<uid>/``; a
  missing Secret or ServiceAccount keeps the pod ContainerCreating with a
  ``FailedMount`` Event, retried. Processes share one filesystem, so mountPaths are
  rewritten in the container's command, args and env to the pod's directories, and
  the credentials come as ``KUBECONFIG``: see :mod:`.volumes` for what that means.
- Only what can run here runs: ``dask scheduler``/``dask-scheduler``/``dask worker``/
  ``dask-worker``, ``dask-memory-operator`` (this project's console script, which
  its image runs) and ``python`` commands, started with the scripts and the Python of
  this venv. Any other container makes the pod ``Failed`` with the reason
  ``UnsupportedContainer``; the image is ignored. Pods of more than one container,
  init containers and ephemeral containers are not run.

Networking without network namespaces: every pod gets a pod IP on loopback from
127.2.0.0/16 (a /24 of it per stack, see stack.py) and Dask is told to listen there
(``--host`` is replaced or added, ``--dashboard-address`` is moved to the pod IP
keeping its port); in other containers' args ``0.0.0.0`` (all of the pod's addresses
in a pod's own network namespace) becomes the pod IP. Services are reached as in a
cluster, through EndpointSlices:

- An endpoint controller (what kube-controller-manager's EndpointSlice controller
  does) writes, for each Service with a selector, the ``discovery.k8s.io/v1``
  EndpointSlices of the pods it selects in its namespace: labels
  ``kubernetes.io/service-name`` and ``endpointslice.kubernetes.io/managed-by:
  endpointslice-controller.k8s.io``, owned by the Service, one slice per set of
  resolved ports (a named ``targetPort`` is resolved per pod), each endpoint with the
  pod's IP, its ``ready``/``serving``/``terminating`` conditions and ``targetRef``.
  Slices it does not manage (written by hand) are left alone; slices it manages are
  brought back when changed or deleted.
- A userspace kube-proxy (:mod:`.proxy`) serves every Service's ``clusterIP:port``
  (allocated by the API server from 127.1.0.0/16) and forwards each connection to a
  ready endpoint of ALL the slices labelled with the Service's name, hand-written
  ones included, as kube-proxy does.
- Names resolve through :mod:`dmo_devstack.dns`: the kubelet writes
  the hosts file of all Services (name -> clusterIP) and starts every process with
  that resolver installed.

Approximated: the controller reads readiness from the Pod objects, and a pod this
kubelet is stopping (scale-down, template change) counts as terminating at once (in a
cluster the ReplicaSet's delete sets its deletionTimestamp); slices hold up to 100
endpoints and are rewritten whole (no batching or ``endpointslice.kubernetes.io/
skip-mirror``); Endpoints (v1) objects are not written.

Memory limits: a worker in a pod sees its cgroup memory limit; here
``resources.limits.memory`` becomes ``--memory-limit`` unless the args give one. The
limit is also enforced as the kernel's OOM killer enforces a container's cgroup limit
(cgroup v2 with ``memory.oom.group``, which kubelets set since 1.28: the whole
container at once): every 0.1 s the kubelet sums the RSS of the processes of each
container with a memory limit (its process tree, and the rest of its session: an
orphaned child still counts); past the limit, all of them get SIGKILL at once, with no
preStop hook and no SIGTERM. The container's terminated state is then ``{exitCode:
137, reason: OOMKilled, startedAt, finishedAt, containerID}``, in ``lastState`` when it
restarts (with the usual back-off), or in ``state`` when its restartPolicy ends it (the
pod is Failed). This is not Dask's own limit: a nanny terminates its worker past 95%
of ``--memory-limit`` (``distributed.worker.memory.terminate``) and starts another in
the same container, which the pod's status does not show (only a nanny that exits
makes a container restart, with reason Error). The nanny watches its worker alone, the
OOM killer nanny and worker together: with the terminate threshold off, or a worker
that grows faster than its nanny looks, the kubelet kills. Approximated: RSS counts a
page shared by several processes in each of them, and no page cache (a cgroup counts
each page once, page cache included); a container can grow past its limit for up to
0.1 s (the kernel stops it at the page); a process that leaves both the tree and the
session escapes.

Probes: a pod is Ready once its ``readinessProbe`` (httpGet or tcpSocket) passes for
the first time, polled every 0.5 s; without a probe, or with an exec probe, once its
process runs; it stays Ready until the process exits (readiness is not probed again).
A ``livenessProbe`` (httpGet or tcpSocket) is probed every ``periodSeconds`` after
``initialDelaySeconds``; after ``failureThreshold`` failures in a row the container
is stopped (preStop, SIGTERM, grace period) and restarted as its restartPolicy says,
with ``Unhealthy`` and ``Killing`` Events. Startup and exec probes are not run.

Each process gets the kubelet's environment without ``DASK_*``, ``KUBERNETES_*``
and ``KUBECONFIG``, plus ``HOSTNAME=<pod>``, ``DMO_POD=<namespace>/<pod>`` (how the
stack finds a pod's processes), the cluster DNS, the ``kubernetes`` Service's
variables a kubelet injects (``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT``
/``KUBERNETES_PORT*``: the emulated API's address, plain HTTP; the per-Service
variables of ``enableServiceLinks`` are not set), ``KUBECONFIG`` when the pod has
credentials, ``TMPDIR`` when a volume is mounted at ``/tmp``, and the container's own
env. Each pod's stdout and stderr go to ``<log-dir>/<namespace>_<pod>.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import datetime
import functools
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import kr8s
import kr8s.asyncio
from kr8s.asyncio.objects import ConfigMap, Deployment, Pod, Secret, Service, new_class
from kubernetes.utils.quantity import parse_quantity

from dmo_devstack import dns
from dmo_devstack import volumes as pod_volumes
from dmo_devstack.proxy import SERVICE_NAME_LABEL, UserspaceProxy, service_ports

logger = logging.getLogger("dask_memory_operator.kubelet")

#: Pod IPs are taken from this range by default; 127.0.0.0/8 is all on loopback.
#: Stacks sharing the machine each pass a part of it (--pod-cidr).
POD_CIDR = "127.2.0.0/16"
#: spec.nodeName of the pods of this kubelet.
NODE_NAME = "process-kubelet"
#: Scripts next to the interpreter of this venv.
BIN_DIR = Path(sys.executable).parent
DASK_SCRIPT = str(BIN_DIR / "dask")
#: This project's console script: the operator's image runs it.
OPERATOR_SCRIPT = str(BIN_DIR / "dask-memory-operator")
#: Restart back-off: first delay, cap, and how long a container must run to reset it.
BACKOFF_START, BACKOFF_MAX, BACKOFF_RESET = 0.5, 10.0, 10.0
#: Seconds between two readings of the memory of the containers with a memory limit.
MEMORY_WATCH_PERIOD = 0.1
#: Seconds without an update after which the process table is read anew.
TABLE_REREAD_AFTER = 1.0
#: Seconds before a deleted pod is replaced (see Kubelet._on_pod_event).
REPLACE_DELAY = 0.5
#: The endpoint controller's slices: who manages them, and their kind.
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
CONTROLLER_NAME = "endpointslice-controller.k8s.io"
EndpointSlice = new_class("EndpointSlice", version="discovery.k8s.io/v1", namespaced=True)
#: Endpoints per slice, as the controller's --max-endpoints-per-slice default.
MAX_ENDPOINTS_PER_SLICE = 100

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: a new session (the container's process group), and
    SIGKILL when the kubelet dies, so that no pod outlives a crashed kubelet."""
    os.setsid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class UnsupportedContainer(Exception):
    """The container cannot run as a local process."""


# ---------------------------------------------------------------------------------
# From a container spec to a command line


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined variables are replaced, ``$$``
    becomes ``$``, references to undefined variables stay as they are."""

    def replace(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(replace, text)


def _field_ref(path: str, pod: Mapping[str, Any], pod_ip: str) -> str:
    meta = pod["metadata"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": NODE_NAME,
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
    }
    if path in simple:
        return simple[path]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return meta.get(m.group(1), {}).get(m.group(2), "")
    raise UnsupportedContainer(f"env valueFrom.fieldRef {path!r} is not supported")


def container_env(container: Mapping[str, Any], pod: Mapping[str, Any], pod_ip: str) -> dict[str, str]:
    """The variables a container declares, in order, each expanded against the earlier ones."""
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" in item:
            source = item["valueFrom"]
            if "fieldRef" not in source:
                raise UnsupportedContainer(f"env {name}: only valueFrom.fieldRef is supported")
            env[name] = _field_ref(source["fieldRef"]["fieldPath"], pod, pod_ip)
        else:
            env[name] = expand(item.get("value", ""), env)
    return env


def _program(argv0: str) -> list[str]:
    """The local command line for a container's program, or UnsupportedContainer."""
    base = os.path.basename(argv0)
    if base == "dask":
        return [DASK_SCRIPT]
    if base in ("dask-scheduler", "dask-worker"):
        return [DASK_SCRIPT, base.split("-", 1)[1]]
    if base == "dask-memory-operator":
        return [OPERATOR_SCRIPT]
    if re.fullmatch(r"python(3(\.\d+)?)?", base):
        return [sys.executable]
    raise UnsupportedContainer(
        f"{argv0!r} is neither a dask nor a python command (nor dask-memory-operator); only those run as local processes"
    )


def _find_option(argv: list[str], option: str) -> int | None:
    """Index of ``--option value`` or ``--option=value`` in argv."""
    for i, arg in enumerate(argv):
        if arg == option or arg.startswith(option + "="):
            return i
    return None


def _set_option(argv: list[str], option: str, value: str) -> None:
    i = _find_option(argv, option)
    if i is None:
        argv += [option, value]
    elif argv[i] == option:
        argv[i + 1] = value
    else:
        argv[i] = f"{option}={value}"


def _option_value(argv: list[str], option: str) -> str | None:
    i = _find_option(argv, option)
    if i is None:
        return None
    return argv[i + 1] if argv[i] == option else argv[i].split("=", 1)[1]


#: The address a process binds to listen on all of its pod's addresses.
ANY_ADDRESS = "0.0.0.0"


def container_argv(container: Mapping[str, Any], env: Mapping[str, str], pod_ip: str) -> list[str]:
    """The command line that runs ``container`` here, listening on ``pod_ip``."""
    raw = [expand(a, env) for a in (container.get("command") or []) + (container.get("args") or [])]
    if not raw:
        raise UnsupportedContainer("no command or args: an image's entrypoint cannot run here")
    argv = _program(raw[0]) + raw[1:]
    if argv[0] != DASK_SCRIPT:
        # In its own network namespace a process binding every address (0.0.0.0) binds
        # its pod's; here all pods share one, so such an address is the pod IP.
        argv = [argv[0]] + [a.replace(ANY_ADDRESS, pod_ip) for a in argv[1:]]
    if argv[0] == DASK_SCRIPT and len(argv) > 1 and argv[1] in ("scheduler", "worker"):
        role = argv[1]
        if _find_option(argv, "--listen-address") is None:
            _set_option(argv, "--host", pod_ip)
        if "--no-dashboard" not in argv:
            # ":8787", "8787", "0.0.0.0:8787": keep the port, bind the pod IP.
            given = _option_value(argv, "--dashboard-address")
            default = "8787" if role == "scheduler" else "0"
            port = (given or default).rsplit(":", 1)[-1] or default
            _set_option(argv, "--dashboard-address", f"{pod_ip}:{port}")
        limit = memory_limit(container)
        if role == "worker" and limit is not None and _find_option(argv, "--memory-limit") is None:
            argv += ["--memory-limit", str(limit)]
    return argv


def template_hash(template: Mapping[str, Any]) -> str:
    """A stable hash of a pod template, like ``pod-template-hash``."""
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def deployment_conditions(deployment: Mapping[str, Any], updated: int, ready: int,
                          old: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``Available`` and ``Progressing`` as the Deployment controller sets them
    (clients such as Helm's ``--wait`` read them): available once no more pods are
    unready than ``maxUnavailable`` allows (25% by default, rounded down), progress
    complete once every wanted pod runs the current template and is ready."""
    wanted = deployment["spec"].get("replicas", 1)
    strategy = deployment["spec"].get("strategy") or {}
    max_unavailable = (strategy.get("rollingUpdate") or {}).get("maxUnavailable", "25%")
    if strategy.get("type") == "Recreate":
        max_unavailable = 0
    if isinstance(max_unavailable, str) and max_unavailable.endswith("%"):
        max_unavailable = wanted * int(max_unavailable[:-1]) // 100
    available = ready >= wanted - int(max_unavailable)
    complete = updated == wanted and ready >= wanted
    now = _now()
    before = {c.get("type"): c for c in old}

    def condition(kind: str, status: bool, reason: str, message: str) -> dict[str, Any]:
        value = "True" if status else "False"
        previous = before.get(kind) or {}
        changed = previous.get("status") != value
        return {"type": kind, "status": value, "reason": reason, "message": message,
                "lastUpdateTime": now if changed or previous.get("reason") != reason else previous["lastUpdateTime"],
                "lastTransitionTime": now if changed else previous.get("lastTransitionTime", now)}

    name = deployment["metadata"]["name"]
    return [
        condition("Available", available,
                  "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                  "Deployment has minimum availability." if available
                  else "Deployment does not have minimum availability."),
        condition("Progressing", True, "NewReplicaSetAvailable" if complete else "ReplicaSetUpdated",
                  f'ReplicaSet "{name}" has successfully progressed.' if complete
                  else f'ReplicaSet "{name}" is progressing.'),
    ]


def selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """Whether a Service's selector selects a pod with these labels."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------------------------
# Memory limits: the OOM killer of the containers' cgroups


def memory_limit(container: Mapping[str, Any]) -> int | None:
    """A container's ``resources.limits.memory`` in bytes, None without one."""
    limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    return None if limit is None else _bytes(limit)


@functools.lru_cache(maxsize=256)
def _bytes(quantity: str | int) -> int:
    # cached: the OOM killer asks for every limited container ten times a second
    return int(parse_quantity(quantity))


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class ProcStat(NamedTuple):
    """Where a process is, from ``/proc/<pid>/stat``."""

    ppid: int
    session: int
    #: Clock ticks after boot: tells a reused pid apart.
    start: int


def read_stat(pid: int) -> ProcStat | None:
    """A process's stat, None once it is gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name is in parentheses and may hold spaces and parentheses.
    fields = data[data.rfind(b")") + 2:].split()
    if len(fields) < 20:
        return None
    return ProcStat(int(fields[1]), int(fields[3]), int(fields[19]))


def _last_pid() -> bytes:
    """The pid last given to a process or thread (in this pid namespace), from
    ``/proc/loadavg``: the cheapest way to tell that no process started."""
    fd = os.open("/proc/loadavg", os.O_RDONLY)
    try:
        return os.read(fd, 256).split()[-1]
    finally:
        os.close(fd)


class ProcessTable:
    """The machine's processes as ``/proc`` shows them, kept up to date by update(): a
    look at the last pid given when no process started since, else a listing of
    ``/proc``, in which a process is read when it first appears and forgotten when it
    disappears (its children, reparented, leave its entry). What is kept stays true: a
    pid is given again only once the counter wrapped around, far more than a second of
    forks away, and after a pause of more than a second everything is read anew. A
    measured process keeps its ``statm`` open: reading it again costs a few µs, and
    fails once the process is gone, whatever has its pid since."""

    #: Each process as first read.
    stats: dict[int, ProcStat]
    #: Pids by parent pid, and by session.
    children: dict[int, set[int]]
    sessions: dict[int, set[int]]

    def __init__(self, stats: Mapping[int, ProcStat] | None = None):
        self.stats, self.children, self.sessions = {}, {}, {}
        self._names: set[str] = set()
        self._last_pid: bytes | None = None
        self._statm: dict[int, int] = {}
        self._updated_at = -math.inf
        for pid, stat in (stats or {}).items():
            self._add(pid, stat)

    def update(self) -> None:
        now = time.monotonic()
        if now - self._updated_at > TABLE_REREAD_AFTER:
            self.close()
        self._updated_at = now
        last_pid = _last_pid()
        if last_pid == self._last_pid:
            return  # no process (or thread) started: one gone is forgotten when measured
        self._last_pid = last_pid
        names = set(os.listdir("/proc"))
        for name in self._names - names:
            if name.isdigit():
                self._forget(int(name))
        for name in names - self._names:
            if name.isdigit() and (stat := read_stat(int(name))) is not None:
                self._add(int(name), stat)
        self._names = names

    def container(self, root: int) -> list[int]:
        """The processes the cgroup of the container whose process is ``root`` would
        hold: ``root`` first, its descendants parents before children, then the rest of
        its session (the kubelet starts each container in a new session: a child whose
        parent exited is still there)."""
        if root not in self.stats:
            return []
        found, i = [root], 0
        while i < len(found):
            found += self.children.get(found[i], ())
            i += 1
        return found + list(self.sessions.get(root, set()).difference(found))

    def measure(self, pids: list[int]) -> int:
        """The RSS of these processes now, summed (one gone meanwhile counts nothing)."""
        total = 0
        for pid in pids:
            fd = self._statm.get(pid)
            if fd is None and (fd := self._open_statm(pid)) is None:
                continue
            try:
                total += int(os.pread(fd, 256, 0).split()[1]) * _PAGE_SIZE
            except (OSError, IndexError, ValueError):
                self._forget(pid)  # reaped: ESRCH
        return total

    def _open_statm(self, pid: int) -> int | None:
        try:
            fd = os.open(f"/proc/{pid}/statm", os.O_RDONLY)
        except OSError:
            return None
        # Checked once open: the file is then of the process that was read, not of a
        # later one with its pid.
        if not self.same(pid, read_stat(pid)):
            os.close(fd)
            return None
        self._statm[pid] = fd
        return fd

    def same(self, pid: int, stat: ProcStat | None) -> bool:
        """Whether ``stat``, read now, is of the process that was read as ``pid``."""
        return stat is not None and pid in self.stats and stat.start == self.stats[pid].start

    def _add(self, pid: int, stat: ProcStat) -> None:
        self.stats[pid] = stat
        self.children.setdefault(stat.ppid, set()).add(pid)
        self.sessions.setdefault(stat.session, set()).add(pid)

    def _forget(self, pid: int) -> None:
        stat = self.stats.pop(pid, None)
        if stat is not None:
            for index, key in ((self.children, stat.ppid), (self.sessions, stat.session)):
                group = index.get(key, set())  # none: the parent was forgotten first
                group.discard(pid)
                if not group:
                    index.pop(key, None)
        self.children.pop(pid, None)
        fd = self._statm.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Forget every process (and close the files kept open)."""
        for pid in list(self.stats) + list(self._statm):
            self._forget(pid)
        self._names, self._last_pid = set(), None


def kill_processes(table: ProcessTable, pids: list[int]) -> None:
    """SIGKILL a container's processes (``table.container(root)``) at once, each only if
    it still is, read now, what was read: the same process (through a pidfd opened
    before the check: not a later one with its pid), in the root's session or a child of
    one checked before. All are checked before any is killed (a killed parent's children
    are reparented)."""
    root = pids[0] if pids else None
    checked: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            now = read_stat(pid)
            if table.same(pid, now) and (now.session == root or now.ppid in checked):
                checked[pid] = fd
            else:
                os.close(fd)
        for fd in checked.values():
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        for fd in checked.values():
            os.close(fd)


# ---------------------------------------------------------------------------------
# One pod


def pod_from_deployment(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """A new Pod of a Deployment's template, as its ReplicaSet would make it (bound here)."""
    template = deployment["spec"]["template"]
    thash = template_hash(template)
    meta = deployment["metadata"]
    spec = json.loads(json.dumps(template.get("spec") or {}))
    spec["nodeName"] = NODE_NAME
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{meta['name']}-{thash}-{secrets.token_hex(3)[:5]}",
            "namespace": meta["namespace"],
            "labels": {**(template.get("metadata") or {}).get("labels", {}), "pod-template-hash": thash},
            "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
    }


def _pod_port(pod: Mapping[str, Any], port: int | str) -> int | None:
    """A numeric port, or the containerPort of that name in any of the pod's containers."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
    return None


def _owned_by(item: Mapping[str, Any], owner: Mapping[str, Any]) -> bool:
    return any(ref.get("uid") == owner["metadata"]["uid"] and ref.get("controller")
               for ref in item["metadata"].get("ownerReferences") or [])


def made_by_deployment(pod: Mapping[str, Any]) -> bool:
    """Whether a Pod is one this kubelet's Deployment controller made (its controller is a Deployment)."""
    return any(ref.get("controller") and ref.get("kind") == "Deployment"
               for ref in pod["metadata"].get("ownerReferences") or [])


def exit_code(returncode: int) -> int:
    """A container's exit code as Kubernetes reports it: 128 + signal when killed."""
    return 128 - returncode if returncode < 0 else returncode


class PodRunner:
    """One pod: its Pod object, its IP, volumes and container process, restarted as its
    restartPolicy says until stopped."""

    #: The kubelet that runs it.
    kubelet: Kubelet
    #: The owning Deployment (as seen when the pod was created); None for a Pod made by others.
    deployment: dict[str, Any] | None
    #: Hash of the pod template this pod runs (of a Deployment's pods).
    template_hash: str
    #: The Pod object as last written.
    pod: dict[str, Any]
    #: The pod IP, given at creation.
    ip: str
    #: Set when the pod should end.
    stopping: asyncio.Event
    #: Set once the process is gone and the Pod object deleted.
    done: asyncio.Event
    #: The running container process, if any.
    process: asyncio.subprocess.Process | None
    #: Container restarts so far.
    restart_count: int
    #: Whether the readiness check passed for the current process.
    ready: bool
    #: Failed: the container cannot run here (reason, message).
    failure: tuple[str, str] | None
    #: The container ended for good (restartPolicy Never/OnFailure): its terminated state.
    finished: dict[str, Any] | None
    #: The pod's volumes, once set up.
    volumes: pod_volumes.PodVolumes | None
    #: The task of run().
    task: asyncio.Task | None

    def __init__(self, kubelet: Kubelet, pod: dict[str, Any], ip: str, deployment: dict[str, Any] | None = None):
        self.kubelet = kubelet
        self.deployment = deployment
        self.template_hash = template_hash(deployment["spec"]["template"]) if deployment else ""
        self.pod = pod
        self.ip = ip
        self.stopping = asyncio.Event()
        self.done = asyncio.Event()
        self.process = None
        self.restart_count = 0
        self.ready = False
        self.failure = None
        self.finished = None
        self.volumes = None
        self.task = None
        self._stop_grace: float | None = None
        self._skip_hooks = False
        self._started_at = _now()
        self._process_started_at = ""
        self._last_state: dict[str, Any] = {}
        self._oom_killed = False
        self._events: dict[tuple[str, str], tuple[str, int]] = {}

    @property
    def name(self) -> str:
        return self.pod["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.pod["metadata"]["namespace"]

    @property
    def uid(self) -> str | None:
        return self.pod["metadata"].get("uid")

    @property
    def labels(self) -> dict[str, str]:
        return self.pod["metadata"].get("labels") or {}

    @property
    def container(self) -> dict[str, Any]:
        return self.pod["spec"]["containers"][0]

    @property
    def restart_policy(self) -> str:
        return self.pod["spec"].get("restartPolicy", "Always")

    @property
    def memory_limit(self) -> int | None:
        return memory_limit(self.container)

    @property
    def running(self) -> bool:
        """Whether the container's process runs (started, not yet exited)."""
        return self.process is not None and self.process.returncode is None

    @property
    def log_path(self) -> Path:
        return self.kubelet.log_dir / f"{self.namespace}_{self.name}.log"

    def port_number(self, port: int | str) -> int | None:
        """A numeric port, or the containerPort of that name (None: no such port)."""
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in self.container.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        return None

    # -- the Pod object --------------------------------------------------------

    def _status(self) -> dict[str, Any]:
        container = self.container
        cstatus: dict[str, Any] = {
            "name": container.get("name", "main"),
            "image": container.get("image", ""),
            "imageID": "",
            "restartCount": self.restart_count,
            "ready": self.ready,
            "started": self.process is not None,
            "lastState": self._last_state,
        }
        ready = "True" if self.ready else "False"
        status: dict[str, Any] = {
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self._started_at,
        }
        ready_condition: dict[str, Any] = {"status": ready}
        if self.failure is not None:
            reason, message = self.failure
            status.update(phase="Failed", reason=reason, message=message)
            cstatus["state"] = {"waiting": {"reason": reason, "message": message}}
        elif self.finished is not None:
            status["phase"] = "Succeeded" if self.finished["exitCode"] == 0 else "Failed"
            cstatus["state"] = {"terminated": self.finished}
            ready_condition["reason"] = "PodCompleted"
        elif self.process is not None:
            status["phase"] = "Running"
            cstatus["containerID"] = f"process://{self.process.pid}"
            cstatus["state"] = {"running": {"startedAt": self._process_started_at}}
        else:
            status["phase"] = "Running" if self.restart_count else "Pending"
            reason = "CrashLoopBackOff" if self.restart_count else "ContainerCreating"
            cstatus["state"] = {"waiting": {"reason": reason}}
            if not self.restart_count:
                ready_condition["reason"] = "ContainersNotReady"
        status["conditions"] = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", **ready_condition},
            {"type": "Ready", **ready_condition},
        ]
        status["containerStatuses"] = [cstatus]
        return status

    async def _publish(self) -> None:
        """Write the pod's status; a pod deleted meanwhile is left alone."""
        if self.uid is None or self.done.is_set():
            return
        try:
            obj = Pod(self.pod, api=self.kubelet.api)
            await obj.patch({"status": self._status()}, subresource="status")
        except kr8s.NotFoundError:
            return
        self.kubelet.changed()

    async def event(self, reason: str, message: str, type_: str = "Warning") -> None:
        """Report an Event about the pod, as the kubelet does (a repeated one counts up)."""
        key = (reason, message)
        now = _now()
        try:
            if key in self._events:
                name, count = self._events[key]
                self._events[key] = (name, count + 1)
                async with self.kubelet.api.call_api(
                    "PATCH", version="v1", namespace=self.namespace, url=f"events/{name}",
                    json={"count": count + 1, "lastTimestamp": now},
                    headers={"Content-Type": "application/merge-patch+json"}, raise_for_status=False,
                ):
                    return
            name = f"{self.name}.{secrets.token_hex(8)}"
            self._events[key] = (name, 1)
            body = {
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"name": name, "namespace": self.namespace},
                "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": self.namespace,
                                   "name": self.name, "uid": self.uid},
                "reason": reason, "message": message, "type": type_, "count": 1,
                "firstTimestamp": now, "lastTimestamp": now,
                "source": {"component": "kubelet", "host": NODE_NAME},
                "reportingComponent": "kubelet", "reportingInstance": NODE_NAME,
            }
            async with self.kubelet.api.call_api("POST", version="v1", namespace=self.namespace, url="events",
                                                 json=body, raise_for_status=False):
                pass
        except Exception:
            logger.exception("pod %s/%s: could not report event %s", self.namespace, self.name, reason)

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        if self.deployment is not None:
            try:
                obj = Pod(json.loads(json.dumps(self.pod)), api=self.kubelet.api)
                await obj.create()
                # as admitted: a mutating webhook may have changed it (its grace period)
                self.pod = obj.raw
            except Exception:
                # Left to the next reconcile, which makes a new pod.
                logger.exception("could not create pod %s/%s", self.namespace, self.name)
                await asyncio.sleep(1.0)
                self.done.set()
                self.kubelet.changed()
                return
        refresh: asyncio.Task | None = None
        try:
            await self._publish()
            if len(self.pod["spec"].get("containers", [])) != 1:
                self.failure = ("UnsupportedContainer", "the process kubelet runs pods of exactly one container")
            elif await self._mount_volumes():
                refresh = asyncio.create_task(self._refresh_token())
                await self._run_container()
            if self.failure is not None:
                logger.warning("pod %s/%s failed: %s", self.namespace, self.name, self.failure[1])
            await self._publish()
            await self.stopping.wait()
        except Exception:
            logger.exception("pod %s/%s crashed in the kubelet", self.namespace, self.name)
            await self.stopping.wait()
        finally:
            if refresh is not None:
                refresh.cancel()
            await self._delete()

    async def _mount_volumes(self) -> bool:
        """Set the volumes up, retrying as the kubelet's volume manager does while one
        cannot be had (FailedMount); False when the pod is to stop or cannot run."""
        delay = 0.5
        while not self.stopping.is_set():
            try:
                self.volumes = await pod_volumes.mount_volumes(
                    self.kubelet.api, self.pod, self.kubelet.pod_dir(self.uid or self.name),
                    self.kubelet.server, credentials=self.kubelet.token_requests,
                )
                return True
            except pod_volumes.UnsupportedVolume as exc:
                self.failure = ("UnsupportedContainer", str(exc))
                return False
            except pod_volumes.MountError as exc:
                logger.warning("pod %s/%s: %s", self.namespace, self.name, exc)
                await self.event("FailedMount", str(exc))
                await self._publish()
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
            except TimeoutError:
                pass
            delay = min(2 * delay, 8.0)
        return False

    async def _refresh_token(self) -> None:
        """Request the service-account token again at 80% of its lifetime."""
        while self.volumes is not None and self.volumes.token_refresh_at is not None:
            await asyncio.sleep(max(self.volumes.token_refresh_at - time.monotonic(), 1.0))
            try:
                await pod_volumes.refresh_token(self.kubelet.api, self.pod, self.volumes, self.kubelet.server)
            except Exception as exc:
                logger.warning("pod %s/%s: token refresh failed: %s", self.namespace, self.name, exc)
                self.volumes.token_refresh_at = time.monotonic() + 10.0

    def _command(self) -> tuple[list[str], dict[str, str], Path]:
        """argv, env and working directory of the container, its mountPaths rewritten."""
        assert self.volumes is not None
        container = self.container
        rewrite = self.volumes.rewrite
        env = {k: rewrite(v) for k, v in container_env(container, self.pod, self.ip).items()}
        argv = container_argv(container, env, self.ip)
        argv = argv[:1] + [rewrite(a) for a in argv[1:]]
        cwd = self.kubelet.state_dir
        if container.get("workingDir") and Path(rewrite(container["workingDir"])).is_dir():
            cwd = Path(rewrite(container["workingDir"]))
        return argv, {**self.volumes.env(), **env}, cwd

    def enforce_memory_limit(self, table: ProcessTable) -> None:
        """As the kernel does once the container's cgroup passes its memory limit: SIGKILL
        all of its processes at once (no hook, no SIGTERM); run() reports OOMKilled."""
        limit = self.memory_limit
        if limit is None or not self.running:
            return
        pids = table.container(self.process.pid)
        used = table.measure(pids)
        if used <= limit:
            return
        logger.warning("pod %s/%s: OOM kill: %d bytes in %d processes > limit %d", self.namespace, self.name,
                       used, len(pids), limit)
        with open(self.log_path, "ab") as log:
            log.write(f"=== process kubelet: OOM kill at {_now()}: {used} bytes in pids {pids} > limit {limit}\n"
                      .encode())
        self._oom_killed = True
        kill_processes(table, pids)

    def _termination_reason(self, code: int) -> str:
        if self._oom_killed:
            return "OOMKilled"
        return "Completed" if code == 0 else "Error"

    def _restarts(self, code: int) -> bool:
        """Whether the container is started again after exiting with ``code``."""
        policy = self.restart_policy
        return policy == "Always" or (policy == "OnFailure" and code != 0)

    async def _run_container(self) -> None:
        try:
            argv, env, cwd = self._command()
        except UnsupportedContainer as exc:
            self.failure = ("UnsupportedContainer", str(exc))
            return
        env = self.kubelet.process_env(self, env)
        backoff = BACKOFF_START
        while not self.stopping.is_set():
            loop = asyncio.get_running_loop()
            began = loop.time()
            with open(self.log_path, "ab") as log:
                log.write(f"=== process kubelet: start #{self.restart_count} at {_now()}: {argv}\n".encode())
                log.flush()
                self._oom_killed = False
                self.process = await asyncio.create_subprocess_exec(
                    *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                    stderr=asyncio.subprocess.STDOUT, preexec_fn=_die_with_parent, cwd=cwd,
                )
            self._process_started_at = _now()
            if self.memory_limit is not None:
                self.kubelet.limited_started.set()
            logger.info("pod %s/%s: started pid %d: %s", self.namespace, self.name, self.process.pid, argv)
            await self._publish()
            probe = asyncio.create_task(self._probe_readiness())
            liveness = asyncio.create_task(self._probe_liveness())
            exited = asyncio.create_task(self.process.wait())
            stop = asyncio.create_task(self.stopping.wait())
            await asyncio.wait([exited, stop, liveness], return_when=asyncio.FIRST_COMPLETED)
            probe.cancel()
            if not exited.done() and stop.done():
                liveness.cancel()
                await self._terminate()
                await exited
                self._kill_group()
                return
            if not exited.done():
                # The liveness probe failed: the container is killed and restarted as its policy says.
                stop.cancel()
                await self.event("Killing", f"Container {self.container.get('name', 'main')} failed liveness "
                                 "probe, will be restarted", "Normal")
                await self._terminate()
                await exited
            stop.cancel()
            liveness.cancel()
            self._kill_group()
            code = exit_code(self.process.returncode)
            logger.info("pod %s/%s: process exited with %s", self.namespace, self.name, code)
            terminated = {"exitCode": code, "reason": self._termination_reason(code),
                          "startedAt": self._process_started_at, "finishedAt": _now(),
                          "containerID": f"process://{self.process.pid}"}
            self.process = None
            self.ready = False
            if not self._restarts(code):
                self.finished = terminated
                return
            self._last_state = {"terminated": terminated}
            self.restart_count += 1
            await self._publish()
            if loop.time() - began > BACKOFF_RESET:
                backoff = BACKOFF_START
            try:
                await asyncio.wait_for(self.stopping.wait(), backoff)
            except TimeoutError:
                pass
            backoff = min(2 * backoff, BACKOFF_MAX)

    async def _probe_readiness(self) -> None:
        """Ready once the readinessProbe passes (httpGet, tcpSocket) or at once without one."""
        probe = self.container.get("readinessProbe") or {}
        period = min(float(probe.get("periodSeconds", 10)), 0.5)
        while True:
            try:
                passed = await self._probe_once(probe)
            except UnsupportedContainer as exc:
                logger.warning("pod %s/%s: readiness probe not run, pod never ready: %s", self.namespace, self.name, exc)
                return
            if passed:
                self.ready = True
                await self._publish()
                return
            await asyncio.sleep(period)

    async def _probe_liveness(self) -> None:
        """Returns once the livenessProbe (httpGet, tcpSocket) failed failureThreshold
        times in a row, probing every periodSeconds after initialDelaySeconds; never
        without such a probe."""
        probe = self.container.get("livenessProbe") or {}
        if "httpGet" not in probe and "tcpSocket" not in probe:
            await asyncio.Event().wait()
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        period = float(probe.get("periodSeconds", 10))
        threshold = int(probe.get("failureThreshold", 3))
        failures = 0
        while True:
            try:
                passed = await self._probe_once(probe)
            except UnsupportedContainer as exc:
                logger.warning("pod %s/%s: liveness probe not run: %s", self.namespace, self.name, exc)
                await asyncio.Event().wait()
            failures = 0 if passed else failures + 1
            if failures:
                await self.event("Unhealthy", f"Liveness probe failed ({failures}/{threshold})")
            if failures >= threshold:
                return
            await asyncio.sleep(period)

    def _port(self, port: int | str) -> int:
        number = self.port_number(port)
        if number is None:
            raise UnsupportedContainer(f"probe port {port!r} is not a port of the container")
        return number

    async def _probe_once(self, probe: Mapping[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        if "httpGet" in probe:
            get = probe["httpGet"]
            url = f"http://{self.ip}:{self._port(get['port'])}{get.get('path', '/')}"
            try:
                async with httpx.AsyncClient(timeout=timeout) as client:
                    return (await client.get(url)).status_code < 400
            except httpx.HTTPError:
                return False
        if "tcpSocket" in probe:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.ip, self._port(probe["tcpSocket"]["port"])), timeout)
            except (OSError, TimeoutError):
                return False
            writer.close()
            return True
        # No probe, or an exec probe: the container is ready once it runs.
        return True

    async def _terminate(self) -> None:
        """preStop hook, SIGTERM, then SIGKILL when the grace period is over."""
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._grace
        hook = ((self.container.get("lifecycle") or {}).get("preStop") or {}).get("exec")
        if hook and not self._skip_hooks:
            await self._run_pre_stop(hook.get("command") or [], deadline)
        logger.info("pod %s/%s: SIGTERM to pid %d", self.namespace, self.name, self.process.pid)
        self._signal(signal.SIGTERM)
        # As a kubelet does, a hook that used up the grace period leaves 2 s for SIGTERM.
        try:
            await asyncio.wait_for(self.process.wait(), max(deadline - loop.time(), 2.0))
        except TimeoutError:
            logger.warning("pod %s/%s: SIGKILL after the grace period", self.namespace, self.name)
            self._kill_group()

    async def _run_pre_stop(self, command: list[str], deadline: float) -> None:
        env = container_env(self.container, self.pod, self.ip)
        rewrite = self.volumes.rewrite if self.volumes is not None else (lambda text: text)
        try:
            argv = _program(command[0]) + [rewrite(expand(a, env)) for a in command[1:]] if command else []
        except UnsupportedContainer as exc:
            logger.warning("pod %s/%s: preStop hook not run: %s", self.namespace, self.name, exc)
            return
        loop = asyncio.get_running_loop()
        with open(self.log_path, "ab") as log:
            log.write(f"=== process kubelet: preStop at {_now()}: {argv}\n".encode())
            log.flush()
            hook = await asyncio.create_subprocess_exec(
                *argv, env=self.kubelet.process_env(self, self._hook_env(env)), stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=asyncio.subprocess.STDOUT, preexec_fn=_die_with_parent,
                cwd=self.kubelet.state_dir,
            )
        try:
            code = await asyncio.wait_for(hook.wait(), max(deadline - loop.time(), 0))
            logger.info("pod %s/%s: preStop hook exited with %s", self.namespace, self.name, code)
        except TimeoutError:
            logger.warning("pod %s/%s: preStop hook still running after the grace period", self.namespace, self.name)
            os.killpg(hook.pid, signal.SIGKILL)
            await hook.wait()

    def _hook_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """A hook runs in the container: its env with the volumes' paths and variables."""
        if self.volumes is None:
            return dict(env)
        return {**self.volumes.env(), **{k: self.volumes.rewrite(v) for k, v in env.items()}}

    def _signal(self, sig: int) -> None:
        assert self.process is not None
        try:
            os.kill(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def _kill_group(self) -> None:
        """Kill whatever is left in the container's process group (e.g. a nanny's worker)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    @property
    def _grace(self) -> float:
        """Seconds from the stop to the SIGKILL: the pod's as admitted, or a shorter
        one the stop asked for (a delete's gracePeriodSeconds)."""
        grace = float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
        return grace if self._stop_grace is None else min(grace, self._stop_grace)

    def stop(self, *, grace: float | None = None, hooks: bool = True) -> None:
        """Ask the pod to end; ``done`` is set once its process and Pod object are gone."""
        if grace is not None:
            self._stop_grace = grace if self._stop_grace is None else min(self._stop_grace, grace)
        self._skip_hooks = not hooks
        if not self.stopping.is_set():
            self.stopping.set()
            self.kubelet.changed()  # it is no endpoint any more

    async def _delete(self) -> None:
        self.process = None
        if self.uid is not None and not self.kubelet.shutting_down:
            try:
                # The containers are gone: as a kubelet does, delete with no grace.
                await Pod(self.pod, api=self.kubelet.api).delete(force=True)
            except kr8s.NotFoundError:
                pass
            except Exception:
                logger.exception("pod %s/%s: could not delete the Pod object", self.namespace, self.name)
        if not self.kubelet.shutting_down:
            shutil.rmtree(self.kubelet.pod_dir(self.uid or self.name), ignore_errors=True)
        self.done.set()
        self.kubelet.changed()


# ---------------------------------------------------------------------------------
# The kubelet


class Kubelet:
    """Watches Deployments, Services and Pods and keeps one PodRunner per wanted pod."""

    #: The kr8s API client.
    api: Any
    #: Working directory of the processes; holds the hosts file.
    state_dir: Path
    #: Where each pod's output goes.
    log_dir: Path
    #: The cluster DNS hosts file (see dns.py).
    hosts_file: Path
    #: Cached objects by uid.
    deployments: dict[str, dict[str, Any]]
    services: dict[str, dict[str, Any]]
    #: Pods by Deployment uid; stopped pods leave once done.
    runners: dict[str, list[PodRunner]]
    #: Pods made by others (bare Pods, a DaskJob's runner), by Pod uid.
    bare: dict[str, PodRunner]
    #: Cached Pods by uid (all of them, not only this kubelet's).
    pods: dict[str, dict[str, Any]]
    #: The API server's URL, as pods are told it (KUBERNETES_SERVICE_HOST, their kubeconfig).
    server: str
    #: Whether the API serves TokenRequest (serviceaccounts/token): pods get credentials.
    token_requests: bool
    #: Every EndpointSlice by uid (all namespaces, whoever wrote it): the proxy's endpoints.
    slices: dict[str, dict[str, Any]]
    #: Every Service's clusterIP ports, to the endpoints of its slices.
    proxy: UserspaceProxy
    #: Pod IPs in use, and the pod that holds each.
    ips_in_use: dict[str, PodRunner]
    #: Where pod IPs come from.
    pod_cidr: ipaddress.IPv4Network
    #: Set by SIGTERM.
    shutting_down: bool

    def __init__(self, api: Any, state_dir: Path, log_dir: Path, *, pod_cidr: str = POD_CIDR):
        self.api = api
        self.state_dir = state_dir
        self.log_dir = log_dir
        self.hosts_file = state_dir / "cluster-hosts"
        self.deployments = {}
        self.services = {}
        self.runners = {}
        self.bare = {}
        self.pods = {}
        self.server = str(getattr(getattr(api, "auth", None), "server", "") or "")
        self.token_requests = False
        self.proxy = UserspaceProxy()
        self.slices = {}
        self._stopping_uids: set[str | None] = set()
        self.ips_in_use = {}
        self.pod_cidr = ipaddress.ip_network(pod_cidr)
        self._next_ip_index = 0
        self.shutting_down = False
        self._wake = asyncio.Event()
        self._hosts_written: list[tuple[str, str, str]] | None = None
        #: The machine's processes, for the OOM killer.
        self._processes = ProcessTable()
        #: Set when a container with a memory limit starts: wakes the OOM killer.
        self.limited_started = asyncio.Event()
        #: Deployment uid -> loop time before which a deleted pod is not replaced.
        self._replace_not_before: dict[str, float] = {}

    def changed(self) -> None:
        """Something changed: reconcile soon."""
        self._wake.set()

    def pod_dir(self, uid: str) -> Path:
        """A pod's directory: its volumes and kubeconfig (see volumes.py)."""
        return self.state_dir / "pods" / uid

    def all_runners(self) -> list[PodRunner]:
        return [r for rs in self.runners.values() for r in rs] + list(self.bare.values())

    def limited_runners(self) -> list[PodRunner]:
        """The pods whose container runs with a memory limit: those the OOM killer watches."""
        return [r for r in self.all_runners() if r.running and r.memory_limit is not None]

    async def _watch_memory(self) -> None:
        """The OOM killer: one reading of /proc for all the limited containers each period;
        asleep while there are none."""
        while True:
            if not self.limited_runners():
                self.limited_started.clear()
                await self.limited_started.wait()
            await asyncio.sleep(MEMORY_WATCH_PERIOD)
            try:
                self._processes.update()
                for runner in self.limited_runners():
                    runner.enforce_memory_limit(self._processes)
            except Exception:
                logger.exception("memory watch failed")
                await asyncio.sleep(1.0)

    def process_env(self, runner: PodRunner, env: Mapping[str, str]) -> dict[str, str]:
        """The environment of a container process: the kubelet's own minus Dask and
        Kubernetes settings, the pod's identity, the cluster DNS, the ``kubernetes``
        Service's variables, then the container's env (with the volumes' KUBECONFIG)."""
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("DASK_", "KUBERNETES_")) and k != "KUBECONFIG"}
        base.update(
            HOSTNAME=runner.name,
            PYTHONUNBUFFERED="1",
            DMO_POD=f"{runner.namespace}/{runner.name}",
        )
        base = dns.process_env(self.hosts_file, base)
        if self.server:
            base.update(pod_volumes.service_env(self.server))
        base.update(env)
        return base

    # -- watching --------------------------------------------------------------

    async def _list_watch(
        self, kind: type, cache: dict[str, dict[str, Any]] | None, on_event=None,
        listed: asyncio.Event | None = None,
    ) -> None:
        """Keep ``cache`` equal to the objects of ``kind`` (all namespaces): list, then
        watch from the list's resourceVersion; on any error list again."""
        while True:
            try:
                async with self.api.async_get_kind(kind, namespace=kr8s.ALL) as (_, response):
                    listing = response.json()
                if cache is not None:
                    cache.clear()
                    cache.update({o["metadata"]["uid"]: o for o in listing.get("items") or []})
                self.changed()
                if listed is not None:
                    listed.set()
                since = listing["metadata"].get("resourceVersion")
                async for event, obj in self.api.watch(kind, namespace=kr8s.ALL, since=since):
                    raw = obj.raw
                    if cache is not None:
                        if event == "DELETED":
                            cache.pop(raw["metadata"]["uid"], None)
                        elif event in ("ADDED", "MODIFIED"):
                            cache[raw["metadata"]["uid"]] = raw
                    if on_event is not None:
                        on_event(event, raw)
                    self.changed()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("watch of %s ended (%s: %s); listing again", kind.kind, type(exc).__name__, exc)
                await asyncio.sleep(1.0)

    def _on_pod_event(self, event: str, pod: dict[str, Any]) -> None:
        """A Pod of ours deleted by someone else (kubectl delete pod, garbage collection) ends its process."""
        if event != "DELETED" and not pod["metadata"].get("deletionTimestamp"):
            return
        uid = pod["metadata"]["uid"]
        for runner in self.all_runners():
            if runner.uid == uid and not runner.stopping.is_set():
                grace = pod["metadata"].get("deletionGracePeriodSeconds")
                logger.info("pod %s/%s deleted: stopping it", runner.namespace, runner.name)
                runner.stop(grace=None if grace is None else float(grace))
                if runner.deployment is None:
                    continue
                # The garbage collector deletes the pods of a deleted Deployment, and
                # the Deployments watch may tell it later: wait a moment before
                # replacing, rather than start a pod only to stop it.
                owner = runner.deployment["metadata"]["uid"]
                loop = asyncio.get_running_loop()
                self._replace_not_before[owner] = loop.time() + REPLACE_DELAY
                loop.call_later(REPLACE_DELAY, self.changed)

    def _on_volume_source_event(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        """A Secret or ConfigMap changed: rewrite the volumes made from it (the kubelet
        propagates updates to mounted volumes)."""
        if event != "MODIFIED":
            return
        key = (kind, obj["metadata"]["name"])
        for runner in self.all_runners():
            if runner.volumes is None or runner.namespace != obj["metadata"]["namespace"]:
                continue
            for path, source in runner.volumes.sources.get(key, []):
                try:
                    pod_volumes.write_volume(kind, obj, source, path)
                except Exception as exc:
                    logger.warning("pod %s/%s: %s %s not updated: %s", runner.namespace, runner.name,
                                   kind, key[1], exc)

    # -- reconciling -----------------------------------------------------------

    def _allocate_ip(self) -> str:
        """The next free pod IP after the last one handed out, as CNI's host-local IPAM
        allocates (round robin): an address just released is not handed out again at
        once, while clients of the pod that had it may still be trying to reach it."""
        first = int(self.pod_cidr.network_address) + 1
        size = self.pod_cidr.num_addresses - 2  # without the network and broadcast addresses
        for i in range(size):
            index = (self._next_ip_index + i) % size
            ip = str(ipaddress.ip_address(first + index))
            if ip not in self.ips_in_use and not ip.endswith(".255"):
                self._next_ip_index = index + 1
                return ip
        raise RuntimeError(f"no pod IP left in {self.pod_cidr}")

    def _start_pod(self, deployment: dict[str, Any], ip: str) -> None:
        runner = PodRunner(self, pod_from_deployment(deployment), ip, deployment)
        self.ips_in_use[ip] = runner
        self.runners.setdefault(deployment["metadata"]["uid"], []).append(runner)
        runner.task = asyncio.create_task(runner.run(), name=f"pod {runner.namespace}/{runner.name}")

    def _start_bare_pods(self) -> None:
        """Run the Pods others made (no Deployment of ours controls them) that are not
        bound elsewhere, not finished and not being deleted."""
        for uid, runner in self.bare.items():
            if uid not in self.pods and not runner.stopping.is_set():
                runner.stop()  # deleted while the watch was down: gone from the new list
        for uid, pod in list(self.pods.items()):
            meta, spec = pod["metadata"], pod.get("spec") or {}
            if (
                uid in self.bare or made_by_deployment(pod) or meta.get("deletionTimestamp")
                or spec.get("nodeName") not in (None, "", NODE_NAME)
                or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            ):
                continue
            runner = PodRunner(self, json.loads(json.dumps(pod)), self._allocate_ip())
            self.ips_in_use[runner.ip] = runner
            self.bare[uid] = runner
            logger.info("running pod %s/%s (made by others)", runner.namespace, runner.name)
            runner.task = asyncio.create_task(runner.run(), name=f"pod {runner.namespace}/{runner.name}")

    def _release_finished(self) -> None:
        """Pods done (gone) or whose container ended for good give their IP back."""
        for uid, runners in list(self.runners.items()):
            for runner in [r for r in runners if r.done.is_set()]:
                runners.remove(runner)
            if not runners:
                del self.runners[uid]
        for uid in [u for u, r in self.bare.items() if r.done.is_set()]:
            del self.bare[uid]
        for ip, runner in list(self.ips_in_use.items()):
            if runner.done.is_set() or runner.finished is not None or runner.failure is not None:
                del self.ips_in_use[ip]

    # -- the endpoint controller ------------------------------------------------

    def _pod_endpoint(self, pod: Mapping[str, Any]) -> dict[str, Any] | None:
        """A pod as an EndpointSlice endpoint, None when it has no IP or has ended."""
        meta, status = pod["metadata"], pod.get("status") or {}
        if not status.get("podIP") or status.get("phase") in ("Succeeded", "Failed"):
            return None
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
        terminating = bool(meta.get("deletionTimestamp")) or meta.get("uid") in self._stopping_uids
        return {
            "addresses": [status["podIP"]],
            "conditions": {"ready": ready and not terminating, "serving": ready, "terminating": terminating},
            "nodeName": (pod.get("spec") or {}).get("nodeName") or NODE_NAME,
            "targetRef": {"kind": "Pod", "namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
        }

    def _wanted_slices(self, svc: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The slices' contents (ports, endpoints) a Service with a selector gets: its
        pods grouped by their resolved ports, as the EndpointSlice controller does."""
        spec = svc.get("spec") or {}
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for pod in self.pods.values():
            if pod["metadata"].get("namespace") != svc["metadata"]["namespace"] \
                    or not selects(spec.get("selector"), pod["metadata"].get("labels") or {}):
                continue
            endpoint = self._pod_endpoint(pod)
            if endpoint is None:
                continue
            ports = []
            for entry in spec.get("ports") or []:
                target = entry.get("targetPort", entry["port"])
                number = _pod_port(pod, target)
                if number is not None:
                    ports.append((entry.get("name") or "", number, entry.get("protocol", "TCP")))
            groups.setdefault(tuple(ports), []).append(endpoint)
        if not groups:
            # A Service without endpoints still has its (empty) slice.
            groups[()] = []
        wanted = []
        for ports, endpoints in sorted(groups.items()):
            endpoints.sort(key=lambda e: e["targetRef"]["name"])
            for i in range(0, max(len(endpoints), 1), MAX_ENDPOINTS_PER_SLICE):
                wanted.append({
                    "addressType": "IPv4",
                    "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
                    "endpoints": endpoints[i:i + MAX_ENDPOINTS_PER_SLICE],
                })
        return wanted

    async def _sync_endpoint_slices(self) -> None:
        """Make the managed slices of every Service with a selector what its pods say;
        delete managed slices of Services gone or without a selector. Slices written by
        others are never touched (kube-proxy still follows them)."""
        services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in self.services.values()}
        self._stopping_uids = {r.uid for r in self.all_runners() if r.stopping.is_set()}
        managed: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for item in list(self.slices.values()):
            labels = item["metadata"].get("labels") or {}
            if labels.get(MANAGED_BY_LABEL) == CONTROLLER_NAME and SERVICE_NAME_LABEL in labels:
                managed.setdefault((item["metadata"]["namespace"], labels[SERVICE_NAME_LABEL]), []).append(item)
        for key in set(services) | set(managed):
            svc = services.get(key)
            have = sorted(managed.get(key, []), key=lambda i: i["metadata"]["name"])
            if svc is None or not (svc.get("spec") or {}).get("selector") or svc["metadata"].get("deletionTimestamp"):
                wanted: list[dict[str, Any]] = []
            else:
                wanted = self._wanted_slices(svc)
            for i, body in enumerate(wanted):
                if i < len(have):
                    current = have[i]
                    if all(current.get(k) == v for k, v in body.items()) and svc is not None \
                            and _owned_by(current, svc):
                        continue
                    await self._write_slice("PATCH", key[0], current["metadata"]["name"], body, svc)
                else:
                    await self._write_slice("POST", key[0], None, body, svc)
            for extra in have[len(wanted):]:
                await self._write_slice("DELETE", key[0], extra["metadata"]["name"], None, svc)

    async def _write_slice(self, verb: str, namespace: str, name: str | None,
                           body: dict[str, Any] | None, svc: Mapping[str, Any] | None) -> None:
        """One write of a managed slice; its answer goes into the cache at once, so that
        the next pass does not write it again before the watch tells."""
        if body is not None and svc is not None:
            meta = svc["metadata"]
            body = {
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {
                    "labels": {SERVICE_NAME_LABEL: meta["name"], MANAGED_BY_LABEL: CONTROLLER_NAME},
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": meta["name"],
                                         "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}],
                    **({"generateName": f"{meta['name']}-"} if name is None else {}),
                },
                **body,
            }
        url = "endpointslices" if name is None else f"endpointslices/{name}"
        headers = {"Content-Type": "application/merge-patch+json"} if verb == "PATCH" else None
        try:
            async with self.api.call_api(verb, version="discovery.k8s.io/v1", base="/apis", namespace=namespace,
                                         url=url, json=body, headers=headers) as resp:
                answer = resp.json()
        except kr8s.ServerError as exc:
            if exc.response is not None and exc.response.status_code in (404, 409):
                self.changed()  # gone or changed meanwhile: the watch tells, the next pass fixes
                return
            raise
        if verb == "DELETE":
            # in place: the watch and the proxy hold this very dict
            for uid in [u for u, i in self.slices.items()
                        if (i["metadata"].get("namespace"), i["metadata"].get("name")) == (namespace, name)]:
                del self.slices[uid]
        elif answer.get("kind") == "EndpointSlice":
            self.slices[answer["metadata"]["uid"]] = answer

    async def reconcile(self) -> None:
        loop = asyncio.get_running_loop()
        # Pods whose process and object are gone leave the books.
        self._release_finished()
        # Pods of deleted Deployments end.
        for uid in [u for u in self._replace_not_before if u not in self.deployments]:
            del self._replace_not_before[uid]
        for uid, runners in self.runners.items():
            if uid not in self.deployments:
                for runner in runners:
                    runner.stop()
        self._write_hosts()
        # A copy: the watches change the cache while this awaits status patches.
        for uid, deployment in list(self.deployments.items()):
            runners = self.runners.get(uid, [])
            current = template_hash(deployment["spec"]["template"])
            active = [r for r in runners if not r.stopping.is_set()]
            outdated = [r for r in active if r.template_hash != current]
            for runner in outdated:
                runner.stop()
            active = [r for r in active if r.template_hash == current]
            wanted = 0 if deployment["metadata"].get("deletionTimestamp") else deployment["spec"].get("replicas", 1)
            for runner in active[wanted:][::-1]:
                runner.stop()
            # Recreate: new pods start once the old template's pods are gone.
            if loop.time() < self._replace_not_before.get(uid, 0):
                pass
            elif len(active) < wanted and not any(r.template_hash != current for r in runners):
                for _ in range(wanted - len(active)):
                    self._start_pod(deployment, self._allocate_ip())
            await self._update_deployment_status(deployment)
        self._start_bare_pods()
        await self._sync_endpoint_slices()
        if not await self.proxy.sync(service_ports(list(self.services.values()), self.slices)):
            loop.call_later(1.0, self.changed)

    def _write_hosts(self) -> None:
        entries = sorted(
            (svc["metadata"]["name"], svc["metadata"]["namespace"], svc["spec"]["clusterIP"])
            for svc in self.services.values()
            if svc.get("spec", {}).get("clusterIP") not in (None, "", "None")
        )
        if entries != self._hosts_written:
            dns.write_hosts(self.hosts_file, entries)
            self._hosts_written = entries

    async def _update_deployment_status(self, deployment: dict[str, Any]) -> None:
        runners = [r for r in self.runners.get(deployment["metadata"]["uid"], []) if not r.stopping.is_set()]
        current = template_hash(deployment["spec"]["template"])
        ready = sum(1 for r in runners if r.ready)
        updated = sum(1 for r in runners if r.template_hash == current)
        status = {
            "observedGeneration": deployment["metadata"].get("generation", 1),
            "replicas": len(runners),
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": len(runners) - ready,
        }
        old = deployment.get("status") or {}
        conditions = deployment_conditions(deployment, updated, ready, old.get("conditions") or [])
        if all(old.get(k, 0) == v for k, v in status.items()) and conditions == old.get("conditions"):
            return
        status["conditions"] = conditions
        try:
            obj = Deployment(deployment, api=self.api)
            await obj.patch({"status": status}, subresource="status")
            deployment["status"] = obj.raw.get("status", status)
        except kr8s.NotFoundError:
            pass

    async def _reconcile_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # A set event's wait() does not yield: let the pods' tasks run between passes.
            await asyncio.sleep(0)
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("reconcile failed; retrying")
                await asyncio.sleep(1.0)
                self.changed()

    async def _delete_stale_pods(self) -> None:
        """Pods of an earlier run of this kubelet have no process any more."""
        async for pod in self.api.get(Pod, namespace=kr8s.ALL, field_selector=f"spec.nodeName={NODE_NAME}"):
            if pod.raw["spec"].get("nodeName") != NODE_NAME:
                continue  # a server that ignores field selectors
            logger.info("deleting stale pod %s/%s", pod.namespace, pod.name)
            try:
                await pod.delete(force=True)
            except kr8s.NotFoundError:
                pass

    def _clean_pod_dirs(self) -> None:
        """Pod directories of an earlier run: their pods are gone or will be set up again."""
        root = self.state_dir / "pods"
        if root.is_dir():
            for entry in root.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)

    async def _serves_token_requests(self) -> bool:
        """Whether the API serves ``serviceaccounts/token``; without it pods get no credentials."""
        try:
            async with self.api.call_api("GET", version="v1", url="") as resp:
                names = {r["name"] for r in resp.json().get("resources") or []}
        except Exception as exc:
            logger.warning("could not read the API's discovery: %s", exc)
            return False
        if "serviceaccounts/token" not in names:
            logger.warning("the API does not serve TokenRequest: pods get no service-account credentials")
        return "serviceaccounts/token" in names

    async def run(self, ready_file: Path | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._write_hosts()
        await self._delete_stale_pods()
        self._clean_pod_dirs()
        self.token_requests = await self._serves_token_requests()
        services_listed, pods_listed, slices_listed = asyncio.Event(), asyncio.Event(), asyncio.Event()
        tasks = [
            asyncio.create_task(self._list_watch(Service, self.services, listed=services_listed)),
            asyncio.create_task(self._list_watch(Pod, self.pods, self._on_pod_event, listed=pods_listed)),
            asyncio.create_task(self._list_watch(EndpointSlice, self.slices, listed=slices_listed)),
            asyncio.create_task(self._list_watch(
                Secret, None, lambda event, obj: self._on_volume_source_event("secret", event, obj))),
            asyncio.create_task(self._list_watch(
                ConfigMap, None, lambda event, obj: self._on_volume_source_event("configmap", event, obj))),
        ]
        # The endpoint controller writes slices from what it has seen: it must have seen
        # the Services, Pods and existing slices (else it would write duplicates).
        await asyncio.gather(services_listed.wait(), pods_listed.wait(), slices_listed.wait())
        tasks.append(asyncio.create_task(self._list_watch(Deployment, self.deployments)))
        tasks.append(asyncio.create_task(self._reconcile_loop()))
        tasks.append(asyncio.create_task(self._watch_memory()))
        if ready_file is not None:
            ready_file.write_text(str(os.getpid()))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def shutdown(self, grace: float) -> None:
        """Stop every pod: SIGTERM, SIGKILL after ``grace``; no hooks, Pod objects stay."""
        self.shutting_down = True
        runners = self.all_runners()
        for runner in runners:
            runner.stop(grace=grace, hooks=False)
        tasks = [r.task for r in runners if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace + 5)
        for runner in runners:
            runner._kill_group()
        self.proxy.close()


async def amain(args: argparse.Namespace) -> None:
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir).resolve() if args.log_dir else state_dir / "pods"
    api = await kr8s.asyncio.api(kubeconfig=args.kubeconfig)
    kubelet = Kubelet(api, state_dir, log_dir, pod_cidr=args.pod_cidr)
    loop = asyncio.get_running_loop()
    main = asyncio.create_task(kubelet.run(ready_file=state_dir / "kubelet.ready"))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await asyncio.wait([main, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    logger.info("shutting down")
    main.cancel()
    await kubelet.shutdown(args.shutdown_grace)
    if main.done() and not main.cancelled() and main.exception():
        raise main.exception()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state-dir", required=True, help="working directory, hosts file, ready marker")
    parser.add_argument("--log-dir", help="one log file per pod (default: <state-dir>/pods)")
    parser.add_argument("--pod-cidr", default=POD_CIDR, help="pod IPs (on loopback)")
    parser.add_argument("--shutdown-grace", type=float, default=5.0,
                        help="seconds between SIGTERM and SIGKILL of the pods when the kubelet stops")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per API request would drown what the kubelet does.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
