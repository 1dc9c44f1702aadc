"""The chaos driver: random ``adaptive`` bound changes on a busy cluster, some of them
with the operator killed (SIGKILL) and restarted, and then the promises checked; and
node drains (:func:`run_drains`, at the end of this module): several worker pods born
with the preStop hook evicted at once, one of them running a seceded task.

Shared by ``tests/test_chaos.py`` (a few seeded rounds) and ``benchmarks/chaos.py``
(the long run): :func:`run_chaos` does everything between a running local stack (with
a namespace) and the figures (:class:`ChaosResult`); :func:`run_drains` the same for
drains (:class:`DrainResult`).

The job runs throughout: ``CHUNKS`` chunks of integers are computed once and held
(persisted data, ~2 MB each), and every round adds a batch of slow tasks that each sum
one chunk; their results stay held too. Every answer is known in advance (sums of
``arange`` segments), so the result is checked exactly. A
:class:`~dmo_devstack.probes.TaskLedger` on the scheduler tells
whether a key was computed twice, lost with a leaving worker, or whether a running
task's worker left under it.

Each round: new bounds ``1 <= minimum <= maximum <= MAX_WORKERS`` (half the time with
``maximum`` under the current size when there is room to lower it), a new batch of
tasks, then, with probability ``kill_probability``, a SIGKILL of the operator a
moment later and a restart, then a random short wait. At the end: the job's results
are gathered and compared, the ledger read, and the cluster must settle: the worker
group's replicas equal its Deployments equal the connected workers, none
``closing_gracefully``, at the size the policy's status wants, within the last
bounds.

The workers' functions live in this installed module: the scheduler and the workers
import them by reference.
"""

from __future__ import annotations

import json
import random
import secrets
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, Event, Future

from dmo_devstack.probes import task_ledger, worker_statuses
from dmo_devstack.scaling_probes import (
    OPERATOR,
    client_of,
    events,
    free_port,
    make_cluster,
    policy,
    replicas,
    scaling_entry,
    set_adaptive,
    start_operator,
    wait_policy_reconciled,
    worker_deployments,
)
from dmo_devstack.stack import LocalStack


MAX_WORKERS = 4
CHUNKS = 16
CHUNK_LEN = 250_000  # int64: 2 MB a chunk, 32 MB in all
TASKS_PER_ROUND = 8
TASK_SECONDS = 0.5
#: Event reasons counted in the figures
EVENT_REASONS = ("RetirementStarted", "WorkerRetired", "RetirementAborted", "RetirementCancelled",
                 "RetiringWorkerLost", "PendingWorkersRemoved", "ScaledUp")


# --- the operator ---------------------------------------------------------------


@dataclass
class Operator:
    """The operator of a chaos run: started, SIGKILLed, started again.

    ``webhook``: it also serves its admission webhook (HTTPS on 127.0.0.1, certificates
    in the stack's state directory); :meth:`serve_namespace` sends it the pod creations
    of a namespace, so that worker pods are born with the preStop retirement hook."""

    stack: LocalStack
    metrics_port: int = field(default_factory=free_port)
    liveness_port: int = field(default_factory=free_port)
    webhook: bool = False
    webhook_port: int = field(default_factory=free_port)
    #: MutatingWebhookConfigurations this operator created (deleted by :meth:`stop`)
    configurations: list[str] = field(default_factory=list)

    def _webhook_args(self) -> list[str]:
        if not self.webhook:
            return []
        return ["--webhook-port", str(self.webhook_port), "--webhook-address", "127.0.0.1",
                "--webhook-cert-dir", str(self._cert_dir)]

    @property
    def _cert_dir(self) -> Path:
        return self.stack.state_dir / f"chaos-webhook-certs-{self.webhook_port}"

    def serve_namespace(self, ns: str) -> None:
        """A MutatingWebhookConfiguration of its own (named after ``ns``) that sends this
        operator the pod creations of ``ns`` only (the namespace is labelled for it: the
        emulated API has no ``kubernetes.io/metadata.name`` label)."""
        from dask_memory_operator.webhook.configuration import NAME, mutating_webhook_configuration

        assert self.webhook, "the operator was not started with its webhook"
        ca = (self._cert_dir / "ca.crt").read_bytes()
        self.stack.kubectl("label", "namespace", ns, f"{DRAIN_LABEL}=true", "--overwrite")
        name = f"{NAME}-{ns}"[:63]
        config = mutating_webhook_configuration(ca, url=f"https://127.0.0.1:{self.webhook_port}", name=name)
        for hook in config["webhooks"]:
            hook["namespaceSelector"] = {"matchLabels": {DRAIN_LABEL: "true"}}
        self.stack.apply(config)
        self.configurations.append(name)

    def start(self, timeout: float = 60.0) -> float:
        """Start it and wait until kopf answers its liveness probe; the seconds that took."""
        t0 = time.monotonic()
        if self.webhook and not (self._cert_dir / "ca.crt").exists():
            from dask_memory_operator.webhook.certs import write_webhook_certs

            write_webhook_certs(self._cert_dir, ["localhost"], ["127.0.0.1"])  # ca.crt among them
        start_operator(self.stack, self.metrics_port, self.liveness_port, self._webhook_args())
        process = self.stack.processes_by_name[OPERATOR]
        self.stack.wait_for(lambda: LocalStack._healthy(self.liveness_port) or not process.alive, timeout,
                            "the operator's liveness probe")
        if not process.alive:
            raise RuntimeError(f"the operator exited:\n{self.stack.logs(OPERATOR)[-4000:]}")
        return time.monotonic() - t0

    def kill(self) -> None:
        """SIGKILL (no cleanup of any kind), then reap its process group."""
        process = self.stack.processes_by_name[OPERATOR]
        assert process.popen is not None and process.alive, "the operator is not running"
        with open(process.log_path, "ab") as log:
            log.write(f"=== chaos: SIGKILL at {time.strftime('%H:%M:%S')}\n".encode())
        process.popen.send_signal(signal.SIGKILL)
        process.popen.wait(10)
        self.stack.stop_process(OPERATOR)

    def stop(self) -> None:
        for name in self.configurations:
            self.stack.kubectl("delete", "mutatingwebhookconfiguration", name, "--wait=false", check=False)
        self.configurations.clear()
        self.stack.stop_process(OPERATOR)


