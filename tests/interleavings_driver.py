"""Randomized interleavings of everything that copies, drops, retires and closes
workers on one scheduler, with the invariants of issue 14 checked after every step.

Why: amm_core's retirement engine is safe when it is the only thing acting on a
scheduler; issue 14 lists eleven ways it is not when other mechanisms act beside it
(other AMM policies, upstream ``retire_workers``, several preStop hooks at once, aborts,
restarts). Regression tests pin the cases someone thought of; this driver looks for
the ones nobody did, by playing seeded random sequences of those mechanisms against a
real in-process ``Scheduler`` and 4-6 real ``Worker`` objects (real TCP comms, one
thread each, the amm_core ``MemoryPolicyPlugin`` registered), and asserting from the
scheduler itself, never from a result that recomputation would give again:

(a) **no key lost** unless every holder was killed outright. Read from the scheduler's
    ``remove-worker`` events (their "lost-computed-tasks" and "lost-scattered-tasks")
    and from a transition log (a held key going memory -> anything while the driver
    still holds its future). A worker removal is *forced*, and what it loses allowed,
    when the driver killed the process outright (a crash, a container restart) or the
    grace period of its pod ran out (the preStop hook hit its deadline). Two kinds of
    loss are counted apart, not as violations: *undrained* keys, of tasks that were
    already running on a worker when a retirement that does not wait for them started
    (upstream ``retire_workers`` never waits, dask/distributed#8202; amm_core's with
    ``drain=False``): they may finish after the worker is done and go with it, the
    wasted work such a retirement accepts; and P2P outputs restarted because upstream
    retired a worker of a running shuffle (upstream ignores P2P's veto when given
    names). A key that had a copy on a worker killed outright may be lost when the
    next holder goes too, even a leaving one whose retirement was done (a crash of the
    only holder in service, then the planned deletion): counted apart as well.
    A key lost to one of these causes, or to a forced removal, is being
    recomputed: if it leaves memory again through a worker's message (distributed's
    own race: a replica a worker fetched from the dying worker is called redundant
    while the key is recomputed, and dropped after the scheduler took it as the
    result), that is counted apart too, unless an AMM drop did it. Actors cannot
    move: they are left out.
(b) **no worker stuck** ``closing_gracefully`` whose retirement ended and whose pod is
    not going. Checked at the end of each sequence, after a wind-down that releases
    what blocks retirements (events set, actors released, pauses lifted), lets the
    callers act as they would (the operator deletes done workers, hooks return and
    their pods get SIGTERM, dask-kubernetes deletes what ``retire_workers`` returned)
    and waits, with a deadline, for every worker to be either gone or back in service.
    A worker still closing_gracefully then is stuck, whether its retirement ended or
    will never end (with every blocker released, it had its chance).
(c) **records bounded**: ``len(plugin.retirement.records) <=
    amm_core.retirement.MAX_RECORDS`` (500 when the constant does not exist).

The world is modelled as dask-kubernetes runs it: a Deployment per worker, named as
the worker, with one pod (a host IP of its own, 127.x.y.z) running one worker
process. The callers are played as they behave:

- the **preStop hook** is amm_core.prestop's own ``retire()`` coroutine, run in this
  event loop; when it returns the kubelet closes the pod's process (its SIGTERM) and
  the pod is gone; the Deployment then either starts its next pod (a node drain) or
  was deleted with it (a scale-down from outside);
- the **operator** calls ``amm_core_retire(keep_out=True)``, ``_cancel_`` and
  ``_forget_retirement`` through ``Scheduler.handlers``; on a pass it deletes the
  Deployment of each worker whose record is ``done`` (and of each name the scheduler
  answered "unknown": a pending pod), forgets ended records, and replaces the workers
  RetirePaused reports as retired;
- **dask-kubernetes' path** is upstream ``Scheduler.retire_workers`` (all four
  ``close_workers``/``remove`` variants) run as a task; the workers it returns have
  their Deployments deleted at once (a restart in between is dask-kubernetes#855,
  outside what amm_core can guard, so it is not played); a worker is not given to a
  second call while one is retiring it (the second one's abort would "restore" the
  first one's closing_gracefully: upstream's own stuck worker, not played either);
- the **AMM** is the scheduler's own extension, configured through the plugin's
  ``amm_core_apply`` with a random subset of every amm_core policy
  (``amm_core.BUILTIN_POLICIES``) and upstream ``ReduceReplicas``; it is "running"
  with an interval of an hour, so that upstream ``retire_workers`` uses it and every
  cycle happens when a step (or the wind-down) calls ``run_once()``;
- a worker's **memory monitor** pausing or unpausing it is played by setting the
  worker's status as the monitor does (in-process workers share one process, whose
  memory cannot pause one of them; their own pause threshold is off);
- **crashes**: a worker closed without any retirement; a container restarting under
  the same name on the same host.

A sequence is a list of step kinds drawn from the seed up front; each step resolves
its targets from the current state with a generator seeded by (seed, step number),
so a sequence replays the same way as far as timing lets it. Between steps the event
loop runs a few milliseconds, so that hooks, retirements and comms interleave with
them. A failing sequence is reported with its seed, the steps as they resolved, what
happened in the background between them, and a replay command.

One cluster serves many sequences (starting one costs more than a sequence); it is
rebuilt after a sequence that broke an invariant or failed in the driver, and every
``per_cluster`` sequences, alternating work stealing on and off (without stealing a
``closing_gracefully`` worker's queued tasks never move by themselves: issue case 4).
Between sequences the operator forgets its own records only: records left by hooks
stay, as they do on a real scheduler (issue case 3).

Timing knobs changed while sequences run, so that 200 sequences fit in the suite's
budget; they change how soon things happen, not what may happen:
amm_core.prestop's ``POLL_INTERVAL`` (the hook's polling period) is 20 ms, so that a
hook returns as soon as its record says so; amm_core.retirement's ``COPY_TIMEOUT`` is
1 s, so that a copy asked of a worker that then left (or started leaving) is asked
again within a second, not ten: with several hooks started in one step, the first
one's copies often go to a worker whose own hook comes next, and with ten seconds a
sequence's wind-down would mostly wait for that. Nothing else of amm_core or
distributed is patched.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import itertools
import logging
import random
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import dask
from distributed import Client, Event, Scheduler, Worker, get_worker, secede
from distributed.client import Future, futures_of
from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin

import amm_core
from amm_core import prestop
from amm_core import retirement as retirement_module
from amm_core.plugin import PLUGIN_NAME, MemoryPolicyPlugin

logger = logging.getLogger(__name__)

KiB = 2**10
AMM = "distributed.scheduler.active-memory-manager"

#: Settings of every cluster: workers never spill, pause or get killed by their own
#: memory monitor (the driver pauses them itself); the main AMM stopped until the
#: first apply; no policy from dask config.
CLUSTER_CONFIG = {
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
    "distributed.worker.memory.terminate": False,
    f"{AMM}.start": False,
    f"{AMM}.measure": "managed",
    f"{AMM}.policies": [],
}
#: Every worker's memory limit: in-process workers report this process's memory as
#: theirs; 4 GB leaves room for everything the sequences move
MEMORY_LIMIT = "4GB"
#: Workers in service at the start of a sequence
WORKERS = (4, 6)
#: Steps per sequence
STEPS = (5, 10)
#: Seconds the wind-down waits for every retirement to end and every worker to be
#: gone or back in service: longer than a hook's longest deadline (NORMAL_LIMIT +
#: prestop.ENGINE_SLACK) and than COPY_TIMEOUT below (a copy asked of a recipient
#: that left is asked again only after it), so that what remains is stuck
SETTLE_TIMEOUT = 5.0
#: Retirement limits (seconds) of the operator's and the hooks' retirements: normal
#: (far above the second or so a retirement takes here; a blocked one costs its
#: limit), and short (the limit passes while keys still move)
NORMAL_LIMIT = (1.5, 3.0)
SHORT_LIMIT = (0.2, 0.8)
#: Records the engine may keep when amm_core.retirement has no MAX_RECORDS (yet)
DEFAULT_MAX_RECORDS = 500
#: The hook's polling period and the engine's copy timeout while sequences run (see
#: the module docstring)
HOOK_POLL_INTERVAL = 0.02
COPY_TIMEOUT = 1.0
#: Seconds the settled condition must hold before the end-of-sequence checks: status
#: messages in flight (a worker echoing a status the scheduler sent it) land first
QUIET = 0.06
#: Sequences per cluster before it is rebuilt
PER_CLUSTER = 50
#: Seconds a worker's close may take before the driver goes on without it
CLOSE_TIMEOUT = 10.0
#: Seconds one sequence may take before it counts as hung (a failure, reported with
#: its steps so far); the longest passing ones take about 15 s
SEQUENCE_TIMEOUT = 120.0
#: Seconds a cluster may take to start or to close
CLUSTER_TIMEOUT = 60.0

#: The AMM is "running" with this interval: cycles come from run_once() only
AMM_INTERVAL = 3600
#: Arguments that make each policy act at this scale (kilobytes per worker, 4 GB
#: limits); policies not listed take their defaults
POLICY_ARGS: dict[str, dict[str, Any]] = {
    "PressureReduceReplicas": {"pressure": 0.0},
    "Rebalance": {"threshold": 0.0002, "cooldown": 0},
    "RetirePaused": {"after": 0},
}
UPSTREAM_REDUCE = "distributed.active_memory_manager.ReduceReplicas"
#: Stimulus id of the driver's upstream retire_workers calls (and of the removals
#: they make with remove=True)
UPSTREAM_STIMULUS = "retire-workers-interleavings"
#: The owner amm_core_apply is called with (as the operator's MemoryPolicy)
OWNER = {"uid": "interleavings", "namespace": "test", "name": "interleavings", "generation": 1}

#: How often each step kind is drawn
WEIGHTS: dict[str, int] = {
    "scatter": 12,
    "chain": 12,
    "seceded": 5,
    "release_seceded": 4,
    "actor": 3,
    "release_actor": 3,
    "p2p": 4,
    "release": 5,
    "amm_cycle": 10,
    "engine_cycle": 3,
    "pause": 4,
    "unpause": 3,
    "upstream_retire": 6,
    "operator_retire": 9,
    "operator_cancel": 4,
    "operator_forget": 3,
    "operator_pass": 8,
    "drain": 8,
    "kill": 3,
    "restart": 4,
    "reschedule": 3,
}


def p2p_note() -> str:
    """Which P2P the sequences run."""
    try:
        importlib.import_module("dask.dataframe")
    except ImportError as e:
        return (
            f"P2P: a rechunk of a dask array (dask.dataframe cannot be imported here: {e}; "
            "its P2P shuffle is left out)"
        )
    return "P2P: a rechunk of a dask array (dask.dataframe's P2P shuffle is not played)"


def p2p_available() -> str:
    """"" when a P2P rechunk can run here, else why not. A P2P rechunk of a dask array
    goes through the same shuffle scheduler plugin as a dataframe shuffle: the same
    barrier, output pinning over ``scheduler.workers``, veto on downscaling
    (``valid_workers_downscaling``) and restart when a worker of it leaves."""
    try:
        importlib.import_module("dask.array")
        importlib.import_module("distributed.shuffle")
    except ImportError as e:
        return f"no P2P: {e}"
    return ""


# --- functions run on the workers (found there by reference) ---------------------


def blob(i: int, size: int) -> bytes:
    return (i % 2**32).to_bytes(4, "little") * (size // 4)


def link(*deps: Any, i: int, size: int, delay: float) -> bytes:
    """A link of a chain: depends on ``deps``, sleeps ``delay``, returns ``size`` bytes."""
    time.sleep(delay)
    return blob(i, size)


def seceding(event_name: str) -> int:
    """Secede (as worker_client() does) and wait for an Event; give up when the worker
    closes (its process is gone) or after a minute, so no thread waits forever."""
    secede()
    worker = get_worker()
    ev = Event(event_name)
    for _ in range(120):
        try:
            if ev.wait(timeout=0.5):
                return 1
        except Exception:
            return 0
        if worker.status not in (Status.running, Status.paused, Status.closing_gracefully):
            return 0
    return 0


class Box:
    """An actor."""

    n = 0


# --- what the scheduler saw ------------------------------------------------------


@dataclass
class Removal:
    """A worker left the scheduler (its remove-worker event)."""

    address: str
    stimulus_id: str
    lost: set[Any]


class Observer(SchedulerPlugin):
    """The scheduler's own account of removals and of keys leaving memory."""

    name = "interleavings-observer"

    def __init__(self) -> None:
        self.removals: list[Removal] = []
        #: (key, new state, stimulus_id) of every transition out of memory
        self.left_memory: list[tuple[Any, str, str]] = []
        #: Called with a worker's address when the scheduler sets it closing_gracefully
        self.on_closing_gracefully: Callable[[str], None] | None = None

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start == "memory" and finish != "memory":
            self.left_memory.append((key, finish, str(kwargs.get("stimulus_id", ""))))

    def log_event(self, topic: Any, msg: Any) -> None:
        if (
            isinstance(msg, dict)
            and msg.get("action") == "worker-status-change"
            and msg.get("status") == Status.closing_gracefully.name
            and self.on_closing_gracefully is not None
        ):
            self.on_closing_gracefully(str(topic))
        if topic == "all" and isinstance(msg, dict) and msg.get("action") == "remove-worker":
            lost = set(msg.get("lost-computed-tasks") or ()) | set(
                msg.get("lost-scattered-tasks") or ()
            )
            self.removals.append(
                Removal(str(msg.get("worker")), str(msg.get("stimulus_id", "")), lost)
            )

    def clear(self) -> None:
        self.removals.clear()
        self.left_memory.clear()


