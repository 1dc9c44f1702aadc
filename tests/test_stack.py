"""The local Kubernetes stack, end to end on real processes.

A DaskCluster applied with kubectl to the emulated API is turned by the real
dask-kubernetes operator into Deployments and a Service, and by the process kubelet
into `dask scheduler`/`dask worker` processes on this machine. These tests check
what the project's own end-to-end tests rely on: the scheduler is reachable at the
Service's clusterIP (through its EndpointSlice, which the kubelet's endpoint controller
writes, and the kubelet's userspace kube-proxy) and at its own pod IP, workers are named after their Deployments, scaling through the
DaskWorkerGroup works both ways (down by dask-kubernetes retiring workers through
the scheduler), a crashed scheduler is restarted, deletion ends the processes, and
stopping the stack leaves nothing running.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from distributed import Client

from dmo_devstack import dns
from dmo_devstack.kubelet import UnsupportedContainer, container_argv, container_env, expand
from dmo_devstack.stack import LocalStack, daskcluster_manifest

# ---------------------------------------------------------------------------------
# Units: no stack needed


def test_expand_follows_kubernetes_rules():
    env = {"A": "x", "B": "$(A)"}
    assert expand("$(A)-$(B)-$(C)-$$(A)", env) == "x-$(A)-$(C)-$(A)"


def test_container_command_runs_here_on_the_pod_ip():
    pod = {"metadata": {"name": "w-pod", "namespace": "ns"}, "spec": {}}
    container = {
        "args": ["dask-worker", "--name", "$(DASK_WORKER_NAME)", "--dashboard-address", "8788"],
        "env": [
            {"name": "DASK_WORKER_NAME", "value": "w"},
            {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "MY_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "resources": {"limits": {"memory": "1Gi"}},
    }
    env = container_env(container, pod, "127.2.0.7")
    assert env == {"DASK_WORKER_NAME": "w", "MY_IP": "127.2.0.7", "MY_POD": "w-pod"}
    argv = container_argv(container, env, "127.2.0.7")
    assert argv[:2] == [os.path.join(os.path.dirname(sys.executable), "dask"), "worker"]
    assert argv[argv.index("--name") + 1] == "w"
    assert argv[argv.index("--host") + 1] == "127.2.0.7"
    assert argv[argv.index("--dashboard-address") + 1] == "127.2.0.7:8788"
    assert argv[argv.index("--memory-limit") + 1] == str(2**30)

    scheduler = container_argv({"command": ["dask", "scheduler", "--host", "0.0.0.0"]}, {}, "127.1.0.3")
    assert scheduler[2:] == ["--host", "127.1.0.3", "--dashboard-address", "127.1.0.3:8787"]
    given_limit = container_argv(
        {"args": ["dask", "worker", "--memory-limit", "500MB"], "resources": {"limits": {"memory": "1Gi"}}},
        {}, "127.2.0.8",
    )
    assert given_limit.count("--memory-limit") == 1 and "500MB" in given_limit
    with pytest.raises(UnsupportedContainer, match="neither a dask nor a python"):
        container_argv({"command": ["nginx"]}, {}, "127.2.0.9")


def test_cluster_dns_in_a_new_process(tmp_path):
    hosts = tmp_path / "hosts"
    dns.write_hosts(hosts, [("c-scheduler", "ns1", "127.1.0.42")])
    code = textwrap.dedent(
        """
        import asyncio, socket
        async def main():
            loop = asyncio.get_running_loop()
            for name in ["c-scheduler.ns1", "c-scheduler.ns1.svc", "c-scheduler.ns1.svc.cluster.local"]:
                [(*_, (ip, port))] = await loop.getaddrinfo(name, 8786, type=socket.SOCK_STREAM)
                print(name, ip, port)
            try:
                socket.getaddrinfo("other.ns1.svc.cluster.local", 1)
            except socket.gaierror:
                print("unknown service: gaierror")
            print("localhost", socket.getaddrinfo("localhost", 1, type=socket.SOCK_STREAM)[0][4][0])
        asyncio.run(main())
        """
    )
    env = dns.process_env(hosts, {k: v for k, v in os.environ.items() if k != dns.ENV_VAR})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [
        "c-scheduler.ns1 127.1.0.42 8786",
        "c-scheduler.ns1.svc 127.1.0.42 8786",
        "c-scheduler.ns1.svc.cluster.local 127.1.0.42 8786",
        "unknown service: gaierror",
        "localhost 127.0.0.1",
    ]


# ---------------------------------------------------------------------------------
# End to end


def _worker_deployments(stack, namespace, group):
    return sorted(d["metadata"]["name"] for d in stack.deployments(namespace, f"dask.org/workergroup-name={group}"))


def _worker_pods(stack, namespace, cluster):
    return stack.pods(namespace, f"dask.org/cluster-name={cluster},dask.org/component=worker")


def _scheduler_pod(stack, namespace, cluster):
    pods = stack.pods(namespace, f"dask.org/cluster-name={cluster},dask.org/component=scheduler")
    return pods[0] if len(pods) == 1 else None


def _connect(stack, namespace, cluster, n_workers):
    address = stack.wait_for(
        lambda: stack.get_json(f"/api/v1/namespaces/{namespace}/services/{cluster}-scheduler")
        and stack.scheduler_address(namespace, cluster),
        60, "the scheduler Service",
    )
    client = Client(address, timeout="60s")
    client.wait_for_workers(n_workers, timeout=90)
    return client


def _worker_names(client):
    return sorted(w["name"] for w in client.scheduler_info(n_workers=-1)["workers"].values())


def test_daskcluster_lifecycle(stack, namespace):
    """Create, compute, scale up, scale down (retirement through the scheduler), delete."""
    stack.apply(daskcluster_manifest("demo", workers=2), namespace)
    client = _connect(stack, namespace, "demo", 2)
    try:
        address = stack.scheduler_address(namespace, "demo")
        cluster_ip = address.removeprefix("tcp://").rsplit(":", 1)[0]
        assert ipaddress.ip_address(cluster_ip) in ipaddress.ip_network(stack.service_cidr)
        scheduler = stack.wait_for(lambda: _scheduler_pod(stack, namespace, "demo"), 30, "the scheduler pod")
        pod_ip = scheduler["status"]["podIP"]
        assert ipaddress.ip_address(pod_ip) in ipaddress.ip_network(stack.pod_cidr)
        assert scheduler["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
        # the Service's slice, as the EndpointSlice controller writes it
        [eps] = json.loads(stack.kubectl("get", "endpointslices", "-n", namespace, "-l",
                                         "kubernetes.io/service-name=demo-scheduler", "-o", "json").stdout)["items"]
        assert eps["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
        assert eps["metadata"]["ownerReferences"][0]["name"] == "demo-scheduler"
        assert [e["addresses"] for e in eps["endpoints"]] == [[pod_ip]]
        assert {p["name"]: p["port"] for p in eps["ports"]} == {"tcp-comm": 8786, "http-dashboard": 8787}
        with Client(f"tcp://{pod_ip}:8786", timeout="30s") as direct:
            assert direct.scheduler_info()["address"] == client.scheduler_info()["address"]

        # Dask worker names are the worker Deployments' names (--name $(DASK_WORKER_NAME)).
        stack.wait_for(lambda: len(_worker_names(client)) == 2, 30, "2 workers")
        assert _worker_names(client) == _worker_deployments(stack, namespace, "demo-default")
        assert client.submit(sum, range(10)).result() == 45
        for w in client.scheduler_info(n_workers=-1)["workers"].values():
            assert ipaddress.ip_address(w["host"]) in ipaddress.ip_network(stack.pod_cidr)
            assert w["nthreads"] == 1
            assert w["memory_limit"] == 500_000_000

        # Every worker pod is Running and Ready, its Deployment's status says so.
        stack.wait_for(
            lambda: all(
                d.get("status", {}).get("readyReplicas") == 1
                for d in stack.deployments(namespace, "dask.org/cluster-name=demo")
            ),
            30, "the Deployments' status",
        )

        stack.kubectl("scale", "daskworkergroup", "demo-default", "--replicas", "3", "-n", namespace)
        client.wait_for_workers(3, timeout=90)
        assert _worker_names(client) == _worker_deployments(stack, namespace, "demo-default")

        # Data scattered to every worker survives scaling down to 1, which it only
        # does when dask-kubernetes retires the workers through the scheduler.
        workers = list(client.scheduler_info(n_workers=-1)["workers"])
        futures = [client.scatter(i, workers=[w]) for i, w in enumerate(workers)]
        before = {p["metadata"]["name"]: p["metadata"]["ownerReferences"][0]["name"]
                  for p in _worker_pods(stack, namespace, "demo")}
        stack.kubectl("scale", "daskworkergroup", "demo-default", "--replicas", "1", "-n", namespace)
        stack.wait_for(lambda: len(_worker_names(client)) == 1, 90, "1 worker left")
        stack.wait_for(lambda: len(_worker_pods(stack, namespace, "demo")) == 1, 60, "1 worker pod left")
        assert _worker_names(client) == _worker_deployments(stack, namespace, "demo-default")
        assert client.gather(futures) == list(range(3))
        gone = set(before) - {p["metadata"]["name"] for p in _worker_pods(stack, namespace, "demo")}
        assert len(gone) == 2
        stack.wait_for(
            lambda: not any(stack.pod_processes(namespace, pod) for pod in gone), 30, "retired workers' processes to end"
        )
        # dask-kubernetes chose them through the scheduler (RPC), not LIFO.
        [chosen] = [line for line in stack.logs("dask-kubernetes").splitlines()
                    if "Workers to close" in line and namespace in line]
        assert all(before[pod] in chosen for pod in gone)
        assert "falling back to LIFO" not in stack.logs("dask-kubernetes")
    finally:
        client.close()

    stack.kubectl("delete", "daskcluster", "demo", "-n", namespace, "--wait=false")
    stack.wait_for(lambda: not stack.pods(namespace), 60, "all pods to go")
    stack.wait_for(
        lambda: not stack.pod_processes(namespace),
        60, "all processes of the cluster to end",
    )
    assert not stack.deployments(namespace)


def test_killed_scheduler_is_restarted(stack, namespace):
    stack.apply(daskcluster_manifest("crash", workers=1), namespace)
    client = _connect(stack, namespace, "crash", 1)
    try:
        [name] = _worker_names(client)
        # closed before the kill: a client still reconnecting when closed raises
        # "ConnectionPool is closed" (distributed's, seen under load)
        client.close()
        pod = stack.wait_for(lambda: _scheduler_pod(stack, namespace, "crash"), 30, "the scheduler pod")
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
        [process] = [p for p in stack.pod_processes(namespace, pod["metadata"]["name"]) if "scheduler" in p.cmdline()]
        process.send_signal(signal.SIGKILL)

        def restarted():
            p = _scheduler_pod(stack, namespace, "crash")
            statuses = (p or {}).get("status", {}).get("containerStatuses") or [{}]
            return statuses[0].get("restartCount") == 1 and _ready(p) and p

        pod = stack.wait_for(restarted, 60, "the scheduler to restart")
        # The same pod, on the same address; the worker comes back under its name.
        assert pod["metadata"]["name"] == _scheduler_pod(stack, namespace, "crash")["metadata"]["name"]
        client = _connect(stack, namespace, "crash", 1)
        assert _worker_names(client) == [name]
        assert client.submit(lambda x: x + 1, 1).result() == 2
        client.close()

        # A deleted scheduler pod is replaced; the Service leads to the new one.
        old = pod["metadata"]["name"]
        stack.kubectl("delete", "pod", old, "-n", namespace, "--wait=false")
        pod = stack.wait_for(
            lambda: (p := _scheduler_pod(stack, namespace, "crash")) and p["metadata"]["name"] != old
            and _ready(p) and p,
            60, "a new scheduler pod",
        )
        client = _connect(stack, namespace, "crash", 1)
        assert client.scheduler_info()["address"] == f"tcp://{pod['status']['podIP']}:8786"
        assert _worker_names(client) == [name]
    finally:
        client.close()


def _ready(pod: dict | None) -> bool:
    """The pod's container is ready (a pod that just started has no statuses yet)."""
    statuses = (pod or {}).get("status", {}).get("containerStatuses") or [{}]
    return bool(statuses[0].get("ready"))


