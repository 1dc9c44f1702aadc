"""One operator, many tenants: does a hostile tenant slow down the others? (issue 15)

One local stack (``_k8s_bench.bench_stack``: emulated API server, process kubelet,
the real dask-kubernetes operator) and ONE dask-memory-operator with its admission
webhook. ``--namespaces`` N namespaces, each with a DaskCluster (a scheduler
preloading amm_core, ``--workers`` workers) and a MemoryPolicy governing it. One of
them is the hostile tenant's: its scheduler preloads ``tenants_hostile_scheduler.py``
after amm_core (4 MiB error replies to every call but the status, 1,000 retirement
records re-reported on every pass, ``forget_retirement`` ignored: an Event flood),
and in its hostile phases the tenant writes, as a tenant would (kubectl), a policy
governing that scheduler with ``adaptive`` (so that it is called every pass), a
policy whose args are nested 1,200 deep and one with 1.3 MB of args. The API
server may refuse those two: that is reported (it is the defence working).

Phases alternate, ``--rounds`` times: **baseline** (no hostile policy: the hostile
scheduler idles, unknown to the operator) then **hostile** (its policies created,
``--soak`` seconds let run, measured, then deleted). In each phase:

- **others_change_s**: every other tenant's policy gets a new AMM interval (one
  ``kubectl patch`` each, all at once); seconds from the patch's acceptance until its
  scheduler runs it, read from the scheduler itself (``extensions["amm"].interval``);
  median and max;
- **admission_p50_ms**: server-side dry-run POSTs (``?dryRun=All``) of worker pods
  of the other tenants' governed clusters, which the API server sends to the
  webhook, timed raw (median); ``ref`` the same for pods the webhook does not
  select (the API server's own share); ``mutated`` how many came back with the
  preStop hook (the webhook answered, not timed out and ignored); ``webhook direct``
  the same reviews POSTed straight to the operator's webhook (its own share: the
  emulator adds its per-call TLS set-up to the raw figure);
- **rss_mb** (max) and **cpu** (CPU-seconds per wall second) of the operator process
  over the phase (psutil); an operator that exited is restarted, as its
  Deployment would be, and counted.

Hostile phases also report the Events posted in the hostile namespace, what the
hostile scheduler was called, and what the other tenants see. Last line: the values
of the hostile phases, then the ratios hostile / baseline (medians over rounds)::

    namespaces=N hostile=1 others_change_s=X admission_p50_ms=Y rss_mb=Z cpu=C others_change_max_s=... ...

Usage::

    .venv/bin/python benchmarks/tenants.py --namespaces 6
    .venv/bin/python benchmarks/tenants.py --namespaces 4 --rounds 1 --soak 10   # smoke run
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil
from distributed import Client

sys.path.insert(0, str(Path(__file__).parent))
import _k8s_bench as kb  # noqa: E402
from dask_memory_operator.untrusted import raise_recursion_limit  # noqa: E402
from dask_memory_operator.webhook.handlers import HANDLER_ID  # noqa: E402
from tenants_hostile_scheduler import NAME as HOSTILE_PLUGIN  # noqa: E402

PRELOAD = Path(__file__).with_name("tenants_hostile_scheduler.py").resolve()
OPERATOR = "dask-memory-operator"
CLUSTER, POLICY = "c", "p"
INTERVALS = (3.0, 2.0)  # others' AMM interval in baseline, hostile phases (policies start at 2s)
CHANGE_TIMEOUT = 60.0
MEDIAN = kb.median


# --- the tenants ---------------------------------------------------------------------


def make_tenant(stack: kb.LocalStack, prefix: str, workers: int, hostile: bool = False) -> str:
    ns = kb.new_namespace(stack, prefix, hooked=True)
    manifest = kb.daskcluster_manifest(CLUSTER, workers=workers, scheduler_env=kb.scheduler_env(),
                                       worker_args=("--nthreads", "1", "--memory-limit", "300MB"))
    if hostile:  # the tenant's own scheduler command
        [container] = manifest["spec"]["scheduler"]["spec"]["containers"]
        container["args"] = ["dask", "scheduler", "--preload", "amm_core.plugin", "--preload", str(PRELOAD)]
    stack.apply(manifest, namespace=ns)
    if not hostile:
        stack.apply(kb.memory_policy(POLICY, CLUSTER, adaptive=None), namespace=ns)
    return ns


def hostile_policies() -> dict[str, str]:
    """What the hostile tenant writes (JSON): a policy the API server takes (adaptive,
    so that its scheduler is called every pass), one whose args are nested 1,200 deep
    (7.2 kB) and one with 1.3 MB of args."""
    policies = {"flood": json.dumps(kb.memory_policy("flood", CLUSTER, adaptive={"minimum": 0, "maximum": 1}))}
    deep = '{"a":' * 1200 + "0" + "}" * 1200  # deeper than Python's json.dumps goes
    for name, args in (("deep", '{"x":' + deep + "}"), ("huge", json.dumps({"blob": ["x" * 1000] * 1300}))):
        policy = kb.memory_policy(name, CLUSTER, adaptive=None)
        policy["spec"]["activeMemoryManager"]["policies"] = [{"class": "ReduceReplicas", "args": "ARGS"}]
        policies[name] = json.dumps(policy).replace('"ARGS"', args)
    return policies


def create_as_tenant(stack: kb.LocalStack, ns: str, text: str) -> str:
    """``kubectl create`` (apply would copy 1.3 MB into an annotation); when kubectl
    itself gives up before the server answers, a plain POST. "accepted" or why not."""
    out = stack.kubectl("create", "-n", ns, "-f", "-", input=text, check=False)
    if out.returncode == 0:
        return "accepted"
    if "Error from server" in out.stderr or "is invalid" in out.stderr:
        return "refused: " + out.stderr.strip().partition("is invalid:")[2][:200]
    request = urllib.request.Request(f"{stack.api_url}/apis/amm.dask.org/v1alpha1/namespaces/{ns}/memorypolicies",
                                     data=text.encode(), headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=30).close()
        return "accepted (POST; kubectl: " + out.stderr.strip()[:80] + ")"
    except urllib.error.HTTPError as exc:
        return f"refused ({exc.code}): " + json.loads(exc.read()).get("message", "")[-200:]


def remove_policies(stack: kb.LocalStack, ns: str, names: list[str]) -> list[str]:
    """Delete the hostile policies; those still there after 20 s (the operator's
    finalizer, its restore failing on the hostile scheduler) lose their finalizers,
    as their tenant would do. Returns those."""
    path = f"/apis/amm.dask.org/v1alpha1/namespaces/{ns}/memorypolicies/"
    stack.kubectl("delete", "memorypolicies", *names, "-n", ns, "--wait=false", "--ignore-not-found", check=False)
    try:
        stack.wait_for(lambda: not any(stack.get_json(path + n) for n in names), 20, "hostile policies gone", 0.5)
        return []
    except TimeoutError:
        stuck = [n for n in names if stack.get_json(path + n)]
        for name in stuck:
            stack.kubectl("patch", "memorypolicy", name, "-n", ns, "--type=merge",
                          "-p", '{"metadata":{"finalizers":null}}', check=False)
        return stuck


# --- measures ------------------------------------------------------------------------


def _amm_interval(dask_scheduler: Any) -> float:
    return dask_scheduler.extensions["amm"].interval


def _hostile_calls(dask_scheduler: Any) -> dict[str, int]:
    return dict(dask_scheduler.plugins[HOSTILE_PLUGIN].calls)


def change_others(stack: kb.LocalStack, clients: dict[str, Client], interval: float) -> list[float]:
    """Patch every other tenant's AMM interval, all at once (a thread each); seconds from
    the API's acceptance of the patch until the scheduler runs it (CHANGE_TIMEOUT: never)."""
    took: dict[str, float] = {}

    def one(ns: str, client: Client) -> None:
        kb.patch_policy(stack, ns, POLICY, {"activeMemoryManager": {"interval": f"{interval:g}s"}})
        t0 = time.monotonic()
        try:
            while (time.monotonic() - t0 < CHANGE_TIMEOUT
                   and abs(client.run_on_scheduler(_amm_interval) - interval) > 1e-6):
                time.sleep(0.05)
        finally:
            took[ns] = min(time.monotonic() - t0, CHANGE_TIMEOUT)

    threads = [threading.Thread(target=one, args=item) for item in clients.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return list(took.values())


def probe_pod(i: int, governed: bool) -> dict[str, Any]:
    labels = {"dask.org/cluster-name": CLUSTER, "dask.org/component": "worker"} if governed else {"app": "probe"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"probe-{i}", "labels": labels},
            "spec": {"containers": [{"name": "worker", "image": "ghcr.io/dask/dask:latest",
                                     "args": ["dask", "worker", "--name", f"probe-{i}"]}]}}