# --- the job ------------------------------------------------------------------------


def make_chunk(i: int) -> np.ndarray:
    """Chunk ``i`` of the persisted data: ``arange`` over its segment."""
    return np.arange(i * CHUNK_LEN, (i + 1) * CHUNK_LEN, dtype=np.int64)


def slow_sum(chunk: np.ndarray, seconds: float) -> int:
    time.sleep(seconds)
    return int(chunk.sum())


def chunk_sum(i: int) -> int:
    """What :func:`slow_sum` of chunk ``i`` is, without a cluster."""
    lo, hi = i * CHUNK_LEN, (i + 1) * CHUNK_LEN
    return (lo + hi - 1) * (hi - lo) // 2


@dataclass
class Job:
    """The persisted chunks and every round's tasks, with their expected answers."""

    client: Client
    chunks: list[Future] = field(default_factory=list)
    tasks: dict[str, tuple[Future, int]] = field(default_factory=dict)

    def start(self) -> None:
        self.chunks = [self.client.submit(make_chunk, i, key=f"chaos-chunk-{i}") for i in range(CHUNKS)]
        self.client.gather(self.chunks)

    def add_batch(self, rnd: int, rng: random.Random, n: int = TASKS_PER_ROUND,
                  seconds: float = TASK_SECONDS) -> None:
        for t in range(n):
            i = rng.randrange(CHUNKS)
            key = f"chaos-sum-{rnd}-{t}"
            self.tasks[key] = (self.client.submit(slow_sum, self.chunks[i], seconds, key=key), chunk_sum(i))

    def check(self) -> list[str]:
        """Wait for every task; the keys whose answer is wrong (none, when all is well)."""
        got = self.client.gather([f for f, _ in self.tasks.values()])
        wrong = [k for (k, (_, want)), value in zip(self.tasks.items(), got) if value != want]
        if self.client.gather(self.chunks[0]).shape != (CHUNK_LEN,):
            wrong.append("chaos-chunk-0")
        return wrong


# --- one run ------------------------------------------------------------------------


@dataclass
class Round:
    index: int
    minimum: int
    maximum: int
    #: Workers (replicas) before the bounds changed
    before: int
    killed: bool
    wait: float
    #: As seen at the round's end
    replicas: int = 0
    deployments: int = 0
    connected: int = 0
    closing: int = 0
    retiring: int = 0
    reason: str = ""


