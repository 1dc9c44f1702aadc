"""Cluster DNS for the local processes of the local Kubernetes stack.

Inside a real cluster, ``<svc>.<ns>.svc.cluster.local`` resolves to the Service's
clusterIP through the cluster DNS named in every pod's resolv.conf. dask-kubernetes
relies on it twice: its operator checks that ``<cluster>-scheduler.<ns>`` resolves
before talking to the scheduler (``networking.get_scheduler_address``), and every
worker gets ``DASK_SCHEDULER_ADDRESS=tcp://<cluster>-scheduler.<ns>.svc.cluster.local:8786``.

Here every "pod" is a process on this machine, without a network namespace or a
resolv.conf of its own. The process kubelet keeps a hosts file of the Services'
names and clusterIPs (:func:`write_hosts`) and starts each process with
``DMO_CLUSTER_HOSTS=<that file>`` and the directory of ``_cluster_dns/sitecustomize.py``
on ``PYTHONPATH``; that sitecustomize calls :func:`install`, which wraps
``socket.getaddrinfo``. asyncio (``loop.getaddrinfo``), tornado and aiohttp look
``socket.getaddrinfo`` up at call time, so the wrapper serves Dask comms, the
dashboard and the operator's HTTP calls. Names outside the cluster resolve as before;
a name under ``.svc.cluster.local`` that no Service has fails at once instead of
asking the machine's resolver.

This module imports only the standard library: sitecustomize loads it by file path
into every process the stack starts, before anything else is imported.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path

#: Environment variable naming the hosts file; set on every process of the stack.
ENV_VAR = "DMO_CLUSTER_HOSTS"
#: The cluster domain of Service names.
CLUSTER_DOMAIN = "cluster.local"
#: The directory to put on PYTHONPATH so that a process installs the resolver.
SITECUSTOMIZE_DIR = Path(__file__).parent / "_cluster_dns"


def service_names(name: str, namespace: str) -> list[str]:
    """The names under which a Service is known inside the cluster."""
    return [
        f"{name}.{namespace}",
        f"{name}.{namespace}.svc",
        f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}",
    ]


def write_hosts(path: str | os.PathLike, services: Iterable[tuple[str, str, str]]) -> None:
    """Write the hosts file for ``(name, namespace, cluster_ip)`` triples.

    The file is replaced atomically so that a reader never sees half of it.
    """
    path = Path(path)
    lines = [
        " ".join([ip, *service_names(name, namespace)])
        for name, namespace, ip in sorted(services)
    ]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    os.replace(tmp, path)


class HostsTable:
    """Names to addresses, read from a hosts file and re-read when the file changes."""

    #: The hosts file.
    path: Path
    #: (mtime_ns, size, inode) of the file when last read; None when it was missing.
    _stamp: tuple[int, int, int] | None
    #: Lower-case name -> IP address.
    _names: dict[str, str]
    #: Namespaces that have at least one Service: ``<x>.<ns>`` is a cluster name.
    _namespaces: set[str]

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stamp = None
        self._names = {}
        self._namespaces = set()

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            # The kubelet has not written it yet: no Service is known.
            self._stamp, self._names, self._namespaces = None, {}, set()
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        names: dict[str, str] = {}
        namespaces: set[str] = set()
        for line in self.path.read_text().splitlines():
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2:
                continue
            ip, *aliases = fields
            for alias in aliases:
                names[alias.lower()] = ip
                parts = alias.split(".")
                if len(parts) >= 2:
                    namespaces.add(parts[1].lower())
        self._stamp, self._names, self._namespaces = stamp, names, namespaces

    def lookup(self, host: str) -> str | None:
        """The address of a cluster name, or None when ``host`` is not a cluster name.

        Raises ``socket.gaierror`` for a name that can only be a cluster name
        (``*.svc.cluster.local``, or ``<x>.<ns>`` of a known namespace) but that no
        Service has, as the cluster DNS answers NXDOMAIN.
        """
        self._refresh()
        name = host.rstrip(".").lower()
        ip = self._names.get(name)
        if ip is not None:
            return ip
        parts = name.split(".")
        if name.endswith(f".svc.{CLUSTER_DOMAIN}") or name.endswith(".svc") or (
            len(parts) == 2 and parts[1] in self._namespaces
        ):
            raise socket.gaierror(socket.EAI_NONAME, f"no Service named {host!r} in the cluster")
        return None


_original_getaddrinfo = socket.getaddrinfo
_table: HostsTable | None = None


def _cluster_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    """``socket.getaddrinfo`` that answers cluster names from the hosts table."""
    assert _table is not None
    if isinstance(host, bytes):
        name = host.decode("idna")
    else:
        name = host
    if isinstance(name, str) and name:
        ip = _table.lookup(name)
        if ip is not None:
            host = ip
    return _original_getaddrinfo(host, port, family, type, proto, flags)


def install(path: str | os.PathLike | None = None) -> None:
    """Resolve cluster names in this process from the hosts file ``path``
    (default: ``$DMO_CLUSTER_HOSTS``). Calling it again switches the file."""
    global _table
    if path is None:
        path = os.environ[ENV_VAR]
    _table = HostsTable(path)
    socket.getaddrinfo = _cluster_getaddrinfo


def uninstall() -> None:
    """Restore the machine's resolver."""
    global _table
    socket.getaddrinfo = _original_getaddrinfo
    _table = None


def process_env(hosts_file: str | os.PathLike, env: dict[str, str]) -> dict[str, str]:
    """``env`` plus what makes a Python process use the cluster DNS (its resolv.conf)."""
    env = dict(env)
    env[ENV_VAR] = str(hosts_file)
    pythonpath = [str(SITECUSTOMIZE_DIR)]
    pythonpath += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in pythonpath]
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    return env
