"""The process kubelet as a node runs what a Helm chart installs: bare Pods (a
``helm test`` hook), a Deployment behind two Services (both through their EndpointSlices
and the userspace proxy), service-account credentials from TokenRequest,
Secret and emptyDir volumes, liveness probes, OOM kills past a memory limit. Each test starts a few small Python
processes on the session's LocalStack; they wait on conditions, never on sleeps.
"""

from __future__ import annotations

import base64
import json
import re
import os
import signal
import subprocess
import sys
import urllib.request
from types import SimpleNamespace

import psutil
import pytest

from dmo_devstack.kubelet import Kubelet, PodRunner, ProcessTable, kill_processes
from dmo_devstack.stack import LocalStack
from dmo_devstack.volumes import PodVolumes, write_atomic


@pytest.fixture
def ns(stack, namespace):
    """The test's namespace; bare Pods are deleted at the end, whatever happened (the
    ``namespace`` fixture waits for the processes of its pods to end)."""
    yield namespace
    stack.kubectl("delete", "pods", "--all", "-n", namespace, "--wait=false", check=False)


def _pod(name: str, script: str, *, restart: str = "Never", **spec) -> dict:
    container = {"name": "main", "image": "python:3.11", "command": ["python", "-c", script]}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": 2, "containers": [container], **spec}}


def _get_pod(stack, namespace: str, name: str) -> dict:
    return stack.get_json(f"/api/v1/namespaces/{namespace}/pods/{name}") or {}


def _phase(stack, namespace: str, name: str, phases: tuple[str, ...]) -> dict | None:
    pod = _get_pod(stack, namespace, name)
    return pod if (pod.get("status") or {}).get("phase") in phases else None


def _terminated(pod: dict) -> dict:
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]


def _events(stack, namespace: str, pod: str) -> list[dict]:
    items = stack.get_json(f"/api/v1/namespaces/{namespace}/events")["items"]
    return [e for e in items if e["involvedObject"].get("name") == pod]


# ---------------------------------------------------------------------------------
# Units


def test_mount_paths_are_rewritten_as_whole_path_prefixes(tmp_path):
    volumes = PodVolumes(tmp_path, mounts=[("/etc/app/certs", "/x/certs"), ("/tmp", "/x/tmp")])
    assert volumes.rewrite("--cert-dir=/etc/app/certs") == "--cert-dir=/x/certs"
    assert volumes.rewrite("open('/etc/app/certs/tls.crt')") == "open('/x/certs/tls.crt')"
    assert volumes.rewrite("/etc/app/certsfoo /tmpfile /x/tmp2/tmp") == "/etc/app/certsfoo /tmpfile /x/tmp2/tmp"
    assert volumes.rewrite("/etc/app/certs:/tmp") == "/x/certs:/x/tmp"  # a replacement is not rewritten again
    assert volumes.env() == {"TMPDIR": "/x/tmp"}


def test_volumes_are_switched_atomically_like_the_kubelets_writer(tmp_path):
    target = tmp_path / "vol"
    write_atomic(target, {"a": (b"1", 0o644), "b": (b"2", 0o600)})
    assert (target / "a").read_text() == "1" and (target / "a").is_symlink()
    first = (target / "..data").readlink()
    write_atomic(target, {"a": (b"3", 0o644)})
    assert (target / "a").read_text() == "3" and not (target / "b").exists()
    assert not (target / first).exists()  # the old generation is gone


def _in_new_session(script: str) -> subprocess.Popen:
    """A process started as the kubelet starts a container: in a new session."""
    return subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdout=subprocess.PIPE, text=True)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# A container: a child holding 64 MiB, and an orphan (its parent exited) left in the session.
TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "held = b'x' * (64 << 20); import time; time.sleep(120)"])
sleeper = "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']).pid)"
parent = subprocess.Popen([sys.executable, "-c", sleeper], stdout=subprocess.PIPE, text=True)
orphan = int(parent.stdout.readline())
parent.wait()
print(child.pid, orphan, flush=True)
time.sleep(120)
"""


def test_the_oom_killer_reads_and_kills_a_containers_processes_only():
    """A container's processes are its tree, root first, and the rest of its session
    (an orphan); their RSS is summed; all of them are killed, a process of another
    session is not (even when asked), nor a process whose pid was reused since the reading."""
    bystander = _in_new_session("import time; time.sleep(120)")
    root = _in_new_session(TREE)
    table = ProcessTable()
    try:
        child, orphan = map(int, root.stdout.readline().split())

        def grown():
            table.update()
            return child in table.stats and table.measure([child]) >= 64 << 20
        LocalStack.wait_for(grown, 30, "the child to hold its memory")
        pids = table.container(root.pid)
        assert pids[0] == root.pid and sorted(pids) == sorted([root.pid, child, orphan])
        assert table.stats[orphan].ppid not in pids  # reparented: found by its session
        assert table.measure(pids) > table.measure([child]) >= 64 << 20
        assert table.container(bystander.pid) == [bystander.pid]

        reused = ProcessTable({bystander.pid: table.stats[bystander.pid]._replace(start=0)})
        assert reused.measure([bystander.pid]) == 0
        kill_processes(reused, [bystander.pid])
        kill_processes(table, pids + [bystander.pid])  # not in the session, nor a child
        assert root.wait(10) == -signal.SIGKILL
        LocalStack.wait_for(lambda: _gone(child) and _gone(orphan), 10, "the container's processes to end")
        assert bystander.poll() is None
        assert table.measure(pids) == 0
    finally:
        table.close()
        bystander.kill()
        try:
            os.killpg(root.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_only_running_containers_with_a_memory_limit_are_watched(tmp_path):
    kubelet = Kubelet(None, tmp_path, tmp_path)

    def runner(name: str, resources: dict, returncode: int | None = None) -> PodRunner:
        container = {"name": "main", "command": ["python"], "resources": resources}
        pod = {"metadata": {"name": name, "namespace": "ns", "uid": name}, "spec": {"containers": [container]}}
        kubelet.bare[name] = PodRunner(kubelet, pod, "127.2.0.9")
        kubelet.bare[name].process = SimpleNamespace(pid=os.getpid(), returncode=returncode)
        return kubelet.bare[name]

    limited = runner("limited", {"limits": {"memory": "200Mi", "cpu": "1"}})
    runner("no-limits", {})
    runner("cpu-limit", {"limits": {"cpu": "1"}, "requests": {"memory": "1Gi"}})
    runner("exited", {"limits": {"memory": "200Mi"}}, returncode=0)
    assert kubelet.limited_runners() == [limited]
    assert limited.memory_limit == 200 << 20


# ---------------------------------------------------------------------------------
# On the stack


def test_bare_pods_run_to_completion_as_their_restart_policy_says(stack, ns, tmp_path):
    """Never: Succeeded (exit 0) or Failed (exit 3); OnFailure: restarted after a
    failure, then Succeeded; the operator's console script runs; a deleted running pod
    stops; a failing liveness probe restarts the container."""
    namespace = ns
    flag = tmp_path / "second-try"
    retry = f"import os, sys; p = {str(flag)!r}; os.path.exists(p) or (open(p, 'w').close(), sys.exit(1))"
    stack.apply(_pod("ok", "print('hello from a bare pod')"), namespace)
    stack.apply(_pod("bad", "import sys; sys.exit(3)"), namespace)
    stack.apply(_pod("retry", retry, restart="OnFailure"), namespace)
    help_pod = _pod("help", "")
    help_pod["spec"]["containers"][0].update(command=["dask-memory-operator"], args=["--help"])
    stack.apply(help_pod, namespace)
    stack.apply(_pod("sleeper", "import time; print('UP', flush=True); time.sleep(600)"), namespace)
    stack.apply(_pod("unwell", "import time; time.sleep(600)", restart="Always", container={
        "livenessProbe": {"tcpSocket": {"port": 1}, "periodSeconds": 1, "failureThreshold": 2}}), namespace)

    ok = stack.wait_for(lambda: _phase(stack, namespace, "ok", ("Succeeded", "Failed")), 30, "ok to end")
    assert ok["status"]["phase"] == "Succeeded" and ok["status"]["startTime"]
    assert _terminated(ok)["exitCode"] == 0 and _terminated(ok)["reason"] == "Completed"
    assert "hello from a bare pod" in stack.pod_logs(namespace, "ok")
    assert "ownerReferences" not in ok["metadata"]

    bad = stack.wait_for(lambda: _phase(stack, namespace, "bad", ("Succeeded", "Failed")), 30, "bad to end")
    assert bad["status"]["phase"] == "Failed"
    assert _terminated(bad)["exitCode"] == 3 and _terminated(bad)["reason"] == "Error"
    assert bad["status"]["containerStatuses"][0]["restartCount"] == 0

    retried = stack.wait_for(lambda: _phase(stack, namespace, "retry", ("Succeeded", "Failed")), 30, "retry")
    assert retried["status"]["phase"] == "Succeeded"
    status = retried["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1 and status["lastState"]["terminated"]["exitCode"] == 1

    helped = stack.wait_for(lambda: _phase(stack, namespace, "help", ("Succeeded", "Failed")), 30, "help")
    assert helped["status"]["phase"] == "Succeeded", stack.pod_logs(namespace, "help")
    assert "usage: dask-memory-operator" in stack.pod_logs(namespace, "help")

    stack.wait_for(lambda: "UP" in stack.pod_logs(namespace, "sleeper"), 30, "the sleeper to start")
    assert _get_pod(stack, namespace, "sleeper")["status"]["phase"] == "Running"
    [process] = stack.pod_processes(namespace, "sleeper")
    stack.kubectl("delete", "pod", "sleeper", "-n", namespace, "--wait=false")
    stack.wait_for(lambda: not stack.pod_processes(namespace, "sleeper"), 30, "the deleted pod's process to end")

    def restarted():
        statuses = _get_pod(stack, namespace, "unwell")["status"].get("containerStatuses") or [{}]
        return statuses[0].get("restartCount", 0) >= 1 and statuses[0]
    unwell = stack.wait_for(restarted, 30, "the liveness probe to restart the container")
    assert unwell["lastState"]["terminated"]["exitCode"] == 143  # SIGTERM
    assert any(e["reason"] == "Killing" for e in _events(stack, namespace, "unwell"))


SERVER = """
import http.server, os, sys, threading
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{os.environ['HOSTNAME']} {self.server.server_address[1]}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
ip = os.environ["POD_IP"]
servers = [http.server.ThreadingHTTPServer((ip, port), Handler) for port in (8443, 8080)]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
servers[0].serve_forever()
"""


def _http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.read().decode()
    except OSError:
        return None


def test_a_deployment_behind_two_services_through_the_proxy(stack, ns):
    """A Service 443 -> 8443, a second Service 8080 -> named port "metrics", both
    proxied from their clusterIP to the pod IP; two replicas share the second Service's
    connections, a deleted pod leaves the endpoints."""
    namespace = ns
    for name, port, target in (("web", 443, 8443), ("metrics", 8080, "metrics")):
        stack.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                     "spec": {"selector": {"app": "two"}, "ports": [{"port": port, "targetPort": target}]}},
                    namespace)
    container = {"name": "main", "image": "python:3.11", "command": ["python", "-c", SERVER],
                 "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                 "ports": [{"name": "https", "containerPort": 8443}, {"name": "metrics", "containerPort": 8080}],
                 "readinessProbe": {"httpGet": {"path": "/", "port": "metrics"}}}
    stack.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "two"},
                 "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "two"}},
                          "template": {"metadata": {"labels": {"app": "two"}},
                                       "spec": {"terminationGracePeriodSeconds": 2, "containers": [container]}}}},
                namespace)
    ips = {n: stack.get_json(f"/api/v1/namespaces/{namespace}/services/{n}")["spec"]["clusterIP"]
           for n in ("web", "metrics")}
    first = stack.wait_for(lambda: _http(f"http://{ips['web']}:443/"), 30, "web through the proxy")
    pod, port = first.split()
    assert port == "8443"
    assert _get_pod(stack, namespace, pod)["status"]["podIP"] not in ips.values()  # pods never hold a clusterIP
    assert stack.wait_for(lambda: _http(f"http://{ips['metrics']}:8080/"), 30, "metrics") == f"{pod} 8080"

    stack.kubectl("scale", "deployment", "two", "--replicas", "2", "-n", namespace)
    seen: set[str] = set()

    def both_served():
        answer = _http(f"http://{ips['metrics']}:8080/")
        seen.add(answer.split()[0] if answer else "")
        return len(seen - {""}) == 2
    stack.wait_for(both_served, 30, "both replicas behind the metrics Service")

    stack.kubectl("delete", "pod", pod, "-n", namespace, "--wait=false")
    stack.wait_for(lambda: not stack.pod_processes(namespace, pod), 30, "the deleted pod's process to end")
    others = [p["metadata"]["name"] for p in stack.pods(namespace, "app=two") if p["metadata"]["name"] != pod]
    answers = {(_http(f"http://{ips['metrics']}:8080/") or " ").split()[0] for _ in range(6)}
    assert pod not in answers and answers & set(others)


def test_a_pod_gets_its_service_accounts_credentials(stack, ns):
    """A token from TokenRequest, bound to the pod, in a kubeconfig kr8s finds, with
    which the API authorizes the pod as its ServiceAccount (a RoleBinding grants get and list of ServiceAccounts, as kr8s gets by a list,
    a list of Secrets is denied); the token and namespace files at the standard path
    (rewritten); KUBERNETES_SERVICE_HOST.
    A pod of a ServiceAccount that does not exist stays ContainerCreating with a
    FailedMount Event until the account is created."""
    namespace = ns
    stack.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}}, namespace)
    stack.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "sa-reader"},
                 "rules": [{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get", "list"]}]}, namespace)
    stack.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "reader"},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sa-reader"},
                 "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]}, namespace)
    script = (
        "import json, os, kr8s\n"
        "from kr8s.objects import ServiceAccount\n"
        "d = '/var/run/secrets/kubernetes.io/serviceaccount'\n"
        "ns = open(d + '/namespace').read()\n"
        "sa = ServiceAccount.get('reader', namespace=ns)\n"
        "try:\n"
        "    list(kr8s.get('secrets', namespace=ns)); denied = None\n"
        "except kr8s.ServerError as e:\n"
        "    denied = e.response.json()['message']\n"
        "print('RESULT', json.dumps({'sa': sa.name, 'token': open(d + '/token').read(), 'denied': denied,\n"
        "      'host': os.environ['KUBERNETES_SERVICE_HOST'], 'port': os.environ['KUBERNETES_SERVICE_PORT'],\n"
        "      'ca': os.path.exists(d + '/ca.crt')}), flush=True)\n"
    )
    stack.apply(_pod("reader", script, serviceAccountName="reader"), namespace)
    stack.apply(_pod("nobody", "print('started')", serviceAccountName="nobody"), namespace)
    stack.apply(_pod("opted-out", "import os; print('KUBECONFIG' in os.environ)",
                     serviceAccountName="nobody", automountServiceAccountToken=False), namespace)

    pod = stack.wait_for(lambda: _phase(stack, namespace, "reader", ("Succeeded", "Failed")), 60, "reader")
    logs = stack.pod_logs(namespace, "reader")
    assert pod["status"]["phase"] == "Succeeded", logs
    result = json.loads(logs.split("RESULT ", 1)[1].splitlines()[0])
    assert result["sa"] == "reader" and not result["ca"]
    # The API sees the pod as its ServiceAccount: RBAC lets it get the account, not list secrets.
    assert result["denied"] == (f'secrets is forbidden: User "system:serviceaccount:{namespace}:reader" cannot '
                                f'list resource "secrets" in API group "" in the namespace "{namespace}"')
    assert f"{result['host']}:{result['port']}" == stack.api_url.removeprefix("http://")
    claims = json.loads(base64.urlsafe_b64decode(result["token"].split(".")[1] + "=="))
    assert claims["sub"] == f"system:serviceaccount:{namespace}:reader"
    assert claims["kubernetes.io"]["pod"] == {"name": "reader", "uid": pod["metadata"]["uid"]}
    assert claims["exp"] - claims["iat"] == 3607

    opted = stack.wait_for(lambda: _phase(stack, namespace, "opted-out", ("Succeeded", "Failed")), 30, "opted-out")
    assert opted["status"]["phase"] == "Succeeded" and "False" in stack.pod_logs(namespace, "opted-out")

    def failed_mount():
        return [e for e in _events(stack, namespace, "nobody") if e["reason"] == "FailedMount"]
    [event] = stack.wait_for(failed_mount, 30, "a FailedMount event")
    assert event["type"] == "Warning" and event["source"]["component"] == "kubelet"
    stack.wait_for(lambda: failed_mount()[0]["count"] >= 2, 30, "the kubelet to retry (one Event, counted)")
    assert 'MountVolume.SetUp failed for volume "kube-api-access" : failed to fetch token: ' \
           'serviceaccounts "nobody" not found' == event["message"]
    waiting = _get_pod(stack, namespace, "nobody")
    assert waiting["status"]["phase"] == "Pending"
    assert waiting["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ContainerCreating"
    stack.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody"}}, namespace)
    stack.wait_for(lambda: _phase(stack, namespace, "nobody", ("Succeeded",)), 30, "nobody to run once its SA exists")


def test_secret_and_emptydir_volumes_are_seen_at_their_mount_paths(stack, ns):
    """The process reads the Secret's keys at the mountPath (rewritten in its args),
    sees an update of the Secret, and writes to its emptyDir through TMPDIR."""
    namespace = ns
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
              "data": {"password": base64.b64encode(b"s3cret").decode(), "user": base64.b64encode(b"ann").decode()}}
    stack.apply(secret, namespace)
    script = (
        "import os, tempfile, time\n"
        "print('TMP', tempfile.gettempdir(), flush=True)\n"
        "seen = None\n"
        "while True:\n"
        "    now = open('/etc/demo/creds/password').read() + ' ' + open('/etc/demo/creds/user').read()\n"
        "    if now != seen:\n"
        "        print('SECRET', now, flush=True); seen = now\n"
        "    time.sleep(0.2)\n"
    )
    pod = _pod("mounted", script, restart="Always",
               volumes=[{"name": "creds", "secret": {"secretName": "creds"}}, {"name": "tmp", "emptyDir": {}}],
               container={"volumeMounts": [{"name": "creds", "mountPath": "/etc/demo/creds", "readOnly": True},
                                           {"name": "tmp", "mountPath": "/tmp"}]})
    stack.apply(pod, namespace)
    stack.wait_for(lambda: "SECRET s3cret ann" in stack.pod_logs(namespace, "mounted"), 30, "the secret's files")
    logs = stack.pod_logs(namespace, "mounted")
    tmp = logs.split("TMP ", 1)[1].split()[0]
    uid = _get_pod(stack, namespace, "mounted")["metadata"]["uid"]
    assert tmp.endswith(f"/pods/{uid}/volumes/kubernetes.io~empty-dir/tmp")

    secret["data"]["password"] = base64.b64encode(b"rotated").decode()
    stack.apply(secret, namespace)
    stack.wait_for(lambda: "SECRET rotated ann" in stack.pod_logs(namespace, "mounted"), 30, "the updated secret")

    # A pod whose Secret is missing waits (ContainerCreating, FailedMount) until it exists.
    stack.apply(_pod("early", "print(open('/etc/late/k').read())",
                     volumes=[{"name": "late", "secret": {"secretName": "late"}}],
                     container={"volumeMounts": [{"name": "late", "mountPath": "/etc/late"}]}), namespace)
    stack.wait_for(lambda: any(e["reason"] == "FailedMount" and 'secret "late" not found' in e["message"]
                               for e in _events(stack, namespace, "early")), 30, "a FailedMount event")
    assert _get_pod(stack, namespace, "early")["status"]["phase"] == "Pending"
    stack.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late"},
                 "stringData": {"k": "finally"}}, namespace)
    stack.wait_for(lambda: _phase(stack, namespace, "early", ("Succeeded",)), 30, "early to run")
    assert "finally" in stack.pod_logs(namespace, "early")


# Holds 20 MiB more every 50 ms, up to ``steps`` (then holds it for ``hold`` seconds).
GROW = """
import time
held = []
while len(held) < {steps}:
    held.append(b'x' * (20 << 20))
    print('HELD', 20 * len(held), 'MiB', flush=True)
    time.sleep(0.05)