# --- the cluster: scheduler, plugin, worker pods ---------------------------------


@dataclass(eq=False)
class Pod:
    """One pod of a worker Deployment: a host of its own, one worker process at a time."""

    name: str
    host: str
    worker: Worker | None = None
    #: Why the pod is being deleted ("" while it stays)
    going: str = ""
    #: The pod was deleted: its process is gone for good
    deleted: bool = False
    #: A preStop hook runs for it
    hooked: bool = False

    @property
    def address(self) -> str | None:
        return self.worker.address if self.worker is not None else None


class Cluster:
    """A Scheduler with the amm_core plugin and an Observer, an asynchronous Client,
    and worker pods, one Deployment (by name) each."""

    def __init__(self, work_stealing: bool = True):
        self.work_stealing = work_stealing
        self.observer = Observer()
        #: The current pod of every Deployment, by name (deleted Deployments are gone)
        self.pods: dict[str, Pod] = {}
        #: Addresses whose removal may lose keys: killed outright, or their pod's grace
        #: period ran out; keys that had a copy on such a worker when it was closed
        self.forced: set[str] = set()
        self.crashed_copies: set[Any] = set()
        #: Why each closed worker was closed, by address
        self.why_closed: dict[str, str] = {}
        #: The name of every worker process ever started, by address
        self.names: dict[str, str] = {}
        #: Every worker process ever started
        self.processes: list[Worker] = []
        #: Keys running on a worker when a retirement that does not drain started
        #: (upstream retire_workers, amm_core's with drain=False), by address
        self.undrained: dict[str, set[Any]] = {}
        #: Workers such a retirement was asked for and has not set closing_gracefully yet
        self.undrained_pending: set[str] = set()
        self.observer.on_closing_gracefully = self.retirement_started
        #: Addresses upstream retire_workers retired, and is retiring now
        self.upstream_retired: set[str] = set()
        self.upstream_in_progress: set[str] = set()
        self._names = itertools.count()
        self._hosts = itertools.count(1)
        self._config: Any = None

    async def __aenter__(self) -> Cluster:
        self._config = dask.config.set(
            {**CLUSTER_CONFIG, "distributed.scheduler.work-stealing": self.work_stealing}
        )
        self._config.__enter__()
        try:
            self.s = await Scheduler(dashboard_address=":0", port=0, plugins=[self.observer])
            self.client = await Client(self.s.address, asynchronous=True)
            await self.client.register_plugin(MemoryPolicyPlugin())
            self.plugin = self.s.plugins[PLUGIN_NAME]
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            for pod in list(self.pods.values()):
                await self.stop_process(pod, "the cluster closes", forced=True, wait=False)
            # a worker that closed itself (the scheduler's close op, a heartbeat
            # answered "missing") and hangs there is no pod's any more: killed too, or
            # the event loop's shutdown waits for it for ever
            for w in self.processes:
                if not w._event_finished.is_set():
                    try:
                        await asyncio.wait_for(w.finished(), CLOSE_TIMEOUT)
                    except asyncio.TimeoutError:
                        logger.warning("%s still closing as the cluster closes; killing it", w.address)
                        await kill_in_process(w)
            if getattr(self, "client", None) is not None:
                await self.client.close()
            if getattr(self, "s", None) is not None:
                await self.s.close()
        finally:
            self._config.__exit__(None, None, None)

    def retirement_started(self, address: str) -> None:
        """The scheduler sets ``address`` closing_gracefully: if a retirement that does
        not drain was asked for it, the tasks running there now are undrained."""
        if address in self.undrained_pending:
            self.undrained_pending.discard(address)
            self.snapshot_undrained(address)

    def snapshot_undrained(self, address: str) -> None:
        ws = self.s.workers.get(address)
        if ws is not None:
            self.undrained.setdefault(address, set()).update(ts.key for ts in ws.processing)

    # --- pods -----------------------------------------------------------------

    def new_host(self) -> str:
        n = next(self._hosts)
        return f"127.1.{n // 250}.{n % 250 + 2}"

    async def start_process(self, pod: Pod) -> Worker:
        """Start the pod's worker process once the name is free at the scheduler: a
        process of the same name still closing (from the last sequence's wind-down) is
        gone within CLOSE_TIMEOUT, killed if need be (else "name taken")."""
        await poll(lambda: not self.registered(pod.name), CLOSE_TIMEOUT + 5)
        w = await Worker(
            self.s.address, name=pod.name, nthreads=1, memory_limit=MEMORY_LIMIT, host=pod.host
        )
        pod.worker = w
        self.processes.append(w)
        self.names[w.address] = pod.name
        if pod.deleted:
            # The pod was deleted while the process started: it gets the SIGTERM too
            await self.stop_process(pod, "its pod was deleted as it started", forced=False)
            return w
        # Registered, and past init (the worker says running, or is kept out)
        await poll(
            lambda: w.address in self.s.workers
            and self.s.workers[w.address].status != Status.init,
            5,
        )
        return w

    async def new_deployment(self) -> Pod:
        pod = Pod(f"w{next(self._names)}", self.new_host())
        self.pods[pod.name] = pod
        await self.start_process(pod)
        return pod

    async def next_pod(self, pod: Pod) -> Pod:
        """The Deployment starts a new pod (another host) in place of ``pod``."""
        new = Pod(pod.name, self.new_host())
        self.pods[pod.name] = new
        await self.start_process(new)
        return new

    async def stop_process(self, pod: Pod, why: str, forced: bool, wait: bool = True) -> None:
        """Close the pod's process (a SIGTERM; ``forced``: a kill, or a SIGTERM after the
        grace period ran out) and wait until the scheduler removed it."""
        w, pod.worker = pod.worker, None
        if w is None:
            return
        address = w.address
        self.why_closed[address] = why
        if forced:
            self.killed(address)
        try:
            await asyncio.wait_for(w.close(executor_wait=False, reason=why[:60]), CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            # In one process, a worker closing itself with executor_wait=True (the
            # scheduler's close op, a heartbeat answered "missing") holds distributed's
            # module-global threads_lock while it joins its task threads, and every
            # other worker's close waits for it; and distributed's P2P worker plugin
            # can wait forever in its teardown for a shuffle run closed mid-barrier.
            # A kubelet SIGKILLs such a process at the end of its grace period:
            logger.warning("closing %s took over %gs; killing it", address, CLOSE_TIMEOUT)
            self.killed(address)
            await kill_in_process(w)
        except Exception:
            logger.exception("closing %s", address)
        if wait:
            await poll(lambda: address not in self.s.workers, 5)

    def killed(self, address: str) -> None:
        """The worker at ``address`` dies without a goodbye: what only it held may go."""
        self.forced.add(address)
        ws = self.s.workers.get(address)
        if ws is not None:
            self.crashed_copies.update(ts.key for ts in ws.has_what)

    async def delete_pod(self, pod: Pod, why: str, forced: bool, keep_deployment: bool) -> None:
        pod.deleted = True
        pod.going = pod.going or why
        await self.stop_process(pod, why, forced)
        if not keep_deployment and self.pods.get(pod.name) is pod:
            del self.pods[pod.name]

    # --- what the scheduler knows -----------------------------------------------

    def registered(self, name: str) -> bool:
        return any(str(ws.name) == name for ws in self.s.workers.values())

    def pod_of(self, address: str) -> Pod | None:
        return next((p for p in self.pods.values() if p.address == address), None)

    def live_pods(self) -> list[Pod]:
        """Pods whose process is up and registered, by name."""
        return sorted(
            (p for p in self.pods.values() if p.address in self.s.workers), key=lambda p: p.name
        )

    def in_service(self) -> list[Pod]:
        """Live pods that stay and whose worker is running at the scheduler."""
        return [
            p
            for p in self.live_pods()
            if not p.going and self.s.workers[p.address].status == Status.running
        ]

    def records(self) -> dict[str, Any]:
        return getattr(self.plugin.retirement, "records", {})

    def reports(self) -> dict[str, dict[str, Any]]:
        return {r["worker"]: r for r in self.plugin.retirement.reports()}


async def kill_in_process(w: Worker) -> None:
    """What a SIGKILL does to a worker process, done to an in-process one whose close
    hung: its timers stop, its connections break (the scheduler removes it as it
    removes a dead worker), its background tasks end, and whoever waits for its close
    goes on (else the event loop's shutdown waits for them forever)."""
    for pc in w.periodic_callbacks.values():
        pc.stop()
    w.batched_stream.abort()
    for comm in list(w._comms):
        comm.abort()
    await w.rpc.close()
    try:
        await asyncio.wait_for(w._ongoing_background_tasks.stop(), 2)
    except asyncio.TimeoutError:
        logger.warning("%s: background tasks still running after its kill", w.address)
    w.status = Status.closed
    w._event_finished.set()


async def poll(cond: Callable[[], Any], timeout: float, step: float = 0.01) -> bool:
    """Let the event loop run until ``cond()`` is true or ``timeout`` passed; whether it
    came true."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True


async def handler(s: Scheduler, op: str, **kwargs: Any) -> Any:
    """A scheduler handler, called as a comm would call it (sync or async)."""
    out = s.handlers[op](**kwargs)
    if inspect.isawaitable(out):
        out = await out
    return out


# --- one sequence ----------------------------------------------------------------


@dataclass
class SequenceResult:
    seed: int
    work_stealing: bool
    steps: int = 0
    log: list[str] = field(default_factory=list)
    #: Keys lost against the invariant, and how
    lost: dict[Any, str] = field(default_factory=dict)
    #: Workers stuck closing_gracefully (or retirements that never ended)
    stuck: list[str] = field(default_factory=list)
    #: Records over their bound
    unbounded: list[str] = field(default_factory=list)
    #: amm_core raised (a handler, a policy in a cycle, the hook)
    errors: list[str] = field(default_factory=list)
    #: Keys lost with workers killed outright or after their grace period: allowed
    allowed_lost: int = 0
    #: Keys of tasks a retirement did not wait for, lost with the worker (see the
    #: module docstring), and P2P outputs restarted by upstream retire_workers
    undrained_lost: int = 0
    p2p_restarted: int = 0
    #: Keys being recomputed after a forced loss that left memory again through a
    #: worker's message, keys lost when a leaving worker went after a crash took their
    #: copy in service (see the module docstring)
    recovery_races: int = 0
    crash_then_leave: int = 0
    seconds: float = 0.0
    #: Seconds the wind-down waited for the cluster to settle
    settle_seconds: float = 0.0
    #: Seconds of each phase: prepare, steps, wind-down, clear-up
    phases: dict[str, float] = field(default_factory=dict)
    #: The driver itself failed (a bug here, not a finding)
    driver_error: str = ""
    #: Sequences run on the cluster before this one
    cluster_age: int = 0
    #: What the sequence exercised (hook outcomes, AMM copies and drops, ...)
    seen: Counter[str] = field(default_factory=Counter)

    @property
    def failed(self) -> bool:
        return bool(self.lost or self.stuck or self.unbounded or self.errors or self.driver_error)

    def report(self) -> str:
        lines = [
            f"seed {self.seed} (work stealing {'on' if self.work_stealing else 'off'}, "
            f"sequence #{self.cluster_age + 1} on its cluster, {self.seconds:.1f}s): "
            f"{len(self.lost)} key(s) lost, {len(self.stuck)} stuck, "
            f"{len(self.unbounded)} over bound, {len(self.errors)} error(s)"
        ]
        lines += [f"  LOST {k!r}: {why}" for k, why in list(self.lost.items())[:10]]
        if len(self.lost) > 10:
            lines.append(f"  ... and {len(self.lost) - 10} more")
        lines += [f"  STUCK {s}" for s in self.stuck]
        lines += [f"  UNBOUNDED {s}" for s in self.unbounded]
        lines += [f"  ERROR {s}" for s in self.errors]
        if self.driver_error:
            lines.append(f"  DRIVER ERROR {self.driver_error}")
        lines.append("  steps:")
        lines += [f"    {line}" for line in self.log]
        stealing = "on" if self.work_stealing else "off"
        lines.append(
            f"  replay: python benchmarks/interleavings.py --sequences 1 --seed {self.seed} "
            f"--work-stealing {stealing}"
        )
        if self.cluster_age:
            lines.append(
                "  (or with the cluster's history: python benchmarks/interleavings.py "
                f"--seed {self.seed - self.cluster_age} --sequences {self.cluster_age + 1} "
                f"--work-stealing {stealing})"
            )
        return "\n".join(lines)


class Sequence:
    """The state of one sequence: what the client holds, what runs in the background,
    what the operator is doing; and the invariant checks."""

    def __init__(self, cluster: Cluster, seed: int, result: SequenceResult):
        self.cluster = cluster
        self.s = cluster.s
        self.c = cluster.client
        self.seed = seed
        self.result = result
        #: Futures the client holds, by key (data that must not be lost)
        self.held: dict[Any, Future] = {}
        #: Keys of scattered data among them (what Replicate may be asked to copy)
        self.scattered: list[Any] = []
        #: Names of the Events seceded tasks wait on, not set yet
        self.events: list[str] = []
        #: Actor futures by key; every actor key ever made (left out of loss checks)
        self.actors: dict[Any, Future] = {}
        self.actor_keys: set[Any] = set()
        #: Background tasks: preStop hooks (pod name, task), upstream retire_workers;
        #: names of the pods whose hook returned (their SIGTERM may still run)
        self.hooks: list[tuple[str, asyncio.Task]] = []
        self.hooks_returned: set[str] = set()
        #: Tasks (by name) whose upstream retire_workers call returned; their pods may
        #: still be closing
        self.upstream_returned: set[str] = set()
        self.upstream: list[asyncio.Task] = []
        #: Names the operator retired (keep_out=True) and still follows; names the
        #: scheduler answered "unknown" for (pending pods whose Deployment it deletes)
        self.op_names: set[str] = set()
        self.op_unknown: set[str] = set()
        #: Keys lost to an allowed cause (a forced removal, an undrained task), being
        #: recomputed
        self.recovering: set[Any] = set()
        self.step_no = 0
        self._removals_seen = 0
        self._left_seen = 0
        self._counter = itertools.count()

    def note(self, line: str) -> None:
        """A line in the sequence's log ("  ·" marks what happened in the background)."""
        self.result.log.append(line)

    def error(self, what: str, e: BaseException) -> None:
        """amm_core raised: a finding."""
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-3))
        self.result.errors.append(f"step {self.step_no} {what}: {type(e).__name__}: {e}\n{tb}")
        self.note(f"  · ERROR in {what}: {type(e).__name__}: {e}")

    def unique(self) -> int:
        return self.seed * 1000 + next(self._counter)

    def hold(self, futures: Iterable[Future], scattered: bool = False) -> None:
        for f in futures:
            self.held[f.key] = f
            if scattered:
                self.scattered.append(f.key)

    def release(self, key: Any) -> None:
        f = self.held.pop(key, None)
        if f is not None:
            f.release()

    # --- invariants -------------------------------------------------------------

    def check_losses(self) -> None:
        """(a): the scheduler's removals and transitions since the last check."""
        cluster = self.cluster
        obs = cluster.observer
        new_removals = obs.removals[self._removals_seen :]
        self._removals_seen = len(obs.removals)
        by_stimulus = {r.stimulus_id: r for r in obs.removals}
        for r in new_removals:
            lost = r.lost - self.actor_keys
            if not lost:
                continue
            if r.address in cluster.forced:
                self.result.allowed_lost += len(lost)
                self.recovering |= lost
                continue
            undrained = lost & cluster.undrained.get(r.address, set())
            self.result.undrained_lost += len(undrained)
            crashed = (lost - undrained) & cluster.crashed_copies
            self.result.crash_then_leave += len(crashed)
            self.recovering |= undrained | crashed
            for key in lost - undrained - crashed:
                self.result.lost[key] = (
                    f"lost when {self.describe(r.address)} left "
                    f"(stimulus {r.stimulus_id!r})"
                )
        new_left = obs.left_memory[self._left_seen :]
        self._left_seen = len(obs.left_memory)
        for key, finish, stimulus in new_left:
            if key not in self.held or key in self.actor_keys or key in self.result.lost:
                continue
            r = by_stimulus.get(stimulus)
            if r is not None and key in r.lost:
                continue  # classified with its removal
            if r is not None and r.address in cluster.forced:
                self.result.allowed_lost += 1
                self.recovering.add(key)
                continue
            if r is None and key in self.recovering and not stimulus.startswith(
                "active_memory_manager"
            ):
                self.result.recovery_races += 1
                continue
            if r is not None and (
                r.address in cluster.upstream_retired
                or r.stimulus_id.startswith(UPSTREAM_STIMULUS)
            ):
                self.result.p2p_restarted += 1  # a P2P restart
                continue
            cause = f"removal of {self.describe(r.address)}" if r is not None else stimulus
            self.result.lost[key] = f"went memory -> {finish} while held ({cause})"

    def check_records(self) -> None:
        """(c)"""
        bound = getattr(retirement_module, "MAX_RECORDS", DEFAULT_MAX_RECORDS)
        n = len(self.cluster.records())
        if n > bound and not self.result.unbounded:
            self.result.unbounded.append(f"step {self.step_no}: {n} records > {bound}")

    def describe(self, address: str | None) -> str:
        """A worker as the log names it: name, address, why it was closed."""
        if address is None:
            return "?"
        name = self.cluster.names.get(address, "?")
        why = self.cluster.why_closed.get(address)
        return f"{name} ({address}{'; ' + why if why else ''})"

    # --- helpers for steps --------------------------------------------------------

    def pick(self, rng: random.Random, pods: list[Pod]) -> Pod | None:
        return rng.choice(pods) if pods else None

    def worker_status(self, pod: Pod) -> str:
        ws = self.s.workers.get(pod.address or "")
        return ws.status.name if ws is not None else "gone"


