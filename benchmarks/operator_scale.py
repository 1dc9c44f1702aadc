"""One operator, many governed clusters: what does it cost the API and itself? (issue 16)

One local stack (``_k8s_bench.bench_stack``: emulated API server, process kubelet,
the real dask-kubernetes operator) and ONE dask-memory-operator, run under a
ServiceAccount of its own (a token in a kubeconfig of its own), so that the API
server's audit log tells its requests from everyone else's. ``--clusters`` N
DaskClusters spread over ``--namespaces`` namespaces, each a real scheduler process
preloading amm_core and a worker group of ``replicas: 0`` (100 schedulers fit in
memory here, 100 workers more might not; and they are made quiet when idle,
:data:`QUIET_SCHEDULER`, or 100 would need more than the 2 cores here). One MemoryPolicy per namespace selects all
its clusters: AMM-only in some namespaces, with ``adaptive`` (bounds 0..0: a look
every interval that finds nothing to do) in the others (``--adaptive-share``).

Measured, once everything is Applied:

- **change_s**: every policy gets a new AMM interval at once (a PATCH each); the
  seconds from a policy's PATCH until the last of its schedulers runs it, read from
  the schedulers themselves over RPC (``amm_core_status``); the worst cluster of each
  change, median over ``--changes`` changes;
- **requests_per_cluster_minute**: the operator's requests in the audit log over
  ``--idle`` seconds of nothing changing (from when it wrote nothing for ``--settle``
  seconds: the Events of the last change are posted for a while after it), per
  governed cluster per minute (its watches included: a watch is one request when
  opened); the breakdown by verb and resource is printed;
- **cpu_idle**: the operator's CPU-seconds per wall second over that window;
- **rss_mb**: the operator's largest RSS over the run (psutil, every 0.5 s);
- **scale_down_requests**: one more cluster, in a namespace of its own, 2 workers
  under ``adaptive`` 2..2, lowered to 0..0: the operator's requests in that namespace
  from the PATCH until the group is at 0 replicas with no worker Deployment left and
  the status says so (retirements, Deployment deletions, the replicas patches, the
  Events and the status writes, and the reads of every pass meanwhile).

Last line::

    clusters=N change_s=… rss_mb=… requests_per_cluster_minute=… cpu_idle=… scale_down_requests=… …

With ``--before "<that line of another run>"`` the ratios to it are printed too
(the run before a change is measured on its own tree: see README, Benchmarks).

Usage::

    .venv/bin/python benchmarks/operator_scale.py --clusters 100
    .venv/bin/python benchmarks/operator_scale.py --clusters 10 --idle 30 --changes 2   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import _k8s_bench as kb  # noqa: E402
from dmo_devstack import scaling_probes  # noqa: E402
from dask_memory_operator.schedulers import rpc  # noqa: E402

OPERATOR = "dask-memory-operator"
SERVICE_ACCOUNT = "dmo-bench"
LABEL = {"bench.amm.dask.org/scale": "yes"}
POLICY = "p"
INTERVALS = (3.0, 2.0)  # alternated by the changes (policies start at 2 s)
SCALE_NS_PREFIX = "scale-down"


# --- the operator under its own identity ------------------------------------------------


def operator_kubeconfig(stack: kb.LocalStack) -> tuple[Path, str]:
    """A ServiceAccount bound to cluster-admin and a kubeconfig with its token: the
    audit log's user ``system:serviceaccount:<ns>:dmo-bench`` is the operator. (What
    ``LocalStack.service_account_kubeconfig`` does, kept here so that the benchmark
    also runs on trees from before that method, for the numbers of before.)"""
    ns = "dmo-bench-system"
    stack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    stack.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SERVICE_ACCOUNT}}, namespace=ns)
    stack.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                 "metadata": {"name": SERVICE_ACCOUNT},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                 "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": ns}]})
    request = urllib.request.Request(
        f"{stack.api_url}/api/v1/namespaces/{ns}/serviceaccounts/{SERVICE_ACCOUNT}/token",
        data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                         "spec": {"expirationSeconds": 24 * 3600}}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        token = json.load(resp)["status"]["token"]
    path = stack.state_dir / "operator-kubeconfig"
    user = f"system:serviceaccount:{ns}:{SERVICE_ACCOUNT}"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "bench",
        "clusters": [{"name": "bench", "cluster": {"server": stack.api_url}}],
        "users": [{"name": "bench", "user": {"token": token}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}]}))
    return path, user


def start_operator(stack: kb.LocalStack, kubeconfig: Path, resync: float) -> None:
    argv = [sys.executable, "-m", "dask_memory_operator.cli", "run",
            "--scheduler-access", "pod-ip", "--resync-interval", f"{resync:g}"]
    stack.start_process(OPERATOR, argv, env={"KUBECONFIG": str(kubeconfig)})


class Sampler:
    """RSS and CPU time of the operator every 0.5 s, in a thread."""

    def __init__(self, stack: kb.LocalStack):
        self.stack = stack
        self.samples: list[tuple[float, int, float]] = []  # (monotonic, rss, cpu seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            process = self.stack.processes_by_name[OPERATOR]
            try:
                proc = psutil.Process(process.popen.pid)
                cpu = proc.cpu_times()
                self.samples.append((time.monotonic(), proc.memory_info().rss, cpu.user + cpu.system))
            except psutil.Error:
                pass
            self._stop.wait(0.5)

    def cpu_share(self, start: float, stop: float) -> float:
        inside = [s for s in self.samples if start <= s[0] <= stop]
        if len(inside) < 2:
            return float("nan")
        return (inside[-1][2] - inside[0][2]) / (inside[-1][0] - inside[0][0])

    def rss_mb(self) -> float:
        return max((s[1] for s in self.samples), default=float("nan")) / 2**20

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# --- the audit log ----------------------------------------------------------------------


class Audit:
    """The operator's requests in the audit log, read on from where the last read ended."""

    def __init__(self, stack: kb.LocalStack, user: str):
        self.path, self.user, self.offset = stack.audit_log_path, user, 0

    def skip(self) -> None:
        """From now on."""
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def read(self) -> list[dict[str, Any]]:
        """The operator's requests since the last read or skip: one per request (a
        watch's ResponseStarted, anything else's ResponseComplete)."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        self.offset += end
        found = []
        for line in data[:end].splitlines():
            event = json.loads(line)
            if (event.get("user") or {}).get("username") != self.user:
                continue
            watch = event.get("verb") == "watch"
            if event.get("stage") == ("ResponseStarted" if watch else "ResponseComplete"):
                found.append(event)
        return found


WRITES = ("create", "update", "patch", "delete", "deletecollection")


def settle(audit: Audit, quiet: float, limit: float) -> float:
    """Wait until the operator wrote nothing for ``quiet`` seconds (a change's Events
    are posted one at a time, for tens of seconds after it: not idle traffic), at most
    ``limit`` seconds; returns how long it took."""
    start = last = time.monotonic()
    while time.monotonic() - last < quiet and time.monotonic() - start < limit:
        time.sleep(1)
        if any(e.get("verb") in WRITES for e in audit.read()):
            last = time.monotonic()
    return time.monotonic() - start


def breakdown(events: list[dict[str, Any]]) -> str:
    counts = collections.Counter(
        f"{e.get('verb')} {(e.get('objectRef') or {}).get('resource', e.get('requestURI', '?').split('?')[0])}"
        for e in events)
    return ", ".join(f"{k} ×{n}" for k, n in counts.most_common(12)) or "none"


# --- clusters, policies and schedulers --------------------------------------------------


#: What makes an idle scheduler quiet: distributed's event-loop tick monitor (every 20 ms
#: by default), its system monitor and work stealing's balancing (every 100 ms) cost an
#: idle scheduler 2.4 % of a core, 100 of them more than this 2-core machine has; 0.3 %
#: with these. The operator, what is measured, is not concerned.
QUIET_SCHEDULER = {
    "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "1s",
    "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL": "5s",
    "DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING": "False",
}


def make_clusters(stack: kb.LocalStack, namespaces: list[str], n: int) -> dict[str, list[str]]:
    """``n`` clusters of no workers, round-robin over the namespaces."""
    clusters: dict[str, list[str]] = {ns: [] for ns in namespaces}
    docs: dict[str, list[dict[str, Any]]] = {ns: [] for ns in namespaces}
    for i in range(n):
        ns = namespaces[i % len(namespaces)]
        name = f"c{i:03d}"
        manifest = kb.daskcluster_manifest(name, workers=0, scheduler_env=kb.scheduler_env() | QUIET_SCHEDULER)
        manifest["metadata"]["labels"] = dict(LABEL)
        clusters[ns].append(name)
        docs[ns].append(manifest)
    for ns, items in docs.items():
        if items:  # one kubectl per namespace
            stack.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(items), timeout=600)
    return clusters


def policy(adaptive: bool) -> dict[str, Any]:
    body = scaling_probes.policy(POLICY, "unused", adaptive={"minimum": 0, "maximum": 0} if adaptive else None,
                                 policies=[{"class": "ReduceReplicas"}], interval=f"{kb.AMM_INTERVAL:g}s")
    del body["spec"]["clusterNames"]
    body["spec"]["clusterSelector"] = {"matchLabels": dict(LABEL)}
    return body


def tolerant(predicate: Any) -> Any:
    """``predicate`` for ``wait_for``, a slow answer of the loaded API server taken as
    "not yet" (100 schedulers starting on a small machine keep it busy)."""
    def check() -> Any:
        try:
            return predicate()
        except OSError as e:
            print(f"  (the API server: {e}; asked again)", flush=True)
            return None
    return check


def scheduler_addresses(stack: kb.LocalStack, clusters: dict[str, list[str]]) -> dict[tuple[str, str], str]:
    """``tcp://<pod IP>:8786`` of every cluster's running, ready scheduler."""
    found = {}
    for ns, names in clusters.items():
        for pod in stack.pods(ns, "dask.org/component=scheduler"):
            status = pod.get("status") or {}
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
            cluster = pod["metadata"]["labels"].get("dask.org/cluster-name")
            if ready and status.get("podIP") and not pod["metadata"].get("deletionTimestamp"):
                found[(ns, cluster)] = f"tcp://{status['podIP']}:8786"
    return found


