"""What benchmarks/scale_down.py and benchmarks/adaptive.py share: one local stack
(emulated Kubernetes API, process kubelet, the real dask-kubernetes operator, and
this project's operator when a mode needs it), a fresh namespace and DaskCluster per
run, and the scheduler's own account of what a scale-down cost.

What the scheduler saw (:class:`Ledger`, a scheduler plugin installed by the
benchmark, which is a trusted client: it is pickled by value):

- **re-run**: completions (``processing -> memory``) of a key beyond its first;
- **lost**: keys named in the scheduler's own ``remove-worker`` event as
  ``lost-computed-tasks`` or ``lost-scattered-tasks`` (the removed worker held their
  only copy), counted once per removal, with their ``nbytes``;
- **wasted**: executions a worker started (``executing`` on the worker, reported by
  :class:`ExecLog`, a worker plugin, as a scheduler event) that never completed
  there, because the scheduler took the task away when the worker was removed:
  running work thrown away. Tasks merely assigned to a removed worker and not
  started (``processing-tasks`` of the event minus those) are counted apart as
  *reassigned*: no work is lost on them;
- per removed worker: when it left, when it was first seen ``closing_gracefully``
  (sampled every 100 ms), the bytes of the keys only it held at that moment;
- **rescued** (the benchmark's own measure of what the operator reports as rescued):
  the keys a retiring worker held that a plain deletion would have lost, and that
  were still in memory on a worker that never retired when it was removed, each
  counted once, with their ``nbytes``. At risk: a key whose every holder, when the
  worker's status turned ``closing_gracefully`` (heard synchronously from the
  scheduler's ``worker-status-change`` event, before anything moved), was a worker
  that retired (itself, or others leaving with it, as in a drain), and a key it
  computed during its retirement.

Bytes moved and the transfer rate come from the surviving workers'
``transfer_incoming_log`` (see :func:`transfers`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cloudpickle
from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dmo_devstack import scaling_probes
from dmo_devstack.stack import LocalStack, daskcluster_manifest

MB = 10**6
GB = 10**9
WORKER_LABEL = "dask.org/component=worker"
STARTED_TOPIC = "bench-started"
AMM_INTERVAL = 2.0  # seconds, the same in every mode (distributed's default)

# Ledger and ExecLog travel to the scheduler and workers by value: this module is
# not importable there.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ExecLog(WorkerPlugin):
    """On every worker: tell the scheduler each time a task starts executing."""

    name = "bench-exec-log"

    def setup(self, worker: Any) -> None:
        self.worker = worker

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish == "executing":
            self.worker.log_event(STARTED_TOPIC, {"key": str(key)})


class Ledger(SchedulerPlugin):
    """The scheduler's account of a run (see the module docstring)."""

    name = "bench-ledger"

    def __init__(self) -> None:
        self.computed: Counter[str] = Counter()
        self.started: Counter[str] = Counter()
        #: one dict per worker removal
        self.removals: list[dict[str, Any]] = []
        #: address -> {"name", "closing_since", "unique_bytes"}
        self.closing: dict[str, dict[str, Any]] = {}
        #: (time, workers registered) samples
        self.counts: list[tuple[float, int]] = []
        #: address -> worker name, of every worker seen
        self.names: dict[str, str] = {}
        #: address of a retiring worker -> key -> (nbytes, its holders when it turned
        #: closing_gracefully), of the keys it held then or computed since
        self.retiring: dict[str, dict[str, tuple[int, frozenset[str]]]] = {}
        #: every worker that went closing_gracefully; the keys counted as rescued
        self.ever_retiring: set[str] = set()
        self.rescued_keys: set[str] = set()

    async def start(self, scheduler: Any) -> None:
        from tornado.ioloop import PeriodicCallback

        self.scheduler = scheduler
        self.callback = PeriodicCallback(self.sample, 100)
        self.callback.start()
        for address, ws in scheduler.workers.items():
            self.names[address] = str(ws.name)
        self.sample()

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self.names[worker] = str(scheduler.workers[worker].name)

    def sample(self) -> None:
        now = time.time()
        workers = self.scheduler.workers.values()
        self.counts.append((now, len(workers)))
        for ws in workers:
            if ws.status.name == "closing_gracefully" and ws.address not in self.closing:
                unique = sum(ts.nbytes for ts in ws.has_what if len(ts.who_has or ()) == 1)
                self.closing[ws.address] = {"name": ws.name, "closing_since": now, "unique_bytes": unique}

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start == "processing" and finish == "memory":
            self.computed[str(key)] += 1
            worker = kwargs.get("worker")
            held = self.retiring.get(worker)
            ts = self.scheduler.tasks.get(key)
            if held is not None and ts is not None:
                held[key] = (ts.nbytes, frozenset([worker]))  # computed there: only there

    def log_event(self, topic: str, msg: Any) -> None:
        if topic == STARTED_TOPIC:
            self.started[msg["key"]] += 1
            return
        if isinstance(msg, dict) and msg.get("action") == "worker-status-change":
            ws = self.scheduler.workers.get(topic)
            # logged once the status is set, before the scheduler acts on it: nothing
            # has moved yet
            if ws is not None and msg.get("status") == "closing_gracefully" and topic not in self.retiring:
                self.ever_retiring.add(topic)
                self.retiring[topic] = {ts.key: (ts.nbytes, frozenset(w.address for w in ts.who_has or ()))
                                        for ts in ws.has_what}
            return
        if topic != "all" or not isinstance(msg, dict) or msg.get("action") != "remove-worker":
            return
        # Called before the scheduler transitions the worker's tasks: their states
        # still say what the removed worker held and ran.
        tasks = self.scheduler.tasks
        lost = list(msg["lost-computed-tasks"]) + list(msg["lost-scattered-tasks"])
        held = self.retiring.pop(msg["worker"], {})
        rescued, each = {}, 0
        for k, (n, holders) in held.items():
            ts = tasks.get(k)
            if ts is None or not holders <= self.ever_retiring:
                continue  # gone, or safe anyway on a worker that stayed
            if any(w.address not in self.ever_retiring for w in ts.who_has or ()):
                each += 1  # (a key saved off two leaving workers counts for each)
                if k not in self.rescued_keys:
                    rescued[k] = n
                    self.rescued_keys.add(k)
        self.removals.append({
            "worker": msg["worker"],
            "name": self.names.get(msg["worker"], msg["worker"]),
            "time": time.time(),
            "stimulus_id": msg["stimulus_id"],
            "processing": [str(k) for k in msg["processing-tasks"]],
            "lost": len(lost),
            "lost_bytes": sum(tasks[k].nbytes for k in lost if k in tasks),
            "rescued": len(rescued),
            "rescued_bytes": sum(rescued.values()),
            "rescued_each": each,
        })

    def report(self) -> dict[str, Any]:
        self.sample()
        self.callback.stop()
        rerun = sum(n - 1 for n in self.computed.values() if n > 1)
        # Executions that never completed: started more often than computed.
        wasted = sum(max(0, n - self.computed[k]) for k, n in self.started.items())
        processing = [k for r in self.removals for k in r["processing"]]
        return {
            "rerun": rerun,
            "wasted": wasted,
            "reassigned": max(0, len(processing) - wasted),
            "lost": sum(r["lost"] for r in self.removals),
            "lost_bytes": sum(r["lost_bytes"] for r in self.removals),
            "rescued": sum(r["rescued"] for r in self.removals),
            "rescued_bytes": sum(r["rescued_bytes"] for r in self.removals),
            "rescued_each": sum(r["rescued_each"] for r in self.removals),
            "removals": [{k: v for k, v in r.items() if k != "processing"} for r in self.removals],
            "closing": self.closing,
            "counts": self.counts,
        }


