"""LocalStack: an emulated Kubernetes with the real dask-kubernetes operator, on this machine.

The end-to-end tests and the sandbox need what a cluster gives a Dask operator: an
API server, dask-kubernetes turning DaskClusters into Deployments and Services, and
something that runs those Deployments. Here that is three local processes:

1. ``dmo_devstack.apiserver``: the emulated Kubernetes API (HTTP on
   127.0.0.1), started with the CRDs of dask-kubernetes (from its helm chart in the
   installed package) and of this project (``crds/`` of the repository).
2. ``dmo_devstack.kubelet``: runs each Deployment's pods as local
   ``dask scheduler``/``dask worker`` processes (see its docstring for networking).
3. The dask-kubernetes operator, unmodified from its package, run as its image runs
   it: ``kopf run --all-namespaces -m dask_kubernetes.operator.controller`` (standalone,
   so that it does not pause for other kopf operators).

Every process gets ``KUBECONFIG`` and the cluster DNS (dns.py), so names such as
``<cluster>-scheduler.<ns>`` resolve as they do inside a cluster. More processes
(this project's operator) are started with :meth:`LocalStack.start_process`.
Every process, and every process they start, carries ``DMO_STACK=<state dir>`` in
its environment: that is how :meth:`LocalStack.processes` finds them and how
:meth:`LocalStack.stop` checks that nothing is left behind.

Several stacks may run on one machine at once (tests, the sandbox, other
sessions) and all bind on the one loopback: each reserves an address slot ``s``
(an flock in ``$TMPDIR/dmo-stack-slots``) and uses clusterIPs from ``127.1.s.0/24``
and pod IPs from ``127.2.s.0/24``, so that no worker joins another stack's scheduler.

Logs: ``<state dir>/logs/<name>.log`` per stack process, ``<state dir>/pods/<ns>_<pod>.log``
per pod; the API server's audit log (``--audit-log-path``, JSON lines of
``audit.k8s.io/v1`` Events) is ``<state dir>/audit.log`` (:attr:`LocalStack.audit_log_path`,
parsed by :meth:`LocalStack.audit_events`).

The API server is started with an AdmissionConfiguration (kube-apiserver's
``--admission-control-config-file``) naming :attr:`LocalStack.webhook_kubeconfig`: a
kubeconfig whose users are the client credentials it presents to admission webhooks.
The file does not exist at first (no credentials); a test writes it
(:meth:`LocalStack.set_webhook_client`) and the API server reads it when it changes.
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import psutil
import yaml

from dask_memory_operator import manifests
from dmo_devstack import dns
from dmo_devstack.proxy import SERVICE_NAME_LABEL, slice_endpoints

T = TypeVar("T")

#: CRDs of dask-kubernetes, as its helm chart installs them.
DASK_KUBERNETES_CRDS = (
    Path(importlib.util.find_spec("dask_kubernetes").submodule_search_locations[0])
    / "operator" / "deployment" / "helm" / "dask-kubernetes-operator" / "crds"
)
#: CRDs of this project, from the installed package.
PROJECT_CRDS = Path(str(manifests.CRDS))
#: Environment variable that marks every process of a stack.
STACK_ENV = "DMO_STACK"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"

_PR_SET_PDEATHSIG = 1


def _own_session_die_with_parent() -> None:
    """In the child before exec: its own process group, and SIGKILL when its parent dies
    (so that a crashed test run leaves no stack behind)."""
    os.setsid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _preexec() -> Callable[[], None]:
    # The kernel sends the parent-death signal when the *thread* that forked exits:
    # only the main thread lives as long as the process.
    if threading.current_thread() is threading.main_thread():
        return _own_session_die_with_parent
    return os.setsid


#: Where stacks on this machine reserve their address slot (see LocalStack._reserve_slot).
SLOT_DIR = Path(tempfile.gettempdir()) / "dmo-stack-slots"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; the message includes its stderr."""

    def __str__(self) -> str:
        return f"{' '.join(map(str, self.cmd))} exited with {self.returncode}: {self.stderr.strip()}"


class ManagedProcess:
    """A process of the stack, its output appended to a log file."""

    #: Name in the stack (``apiserver``, ``kubelet``, ``dask-kubernetes``, ...).
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen | None

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.popen = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"=== LocalStack: start {self.argv}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_preexec(),
            )

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL of its process group after ``timeout``; returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.popen.wait()