print('DONE', flush=True)
time.sleep({hold})
"""


def _oom_killed(state: dict) -> bool:
    terminated = state.get("terminated") or {}
    return terminated.get("reason") == "OOMKilled"


def test_a_container_past_its_memory_limit_is_oom_killed(stack, ns):
    """As the kernel's OOM killer on a container's cgroup: past 200Mi the container is
    killed, ``OOMKilled`` and 137 as Kubernetes reports it; Always restarts it, Never
    leaves the pod Failed. A container under its limit, and one without a limit that
    holds more, run to their end."""
    namespace = ns
    limited = {"resources": {"limits": {"memory": "200Mi"}}}
    stack.apply(_pod("oom-always", GROW.format(steps=20, hold=600), restart="Always", container=limited), namespace)
    stack.apply(_pod("oom-never", GROW.format(steps=20, hold=600), container=limited), namespace)
    stack.apply(_pod("under", GROW.format(steps=3, hold=1.5), container=limited), namespace)
    stack.apply(_pod("unlimited", GROW.format(steps=15, hold=0.5)), namespace)

    def restarted():
        statuses = (_get_pod(stack, namespace, "oom-always").get("status") or {}).get("containerStatuses") or [{}]
        return statuses[0].get("restartCount", 0) >= 1 and statuses[0]
    status = stack.wait_for(restarted, 60, "the OOM-killed container to restart")
    last = status["lastState"]["terminated"]
    assert last["reason"] == "OOMKilled" and last["exitCode"] == 137, status
    assert sorted(last) == ["containerID", "exitCode", "finishedAt", "reason", "startedAt"]
    assert last["startedAt"] <= last["finishedAt"]
    stack.wait_for(lambda: "start #1" in stack.pod_logs(namespace, "oom-always"), 30, "the second start")

    never = stack.wait_for(lambda: _phase(stack, namespace, "oom-never", ("Succeeded", "Failed")), 60, "oom-never")
    assert never["status"]["phase"] == "Failed"
    assert _oom_killed(never["status"]["containerStatuses"][0]["state"])
    assert _terminated(never)["exitCode"] == 137
    assert never["status"]["containerStatuses"][0]["restartCount"] == 0
    assert "\nDONE" not in stack.pod_logs(namespace, "oom-never")  # killed on its way up
    assert not stack.pod_processes(namespace, "oom-never")

    for name in ("under", "unlimited"):
        pod = stack.wait_for(lambda: _phase(stack, namespace, name, ("Succeeded", "Failed")), 60, name)
        assert pod["status"]["phase"] == "Succeeded", stack.pod_logs(namespace, name)
        assert _terminated(pod)["reason"] == "Completed"
    assert "HELD 300 MiB" in stack.pod_logs(namespace, "unlimited")


# Preloaded in the worker process (not the nanny): a thread holding 10 MiB more every 0.1 s.
PRELOAD = """
import os, threading, time
def grow():
    os.write(1, b'GROWING %d\\n' % os.getpid())  # one write: other output may interleave
    held = []
    while len(held) < 100:
        held.append(b'x' * (10 << 20))
        time.sleep(0.1)
    time.sleep(600)