# --- the steps -------------------------------------------------------------------

Step = Callable[[Sequence, random.Random], Awaitable[str]]
STEP_FUNCTIONS: dict[str, Step] = {}


def step(fn: Step) -> Step:
    STEP_FUNCTIONS[fn.__name__.removeprefix("step_")] = fn
    return fn


@step
async def step_scatter(q: Sequence, rng: random.Random) -> str:
    pod = q.pick(rng, q.cluster.in_service())
    if pod is None:
        return "scatter: no worker in service"
    n, size = rng.randint(1, 3), rng.choice([64, 256, 512]) * KiB
    futs = await q.c.scatter(
        [blob(q.unique(), size) for _ in range(n)], workers=[pod.address], hash=False
    )
    q.hold(futs, scattered=True)
    return f"scatter {n} x {size // KiB} KiB to {pod.name}"


@step
async def step_chain(q: Sequence, rng: random.Random) -> str:
    layers, made, prev = rng.randint(2, 4), [], []
    for _ in range(layers):
        cur = []
        for _ in range(rng.randint(1, 2)):
            deps = rng.sample(prev, k=min(len(prev), rng.randint(1, 2))) if prev else []
            cur.append(
                q.c.submit(
                    link, *deps, i=q.unique(), size=64 * KiB,
                    delay=rng.choice([0, 0.005, 0.02]), pure=False,
                )
            )
        made += cur
        prev = cur
    q.hold(made)
    return f"chain of {len(made)} task(s) in {layers} layers"