@dataclass
class ChaosResult:
    seed: int | None
    rounds: list[Round]
    kills: int
    #: Events counted by reason (EVENT_REASONS)
    events: dict[str, int]
    #: Aborted retirements whose reason is "cancelled" (a scale-up cancelled them)
    aborted_cancelled: int
    #: The scaling Events in order: "HH:MM:SS reason: message"
    event_log: list[str]
    #: Workers whose RetirementStarted has no outcome Event (retired, aborted,
    #: cancelled, lost), counted per start
    unreported: list[str]
    #: Seconds each restart took until the operator answered its liveness probe
    restart_seconds: list[float]
    wall: float
    job_seconds: float
    settle_seconds: float
    lost: dict[str, int]
    rerun: dict[str, int]
    wasted: dict[str, int]
    wrong: list[str]
    computed: int
    #: The end state
    closing_gracefully_left: int
    replicas_mismatch: int
    workers: int
    desired: int | None
    bounds: tuple[int, int]
    settled: bool

    @property
    def in_bounds(self) -> bool:
        return self.bounds[0] <= self.workers <= self.bounds[1]

    @staticmethod
    def rows(rounds: list[Round], header: bool = True) -> str:
        """Rounds as a table (with its header line when ``header``)."""
        lines = [f"{'round':>5} {'min':>3} {'max':>3} {'before':>6} {'kill':>4} {'wait':>5} "
                 f"{'replicas':>8} {'deploys':>7} {'workers':>7} {'closing':>7} {'retiring':>8}  reason"
                 ] if header else []
        for r in rounds:
            lines.append(f"{r.index:>5} {r.minimum:>3} {r.maximum:>3} {r.before:>6} "
                         f"{'yes' if r.killed else '':>4} {r.wait:>5.1f} {r.replicas:>8} "
                         f"{r.deployments:>7} {r.connected:>7} {r.closing:>7} {r.retiring:>8}  {r.reason}")
        return "\n".join(lines)

    def table(self) -> str:
        return self.rows(self.rounds)

    def summary(self) -> str:
        e = self.events
        return (f"wall {self.wall:.1f}s (job {self.job_seconds:.1f}s, settle {self.settle_seconds:.1f}s); "
                f"{self.computed} tasks computed; retirements started {e['RetirementStarted']}, "
                f"done {e['WorkerRetired']}, aborted {e['RetirementAborted']} "
                f"(of which 'cancelled' {self.aborted_cancelled}), cancelled {e['RetirementCancelled']}, "
                f"lost {e['RetiringWorkerLost']}, started without an outcome Event {len(self.unreported)} "
                f"{self.unreported or ''}; pending removed {e['PendingWorkersRemoved']}, "
                f"scale-ups {e['ScaledUp']}; operator restarts took "
                f"{', '.join(f'{t:.1f}' for t in self.restart_seconds) or '-'}s; end: {self.workers} workers, desired {self.desired}, "
                f"bounds {self.bounds}, settled {self.settled}, wrong results {len(self.wrong)}")

    def last_line(self) -> str:
        return (f"rounds={len(self.rounds)} kills={self.kills} lost_keys={sum(self.lost.values())} "
                f"rerun_tasks={sum(self.rerun.values())} wasted_tasks={sum(self.wasted.values())} "
                f"closing_gracefully_left={self.closing_gracefully_left} "
                f"replicas_mismatch={self.replicas_mismatch}")


@dataclass
class Observed:
    replicas: int
    deployments: int
    statuses: dict[str, str]
    entry: dict[str, Any]

    @property
    def connected(self) -> int:
        return len(self.statuses)

    @property
    def closing(self) -> int:
        return sum(s == "closing_gracefully" for s in self.statuses.values())

    @property
    def settled(self) -> bool:
        return (self.replicas == self.deployments == self.connected
                and set(self.statuses.values()) <= {"running"}
                and not self.entry.get("retiring")
                and self.entry.get("desired") == self.entry.get("replicas") == self.replicas)


def observe(stack: LocalStack, ns: str, cluster: str, client: Client, policy_name: str) -> Observed:
    return Observed(replicas(stack, ns, cluster), len(worker_deployments(stack, ns, cluster)),
                    client.run_on_scheduler(worker_statuses),
                    scaling_entry(stack, ns, policy_name, cluster))


def _event_time(event: dict) -> str:
    return str(event.get("eventTime") or event.get("lastTimestamp") or event.get("firstTimestamp")
               or event["metadata"].get("creationTimestamp") or "")


def new_bounds(rng: random.Random, current: int) -> tuple[int, int]:
    """1 <= minimum <= maximum <= MAX_WORKERS; half the time maximum is put under the
    current size (an immediate scale-down), when there is room for that."""
    if current > 1 and rng.random() < 0.5:
        maximum = rng.randint(1, current - 1)
    else:
        maximum = rng.randint(1, MAX_WORKERS)
    return rng.randint(1, maximum), maximum