threading.Thread(target=grow, daemon=True).start()
"""


def test_a_dask_worker_past_its_memory_limit_is_oom_killed_with_its_nanny(stack, ns):
    """A nanny's worker grows past the pod's limit (the nanny's own terminate threshold
    off): the OOM killer kills nanny and worker together, OOMKilled, nothing left."""
    namespace = ns
    stack.apply(_pod("sched", "", container={"command": ["dask", "scheduler"], "args": ["--no-dashboard"]}), namespace)
    stack.wait_for(lambda: "Scheduler at:" in stack.pod_logs(namespace, "sched"), 60, "the scheduler")
    ip = _get_pod(stack, namespace, "sched")["status"]["podIP"]
    worker = {"command": ["dask", "worker"],
              "args": [f"tcp://{ip}:8786", "--nthreads", "1", "--no-dashboard", "--preload", PRELOAD],
              "env": [{"name": "DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE", "value": "False"}],
              "resources": {"limits": {"memory": "400Mi"}}}
    stack.apply(_pod("worker", "", container=worker), namespace)

    pod = stack.wait_for(lambda: _phase(stack, namespace, "worker", ("Succeeded", "Failed")), 120, "the worker to end")
    logs = stack.pod_logs(namespace, "worker")
    terminated = _terminated(pod)
    assert pod["status"]["phase"] == "Failed" and terminated["reason"] == "OOMKilled", logs
    assert terminated["exitCode"] == 137
    assert "'--memory-limit', '419430400'" in logs  # the limit is the worker's too
    nanny = int(terminated["containerID"].removeprefix("process://"))
    worker_pid = int(re.search(r"GROWING (\d+)\n", logs)[1])
    killed = json.loads(logs.split("OOM kill at ", 1)[1].split(" in pids ", 1)[1].split(" > ", 1)[0])
    assert killed[0] == nanny and worker_pid in killed
    assert not stack.pod_processes(namespace, "worker")


def test_pod_ips_go_round_robin_not_lowest_free(tmp_path):
    """As CNI's host-local IPAM: a released pod IP is not the next one handed out (a
    worker of a deleted cluster, still reconnecting to its scheduler's IP, would reach
    the next scheduler there); the range wraps around to what is free."""
    kubelet = Kubelet(None, tmp_path, tmp_path, pod_cidr="127.2.250.0/29")  # 6 hosts
    first = kubelet._allocate_ip()
    kubelet.ips_in_use[first] = None
    second = kubelet._allocate_ip()
    kubelet.ips_in_use[second] = None
    del kubelet.ips_in_use[first]
    third = kubelet._allocate_ip()
    kubelet.ips_in_use[third] = None
    assert (first, second, third) == ("127.2.250.1", "127.2.250.2", "127.2.250.3")
    for _ in range(3):
        kubelet.ips_in_use[kubelet._allocate_ip()] = None
    assert kubelet._allocate_ip() == first  # wrapped around: the only one free
    kubelet.ips_in_use[first] = None
    with pytest.raises(RuntimeError, match="no pod IP left"):
        kubelet._allocate_ip()