@step
async def step_seceded(q: Sequence, rng: random.Random) -> str:
    pod = q.pick(rng, q.cluster.in_service())
    name = f"interleavings-{q.unique()}"
    q.events.append(name)
    kwargs: dict[str, Any] = {}
    if pod is not None:
        kwargs = {"workers": [pod.address], "allow_other_workers": True}
    q.hold([q.c.submit(seceding, name, pure=False, **kwargs)])
    return f"seceded task waiting on {name}" + (f" on {pod.name}" if pod else "")


@step
async def step_release_seceded(q: Sequence, rng: random.Random) -> str:
    if not q.events:
        return "release seceded: none waiting"
    name = q.events.pop(rng.randrange(len(q.events)))
    await Event(name, client=q.c).set()
    return f"set {name}"


@step
async def step_actor(q: Sequence, rng: random.Random) -> str:
    pod = q.pick(rng, q.cluster.in_service())
    if pod is None:
        return "actor: no worker in service"
    fut = q.c.submit(Box, actor=True, workers=[pod.address], allow_other_workers=True)
    q.actors[fut.key] = fut
    q.actor_keys.add(fut.key)
    return f"actor on {pod.name}"


@step
async def step_release_actor(q: Sequence, rng: random.Random) -> str:
    if not q.actors:
        return "release actor: none"
    key = rng.choice(sorted(q.actors, key=str))
    q.actors.pop(key).release()
    return "released an actor"