def admissions(stack: kb.LocalStack, namespaces: list[str], n: int, budget: float = 40.0) -> dict[str, Any]:
    """``n`` dry-run pod creations of each kind, alternated over the namespaces."""
    times: dict[bool, list[float]] = {True: [], False: []}
    mutated = 0
    deadline = time.monotonic() + budget
    for i in range(n):
        for governed in (True, False):
            ns = namespaces[i % len(namespaces)]
            request = urllib.request.Request(f"{stack.api_url}/api/v1/namespaces/{ns}/pods?dryRun=All",
                                             data=json.dumps(probe_pod(i, governed)).encode(),
                                             headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(request, timeout=30) as resp:
                pod = json.load(resp)
            times[governed].append(1000 * (time.perf_counter() - t0))
            mutated += governed and "preStop" in (pod["spec"]["containers"][0].get("lifecycle") or {})
        if time.monotonic() > deadline:
            break
    return {"p50": MEDIAN(times[True]), "ref": MEDIAN(times[False]), "mutated": f"{mutated}/{len(times[True])}",
            "direct": webhook_direct(stack, namespaces, n)}


def webhook_direct(stack: kb.LocalStack, namespaces: list[str], n: int) -> float:
    """The operator's own share: AdmissionReviews POSTed straight to its webhook (a new
    TLS connection each, as the API server makes), p50 ms; nan if it does not answer us."""
    argv = stack.processes_by_name[OPERATOR].argv
    url = f"https://127.0.0.1:{argv[argv.index('--webhook-port') + 1]}/{HANDLER_ID}"
    context = ssl.create_default_context(cafile=str(stack.state_dir / "webhook-certs" / "ca.crt"))
    times = []
    for i in range(n):
        ns = namespaces[i % len(namespaces)]
        pod = probe_pod(i, True)
        pod["metadata"]["namespace"] = ns
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": str(uuid.uuid4()), "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": ns, "name": pod["metadata"]["name"],
            "operation": "CREATE", "object": pod, "dryRun": True, "userInfo": {"username": "bench"}}}
        request = urllib.request.Request(url, data=json.dumps(review).encode(), headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        try:
            urllib.request.urlopen(request, timeout=10, context=context).close()
        except OSError:  # client certificates required, or no webhook
            return float("nan")
        times.append(1000 * (time.perf_counter() - t0))
    return MEDIAN(times)


class OperatorSampler:
    """RSS and CPU of the operator's process every 0.5 s while in the ``with``;
    restarts it (counted) when it exited."""

    def __init__(self, stack: kb.LocalStack):
        self.stack, self.samples, self.exits = stack, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            process = self.stack.processes_by_name[OPERATOR]
            if not process.alive:
                self.exits.append(process.popen.returncode)
                self.stack.restart_process(OPERATOR)
                continue
            try:
                proc = psutil.Process(process.popen.pid)
                cpu = proc.cpu_times()
                self.samples.append((proc.pid, time.monotonic(), proc.memory_info().rss, cpu.user + cpu.system))
            except psutil.Error:
                pass
            self._stop.wait(0.5)

    def __enter__(self) -> OperatorSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, float]:
        if not self.samples:
            return {"rss_mb": float("nan"), "cpu": float("nan")}
        by_pid: dict[int, list[tuple[float, float]]] = {}
        for pid, t, _, cpu in self.samples:
            by_pid.setdefault(pid, []).append((t, cpu))
        cpu_s = sum(s[-1][1] - s[0][1] for s in by_pid.values())
        wall = self.samples[-1][1] - self.samples[0][1]
        return {"rss_mb": max(s[2] for s in self.samples) / 2**20, "cpu": cpu_s / wall if wall else float("nan")}