def run_chaos(
    stack: LocalStack, ns: str, rng: random.Random, rounds: int, *,
    operator: Operator, kill_probability: float = 0.35, wait: tuple[float, float] = (1.0, 3.0),
    must_kill: bool = False, settle_timeout: float = 120.0, seed: int | None = None,
    on_round: Callable[[Round], None] | None = None, cluster: str = "chaos",
) -> ChaosResult:
    """Run the chaos rounds on a new cluster in ``ns``; ``operator`` must be running,
    and is running again at the end. ``must_kill``: the first round kills the operator whatever the dice
    say (so that a short run has at least one kill)."""
    name = "chaos"
    t0 = time.monotonic()
    make_cluster(stack, ns, cluster, workers=MAX_WORKERS)
    with client_of(stack, ns, cluster, MAX_WORKERS) as client:
        stack.apply(policy(name, cluster,
                           adaptive={"minimum": MAX_WORKERS, "maximum": MAX_WORKERS,
                                     "interval": "500ms", "waitCount": 2},
                           retirement={"timeLimit": "30s", "maxConcurrent": 2}), namespace=ns)
        stack.wait_for(lambda: observe(stack, ns, cluster, client, name).settled, 60,
                       f"{name} to scale {cluster} at {MAX_WORKERS}")
        job = Job(client)
        job.start()
        t_job = time.monotonic()
        done: list[Round] = []
        kills = 0
        restarts: list[float] = []
        bounds = (MAX_WORKERS, MAX_WORKERS)
        for index in range(1, rounds + 1):
            before = replicas(stack, ns, cluster)
            bounds = new_bounds(rng, before)
            killed = (must_kill and index == 1) or rng.random() < kill_probability
            pause = rng.uniform(*wait)
            job.add_batch(index, rng)
            set_adaptive(stack, ns, name, minimum=bounds[0], maximum=bounds[1])
            if killed:
                time.sleep(rng.uniform(0.2, 1.5))  # into whatever the new bounds started
                operator.kill()
                kills += 1
                time.sleep(rng.uniform(0.0, 1.0))
                restarts.append(operator.start())
            time.sleep(pause)
            seen = observe(stack, ns, cluster, client, name)
            record = Round(index, *bounds, before, killed, pause, seen.replicas, seen.deployments,
                           seen.connected, seen.closing, len(seen.entry.get("retiring") or ()),
                           seen.entry.get("reason", ""))
            done.append(record)
            if on_round is not None:
                on_round(record)
        wrong = job.check()
        job_seconds = time.monotonic() - t_job
        ledger = client.run_on_scheduler(task_ledger)
        t_settle = time.monotonic()
        settled = True
        try:
            stack.wait_for(lambda: observe(stack, ns, cluster, client, name).settled, settle_timeout,
                           f"{cluster} to settle", interval=0.5)
        except TimeoutError:
            settled = False
        settle_seconds = time.monotonic() - t_settle
        end = observe(stack, ns, cluster, client, name)
        scaling_events = sorted((e for e in events(stack, ns) if e.get("reason") in EVENT_REASONS),
                                key=_event_time)
        found = Counter(e.get("reason") for e in scaling_events)
        starts, outcomes = Counter(), Counter()
        for e in scaling_events:
            # "Retiring worker W ...", "Retirement of worker W ...", "Worker W ..."
            words = e.get("message", "").split(" ")
            worker = words[{"RetirementStarted": 2, "RetirementAborted": 3}.get(e["reason"], 1)] if len(words) > 3 else ""
            if e["reason"] == "RetirementStarted":
                starts[worker] += 1
            elif e["reason"] in ("WorkerRetired", "RetirementAborted", "RetirementCancelled", "RetiringWorkerLost"):
                outcomes[worker] += 1
        aborted_cancelled = sum(e["message"].rstrip().endswith(": cancelled")
                                for e in events(stack, ns, "RetirementAborted"))
        return ChaosResult(
            seed=seed, rounds=done, kills=kills, events={r: found.get(r, 0) for r in EVENT_REASONS},
            aborted_cancelled=aborted_cancelled,
            event_log=[f"{_event_time(e)[11:19]} {e['reason']}: {e.get('message', '')}" for e in scaling_events],
            unreported=sorted((starts - outcomes).elements()), restart_seconds=restarts, wall=time.monotonic() - t0, job_seconds=job_seconds,
            settle_seconds=settle_seconds, lost=ledger["lost"], rerun=ledger["rerun"],
            wasted=ledger["wasted"], wrong=wrong, computed=ledger["computed"],
            closing_gracefully_left=end.closing,
            replicas_mismatch=abs(end.replicas - end.deployments) + abs(end.deployments - end.connected),
            workers=end.connected, desired=end.entry.get("desired"), bounds=bounds, settled=settled,
        )