@step
async def step_p2p(q: Sequence, rng: random.Random) -> str:
    why_not = p2p_available()
    if why_not:
        return why_not
    import dask.array as da

    x = da.random.default_rng(q.unique()).random((24, 24), chunks=(6, 24))
    y = q.c.persist(x.rechunk((24, 6), method="p2p"))
    q.hold(futures_of(y))
    return "P2P rechunk of 4 chunks"


@step
async def step_release(q: Sequence, rng: random.Random) -> str:
    keys = sorted(q.held, key=str)
    if not keys:
        return "release: nothing held"
    chosen = rng.sample(keys, k=min(len(keys), rng.randint(1, 3)))
    for key in chosen:
        q.release(key)
    return f"released {len(chosen)} future(s)"


def policy_names() -> list[str]:
    return [*amm_core.BUILTIN_POLICIES, UPSTREAM_REDUCE]


async def apply_policies(q: Sequence, names: list[str]) -> None:
    config = {
        "start": True,
        "interval": AMM_INTERVAL,
        "measure": "managed",
        "policies": [{"class": n, **POLICY_ARGS.get(n, {})} for n in names],
    }
    await handler(q.s, "amm_core_apply", config=config, owner=OWNER)


@step
async def step_amm_cycle(q: Sequence, rng: random.Random) -> str:
    names = rng.sample(policy_names(), k=rng.randint(1, 3))
    try:
        await apply_policies(q, names)
    except Exception as e:
        q.error("amm_core_apply", e)
        return f"AMM config {names} refused"
    wanted = ""
    if "Replicate" in names and q.scattered:
        # Imported here (as the other amm_core helpers the steps use): a rename under
        # way in amm_core breaks one step kind, not the whole module
        from amm_core.replicate import register_wanted

        keys = rng.sample(q.scattered, k=min(2, len(q.scattered)))
        n = rng.choice([2, "all"])
        register_wanted(q.s, keys=[k for k in keys if k in q.held], n=n)
        wanted = f", {len(keys)} key(s) wanted x{n}"
    main_cycle(q)
    return f"AMM cycle of {[short_name(n) for n in names]}{wanted}"


def short_name(policy: str) -> str:
    return "ReduceReplicas(upstream)" if policy == UPSTREAM_REDUCE else policy


def engine_cycle(q: Sequence) -> None:
    try:
        q.cluster.plugin.retirement.cycle.run_once()
    except Exception as e:
        q.error("the retirement engine's cycle", e)


def main_cycle(q: Sequence) -> None:
    try:
        q.s.extensions["amm"].run_once()
    except Exception as e:
        q.error("an AMM cycle", e)


@step
async def step_engine_cycle(q: Sequence, rng: random.Random) -> str:
    engine_cycle(q)
    return "retirement engine cycle"


@step
async def step_pause(q: Sequence, rng: random.Random) -> str:
    # The memory monitor pauses only a running worker
    pods = [p for p in q.cluster.live_pods() if p.worker.status == Status.running]
    pod = q.pick(rng, pods)
    if pod is None:
        return "pause: no running worker"
    pod.worker.status = Status.paused
    return f"{pod.name} pauses"


@step
async def step_unpause(q: Sequence, rng: random.Random) -> str:
    pods = [p for p in q.cluster.live_pods() if p.worker.status == Status.paused]
    pod = q.pick(rng, pods)
    if pod is None:
        return "unpause: no paused worker"
    pod.worker.status = Status.running
    return f"{pod.name} unpauses"


def undrained(q: Sequence, pod: Pod) -> None:
    """A retirement that does not wait for running tasks starts on ``pod``: the keys
    those tasks make may go with the worker (see the module docstring)."""
    if pod.address is not None:
        q.cluster.snapshot_undrained(pod.address)
        q.cluster.undrained_pending.add(pod.address)


@step
async def step_upstream_retire(q: Sequence, rng: random.Random) -> str:
    busy = q.cluster.upstream_in_progress
    pods = [p for p in q.cluster.live_pods() if not p.deleted and p.address not in busy]
    if not pods:
        return "upstream retire_workers: no worker"
    targets = rng.sample(pods, k=min(len(pods), rng.randint(1, 2)))
    close, remove = rng.choice([(False, False), (True, False), (False, True), (True, True)])
    for pod in targets:
        undrained(q, pod)
    n = q.step_no
    names = [p.name for p in targets]
    q.upstream.append(
        asyncio.create_task(upstream_retire(q, targets, close, remove, n), name=f"upstream-{n}")
    )
    return f"upstream retire_workers({names}, close_workers={close}, remove={remove})"


async def upstream_retire(
    q: Sequence, targets: list[Pod], close: bool, remove: bool, n: int
) -> None:
    """Upstream retire_workers as dask-kubernetes calls it; the Deployments of the
    workers it returns are deleted at once."""
    addresses = [p.address for p in targets if p.address]
    q.cluster.upstream_in_progress.update(addresses)
    try:
        retired = await q.s.retire_workers(
            workers=addresses, close_workers=close, remove=remove,
            stimulus_id=f"{UPSTREAM_STIMULUS}-{q.seed}-{n}",
        )
    except Exception as e:
        q.note(f"  · upstream retire_workers of step {n} raised {type(e).__name__}: {e}")
        return
    finally:
        q.cluster.upstream_in_progress.difference_update(addresses)
    q.upstream_returned.add(f"upstream-{n}")
    q.cluster.upstream_retired.update(retired)
    q.result.seen["upstream retired"] += len(retired)
    q.result.seen["upstream not retired"] += len(addresses) - len(retired)
    q.note(
        f"  · upstream retire_workers of step {n} returned "
        f"{sorted(q.describe(a) for a in retired)}"
    )
    for address in retired:
        pod = next((p for p in targets if p.address == address), None)
        if pod is not None and not pod.deleted:
            await q.cluster.delete_pod(
                pod, "dask-kubernetes deleted it after retire_workers", forced=False,
                keep_deployment=False,
            )


@step
async def step_operator_retire(q: Sequence, rng: random.Random) -> str:
    live = [p for p in q.cluster.live_pods() if not p.deleted]
    down = [p for p in q.cluster.pods.values() if p.worker is None and not p.deleted]
    if down and rng.random() < 0.15:
        names = [rng.choice(sorted(down, key=lambda p: p.name)).name]  # a pending pod
    elif live:
        names = [p.name for p in rng.sample(live, k=min(len(live), rng.randint(1, 2)))]
    else:
        return "operator retire: no worker"
    short = rng.random() < 0.25
    limit = round(rng.uniform(*(SHORT_LIMIT if short else NORMAL_LIMIT)), 2)
    drain = rng.random() < 0.8
    for name in names if not drain else ():
        if name in q.cluster.pods and name not in q.cluster.records():
            undrained(q, q.cluster.pods[name])
    try:
        reply = await handler(
            q.s, "amm_core_retire", workers=names, limit=limit, drain=drain,
            reason="operator scale-down", keep_out=True,
        )
    except Exception as e:
        q.error("amm_core_retire (operator)", e)
        return f"operator retire {names}: raised"
    for name in names:  # the handler set the statuses it sets
        pod = q.cluster.pods.get(name)
        if pod is not None and pod.address is not None and not pod.hooked:
            q.cluster.undrained_pending.discard(pod.address)
    unknown = list(reply.get("unknown") or ())
    q.op_unknown.update(unknown)
    q.op_names.update(n for n in names if n not in unknown)
    states = {r["worker"]: r.get("state") for r in reply.get("retirements") or ()}
    return (
        f"operator retire {names} limit={limit}s drain={drain} -> {states}"
        + (f", unknown {unknown}" if unknown else "")
    )