def _ledger_report(dask_scheduler: Any) -> dict[str, Any]:
    return dask_scheduler.plugins[Ledger.name].report()


def install_ledger(client: Client) -> None:
    client.register_plugin(Ledger())
    client.register_plugin(ExecLog())


def ledger_report(client: Client) -> dict[str, Any]:
    return client.run_on_scheduler(_ledger_report)


def _incoming(dask_worker: Any) -> list[dict[str, Any]]:
    return [{"who": e["who"], "start": e["start"], "stop": e["stop"], "total": e["total"],
             "duration": e["duration"]} for e in dask_worker.transfer_incoming_log]


def transfers(client: Client, since: float) -> dict[str, Any]:
    """From the incoming transfer logs of the workers alive now: bytes fetched per
    sending worker after ``since`` (``moved_from``), and the transfer rate of the whole
    run: per sending worker, the bytes others fetched from it over the time it was
    sending (the union of its fetches' [start, stop] intervals, so that concurrent
    fetches are not counted twice), summed over senders (total bytes / total sending
    seconds). A fetch is one ``gather_dep``, of up to 50 MB."""
    entries = [e for log in client.run(_incoming).values() for e in log]
    moved: Counter[str] = Counter()
    by_sender: dict[str, list[tuple[float, float]]] = {}
    nbytes = 0
    for e in entries:
        if e["start"] >= since:
            moved[e["who"]] += e["total"]
        by_sender.setdefault(e["who"], []).append((e["start"], e["stop"]))
        nbytes += e["total"]
    seconds = sum(_union_length(intervals) for intervals in by_sender.values())
    return {"moved_from": dict(moved), "rate": nbytes / seconds if seconds else float("nan"),
            "fetched": nbytes}


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