# --- node drains ----------------------------------------------------------------------
#
# A node drain evicts the pods of a node at once; each worker's Deployment (replicas 1,
# still there) makes a new pod, whose worker joins under the same name. The pods were
# born through the operator's webhook: each runs the amm_core preStop hook, which
# retires its worker through the scheduler before the SIGTERM. One of the drained
# workers runs a seceded task (as ``worker_client()`` makes one) that ends a moment
# after the drain started: with the hook keeping the worker out and waiting, it
# finishes inside the grace period and its result is moved like any other key.

#: Workers of the drained cluster (each round drains 2 or 3 of them)
DRAIN_WORKERS = 4
#: The policy's AMM policies during the drains (the hooks' retirements run beside them)
DRAIN_POLICIES = [{"class": "PressureReduceReplicas"}, {"class": "Rebalance"}]
#: The policy's retirement: the hook's limit (the pods' grace period is 15 s more)
DRAIN_LIMIT = 20
DRAIN_RETIREMENT = {"timeLimit": f"{DRAIN_LIMIT}s", "drain": True}
#: Namespaces labelled so get pod creations sent to the drain operator's webhook
DRAIN_LABEL = "chaos.amm.dask.org/drain"
#: Scattered keys (nothing can recompute them): their bytes each
SCATTERED, SCATTERED_BYTES = 8, 1_000_000
#: Slow tasks added right before each drain, so that the workers are busy
DRAIN_TASKS = 12
#: Seconds the seceded task goes on after its worker's retirement started (the hook's
#: amm_core_retire reached the scheduler); bounded by SECEDED_TIMEOUT whatever happens
RELEASE_AFTER = 1.0
SECEDED_TIMEOUT = 60.0
#: The seceded tasks' results: SECEDED_BASE + round
SECEDED_BASE = 1_000_000


def seceded_task(event: str, value: int, timeout: float) -> int:
    """Secede (as ``worker_client()`` does for a task that submits work), wait until
    ``event`` is set or ``timeout`` passes, rejoin, and return ``value``."""
    from distributed import Event, worker_client

    with worker_client() as client:
        Event(event, client=client).wait(timeout)
    return value


def long_running_on(key: str, dask_scheduler: Any = None) -> str | None:
    """Run on the scheduler: the address of the worker on which ``key`` runs seceded
    (a ``long_running`` task), else None."""
    ts = dask_scheduler.tasks.get(key)
    ws = ts.processing_on if ts is not None and ts.state == "processing" else None
    return ws.address if ws is not None and ts in ws.long_running else None


def worker_addresses(dask_scheduler: Any = None) -> dict[str, str]:
    """Run on the scheduler: worker name -> address."""
    return {str(ws.name): ws.address for ws in dask_scheduler.workers.values()}