@step
async def step_operator_cancel(q: Sequence, rng: random.Random) -> str:
    if not q.op_names:
        return "operator cancel: nothing retiring"
    name = rng.choice(sorted(q.op_names))
    try:
        reply = await handler(q.s, "amm_core_cancel_retirement", workers=[name])
    except Exception as e:
        q.error("amm_core_cancel_retirement", e)
        return f"operator cancel {name}: raised"
    if name in (reply.get("cancelled") or ()):
        q.op_names.discard(name)
        return f"operator cancel {name}: cancelled"
    return f"operator cancel {name}: kept {reply.get('kept', '')}"


@step
async def step_operator_forget(q: Sequence, rng: random.Random) -> str:
    names = sorted(set(q.cluster.records()) | q.op_names | q.op_unknown)
    if not names:
        return "operator forget: no record"
    name = rng.choice(names)
    return await forget(q, name)


async def forget(q: Sequence, name: str) -> str:
    try:
        reply = await handler(q.s, "amm_core_forget_retirement", workers=[name])
    except Exception as e:
        q.error("amm_core_forget_retirement", e)
        return f"forget {name}: raised"
    if name in (reply.get("forgotten") or ()):
        q.op_names.discard(name)
        q.op_unknown.discard(name)
        return f"forget {name}: forgotten"
    return f"forget {name}: kept"


@step
async def step_operator_pass(q: Sequence, rng: random.Random) -> str:
    return await operator_pass(q)


async def operator_pass(q: Sequence) -> str:
    """What the operator does when it polls: delete the Deployments of workers whose
    retirement is done (and of names answered "unknown"), forget ended records,
    replace the workers RetirePaused retired."""
    did = []
    cluster = q.cluster
    reports = cluster.reports()
    for name in sorted(q.op_names):
        r = reports.get(name)
        pod = cluster.pods.get(name)
        if r is None:
            q.op_names.discard(name)
            did.append(f"{name}: no record")
        elif r.get("state") == "done" and not r.get("left"):
            if pod is not None:
                await cluster.delete_pod(
                    pod, "the operator deleted it (retirement done)", forced=False,
                    keep_deployment=False,
                )
            did.append(f"{name}: done, deleted; {await forget(q, name)}")
            q.result.seen["operator deleted a done worker"] += 1
        elif r.get("state") == "aborted" or r.get("left"):
            did.append(f"{name}: {r.get('state')}{' left' if r.get('left') else ''}; "
                       f"{await forget(q, name)}")
            q.result.seen[f"operator saw {r.get('state')}"] += 1
            q.op_names.discard(name)
    for name in sorted(q.op_unknown):
        pod = cluster.pods.get(name)
        if pod is not None:
            await cluster.delete_pod(
                pod, "the operator deleted its pending Deployment", forced=False,
                keep_deployment=False,
            )
        did.append(f"{name}: unknown, Deployment deleted; {await forget(q, name)}")
        q.op_unknown.discard(name)
    from amm_core.retire_paused import replacements

    for entry in replacements(q.s):
        pod = cluster.pod_of(entry["address"])
        if entry.get("retired") and pod is not None and not pod.deleted:
            await cluster.delete_pod(
                pod, "the operator replaced it (RetirePaused: retired)", forced=False,
                keep_deployment=True,
            )
            did.append(f"{pod.name}: replaced for RetirePaused")
            q.result.seen["RetirePaused worker replaced"] += 1
    return "operator pass: " + ("; ".join(did) or "nothing to do")


@step
async def step_drain(q: Sequence, rng: random.Random) -> str:
    pods = [p for p in q.cluster.live_pods() if not p.going]
    if not pods:
        return "drain: no pod"
    chosen = rng.sample(pods, k=min(len(pods), rng.choice([1, 2, 2, 3, 3])))
    short = rng.random() < 0.25
    limit = round(rng.uniform(*(SHORT_LIMIT if short else NORMAL_LIMIT)), 2)
    drain = rng.random() < 0.8
    keep = {p.name: rng.random() < 0.5 for p in chosen}
    for pod in chosen:
        if not drain and pod.name not in q.cluster.records():
            undrained(q, pod)
        pod.going = "preStop hook"
        pod.hooked = True
        q.hooks.append(
            (pod.name, asyncio.create_task(hook(q, pod, limit, drain, keep[pod.name])))
        )
    return (
        f"drain: preStop hooks for {[p.name for p in chosen]} limit={limit}s drain={drain} "
        f"(Deployment kept: {keep})"
    )


async def run_prestop(address: str, name: str, limit: float, drain: bool, deadline: float) -> str:
    """amm_core.prestop.retire with the arguments its signature takes."""
    params = inspect.signature(prestop.retire).parameters
    kwargs = {
        "address": address, "name": name, "limit": limit, "drain": drain,
        "deadline": deadline, "connect_timeout": 2.0,
    }
    return await prestop.retire(**{k: v for k, v in kwargs.items() if k in params})


async def hook(q: Sequence, pod: Pod, limit: float, drain: bool, keep_deployment: bool) -> None:
    """A pod deleted with the preStop hook: the hook runs until it returns (its
    deadline as prestop.main computes it, grace = limit + 5 s), then the kubelet sends
    SIGTERM. Returning at the deadline means the grace period ran out: a kill."""
    deadline = time.monotonic() + limit + getattr(prestop, "ENGINE_SLACK", 1.0)
    try:
        outcome = await run_prestop(q.s.address, pod.name, limit, drain, deadline)
    except Exception as e:
        q.error(f"the preStop hook of {pod.name}", e)
        outcome = "raised"
    timed_out = time.monotonic() >= deadline - 0.01
    q.hooks_returned.add(pod.name)
    q.result.seen["hook " + ("timed out" if timed_out else outcome.split(":")[0][:30])] += 1
    q.note(f"  · hook {pod.name} returned{' at its deadline' if timed_out else ''}: {outcome}")
    why = "its preStop hook returned: SIGTERM" + (" after the grace period" if timed_out else "")
    await q.cluster.delete_pod(pod, why, forced=timed_out, keep_deployment=keep_deployment)


@step
async def step_kill(q: Sequence, rng: random.Random) -> str:
    pod = q.pick(rng, q.cluster.live_pods())
    if pod is None:
        return "kill: no worker"
    status = q.worker_status(pod)
    await q.cluster.stop_process(pod, "killed outright", forced=True)
    if pod.going:
        pod.deleted = True  # a pod being deleted does not restart
    return f"kill {pod.name} ({status})"


@step
async def step_restart(q: Sequence, rng: random.Random) -> str:
    """The worker's container restarts in the same pod (same host, same name)."""
    pods = [
        p for p in q.cluster.pods.values()
        if not p.deleted and p.address not in q.cluster.upstream_retired
    ]
    pod = q.pick(rng, sorted(pods, key=lambda p: p.name))
    if pod is None:
        return "restart: no pod"
    was = q.worker_status(pod)
    if pod.worker is not None:
        await q.cluster.stop_process(pod, "its container restarted", forced=True)
    if pod.deleted:
        return f"restart {pod.name}: its pod was deleted meanwhile"
    await q.cluster.start_process(pod)
    return f"restart {pod.name} in its pod ({was} -> {q.worker_status(pod)})"


@step
async def step_reschedule(q: Sequence, rng: random.Random) -> str:
    """A Deployment whose pod was deleted (or is down and staying) starts its next pod
    on another host."""
    pods = [p for p in q.cluster.pods.values() if p.worker is None and (p.deleted or not p.going)]
    pod = q.pick(rng, sorted(pods, key=lambda p: p.name))
    if pod is None:
        return "reschedule: no pod to replace"
    new = await q.cluster.next_pod(pod)
    return f"next pod of {pod.name} on {new.host} ({q.worker_status(new)})"


# --- a sequence from start to end ----------------------------------------------------


def plan(seed: int, steps: tuple[int, int] = STEPS) -> list[str]:
    rng = random.Random(seed)
    kinds = [k for k in WEIGHTS if k in STEP_FUNCTIONS]
    return rng.choices(kinds, [WEIGHTS[k] for k in kinds], k=rng.randint(*steps))