# --- the stack and the clusters ------------------------------------------------------


def operator_argv() -> list[str]:
    """This project's operator as the sandbox runs it (pod IPs are local)."""
    return [sys.executable, "-m", "dask_memory_operator.cli", "run", "--verbose",
            "--scheduler-access", "pod-ip", "--resync-interval", "1"]


#: Namespaces labelled so are the only ones the benchmark's webhook configuration
#: sends pods of (its namespaceSelector): the other modes' pods are created as before,
#: the operator mode's included.
HOOK_LABEL = "bench.amm.dask.org/webhook"


@contextmanager
def bench_stack(with_operator: bool, state_dir: str | None = None, webhook: bool = False):
    """The local stack for all runs of a benchmark; this operator too when asked.

    With ``webhook``, the operator also serves its admission webhook over HTTPS on
    127.0.0.1 (certificates of ``webhook.certs``, in the stack's state directory),
    and the cluster-wide MutatingWebhookConfiguration is created once, limited to the
    namespaces labelled :data:`HOOK_LABEL` (see :func:`new_namespace`)."""
    stack = LocalStack(state_dir)
    try:
        stack.start()
        if with_operator or webhook:
            argv = operator_argv()
            if webhook:
                from pathlib import Path

                from dask_memory_operator.webhook.certs import write_webhook_certs
                from dmo_devstack.scaling_probes import free_port
                from dask_memory_operator.webhook.configuration import mutating_webhook_configuration

                port, certs = free_port(), Path(stack.state_dir) / "webhook-certs"
                ca = write_webhook_certs(certs, ["localhost"], ["127.0.0.1"])
                argv += ["--webhook-port", str(port), "--webhook-address", "127.0.0.1",
                         "--webhook-cert-dir", str(certs)]
            stack.start_process("dask-memory-operator", argv)
            if webhook:
                config = mutating_webhook_configuration(ca, url=f"https://127.0.0.1:{port}")
                for hook in config["webhooks"]:
                    hook["namespaceSelector"] = {"matchLabels": {HOOK_LABEL: "true"}}
                stack.apply(config)
        yield stack
    finally:
        stack.stop()