def evict(stack: LocalStack, ns: str, pod: str) -> int:
    """POST an Eviction of ``pod`` (what ``kubectl drain`` does); the HTTP status."""
    body = json.dumps({"apiVersion": "policy/v1", "kind": "Eviction",
                       "metadata": {"name": pod, "namespace": ns}}).encode()
    request = urllib.request.Request(f"{stack.api_url}/api/v1/namespaces/{ns}/pods/{pod}/eviction",
                                     data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def worker_pods(stack: LocalStack, ns: str, cluster: str) -> tuple[dict[str, dict], list[str]]:
    """(worker (Deployment) name -> its live pod, the names of the pods being deleted)."""
    live, going = {}, []
    for pod in stack.pods(ns, f"dask.org/cluster-name={cluster},dask.org/component=worker"):
        if pod["metadata"].get("deletionTimestamp"):
            going.append(pod["metadata"]["name"])
            continue
        owner = next((r["name"] for r in pod["metadata"].get("ownerReferences") or ()
                      if r.get("kind") == "Deployment"), None)
        if owner is not None:
            live[owner] = pod
    return live, going


def retirement_reports(client: Client) -> list[dict]:
    """The scheduler's retirement records (the amm_core plugin's ``amm_core_retirements``)."""
    try:
        return list(client.sync(client.scheduler.amm_core_retirements) or ())
    except Exception:  # the plugin answering something else, a comm hiccup: nothing seen this time
        return []


def hook_outcome(stack: LocalStack, ns: str, pod: str) -> str:
    """The last line the preStop hook wrote in the pod's log (its outcome), shortened."""
    lines = [line.split("amm_core.prestop: ", 1)[1] for line in stack.pod_logs(ns, pod).splitlines()
             if "amm_core.prestop: " in line]
    if not lines:
        return "no hook output"
    return lines[-1][:160]


def _hooks_cut(stack: LocalStack, ns: str) -> int:
    """preStop hooks of the namespace's pods the kubelet ended at the grace period."""
    return sum(f" {ns}/" in line and "preStop hook still running after the grace period" in line
               for line in stack.logs("kubelet").splitlines())


def _record_summary(report: dict | None) -> str:
    if report is None:
        return "no record"
    text = str(report.get("state"))
    if report.get("blocked"):
        text += f" (blocked: {report['blocked']})"
    if report.get("left"):
        text += ", left"
    if report.get("state") == "aborted":
        text += f": {report.get('reason', '')}"
    return text[:160]


@dataclass
class DrainRound:
    index: int
    #: The drained workers (Deployment names), the seceded task's first
    victims: list[str]
    seceded_on: str
    #: The seceded worker's retirement record as seen when its task was let go
    record_at_release: str
    #: Seconds from the evictions to the seceded worker's record (None: none seen)
    record_after: float | None
    #: Per victim, its retirement record as last seen, and its hook's outcome line
    records: dict[str, str] = field(default_factory=dict)
    hooks: dict[str, str] = field(default_factory=dict)
    #: Seconds from the evictions to all workers back and running
    seconds: float = 0.0
    settled: bool = False
    #: The ledger's growth during the round
    lost: int = 0
    rerun: int = 0
    wasted: int = 0
    #: Whether the seceded task itself was among the wasted
    seceded_wasted: bool = False
    #: The victims' preStop hooks the kubelet ended at the grace period
    hooks_cut: int = 0


@dataclass
class DrainResult:
    seed: int | None
    rounds: list[DrainRound]
    wall: float
    lost: dict[str, int]
    rerun: dict[str, int]
    wasted: dict[str, int]
    wrong: list[str]
    computed: int
    closing_gracefully_left: int
    workers: int
    settled: bool
    #: Worker pods seen without the preStop hook (none when the webhook did its part)
    unhooked: list[str]
    #: preStop hooks the kubelet ended at the grace period (the hook must exit before)
    hooks_cut: int = 0

    @property
    def pods_drained(self) -> int:
        return sum(len(r.victims) for r in self.rounds)

    @staticmethod
    def rows(rounds: list[DrainRound], header: bool = True) -> str:
        lines = [f"{'round':>5} {'pods':>4} {'secs':>5} {'lost':>4} {'rerun':>5} {'wasted':>6} "
                 f"{'seceded':>7}  records (seceded worker first) | hook outcomes"] if header else []
        for r in rounds:
            lines.append(f"{r.index:>5} {len(r.victims):>4} {r.seconds:>5.1f} {r.lost:>4} {r.rerun:>5} "
                         f"{r.wasted:>6} {'wasted' if r.seceded_wasted else 'ok':>7}  "
                         + "; ".join(f"{v[-6:]}: {r.records.get(v, '?')}" for v in r.victims)
                         + (" | not settled" if not r.settled else "")
                         + (f" | {r.hooks_cut} hook(s) cut at the grace period" if r.hooks_cut else ""))
            lines.append(f"{'':>39}hooks: " + "; ".join(f"{v[-6:]}: {r.hooks.get(v, '?')}" for v in r.victims))
            lines.append(f"{'':>39}seceded worker's record when its task was let go "
                         f"({'-' if r.record_after is None else f'{r.record_after:.1f}s'} after the drain): "
                         f"{r.record_at_release}")
        return "\n".join(lines)

    def table(self) -> str:
        return self.rows(self.rounds)

    def summary(self) -> str:
        return (f"wall {self.wall:.1f}s; {self.pods_drained} pods drained in {len(self.rounds)} rounds, "
                f"{sum(r.settled for r in self.rounds)} rounds settled; {self.computed} tasks computed; "
                f"seceded tasks wasted {sum(r.seceded_wasted for r in self.rounds)}; hooks cut at the grace "
                f"period {self.hooks_cut}; end: {self.workers} workers, "
                f"settled {self.settled}; wrong results {len(self.wrong)} {self.wrong or ''}; "
                f"pods without the hook {len(self.unhooked)} {self.unhooked or ''}")

    def last_line(self) -> str:
        return (f"rounds={len(self.rounds)} pods_drained={self.pods_drained} "
                f"lost_keys={sum(self.lost.values())} rerun_tasks={sum(self.rerun.values())} "
                f"wasted_tasks={sum(self.wasted.values())} "
                f"closing_gracefully_left={self.closing_gracefully_left}")


def _cluster_ready(stack: LocalStack, ns: str, cluster: str, client: Client, workers: int) -> bool:
    """``workers`` worker pods, none being deleted, and as many workers connected, all running."""
    live, going = worker_pods(stack, ns, cluster)
    statuses = client.run_on_scheduler(worker_statuses)
    return (len(live) == workers and not going and len(statuses) == workers
            and set(statuses) == set(live) and set(statuses.values()) == {"running"})


def _unhooked(stack: LocalStack, ns: str, cluster: str) -> list[str]:
    from dask_memory_operator.webhook.mutation import has_retirement_hook

    live, _ = worker_pods(stack, ns, cluster)
    return sorted(p["metadata"]["name"] for p in live.values()
                  if not any(has_retirement_hook(c) for c in p["spec"]["containers"]))


def _check_drained_job(client: Client, job: Job, scattered: dict[str, tuple[Future, bytes]],
                       seceded: dict[str, tuple[Future, int]], timeout: float) -> list[str]:
    """The keys whose result is wrong or missing (lost scattered data cannot come back)."""
    from distributed import wait as wait_futures

    futures = ([f for f, _ in job.tasks.values()] + [f for f, _ in scattered.values()]
               + [f for f, _ in seceded.values()] + job.chunks)
    try:
        wait_futures(futures, timeout=timeout)
    except Exception:  # timed out, or futures cancelled (lost scattered data): counted below
        pass
    wrong = []
    for key, (future, want) in [*job.tasks.items(), *scattered.items(), *seceded.items()]:
        try:
            ok = future.status == "finished" and future.result(timeout=10) == want
        except Exception:
            ok = False
        if not ok:
            wrong.append(key)
    wrong += [f.key for f in job.chunks if f.status != "finished"]
    return wrong


def run_drains(
    stack: LocalStack, ns: str, rng: random.Random, rounds: int, *, operator: Operator,
    workers: int = DRAIN_WORKERS, round_timeout: float = 120.0, settle_timeout: float = 120.0,
    seed: int | None = None, on_round: Callable[[DrainRound], None] | None = None,
    cluster: str = "drain", policies: list | None = None,
) -> DrainResult:
    """Node drains on a new cluster in ``ns``: ``operator`` must be running with its
    webhook (``Operator(webhook=True)``).

    Set up: the namespace's pod creations go to the webhook; a MemoryPolicy governing
    the cluster (AMM ``policies``, :data:`DRAIN_RETIREMENT`, no ``adaptive``) seen by
    the operator; then the DaskCluster, whose worker pods are born with the hook
    (checked). The job: the persisted chunks, :data:`SCATTERED` scattered keys, and
    results held throughout.

    Each round, once every worker pod is live and its worker running: a batch of slow
    tasks; a seceded task (:func:`seceded_task`) asked of a random worker and seen
    running there seceded; that worker and 1 or 2 others drained at once (their pods
    evicted together); the seceded task let go :data:`RELEASE_AFTER` seconds after its
    worker's retirement record appears (the hook reached the scheduler); then wait
    until the old pods are gone and the new ones' workers are in, running (bounded
    by ``round_timeout``). The records and the hooks' outcome lines are kept per round.

    At the end: every result checked, the TaskLedger read, and the cluster must settle
    (all workers running, none ``closing_gracefully``)."""
    name = "drain"
    t0 = time.monotonic()
    operator.serve_namespace(ns)
    stack.apply(policy(name, cluster, retirement=DRAIN_RETIREMENT,
                       policies=DRAIN_POLICIES if policies is None else policies), namespace=ns)
    wait_policy_reconciled(stack, ns, name)
    # The template's grace period is the one the webhook sets (the time limit + its
    # margin): the process kubelet times a pod's termination by the grace period of
    # the pod it made from the template, before admission (a real kubelet goes by the
    # admitted pod's); with a shorter one there, hooks would be cut short here only.
    from dask_memory_operator.webhook.mutation import GRACE_MARGIN

    grace = DRAIN_LIMIT + GRACE_MARGIN
    make_cluster(stack, ns, cluster, workers=workers, grace=grace)
    cut_before = _hooks_cut(stack, ns)
    unhooked: set[str] = set()
    with client_of(stack, ns, cluster, workers) as client:
        stack.wait_for(lambda: _cluster_ready(stack, ns, cluster, client, workers), 120,
                       f"{cluster}'s {workers} workers running", interval=0.5)
        born = _unhooked(stack, ns, cluster)
        if born:
            raise RuntimeError(f"worker pods born without the preStop hook (the webhook?): {born}")
        job = Job(client)
        job.start()
        values = [bytes(SCATTERED_BYTES - 1) + bytes([i]) for i in range(SCATTERED)]
        scattered_futures = client.scatter(values)
        scattered = {f.key: (f, v) for f, v in zip(scattered_futures, values)}
        seceded: dict[str, tuple[Future, int]] = {}
        done: list[DrainRound] = []
        ledger = client.run_on_scheduler(task_ledger)
        for index in range(1, rounds + 1):
            stack.wait_for(lambda: _cluster_ready(stack, ns, cluster, client, workers), round_timeout,
                           f"{cluster}'s {workers} workers running before round {index}", interval=0.5)
            unhooked.update(_unhooked(stack, ns, cluster))
            pods, _ = worker_pods(stack, ns, cluster)
            addresses = client.run_on_scheduler(worker_addresses)
            job.add_batch(index, rng, n=DRAIN_TASKS)
            first = rng.choice(sorted(addresses))
            key, event = f"chaos-seceded-{index}", f"chaos-seceded-{index}-{secrets.token_hex(4)}"
            future = client.submit(seceded_task, event, SECEDED_BASE + index, SECEDED_TIMEOUT, key=key,
                                   workers=[addresses[first]], allow_other_workers=True, priority=100)
            seceded[key] = (future, SECEDED_BASE + index)
            where = stack.wait_for(lambda: client.run_on_scheduler(long_running_on, key), 60,
                                   f"{key} to run seceded", interval=0.1)
            seceded_on = next(n for n, a in addresses.items() if a == where)
            others = sorted(set(addresses) - {seceded_on})
            victims = [seceded_on] + rng.sample(others, rng.choice((2, 3)) - 1)
            victim_pods = {v: pods[v]["metadata"]["name"] for v in victims}
            victim_addresses = {addresses[v]: v for v in victims}

            # the drain: every victim's pod evicted at once
            t_drain = time.monotonic()
            with ThreadPoolExecutor(len(victims)) as pool:
                codes = list(pool.map(lambda v: evict(stack, ns, victim_pods[v]), victims))
            if any(c >= 300 for c in codes):
                raise RuntimeError(f"evictions of {victim_pods} answered {codes}")

            last: dict[str, dict] = {}

            def look() -> None:
                for report in retirement_reports(client):
                    victim = victim_addresses.get(report.get("address"))
                    if victim is not None:
                        last[victim] = report

            # let the seceded task go a moment after its worker's retirement started
            record_after = None
            deadline = t_drain + 30.0
            while time.monotonic() < deadline and seceded_on not in last:
                look()
                time.sleep(0.1)
            if seceded_on in last:
                record_after = time.monotonic() - t_drain
                release = time.monotonic() + RELEASE_AFTER
                while time.monotonic() < release:
                    look()
                    time.sleep(0.1)
            at_release = _record_summary(last.get(seceded_on))
            Event(event, client=client).set()

            def back() -> bool:
                look()
                _, going = worker_pods(stack, ns, cluster)
                return (not set(victim_pods.values()) & set(going)
                        and _cluster_ready(stack, ns, cluster, client, workers))

            settled = True
            try:
                stack.wait_for(back, round_timeout, f"the drained workers of round {index} back", interval=0.25)
            except TimeoutError:
                settled = False
            seconds = time.monotonic() - t_drain
            now = client.run_on_scheduler(task_ledger)
            cut = _hooks_cut(stack, ns)
            record = DrainRound(
                index, victims, seceded_on, at_release, record_after,
                records={v: _record_summary(last.get(v)) for v in victims},
                hooks={v: hook_outcome(stack, ns, victim_pods[v]) for v in victims},
                seconds=seconds, settled=settled,
                lost=sum(now["lost"].values()) - sum(ledger["lost"].values()),
                rerun=sum(now["rerun"].values()) - sum(ledger["rerun"].values()),
                wasted=sum(now["wasted"].values()) - sum(ledger["wasted"].values()),
                seceded_wasted=key in now["wasted"], hooks_cut=cut - cut_before,
            )
            ledger, cut_before = now, cut
            done.append(record)
            if on_round is not None:
                on_round(record)

        wrong = _check_drained_job(client, job, scattered, seceded, timeout=settle_timeout)
        ledger = client.run_on_scheduler(task_ledger)
        settled = True
        try:
            stack.wait_for(lambda: _cluster_ready(stack, ns, cluster, client, workers), settle_timeout,
                           f"{cluster} to settle", interval=0.5)
        except TimeoutError:
            settled = False
        statuses = client.run_on_scheduler(worker_statuses)
        return DrainResult(
            seed=seed, rounds=done, wall=time.monotonic() - t0, lost=ledger["lost"], rerun=ledger["rerun"],
            wasted=ledger["wasted"], wrong=wrong, computed=ledger["computed"],
            closing_gracefully_left=sum(s == "closing_gracefully" for s in statuses.values()),
            workers=len(statuses), settled=settled, unhooked=sorted(unhooked),
            hooks_cut=sum(r.hooks_cut for r in done),
        )
