"""The chaos driver: random ``adaptive`` bound changes on a busy cluster, some of them
with the operator killed (SIGKILL) and restarted, and then the promises checked.

Shared by ``tests/test_chaos.py`` (a few seeded rounds) and ``benchmarks/chaos.py``
(the long run): :func:`run_chaos` does everything between a running local stack (with
a namespace) and the figures (:class:`ChaosResult`).

The job runs throughout: ``CHUNKS`` chunks of integers are computed once and held
(persisted data, ~2 MB each), and every round adds a batch of slow tasks that each sum
one chunk; their results stay held too. Every answer is known in advance (sums of
``arange`` segments), so the result is checked exactly. A
:class:`~dask_memory_operator.devstack.probes.TaskLedger` on the scheduler tells
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

import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed import Client, Future

from dask_memory_operator.devstack.probes import task_ledger, worker_statuses
from dask_memory_operator.devstack.scaling_probes import (
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
    worker_deployments,
)
from dask_memory_operator.devstack.stack import LocalStack


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
    """The operator of a chaos run: started, SIGKILLed, started again."""

    stack: LocalStack
    metrics_port: int = field(default_factory=free_port)
    liveness_port: int = field(default_factory=free_port)

    def start(self, timeout: float = 60.0) -> float:
        """Start it and wait until kopf answers its liveness probe; the seconds that took."""
        t0 = time.monotonic()
        start_operator(self.stack, self.metrics_port, self.liveness_port)
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