def event_count(stack: kb.LocalStack, ns: str) -> int:
    items = (stack.get_json(f"/api/v1/namespaces/{ns}/events") or {}).get("items") or []
    return sum(e.get("count") or 1 for e in items)


def policy_reason(stack: kb.LocalStack, ns: str, name: str) -> str:
    body = stack.get_json(f"/apis/amm.dask.org/v1alpha1/namespaces/{ns}/memorypolicies/{name}")
    if body is None:
        return "absent"
    ready = [c for c in (body.get("status") or {}).get("conditions") or () if c.get("type") == "Ready"]
    return f"{ready[0].get('reason')}: {str(ready[0].get('message'))[:100]}" if ready else "no status"


# --- the run -------------------------------------------------------------------------


def run_phase(stack: kb.LocalStack, args: argparse.Namespace, clients: dict[str, Client],
              hostile_ns: str, hostile: bool) -> dict[str, Any]:
    notes: list[str] = []
    with OperatorSampler(stack) as sampler:
        if hostile:
            events0 = event_count(stack, hostile_ns)
            for name, text in hostile_policies().items():
                (stack.apply(text, namespace=hostile_ns) if name == "flood" else
                 notes.append(f"policy {name}: {create_as_tenant(stack, hostile_ns, text)}"))
        time.sleep(args.soak)
        change = change_others(stack, clients, INTERVALS[hostile])  # every phase changes it
        adm = admissions(stack, list(clients), args.admissions)
        if hostile:
            for name in ("flood", "deep", "huge"):
                notes.append(f"status of {name}: {policy_reason(stack, hostile_ns, name)}")
            notes.append(f"Events in the hostile namespace during the phase: {event_count(stack, hostile_ns) - events0}")
            stuck = remove_policies(stack, hostile_ns, ["flood", "deep", "huge"])
            if stuck:
                notes.append(f"still there 20 s after deletion (finalizers removed): {stuck}")
    if sampler.exits:
        notes.append(f"the operator exited {len(sampler.exits)} times (codes {sampler.exits}); restarted")
    return {"change": change, "adm": adm, **sampler.result(), "notes": notes, "exits": len(sampler.exits)}