def scheduler_env() -> dict[str, str]:
    """Every mode's scheduler: the AMM on at AMM_INTERVAL, the amm_core plugin preloaded
    (the operator mode needs it; the others carry it idle, for equal footing)."""
    return {
        "DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START": "True",
        "DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__INTERVAL": f"{AMM_INTERVAL}s",
        "DASK_DISTRIBUTED__SCHEDULER__PRELOAD": "amm_core.plugin",
    }


#: Workers keep every transfer of a run in their logs.
WORKER_ENV = {"DASK_DISTRIBUTED__ADMIN__LOW_LEVEL_LOG_LENGTH": "1000000"}


def new_namespace(stack: LocalStack, prefix: str, hooked: bool = False) -> str:
    """A fresh namespace; ``hooked``: labelled for the webhook (:data:`HOOK_LABEL`)."""
    ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
    metadata: dict[str, Any] = {"name": ns}
    if hooked:
        metadata["labels"] = {HOOK_LABEL: "true"}
    stack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata})
    return ns


def make_cluster(stack: LocalStack, ns: str, name: str, workers: int, memory_limit: str) -> Client:
    """A DaskCluster of ``workers`` x 1 thread; returns a Client once they are all up."""
    stack.apply(daskcluster_manifest(
        name, workers=workers, worker_args=("--nthreads", "1", "--memory-limit", memory_limit),
        worker_env=WORKER_ENV, scheduler_env=scheduler_env(),
    ), namespace=ns)
    address = stack.wait_scheduler_address(ns, name)
    client = Client(address, timeout="60s")
    try:
        client.wait_for_workers(workers, timeout=180)
    except BaseException:
        client.close()
        raise
    return client



def delete_namespace(stack: LocalStack, ns: str) -> None:
    """Delete the run's DaskCluster and wait until all its processes are gone, so that
    no run shares the machine with the last one's leftovers."""
    stack.kubectl("delete", "daskclusters", "--all", "-n", ns, "--wait=false", check=False)
    stack.kubectl("delete", "memorypolicies", "--all", "-n", ns, "--wait=false", check=False)
    stack.kubectl("delete", "daskautoscalers", "--all", "-n", ns, "--wait=false", check=False)
    stack.kubectl("delete", "deployments", "--all", "-n", ns, "--wait=false", check=False)
    stack.wait_for(lambda: not stack.pod_processes(ns), 120, f"the processes of {ns} to end")
    stack.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def worker_deployments(stack: LocalStack, ns: str, cluster: str) -> list[dict[str, Any]]:
    """The cluster's worker Deployments, less those being deleted."""
    return [d for d in stack.deployments(ns)
            if not d["metadata"].get("deletionTimestamp")
            and d["metadata"].get("labels", {}).get("dask.org/component") == "worker"
            and d["metadata"].get("labels", {}).get("dask.org/cluster-name") == cluster]


def worker_pods(stack: LocalStack, ns: str, cluster: str) -> list[dict[str, Any]]:
    return [p for p in stack.pods(ns)
            if p["metadata"].get("labels", {}).get("dask.org/component") == "worker"
            and p["metadata"].get("labels", {}).get("dask.org/cluster-name") == cluster]


def scale_worker_group(stack: LocalStack, ns: str, cluster: str, replicas: int) -> None:
    """dask-kubernetes' own path: lower the default DaskWorkerGroup's replicas."""
    stack.kubectl("scale", "daskworkergroup", f"{cluster}-default", "-n", ns, f"--replicas={replicas}")


def memory_policy(name: str, cluster: str, adaptive: dict[str, Any] | None,
                  retirement: dict[str, Any] | None = None) -> dict[str, Any]:
    """A MemoryPolicy governing one cluster: the AMM as every mode has it (amm_core's
    ReduceReplicas at AMM_INTERVAL), and the scaling fields of issue 7 (no
    ``adaptive`` when None: the operator does not scale the cluster)."""
    return scaling_probes.policy(name, cluster, adaptive=adaptive, retirement=retirement,
                                 policies=[{"class": "ReduceReplicas"}], interval=f"{AMM_INTERVAL:g}s")