def test_kubelet_runs_containers_like_a_kubelet(stack, namespace, tmp_path):
    """fieldRef env, $(VAR) args, preStop before SIGTERM on scale to 0, unsupported images."""
    marker = tmp_path / "prestop"
    script = "import os, sys, time; print('ARGS', sys.argv[1:], os.environ['POD_IP'], flush=True); time.sleep(600)"
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "sleeper"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "sleeper"}},
            "template": {
                "metadata": {"labels": {"app": "sleeper"}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "main",
                        "image": "python:3.11",
                        "command": ["python3", "-c", script],
                        "args": ["$(MY_POD)", "$(MY_NS)"],
                        "env": [
                            {"name": "MY_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "MY_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        ],
                        "lifecycle": {"preStop": {"exec": {"command": [
                            "python", "-c", f"open({str(marker)!r}, 'w').write('$(MY_POD)')",
                        ]}}},
                    }],
                },
            },
        },
    }
    unsupported = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "nginx", "image": "nginx", "command": ["nginx", "-g", "daemon off;"]}]},
            },
        },
    }
    stack.apply(deployment, namespace)
    stack.apply(unsupported, namespace)
    sleeper_path = f"/apis/apps/v1/namespaces/{namespace}/deployments/sleeper"

    def running():
        pods = stack.pods(namespace, "app=sleeper")
        return len(pods) == 1 and pods[0]["status"].get("phase") == "Running" and pods[0]

    pod = stack.wait_for(running, 30, "the sleeper pod")
    name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(stack.pod_cidr)
    assert pod["metadata"]["labels"]["app"] == "sleeper"
    assert pod["metadata"]["ownerReferences"][0]["name"] == "sleeper"
    stack.wait_for(lambda: "\nARGS [" in stack.pod_logs(namespace, name), 30, "the sleeper's output")
    assert f"ARGS ['{name}', '{namespace}'] {ip}" in stack.pod_logs(namespace, name)
    stack.wait_for(
        lambda: (stack.get_json(sleeper_path).get("status") or {}).get("readyReplicas") == 1,
        30, "the sleeper Deployment's status",
    )

    web = stack.wait_for(lambda: stack.pods(namespace, "app=web"), 30, "the web pod")[0]
    stack.wait_for(lambda: stack.pods(namespace, "app=web")[0]["status"].get("phase") == "Failed", 30, "web Failed")
    web = stack.pods(namespace, "app=web")[0]
    assert web["status"]["reason"] == "UnsupportedContainer"
    assert "neither a dask nor a python command" in web["status"]["message"]

    def replaced(old):
        pods = [p for p in stack.pods(namespace, "app=sleeper") if p["metadata"]["name"] != old]
        return len(pods) == 1 and pods[0]["status"].get("phase") == "Running" and pods[0]["metadata"]["name"]

    def gone(process):
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE

    # A deleted pod is stopped (its preStop hook runs first) and replaced.
    [process] = stack.pod_processes(namespace, name)
    stack.kubectl("delete", "pod", name, "-n", namespace, "--wait=false")
    name = stack.wait_for(lambda: replaced(name), 30, "a new sleeper pod")
    stack.wait_for(lambda: gone(process), 30, "the deleted pod's process to end")
    stack.wait_for(lambda: marker.exists(), 30, "the preStop hook's marker")
    assert marker.read_text() != name
    marker.unlink()

    # A new pod template replaces the pod.
    [process] = stack.pod_processes(namespace, name)
    stack.kubectl("patch", "deployment", "sleeper", "-n", namespace, "--type", "merge",
                  "-p", '{"spec": {"template": {"metadata": {"annotations": {"revision": "2"}}}}}')
    name = stack.wait_for(lambda: replaced(name), 30, "the sleeper pod of the new template")
    assert stack.pods(namespace, "app=sleeper")[0]["metadata"]["annotations"]["revision"] == "2"
    assert gone(process)
    stack.wait_for(lambda: marker.exists(), 30, "the preStop hook's marker")
    marker.unlink()

    # Scaled to 0: preStop, then SIGTERM, then the Pod object goes.
    [process] = stack.pod_processes(namespace, name)
    stack.kubectl("scale", "deployment", "sleeper", "--replicas", "0", "-n", namespace)
    stack.wait_for(lambda: not stack.pods(namespace, "app=sleeper"), 30, "the sleeper pod to go")
    assert gone(process)
    assert marker.read_text() == name
    status = stack.get_json(sleeper_path)["status"]
    assert status.get("replicas", 0) == 0