class LocalStack:
    """The local Kubernetes stack; a context manager (``with LocalStack() as stack:``)."""

    #: Everything the stack writes: kubeconfig, logs, the kubelet's state.
    state_dir: Path
    #: The kubeconfig of the emulated API (written by the API server).
    kubeconfig: Path
    #: The API server's URL, e.g. ``http://127.0.0.1:40123``.
    api_url: str
    #: Processes by name, in start order.
    processes_by_name: dict[str, ManagedProcess]
    #: Directories of CRD manifests the API server loads at start.
    crd_dirs: list[Path]
    #: Whether to run the dask-kubernetes operator and the kubelet.
    with_dask_operator: bool
    with_kubelet: bool
    #: This stack's address slot s: clusterIPs from 127.1.s.0/24, pod IPs from 127.2.s.0/24.
    slot: int | None

    def __init__(
        self,
        state_dir: str | os.PathLike | None = None,
        *,
        crd_dirs: Iterable[str | os.PathLike] | None = None,
        dask_operator: bool = True,
        kubelet: bool = True,
    ):
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="dmo-stack-")).resolve()
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.api_url = ""
        self.processes_by_name = {}
        if crd_dirs is None:
            crd_dirs = [DASK_KUBERNETES_CRDS]
            if PROJECT_CRDS.is_dir() and any(PROJECT_CRDS.glob("*.yaml")):
                crd_dirs.append(PROJECT_CRDS)
        self.crd_dirs = [Path(d) for d in crd_dirs]
        self.with_dask_operator = dask_operator
        self.with_kubelet = kubelet
        self.slot = None
        self._slot_lock = None

    # -- paths -------------------------------------------------------------------

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pod_log_dir(self) -> Path:
        return self.state_dir / "pods"

    @property
    def audit_log_path(self) -> Path:
        """The API server's audit log: one ``audit.k8s.io/v1`` Event per line (see emulator/audit.py)."""
        return self.state_dir / "audit.log"

    def audit_events(self) -> list[dict[str, Any]]:
        """The audit log's events so far, oldest first (a line still being written is skipped)."""
        if not self.audit_log_path.exists():
            return []
        events = []
        for line in self.audit_log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # the last line, half written
        return events

    @property
    def webhook_kubeconfig(self) -> Path:
        """The kubeconfig of the API server's client credentials for admission webhooks."""
        return self.state_dir / "admission" / "webhook-kubeconfig"

    def set_webhook_client(self, host_port: str, cert: Path | None, key: Path | None = None) -> None:
        """Present this client certificate to the webhook at ``host_port`` (its URL's host
        and port, or ``<service>.<namespace>.svc:<port>``); None: to none. Written atomically."""
        users = [] if cert is None else [
            {"name": host_port, "user": {"client-certificate": str(cert), "client-key": str(key)}}]
        config = {"apiVersion": "v1", "kind": "Config", "clusters": [], "contexts": [], "users": users}
        tmp = self.webhook_kubeconfig.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config))
        os.replace(tmp, self.webhook_kubeconfig)

    @property
    def hosts_file(self) -> Path:
        """The cluster DNS hosts file, kept by the kubelet."""
        return self.state_dir / "kubelet" / "cluster-hosts"

    # -- life cycle ----------------------------------------------------------------

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _reserve_slot(self) -> int:
        """Reserve an address slot no other live stack on this machine holds.

        Every stack's kube-proxy binds ``<clusterIP>:<port>`` and its pods their pod
        IPs on the one loopback of the machine: two stacks handing out the same
        addresses would let a worker of one join the scheduler of the other. The slot is an flock on a file, held
        while this stack lives and released by the kernel when its process dies.
        """
        SLOT_DIR.mkdir(exist_ok=True)
        for slot in range(1, 256):
            handle = open(SLOT_DIR / f"{slot}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.truncate(0)
            handle.write(f"{os.getpid()} {self.state_dir}\n")
            handle.flush()
            self._slot_lock = handle
            return slot
        raise RuntimeError(f"all 255 stack slots in {SLOT_DIR} are taken")

    @property
    def service_cidr(self) -> str:
        return f"127.1.{self.slot}.0/24"

    @property
    def pod_cidr(self) -> str:
        return f"127.2.{self.slot}.0/24"

    def start(self, timeout: float = 60.0) -> LocalStack:
        """Start the API server, then the kubelet, then the dask-kubernetes operator."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig.unlink(missing_ok=True)
        if self.slot is None:
            self.slot = self._reserve_slot()
        admission = self.webhook_kubeconfig.parent / "admission-configuration.yaml"
        admission.parent.mkdir(parents=True, exist_ok=True)
        admission.write_text(yaml.safe_dump({
            "apiVersion": "apiserver.config.k8s.io/v1", "kind": "AdmissionConfiguration",
            "plugins": [{"name": "MutatingAdmissionWebhook", "configuration": {
                "apiVersion": "apiserver.config.k8s.io/v1", "kind": "WebhookAdmission",
                "kubeConfigFile": str(self.webhook_kubeconfig)}}]}))
        argv = [sys.executable, "-m", "dmo_devstack.apiserver", "--port", "0",
                "--kubeconfig", str(self.kubeconfig), "--service-cidr", self.service_cidr,
                "--audit-log-path", str(self.audit_log_path), "--admission-control-config-file", str(admission)]
        for d in self.crd_dirs:
            argv += ["--crds", str(d)]
        apiserver = self.start_process("apiserver", argv, kubeconfig=False)
        self.wait_for(lambda: self.kubeconfig.exists() or not apiserver.alive, timeout, "the API server's kubeconfig")
        if not apiserver.alive:
            raise RuntimeError(f"the API server exited:\n{self.logs('apiserver')}")
        config = yaml.safe_load(self.kubeconfig.read_text())
        self.api_url = config["clusters"][0]["cluster"]["server"].rstrip("/")

        if self.with_kubelet:
            kubelet_dir = self.state_dir / "kubelet"
            ready = kubelet_dir / "kubelet.ready"
            ready.unlink(missing_ok=True)
            kubelet = self.start_process("kubelet", [
                sys.executable, "-m", "dmo_devstack.kubelet",
                "--kubeconfig", str(self.kubeconfig), "--state-dir", str(kubelet_dir),
                "--log-dir", str(self.pod_log_dir), "--pod-cidr", self.pod_cidr,
            ])
            self.wait_for(lambda: ready.exists() or not kubelet.alive, timeout, "the kubelet")
            if not kubelet.alive:
                raise RuntimeError(f"the kubelet exited:\n{self.logs('kubelet')}")

        if self.with_dask_operator:
            port = _free_port()
            operator = self.start_process("dask-kubernetes", [
                sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces",
                f"--liveness=http://127.0.0.1:{port}/healthz", "-m", "dask_kubernetes.operator.controller",
            ])
            self.wait_for(lambda: self._healthy(port) or not operator.alive, timeout, "the dask-kubernetes operator")
            if not operator.alive:
                raise RuntimeError(f"the dask-kubernetes operator exited:\n{self.logs('dask-kubernetes')}")
        return self

    @staticmethod
    def _healthy(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def process_env(self, env: Mapping[str, str] | None = None, *, kubeconfig: bool = True) -> dict[str, str]:
        """The environment of a stack process: this one's, the stack marker, KUBECONFIG,
        the cluster DNS, then ``env``."""
        base = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        base[STACK_ENV] = str(self.state_dir)
        base["PYTHONUNBUFFERED"] = "1"
        if kubeconfig:
            base["KUBECONFIG"] = str(self.kubeconfig)
        base = dns.process_env(self.hosts_file, base)
        base.update(env or {})
        return base

    def start_process(
        self, name: str, argv: list[str], env: Mapping[str, str] | None = None, *, kubeconfig: bool = True
    ) -> ManagedProcess:
        """Start a named process of the stack (e.g. this project's operator) with
        KUBECONFIG and the cluster DNS; its output goes to ``logs(name)``."""
        if name in self.processes_by_name and self.processes_by_name[name].alive:
            raise RuntimeError(f"process {name!r} is already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        process = ManagedProcess(name, list(argv), self.process_env(env, kubeconfig=kubeconfig),
                                 self.log_dir / f"{name}.log")
        process.start()
        self.processes_by_name[name] = process
        return process

    def stop_process(self, name: str, timeout: float = 15.0) -> int | None:
        """SIGTERM a named process, SIGKILL after ``timeout``; returns its exit code."""
        return self.processes_by_name[name].stop(timeout)

    def restart_process(self, name: str, timeout: float = 15.0) -> ManagedProcess:
        """Stop a named process and start it again with the same command and env."""
        process = self.processes_by_name[name]
        process.stop(timeout)
        process.start()
        return process

    def stop(self) -> list[str]:
        """Stop everything, last started first (the kubelet stops every pod), then kill
        any process of the stack still alive. Returns descriptions of the processes that
        had to be killed that way (an empty list when everything ended as it should)."""
        for process in reversed(list(self.processes_by_name.values())):
            process.stop()
        stragglers = []
        for proc in self.processes():
            try:
                stragglers.append(f"{proc.pid} {' '.join(proc.cmdline())}")
                proc.kill()
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(self.processes(), timeout=5)
        if self._slot_lock is not None:
            self._slot_lock.close()  # releases the flock
            self._slot_lock, self.slot = None, None
        return stragglers

    def processes(self) -> list[psutil.Process]:
        """Live processes of this stack (marked by ``DMO_STACK`` in their environment),
        the pods' dask processes included."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and proc.environ().get(STACK_ENV) == str(self.state_dir):
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def pod_processes(self, namespace: str, pod: str | None = None) -> list[psutil.Process]:
        """Live processes of one pod (its container's process group, the preStop hook),
        or of all pods of ``namespace`` when ``pod`` is None."""
        found = []
        for proc in self.processes():
            try:
                ns, _, name = proc.environ().get("DMO_POD", "").partition("/")
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if ns == namespace and (pod is None or name == pod):
                found.append(proc)
        return found

    # -- logs ----------------------------------------------------------------------

    def logs(self, name: str) -> str:
        """Output of a stack process so far."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pod_logs(self, namespace: str, pod: str) -> str:
        """Output of a pod's container (all its restarts) so far."""
        path = self.pod_log_dir / f"{namespace}_{pod}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def dump_logs(self, namespace: str | None = None, tail: int = 80) -> str:
        """The last lines of every stack process's log and of the pods of ``namespace``
        (all pods when None), to print when a test fails."""
        paths = sorted(self.log_dir.glob("*.log"))
        pattern = f"{namespace}_*.log" if namespace else "*.log"
        paths += sorted(self.pod_log_dir.glob(pattern)) if self.pod_log_dir.exists() else []
        out = []
        for path in paths:
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"----- {path.relative_to(self.state_dir)} (last {len(lines)} lines)")
            out += lines
        return "\n".join(out)

    # -- the API -------------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
        """Run kubectl against the stack; raises KubectlError (with stderr) when ``check``."""
        cmd = [KUBECTL, "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    def apply(self, manifest: Mapping[str, Any] | str, namespace: str | None = None) -> None:
        """``kubectl apply`` a manifest (a dict, or YAML text)."""
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
        self.kubectl(*args, input=text)

    def get_json(self, path: str, **params: str) -> dict[str, Any] | None:
        """GET an API path (``/api/v1/namespaces/x/pods``) as JSON; None when 404."""
        url = self.api_url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def service_account_kubeconfig(self, namespace: str, name: str,
                                   cluster_role: str = "cluster-admin") -> tuple[Path, str]:
        """A ServiceAccount ``name`` bound to ``cluster_role``, and a kubeconfig with a
        token of it (a TokenRequest of a day) in the state directory; returns its path
        and the user it is. A process run with it is that user in the audit log, so
        that its requests can be told from the stack's own (all ``system:admin``)."""
        self.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}, namespace=namespace)
        self.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                    "metadata": {"name": f"{namespace}-{name}"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
                    "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]})
        request = urllib.request.Request(
            f"{self.api_url}/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                             "spec": {"expirationSeconds": 24 * 3600}}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            token = json.load(resp)["status"]["token"]
        path = self.state_dir / f"kubeconfig-{namespace}-{name}"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": name,
            "clusters": [{"name": name, "cluster": {"server": self.api_url}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": namespace}}]}))
        return path, f"system:serviceaccount:{namespace}:{name}"

    def pods(self, namespace: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        """The Pod objects of a namespace, optionally filtered by a label selector."""
        params = {"labelSelector": label_selector} if label_selector else {}
        listing = self.get_json(f"/api/v1/namespaces/{namespace}/pods", **params)
        return [] if listing is None else listing.get("items") or []

    def deployments(self, namespace: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else {}
        listing = self.get_json(f"/apis/apps/v1/namespaces/{namespace}/deployments", **params)
        return [] if listing is None else listing.get("items") or []

    def scheduler_address(self, namespace: str, cluster: str) -> str:
        """``tcp://<clusterIP>:<port>`` of a DaskCluster's scheduler Service (port ``tcp-comm``)."""
        svc = self._scheduler_service(namespace, cluster)
        return f"tcp://{svc['spec']['clusterIP']}:{self._comm_port(svc)['port']}"

    def wait_scheduler_address(self, namespace: str, cluster: str, timeout: float = 120) -> str:
        """:meth:`scheduler_address`, once the Service has a ready endpoint (a scheduler
        that answers its readinessProbe): a client that connects before then may reach
        the proxy while it still routes the address elsewhere."""
        def found() -> str | None:
            try:
                svc = self._scheduler_service(namespace, cluster)
            except LookupError:
                return None
            name = svc["metadata"]["name"]
            slices = self.get_json(f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                                   labelSelector=f"{SERVICE_NAME_LABEL}={name}") or {}
            port = self._comm_port(svc)
            if not slice_endpoints(namespace, name, port.get("name", ""), slices.get("items") or ()):
                return None
            return f"tcp://{svc['spec']['clusterIP']}:{port['port']}"
        return self.wait_for(found, timeout, f"{cluster}'s scheduler Service and a ready endpoint")

    def _scheduler_service(self, namespace: str, cluster: str) -> dict[str, Any]:
        svc = self.get_json(f"/api/v1/namespaces/{namespace}/services/{cluster}-scheduler")
        if svc is None:
            raise LookupError(f"no Service {cluster}-scheduler in {namespace}")
        return svc

    @staticmethod
    def _comm_port(svc: dict[str, Any]) -> dict[str, Any]:
        [port] = [p for p in svc["spec"]["ports"] if p.get("name") in ("tcp-comm", svc["metadata"]["name"])]
        return port

    def dashboard_address(self, namespace: str, cluster: str) -> str:
        """``http://<clusterIP>:<port>`` of a DaskCluster's dashboard (port ``http-dashboard``)."""
        svc = self._scheduler_service(namespace, cluster)
        [port] = [p["port"] for p in svc["spec"]["ports"] if p.get("name") == "http-dashboard"]
        return f"http://{svc['spec']['clusterIP']}:{port}"

    @staticmethod
    def wait_for(predicate: Callable[[], T], timeout: float = 60.0, what: str = "a condition",
                 interval: float = 0.25) -> T:
        """Poll ``predicate`` until it returns something truthy, and return that;
        TimeoutError naming ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(interval)


def daskcluster_manifest(
    name: str,
    *,
    workers: int = 2,
    worker_args: Iterable[str] = ("--nthreads", "1", "--memory-limit", "500MB"),
    worker_env: Mapping[str, str] | None = None,
    scheduler_env: Mapping[str, str] | None = None,
    worker_pod_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A DaskCluster as dask-kubernetes' documentation writes one: workers started as
    ``dask worker --name $(DASK_WORKER_NAME) ...`` (so that a Dask worker's name is its
    Deployment's name), a scheduler with the ``tcp-comm``/``http-dashboard`` Service.
    ``worker_pod_extra`` is merged into the worker pod spec (e.g. a
    ``terminationGracePeriodSeconds``)."""
    image = "ghcr.io/dask/dask:latest"  # not pulled: the process kubelet runs the command

    def env(values: Mapping[str, str] | None) -> list[dict[str, str]]:
        return [{"name": k, "value": v} for k, v in (values or {}).items()]

    worker_container = {
        "name": "worker",
        "image": image,
        "args": ["dask", "worker", "--name", "$(DASK_WORKER_NAME)", *worker_args],
        "env": env(worker_env),
    }
    return {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskCluster",
        "metadata": {"name": name},
        "spec": {
            "worker": {
                "replicas": workers,
                "spec": {"containers": [worker_container], **(worker_pod_extra or {})},
            },
            "scheduler": {
                "spec": {
                    "containers": [
                        {
                            "name": "scheduler",
                            "image": image,
                            "args": ["dask", "scheduler"],
                            "env": env(scheduler_env),
                            "ports": [
                                {"name": "tcp-comm", "containerPort": 8786, "protocol": "TCP"},
                                {"name": "http-dashboard", "containerPort": 8787, "protocol": "TCP"},
                            ],
                            "readinessProbe": {
                                "httpGet": {"port": "http-dashboard", "path": "/health"},
                                "initialDelaySeconds": 0,
                                "periodSeconds": 1,
                            },
                        }
                    ]
                },
                "service": {
                    "type": "ClusterIP",
                    "selector": {"dask.org/cluster-name": name, "dask.org/component": "scheduler"},
                    "ports": [
                        {"name": "tcp-comm", "protocol": "TCP", "port": 8786, "targetPort": "tcp-comm"},
                        {"name": "http-dashboard", "protocol": "TCP", "port": 8787, "targetPort": "http-dashboard"},
                    ],
                },
            },
        },
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m dmo_devstack.stack [STATE_DIR]``: run the stack until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(description="Run the local Kubernetes stack until interrupted.")
    parser.add_argument("state_dir", nargs="?")
    args = parser.parse_args(argv)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    with LocalStack(args.state_dir) as stack:
        print(f"export KUBECONFIG={stack.kubeconfig}", flush=True)
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