def summary(phases: list[dict[str, Any]]) -> dict[str, float]:
    changes = [c for p in phases for c in p["change"]]
    return {"change": MEDIAN(changes), "change_max": max(changes, default=float("nan")),
            "adm": MEDIAN(p["adm"]["p50"] for p in phases), "ref": MEDIAN(p["adm"]["ref"] for p in phases),
            "direct": MEDIAN(p["adm"]["direct"] for p in phases),
            "rss": max(p["rss_mb"] for p in phases), "cpu": MEDIAN(p["cpu"] for p in phases)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--namespaces", type=int, default=6, help="tenants, the hostile one included")
    parser.add_argument("--workers", type=int, default=0, help="workers per cluster (0 or 1)")
    parser.add_argument("--rounds", type=int, default=2, help="baseline + hostile phases")
    parser.add_argument("--soak", type=float, default=15.0, help="seconds a phase runs before it is measured")
    parser.add_argument("--admissions", type=int, default=12, help="dry-run pods of each kind per phase")
    parser.add_argument("--state-dir", help="the stack's state directory (logs); a temporary one by default")
    args = parser.parse_args()
    raise_recursion_limit()  # reading back the deep policy, as the operator does
    if args.namespaces < 2:
        parser.error("--namespaces: at least 2 (one hostile)")
    phases: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    t_start = time.monotonic()
    with kb.bench_stack(True, args.state_dir, webhook=True) as stack:
        print(f"stack at {stack.state_dir} (logs: {stack.log_dir})", flush=True)
        others = [make_tenant(stack, f"tenant{i}", args.workers) for i in range(1, args.namespaces)]
        hostile_ns = make_tenant(stack, "hostile", args.workers, hostile=True)
        clients = {ns: Client(stack.wait_scheduler_address(ns, CLUSTER), timeout="120s") for ns in others}
        hostile_client = Client(stack.wait_scheduler_address(hostile_ns, CLUSTER), timeout="120s")
        try:
            for ns in others:
                kb.wait_policy_observed(stack, ns, POLICY, timeout=120)
            print(f"{args.namespaces} tenants up in {time.monotonic() - t_start:.0f}s; hostile: {hostile_ns}", flush=True)
            for rnd in range(1, args.rounds + 1):
                for hostile in (False, True):
                    p = run_phase(stack, args, clients, hostile_ns, hostile)
                    phases[hostile].append(p)
                    print(f"round {rnd} {'hostile ' if hostile else 'baseline'}: change median "
                          f"{MEDIAN(p['change']):.2f}s max {max(p['change']):.2f}s; admission p50 "
                          f"{p['adm']['p50']:.1f}ms (ref {p['adm']['ref']:.1f}ms, hooked {p['adm']['mutated']}, "
                          f"webhook direct {p['adm']['direct']:.1f}ms); "
                          f"rss {p['rss_mb']:.0f}MB cpu {p['cpu']:.2f}", flush=True)
                    for note in p["notes"]:
                        print(f"    {note}", flush=True)
            print(f"hostile scheduler's calls: {hostile_client.run_on_scheduler(_hostile_calls)}")
        finally:
            for client in [*clients.values(), hostile_client]:
                client.close()
    base, host = summary(phases[False]), summary(phases[True])

    def ratio(key: str) -> str:
        return f"{host[key] / base[key]:.2f}" if base[key] else "nan"

    print(f"baseline: others_change_s={base['change']:.2f} others_change_max_s={base['change_max']:.2f} "
          f"admission_p50_ms={base['adm']:.1f} admission_ref_p50_ms={base['ref']:.1f} "
          f"webhook_direct_p50_ms={base['direct']:.1f} "
          f"rss_mb={base['rss']:.0f} cpu={base['cpu']:.2f}; run took {time.monotonic() - t_start:.0f}s")
    print(f"namespaces={args.namespaces} hostile=1 others_change_s={host['change']:.2f} "
          f"admission_p50_ms={host['adm']:.1f} rss_mb={host['rss']:.0f} cpu={host['cpu']:.2f} "
          f"others_change_max_s={host['change_max']:.2f} admission_ref_p50_ms={host['ref']:.1f} "
          f"webhook_direct_p50_ms={host['direct']:.1f} "
          f"operator_exits={sum(p['exits'] for p in phases[True])} "
          f"others_change_ratio={ratio('change')} admission_ratio={ratio('adm')} "
          f"webhook_direct_ratio={ratio('direct')} rss_ratio={ratio('rss')} cpu_ratio={ratio('cpu')}")


if __name__ == "__main__":
    main()