def test_stop_leaves_no_process(tmp_path):
    """A stack of its own: stop() ends the pods' processes through the kubelet."""
    local = LocalStack(tmp_path / "stack", dask_operator=False).start()
    try:
        local.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "busy"}})
        local.apply({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "sleepers"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "sleepers"}},
                "template": {
                    "metadata": {"labels": {"app": "sleepers"}},
                    "spec": {"containers": [{
                        "name": "main", "image": "python:3.11", "command": ["python", "-c", "import time; time.sleep(600)"],
                    }]},
                },
            },
        }, "busy")
        local.wait_for(lambda: len(local.pods("busy")) == 2, 30, "2 pods")
        local.wait_for(
            lambda: len(local.pod_processes("busy")) == 2,
            30, "2 pod processes",
        )
        pids = [p.pid for p in local.processes()]
        assert len(pids) >= 4  # apiserver, kubelet, 2 pods
    finally:
        stragglers = local.stop()
    assert stragglers == []  # nothing had to be killed by the final sweep
    assert local.processes() == []
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    port = int(local.api_url.rsplit(":", 1)[1])
    with socket.socket() as s:  # the API server's port is free again
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_kubelet_honours_the_grace_period_with_a_slow_prestop_hook(stack, namespace):
    """As a kubelet does: the preStop hook has the grace period; when it uses it all,
    SIGTERM comes with 2 s more, then SIGKILL; a hook that ends early is followed by
    SIGTERM at once. The container here ignores SIGTERM and the hook never ends."""
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('UP', flush=True); time.sleep(600)")
    template = {"terminationGracePeriodSeconds": 3, "containers": [{
        "name": "main", "image": "python:3.11", "command": ["python3", "-c", stubborn],
        "lifecycle": {"preStop": {"exec": {"command": ["python", "-c", "import time; time.sleep(600)"]}}}}]}
    stack.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "stubborn"},
                 "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "stubborn"}},
                          "template": {"metadata": {"labels": {"app": "stubborn"}}, "spec": template}}}, namespace)
    pod = stack.wait_for(lambda: stack.pods(namespace, "app=stubborn"), 30, "the pod")[0]["metadata"]["name"]
    stack.wait_for(lambda: "UP" in (stack.pod_logs(namespace, pod) or ""), 30, "the pod to start")
    [process] = stack.pod_processes(namespace, pod)
    started = time.monotonic()
    stack.kubectl("scale", "deployment", "stubborn", "--replicas", "0", "-n", namespace)
    stack.wait_for(lambda: not process.is_running() or process.status() == psutil.STATUS_ZOMBIE, 30,
                   "the process to be killed")
    took = time.monotonic() - started
    assert 4 <= took < 9, took  # 3 s of hook, 2 s after SIGTERM, then SIGKILL