async def prepare(q: Sequence, n: int) -> None:
    """``n`` workers in service: restart down pods, then new Deployments."""
    cluster = q.cluster
    await apply_policies(q, [])
    for pod in sorted(cluster.pods.values(), key=lambda p: p.name):
        if len(cluster.in_service()) >= n:
            break
        if pod.worker is None:
            await (cluster.next_pod(pod) if pod.deleted else cluster.start_process(pod))
    while len(cluster.in_service()) < n:
        await cluster.new_deployment()
    await poll(lambda: len(cluster.in_service()) >= n, 10)


async def let_it_run(rng: random.Random) -> None:
    """Let hooks, retirements and comms move between steps."""
    for _ in range(rng.choice([1, 1, 2, 3])):
        await asyncio.sleep(rng.choice([0, 0.002, 0.005, 0.01]))


async def run_sequence(
    cluster: Cluster, seed: int, steps: tuple[int, int] = STEPS, cluster_age: int = 0
) -> SequenceResult:
    result = SequenceResult(seed, cluster.work_stealing, cluster_age=cluster_age)
    q = Sequence(cluster, seed, result)
    start = time.monotonic()
    try:
        n_workers = random.Random(f"{seed}:workers").randint(*WORKERS)
        copied, dropped = cluster.plugin.replicas_copied, cluster.plugin.replicas_dropped
        await prepare(q, n_workers)
        result.phases["prepare"] = time.monotonic() - start
        cluster.observer.clear()
        q.note(f"start: {[p.name for p in cluster.in_service()]} in service")
        for i, kind in enumerate(plan(seed, steps)):
            q.step_no = i
            rng = random.Random(f"{seed}:{i}")
            try:
                desc = await STEP_FUNCTIONS[kind](q, rng)
            except Exception as e:  # a dask call failing under churn is no finding
                desc = f"{kind}: failed: {type(e).__name__}: {e}"
            q.note(f"{i}: {desc}")
            result.steps += 1
            result.seen[f"step {kind}"] += 1
            await let_it_run(rng)
            q.check_losses()
            q.check_records()
            if result.lost or result.unbounded:
                break
        result.phases["steps"] = time.monotonic() - start - result.phases["prepare"]
        await wind_down(q)
        result.seen["AMM copies enacted"] += cluster.plugin.replicas_copied - copied
        result.seen["AMM drops enacted"] += cluster.plugin.replicas_dropped - dropped
        result.seen["most records"] = max(result.seen["most records"], len(cluster.records()))
    except Exception as e:
        result.driver_error = "".join(traceback.format_exception(e))
    finally:
        result.seconds = time.monotonic() - start
    return result


async def wind_down(q: Sequence) -> None:
    """Release what blocks retirements, let every caller act until every worker is gone
    or back in service; check (a), (b), (c); then clear up for the next sequence."""
    started = time.monotonic()
    q.step_no = -1
    q.note("wind-down: events set, actors released, pauses lifted")
    await release_blockers(q)
    settled = await settle(q)
    q.result.settle_seconds = time.monotonic() - started
    q.check_losses()
    q.check_records()
    find_stuck(q, settled)
    q.result.phases["wind-down"] = time.monotonic() - started
    await clear_up(q)
    q.result.phases["clear-up"] = time.monotonic() - started - q.result.phases["wind-down"]


async def release_blockers(q: Sequence) -> None:
    """The user's work completes: seceded tasks' events set, actors released."""
    for name in q.events:
        await Event(name, client=q.c).set()
    q.events.clear()
    for fut in q.actors.values():
        fut.release()
    q.actors.clear()


def settled(q: Sequence) -> bool:
    """No caller waits any more and no worker is closing_gracefully."""
    return (
        all(t.done() for _, t in q.hooks)
        and all(t.done() for t in q.upstream)
        and not any(ws.status == Status.closing_gracefully for ws in q.s.workers.values())
    )