async def _intervals(addresses: dict[tuple[str, str], str]) -> dict[tuple[str, str], float | None]:
    async def one(address: str) -> float | None:
        try:
            status = await rpc.get_status(address, timeout=5)
        except Exception:  # not up, no plugin yet: not running it
            return None
        return float((status.get("amm") or {}).get("interval") or 0)

    keys = list(addresses)
    values = await asyncio.gather(*(one(addresses[k]) for k in keys))
    return dict(zip(keys, values))


def applied(stack: kb.LocalStack, namespaces: list[str], clusters: dict[str, list[str]]) -> bool:
    for ns in namespaces:
        body = stack.get_json(f"/apis/amm.dask.org/v1alpha1/namespaces/{ns}/memorypolicies/{POLICY}") or {}
        if (body.get("status") or {}).get("appliedClusters") != len(clusters[ns]):
            return False
    return True


def patch_policy(stack: kb.LocalStack, ns: str, spec: dict[str, Any]) -> float:
    """A merge PATCH of the policy's spec; returns when it was accepted (monotonic)."""
    request = urllib.request.Request(
        f"{stack.api_url}/apis/amm.dask.org/v1alpha1/namespaces/{ns}/memorypolicies/{POLICY}",
        data=json.dumps({"spec": spec}).encode(), method="PATCH",
        headers={"Content-Type": "application/merge-patch+json"})
    urllib.request.urlopen(request, timeout=30).close()
    return time.monotonic()