def patch_policy(stack: LocalStack, ns: str, name: str, spec: dict[str, Any]) -> None:
    stack.kubectl("patch", "memorypolicy", name, "-n", ns, "--type=merge", "-p", json.dumps({"spec": spec}))


def policy_scaling(stack: LocalStack, ns: str, name: str) -> list[dict[str, Any]]:
    out = stack.kubectl("get", "memorypolicy", name, "-n", ns, "-o", "json", check=False)
    if out.returncode:
        return []
    return (json.loads(out.stdout).get("status") or {}).get("scaling") or []


def policy_savings(stack: LocalStack, ns: str, name: str, cluster: str) -> dict[str, Any]:
    """``status.clusters[cluster].savings`` of the policy ({} when none)."""
    return scaling_probes.savings_entry(stack, ns, name, cluster)


def wait_policy_observed(stack: LocalStack, ns: str, name: str, timeout: float = 60) -> None:
    """The operator has seen the policy (its status was written): its indexes know
    which clusters the policy governs, so the webhook patches their pods from now on."""
    path = f"/apis/amm.dask.org/v1alpha1/namespaces/{ns}/memorypolicies/{name}"
    stack.wait_for(lambda: ((stack.get_json(path) or {}).get("status") or {}).get("observedGeneration"),
                   timeout, f"MemoryPolicy {name}'s status", interval=0.5)


def wait_policy_scaling(stack: LocalStack, ns: str, name: str, cluster: str,
                        predicate: Callable[[dict[str, Any]], bool], what: str,
                        timeout: float = 90) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        entry = next((e for e in policy_scaling(stack, ns, name) if e.get("cluster") == cluster), None)
        return entry if entry is not None and predicate(entry) else None

    return stack.wait_for(check, timeout, f"MemoryPolicy {name}: {what}", interval=0.5)


# --- runs, rounds and tables ----------------------------------------------------------


@dataclass
class BaseRun:
    """One run of one mode; benchmarks add their measures."""

    mode: str
    rep: int
    error: str = ""
    notes: list[str] = field(default_factory=list)


def add_common_args(parser: argparse.ArgumentParser, modes: Sequence[str]) -> None:
    parser.add_argument("--repeat", type=int, default=3, help="rounds (runs per mode)")
    parser.add_argument("--modes", default=",".join(modes), help="comma-separated subset of " + ", ".join(modes))
    parser.add_argument("--memory-limit", default="1.5GB", help="per worker")
    parser.add_argument("--state-dir", help="the stack's state directory (logs); a temporary one by default")
    parser.add_argument("--logs-on-error", action="store_true", help="print the logs of a failed run")


def parse_modes(parser: argparse.ArgumentParser, args: argparse.Namespace, modes: Sequence[str]) -> list[str]:
    chosen = args.modes.split(",")
    unknown = set(chosen) - set(modes)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")
    return chosen


@contextmanager
def isolated(stack: LocalStack, run: BaseRun, prefix: str, console: Console, logs_on_error: bool):
    """A fresh namespace for one run, deleted (and its processes waited for) at the end;
    an exception fails this run only, recorded in ``run.error`` with where the logs are.
    A ``...+hook`` mode's namespace is labelled for the webhook."""
    ns = new_namespace(stack, f"{prefix}-{run.mode.replace('+', '-')}-{run.rep}", hooked=is_hook_mode(run.mode))
    try:
        yield ns
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        console.print(f"[red]{run.mode} #{run.rep} failed[/]: {escape(run.error)}\n"
                      f"{escape(traceback.format_exc())}")
        console.print(escape(stack.dump_logs(ns, tail=40)) if logs_on_error else
                      f"logs: {stack.log_dir} and {stack.pod_log_dir}/{ns}_*.log")
    finally:
        delete_namespace(stack, ns)


R = TypeVar("R", bound=BaseRun)