async def settle(q: Sequence) -> bool:
    """Let the callers act (:func:`callers_act`) until :func:`settled` held for QUIET
    seconds, or SETTLE_TIMEOUT passed; whether it settled."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    quiet_since: float | None = None
    while True:
        await callers_act(q)
        now = time.monotonic()
        if not settled(q):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= QUIET:
            return True
        if now > deadline:
            return False
        await asyncio.sleep(0.02)


async def callers_act(q: Sequence) -> None:
    """One round of the wind-down: memory monitors unpause their workers, an AMM cycle
    and an engine cycle run, the operator makes a pass, and a worker joins if nobody
    is left in service to take the leaving workers' keys. (Hooks and upstream calls
    run on their own, as tasks.)"""
    for pod in q.cluster.live_pods():
        if pod.worker.status == Status.paused:
            pod.worker.status = Status.running
    main_cycle(q)
    engine_cycle(q)
    line = await operator_pass(q)
    if not line.endswith("nothing to do"):
        q.note(f"  · {line}")
    if not q.cluster.in_service():
        await bring_capacity(q)


async def bring_capacity(q: Sequence) -> None:
    """Nobody is left in service to take the leaving workers' keys: Kubernetes restarts
    a crashed container, or a new worker joins (the autoscaler's answer)."""
    cluster = q.cluster
    down = [p for p in cluster.pods.values() if p.worker is None and not p.going]
    if down:
        pod = min(down, key=lambda p: p.name)
        await (cluster.next_pod(pod) if pod.deleted else cluster.start_process(pod))
    else:
        pod = await cluster.new_deployment()
    q.note(f"  · nobody in service: {pod.name} started")
    await poll(lambda: bool(cluster.in_service()), 5)


def policies_on(q: Sequence, address: str) -> list[str]:
    amm = q.s.extensions["amm"]
    return [
        f"{type(p).__name__}({address})"
        for p in amm.policies
        if getattr(p, "address", None) == address
    ]


def holding(q: Sequence, address: str) -> str:
    """What keeps a worker from being done: tasks assigned to it (seceded ones apart),
    keys only it (or other leaving workers) hold, RetirePaused's view of it."""
    try:
        from amm_core.retire_paused import replacements
        from amm_core.retirement import retiring_workers, unsafe_keys

        ws = q.s.workers[address]
        unsafe = unsafe_keys(ws, retiring_workers(q.s))
        replace = [e for e in replacements(q.s) if e.get("address") == address]
    except Exception as e:  # a description only: never fail the driver for it
        return f"(what holds it unknown: {type(e).__name__}: {e})"
    return (
        f"{len(ws.processing)} task(s) assigned ({len(ws.long_running)} seceded), "
        f"{len(unsafe)} unsafe key(s), {len(ws.actors)} actor(s); RetirePaused: "
        f"{replace[0] if replace else 'not retiring it'}"
    )


def status_history(q: Sequence, address: str) -> list[str]:
    """The worker's status changes as the scheduler logged them (status, stimulus)."""
    return [
        f"{msg.get('status')} ({str(msg.get('stimulus_id', ''))[:40]})"
        for _, msg in q.s.get_events(address)
        if isinstance(msg, dict) and msg.get("action") == "worker-status-change"
    ]


def describe_record(r: dict[str, Any] | None) -> str:
    """A retirement report in a line (``blocked``/``leaving`` when the engine has them)."""
    if r is None:
        return "no record"
    return (
        f"record {r.get('state')}"
        + (f" blocked={r['blocked']!r}" if r.get("blocked") else "")
        + (f" leaving={r['leaving']}" if "leaving" in r else "")
        + f" keep_out={r.get('keep_out')} reason={r.get('reason')!r}"
    )


def find_stuck(q: Sequence, did_settle: bool) -> None:
    """(b), after the wind-down: every worker still closing_gracefully, and every
    caller still waiting, with what the engine and the policies say about it."""
    reports = q.cluster.reports()
    for ws in q.s.workers.values():
        if ws.status != Status.closing_gracefully:
            continue
        record = describe_record(reports.get(str(ws.name)))
        pod = q.cluster.pod_of(ws.address)
        q.result.stuck.append(
            f"{ws.name} ({ws.address}) still closing_gracefully {SETTLE_TIMEOUT:g}s into "
            f"the wind-down; {record}; pod going: {pod.going if pod else '?'!r}; "
            f"hook running: {any(n == ws.name and not t.done() for n, t in q.hooks)}; "
            f"worker's own status: {pod.worker.status.name if pod and pod.worker else '?'}; "
            f"AMM policies on it: {policies_on(q, ws.address)}; {holding(q, ws.address)}; "
            f"status changes at the scheduler: {status_history(q, ws.address)}"
        )
    if not did_settle:
        for name, task in q.hooks:
            if task.done():
                continue
            if name in q.hooks_returned:
                # Its SIGTERM (Worker.close) is slow: no retirement is stuck
                q.result.seen["pod still closing after the wind-down"] += 1
                q.note(f"  · the pod of {name} was still closing after the wind-down")
            else:
                q.result.stuck.append(f"the preStop hook of {name} had not returned")
        if any(not t.done() for t in q.upstream):
            if any(not t.done() and t.get_name() not in q.upstream_returned for t in q.upstream):
                q.result.stuck.append("an upstream retire_workers call had not returned")
            else:
                # retire_workers returned; the SIGTERM of a pod it retired is slow
                q.result.seen["pod still closing after the wind-down"] += 1
                q.note("  · a pod upstream retire_workers retired was still closing after the wind-down")


async def clear_up(q: Sequence) -> None:
    """Make the cluster fit for the next sequence: background callers stopped, pods
    still going deleted (forced: what they lose now is no finding), the operator's
    records forgotten, the client's keys released, the AMM emptied."""
    cluster = q.cluster
    tasks = [t for _, t in q.hooks] + q.upstream
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for pod in list(cluster.pods.values()):
        ws = q.s.workers.get(pod.address or "")
        if pod.going or (ws is not None and ws.status == Status.closing_gracefully):
            await cluster.delete_pod(pod, "cleared up after the sequence", forced=True,
                                     keep_deployment=True)
    for ws in list(q.s.workers.values()):  # processes no pod knows (should not happen)
        if ws.status == Status.closing_gracefully:
            q.result.stuck.append(f"{ws.name} ({ws.address}) has no pod")
    for name in sorted(q.op_names | q.op_unknown):
        await forget(q, name)
    for key in list(q.held):
        q.release(key)
    q.scattered.clear()
    cluster.undrained_pending.clear()
    cluster.crashed_copies.clear()
    await poll(lambda: not q.s.tasks, 1)
    await apply_policies(q, [])


# --- many sequences --------------------------------------------------------------


@dataclass
class Summary:
    sequences: int = 0
    steps: int = 0
    lost_keys: int = 0
    stuck_workers: int = 0
    allowed_lost: int = 0
    undrained_lost: int = 0
    p2p_restarted: int = 0
    recovery_races: int = 0
    crash_then_leave: int = 0
    seconds: float = 0.0
    failures: list[SequenceResult] = field(default_factory=list)
    #: Wind-downs that took more than 2 s (seed, seconds): slow, not stuck
    slow_settles: list[tuple[int, float]] = field(default_factory=list)
    #: What the sequences exercised, summed (but "most records": the most)
    seen: Counter[str] = field(default_factory=Counter)
    #: Clusters whose close outlasted CLUSTER_TIMEOUT (the run went on with a new one)
    cluster_close_hangs: int = 0

    def add(self, r: SequenceResult) -> None:
        self.sequences += 1
        self.steps += r.steps
        self.lost_keys += len(r.lost)
        self.stuck_workers += len(r.stuck)
        self.allowed_lost += r.allowed_lost
        most = max(self.seen["most records"], r.seen["most records"])
        self.seen.update(r.seen)
        self.seen["most records"] = most
        self.undrained_lost += r.undrained_lost
        self.p2p_restarted += r.p2p_restarted
        self.recovery_races += r.recovery_races
        self.crash_then_leave += r.crash_then_leave
        if r.failed:
            self.failures.append(r)
        elif r.settle_seconds > 2:
            self.slow_settles.append((r.seed, round(r.settle_seconds, 1)))

    def last_line(self) -> str:
        return (
            f"sequences={self.sequences} steps={self.steps} lost_keys={self.lost_keys} "
            f"stuck_workers={self.stuck_workers}"
        )

    def details(self) -> str:
        kinds = failure_kinds(self.failures)
        return (
            f"{self.sequences} sequences, {self.steps} steps in {self.seconds:.0f}s; "
            f"failing sequences: {len(self.failures)} ({kinds}); keys lost to workers "
            f"killed outright or past their grace period (allowed): {self.allowed_lost}; "
            f"of tasks a retirement did not drain: {self.undrained_lost}; P2P outputs "
            f"restarted by upstream retire_workers: {self.p2p_restarted}; keys being "
            f"recomputed after a forced loss that left memory again: "
            f"{self.recovery_races}; lost when a leaving worker went after a crash took "
            f"their copy in service: {self.crash_then_leave}; passing sequences whose "
            f"wind-down took over 2s (seed, s): {self.slow_settles}; clusters whose close "
            f"hung (the run went on): {self.cluster_close_hangs}"
            + f"; {p2p_available() or p2p_note()}"
            + "\nexercised: "
            + ", ".join(f"{k}: {v}" for k, v in sorted(self.seen.items()))
        )


def failure_kinds(failures: list[SequenceResult]) -> str:
    lost = sum(1 for r in failures if r.lost)
    stuck = sum(1 for r in failures if r.stuck)
    unbounded = sum(1 for r in failures if r.unbounded)
    errors = sum(1 for r in failures if r.errors)
    driver = sum(1 for r in failures if r.driver_error)
    return (
        f"{lost} with lost keys, {stuck} with stuck workers, {unbounded} over the record "
        f"bound, {errors} with amm_core errors, {driver} driver errors"
    )


@contextmanager
def fast_timings() -> Iterator[None]:
    """The timing knobs of the module docstring, put back afterwards (each only if the
    module has it)."""
    knobs = [
        (prestop, "POLL_INTERVAL", HOOK_POLL_INTERVAL),
        (retirement_module, "COPY_TIMEOUT", COPY_TIMEOUT),
    ]
    old = [(m, name, getattr(m, name)) for m, name, _ in knobs if hasattr(m, name)]
    for m, name, value in knobs:
        if hasattr(m, name):
            setattr(m, name, value)
    try:
        yield
    finally:
        for m, name, value in old:
            setattr(m, name, value)


async def run_sequence_or_hang(
    cluster: Cluster, seed: int, steps: tuple[int, int], age: int
) -> SequenceResult:
    """:func:`run_sequence`, or a failed result when it does not end within
    SEQUENCE_TIMEOUT (the cluster is then rebuilt)."""
    try:
        return await asyncio.wait_for(
            run_sequence(cluster, seed, steps, cluster_age=age), SEQUENCE_TIMEOUT
        )
    except TimeoutError:
        result = SequenceResult(seed, cluster.work_stealing, cluster_age=age)
        result.driver_error = f"hung: the sequence did not end within {SEQUENCE_TIMEOUT:g}s"
        return result


async def run_sequences(
    seeds: Iterable[int],
    *,
    steps: tuple[int, int] = STEPS,
    work_stealing: str = "alternate",
    per_cluster: int = PER_CLUSTER,
    max_failures: int | None = None,
    on_result: Callable[[SequenceResult], None] | None = None,
) -> Summary:
    """Run a sequence per seed, reusing a cluster for up to ``per_cluster`` of them and
    rebuilding it after a failing one; stop after ``max_failures`` failing sequences.
    ``work_stealing``: "on", "off", or "alternate" (per cluster)."""
    summary = Summary()
    start = time.monotonic()
    todo = list(seeds)
    clusters = itertools.count()
    with fast_timings():
        while todo:
            n = next(clusters)
            stealing = {"on": True, "off": False}.get(work_stealing, n % 2 == 0)
            cluster = Cluster(work_stealing=stealing)
            # the watchdog covers the cluster's start and close too: a run reports, never hangs
            await asyncio.wait_for(cluster.__aenter__(), CLUSTER_TIMEOUT)
            try:
                for age in range(per_cluster):
                    if not todo:
                        break
                    r = await run_sequence_or_hang(cluster, todo.pop(0), steps, age)
                    summary.add(r)
                    if on_result is not None:
                        on_result(r)
                    if max_failures is not None and len(summary.failures) >= max_failures:
                        todo.clear()
                    if r.failed:
                        break
            finally:
                try:
                    await asyncio.wait_for(cluster.__aexit__(None, None, None), CLUSTER_TIMEOUT)
                except TimeoutError:
                    summary.cluster_close_hangs += 1
    summary.seconds = time.monotonic() - start
    return summary