def change(stack: kb.LocalStack, clusters: dict[str, list[str]], addresses: dict[tuple[str, str], str],
           interval: float, timeout: float = 60.0) -> tuple[float, float]:
    """Every policy gets ``interval`` at once; returns the worst and the median
    seconds from a policy's PATCH until its scheduler runs it."""
    accepted: dict[str, float] = {}

    def one(ns: str) -> None:
        accepted[ns] = patch_policy(stack, ns, {"activeMemoryManager": {"interval": f"{interval:g}s"}})

    threads = [threading.Thread(target=one, args=(ns,)) for ns in clusters if clusters[ns]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took: dict[tuple[str, str], float] = {}
    deadline = time.monotonic() + timeout
    while len(took) < len(addresses) and time.monotonic() < deadline:
        left = {k: a for k, a in addresses.items() if k not in took}
        for key, value in asyncio.run(_intervals(left)).items():
            if value is not None and abs(value - interval) < 1e-6:
                took[key] = time.monotonic() - accepted[key[0]]
        time.sleep(0.05)
    missing = len(addresses) - len(took)
    if missing:
        print(f"  {missing} schedulers did not take the change within {timeout:g}s", flush=True)
    values = list(took.values()) + [timeout] * missing
    return max(values), statistics.median(values)


# --- the scale-down ---------------------------------------------------------------------


def scale_down(stack: kb.LocalStack, audit: Audit, ns: str, timeout: float = 180.0) -> tuple[int, float, str]:
    """adaptive 2..2 -> 0..0; the operator's requests in ``ns`` until it is over."""
    cluster = "s"
    audit.read()
    t0 = time.monotonic()
    patch_policy(stack, ns, {"adaptive": {"minimum": 0, "maximum": 0}})

    def done() -> bool:
        entry = scaling_probes.scaling_entry(stack, ns, POLICY, cluster)
        return (scaling_probes.replicas(stack, ns, cluster) == 0
                and not scaling_probes.worker_deployments(stack, ns, cluster)
                and entry.get("replicas") == 0 and not entry.get("retiring")
                and entry.get("reason") in ("Steady", "HeldByMinimum"))

    stack.wait_for(tolerant(done), timeout, "the scale-down to end", interval=0.25)
    took = time.monotonic() - t0
    time.sleep(2)  # the last status write and Event
    mine = [e for e in audit.read() if (e.get("objectRef") or {}).get("namespace") == ns]
    return len(mine), took, breakdown(mine)


def make_scale_cluster(stack: kb.LocalStack) -> str:
    ns = kb.new_namespace(stack, SCALE_NS_PREFIX)
    stack.apply(kb.daskcluster_manifest("s", workers=2, scheduler_env=kb.scheduler_env(),
                                        worker_args=("--nthreads", "1", "--memory-limit", "300MB")), namespace=ns)
    body = scaling_probes.policy(POLICY, "s", adaptive={"minimum": 2, "maximum": 2},
                                 policies=[{"class": "ReduceReplicas"}], interval=f"{kb.AMM_INTERVAL:g}s")
    stack.apply(body, namespace=ns)
    return ns


# --- the run ----------------------------------------------------------------------------


def parse_line(line: str) -> dict[str, float]:
    out = {}
    for word in line.split():
        key, _, value = word.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clusters", type=int, default=100, help="governed DaskClusters (no workers)")
    parser.add_argument("--namespaces", type=int, default=10, help="namespaces they are spread over")
    parser.add_argument("--adaptive-share", type=float, default=0.5,
                        help="share of the namespaces whose policy has adaptive (0..0)")
    parser.add_argument("--changes", type=int, default=3, help="policy changes measured")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of the idle window")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds without a write by the operator before the idle window")
    parser.add_argument("--resync-interval", type=float, default=10.0, help="the operator's")
    parser.add_argument("--no-scale-down", action="store_true", help="skip the scale-down measure")
    parser.add_argument("--before", default=None, help="the last line of a run to compare with")
    parser.add_argument("--state-dir", help="the stack's state directory (logs); a temporary one by default")
    args = parser.parse_args()
    t_start = time.monotonic()
    with kb.bench_stack(False, args.state_dir) as stack:
        print(f"stack at {stack.state_dir} (logs: {stack.log_dir})", flush=True)
        kubeconfig, user = operator_kubeconfig(stack)
        namespaces = [kb.new_namespace(stack, f"scale{i:02d}") for i in range(min(args.namespaces, args.clusters))]
        clusters = make_clusters(stack, namespaces, args.clusters)
        adaptive = set(namespaces[:round(len(namespaces) * args.adaptive_share)])
        for ns in namespaces:
            stack.apply(policy(ns in adaptive), namespace=ns)
        scale_ns = None if args.no_scale_down else make_scale_cluster(stack)
        addresses = stack.wait_for(
            tolerant(lambda: a if len(a := scheduler_addresses(stack, clusters)) == args.clusters else None),
            120 + 10 * args.clusters, f"{args.clusters} schedulers", interval=5)
        print(f"{args.clusters} schedulers up in {time.monotonic() - t_start:.0f}s", flush=True)
        audit = Audit(stack, user)
        start_operator(stack, kubeconfig, args.resync_interval)
        with Sampler(stack) as sampler:
            t_op = time.monotonic()
            stack.wait_for(tolerant(lambda: applied(stack, namespaces, clusters)), 120 + 2 * args.clusters,
                           "every policy Applied", 1)
            if scale_ns is not None:
                scaling_probes.wait_policy_reconciled(stack, scale_ns, POLICY, 120)
            startup = audit.read()
            print(f"operator: every cluster Applied {time.monotonic() - t_op:.1f}s after its start; "
                  f"{len(startup)} requests so far ({breakdown(startup)})", flush=True)

            worst, medians = [], []
            for i in range(args.changes):
                w, m = change(stack, clusters, addresses, INTERVALS[i % 2])
                worst.append(w)
                medians.append(m)
                print(f"change {i + 1}: every scheduler in {w:.2f}s (median {m:.2f}s)", flush=True)
                time.sleep(2)

            took = settle(audit, args.settle, 180)
            print(f"no write for {args.settle:g}s after {took:.0f}s", flush=True)
            t0 = time.monotonic()
            time.sleep(args.idle)
            t1 = time.monotonic()
            idle = [e for e in audit.read() if (e.get("objectRef") or {}).get("namespace") != scale_ns]
            per_cluster_minute = len(idle) / args.clusters / ((t1 - t0) / 60)
            cpu_idle = sampler.cpu_share(t0, t1)
            print(f"idle {t1 - t0:.0f}s: {len(idle)} requests ({breakdown(idle)}); "
                  f"cpu {cpu_idle:.3f}", flush=True)

            sd, sd_s, sd_what = (0, float("nan"), "skipped") if scale_ns is None else scale_down(stack, audit, scale_ns)
            print(f"scale-down 2 -> 0 workers in {sd_s:.1f}s: {sd} requests ({sd_what})", flush=True)
        rss = sampler.rss_mb()
    change_s = statistics.median(worst)
    line = (f"clusters={args.clusters} change_s={change_s:.2f} rss_mb={rss:.0f} "
            f"requests_per_cluster_minute={per_cluster_minute:.2f} cpu_idle={cpu_idle:.3f} "
            f"scale_down_requests={sd} change_median_s={statistics.median(medians):.2f} "
            f"namespaces={len(namespaces)} adaptive_namespaces={len(adaptive)}")
    if args.before:
        before = parse_line(args.before)
        now = parse_line(line)
        ratios = [f"{k}_ratio={now[k] / before[k]:.3f}" for k in
                  ("change_s", "rss_mb", "requests_per_cluster_minute", "cpu_idle", "scale_down_requests")
                  if before.get(k)]
        line += " " + " ".join(ratios)
    print(f"run took {time.monotonic() - t_start:.0f}s")
    print(line)


if __name__ == "__main__":
    main()