def is_hook_mode(mode: str) -> bool:
    """``<mode>+hook``: that mode with the operator's webhook injecting the preStop hook."""
    return mode.endswith("+hook")


def run_rounds(modes: Sequence[str], args: argparse.Namespace, console: Console,
               run_once: Callable[[LocalStack, str, int], R], describe: Callable[[R], str]) -> list[R]:
    """Every mode ``args.repeat`` times, interleaved (:func:`rotations`), on one stack
    (with this operator when the ``operator`` mode is in, and its webhook when a
    ``+hook`` mode is); prints a line per run."""
    runs: list[R] = []
    with bench_stack("operator" in modes, args.state_dir, webhook=any(map(is_hook_mode, modes))) as stack:
        console.print(f"stack at {stack.state_dir} (logs: {stack.log_dir}, pods: {stack.pod_log_dir})")
        for rep, mode in rotations(modes, args.repeat):
            run = run_once(stack, mode, rep)
            runs.append(run)
            console.print(f"  #{rep} {mode:20s} {describe(run)}"
                          + (f"  ERROR {escape(run.error)}" if run.error else ""))
            for note in run.notes:
                console.print(f"      {escape(note)}")
    return runs


def ok_runs(runs: Sequence[R], mode: str) -> list[R]:
    return [r for r in runs if r.mode == mode and not r.error]


def mode_table(title: str, columns: Sequence[str], runs: Sequence[R], modes: Sequence[str],
               cells: Callable[[list[R]], list[str]]) -> Table:
    """A row a mode: ``mode``, ``runs`` (and failed ones), then ``cells`` of its good runs."""
    table = Table(title=escape(title))
    for col in ("mode", "runs", *columns):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for mode in modes:
        ok = ok_runs(runs, mode)
        failed = sum(1 for r in runs if r.mode == mode and r.error)
        count = f"{len(ok)}" + (f" ({failed} failed)" if failed else "")
        table.add_row(mode, count, *(cells(ok) if ok else ["-"] * len(columns)))
    return table


def total(runs: Sequence[BaseRun], attr: str) -> str:
    """The sum of ``attr`` over ``runs``, ``nan`` when there are none."""
    return str(sum(getattr(r, attr) for r in runs)) if runs else "nan"


# --- sampling and summaries ------------------------------------------------------------


class PodCounter:
    """Samples the number of worker pods of a cluster in the API every ``interval``
    seconds (in the calling thread's place: call :meth:`sample` from a loop, or
    :meth:`run_in_thread`)."""

    def __init__(self, stack: LocalStack, ns: str, cluster: str, interval: float = 0.25):
        import threading

        self.stack, self.ns, self.cluster, self.interval = stack, ns, cluster, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), len(worker_pods(self.stack, self.ns, self.cluster))))
            except OSError:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> PodCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def integral(samples: Sequence[tuple[float, int]], start: float, stop: float) -> float:
    """The integral of a step function (value held until the next sample) over
    [start, stop]: worker-seconds."""
    total = 0.0
    points = sorted(samples)
    for (t0, v), (t1, _) in zip(points, points[1:] + [(stop, 0)]):
        lo, hi = max(t0, start), min(t1, stop)
        if hi > lo:
            total += v * (hi - lo)
    return total


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def stat(values: Sequence[float], fmt: str) -> str:
    """``median [min, max]``, escaped for a rich table cell."""
    if not values:
        return "-"
    def show(v: float) -> str:
        # the median of an even number of counts may fall between two
        return format(v, ".1f") if fmt == "d" and not float(v).is_integer() else format(int(v) if fmt == "d" else v, fmt)

    return escape(f"{show(median(values))} [{show(min(values))}, {show(max(values))}]")


def rotations(modes: Sequence[str], repeat: int) -> Iterable[tuple[int, str]]:
    """(round, mode) interleaved round-robin, the starting mode rotating each round."""
    for rep in range(repeat):
        k = rep % len(modes)
        for mode in list(modes[k:]) + list(modes[:k]):
            yield rep + 1, mode
