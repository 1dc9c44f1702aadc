"""What the amm_core scheduler plugin costs the scheduler's event loop, at production
scale, next to what distributed's own nearest equivalents cost on the same state.

Issue 16's first benchmark. A real ``distributed.Scheduler`` runs in this process;
its state is built through the scheduler's own methods, without worker processes:
``--workers`` (500) workers register through ``Scheduler.add_worker`` over a parked
in-process comm (it takes whatever the scheduler sends and never answers: the
scheduler's messages to workers cost what they cost, and go nowhere), heartbeat once
through ``heartbeat_worker``, and hold ``--keys`` (1M) keys, each on one worker, put
there with ``update_data`` (what a scatter does). The amm_core plugin is then
registered live (the cost of that registration is reported on its own: a plugin
preloaded with the scheduler's image pays nothing there), and the main AMM is
configured, not started, with a typical policy set (README: ``ReduceReplicas``,
``Replicate``, ``Rebalance``, ``RetirePaused``).

Measured (medians over ``--repeat`` repetitions, ours and upstream's interleaved, the
order swapped at every repetition). A cost is the CPU time of the event loop's thread
while the call runs (:data:`cost_clock`): on a machine shared with other processes
wall time also counts the moments the thread waited for a CPU; on a quiet machine the
two agree.

- the operator's calls: ``amm_core_scaling`` next to ``Scheduler.adaptive_target``
  (which it includes), ``amm_core_retirement_candidates`` over every worker next to
  ``Scheduler.workers_to_close``, ``amm_core_status``; and one cycle of the main AMM;
- the engine: ``amm_core_retire`` of ``--retiring`` (4) workers, whose first cycle
  runs inside the call, next to the first cycle of upstream ``RetireWorker`` for the
  same workers (an ``ActiveMemoryManagerExtension`` with ``register=False``, the
  workers closing_gracefully as ``retire_workers`` sets them); then the engine's
  next cycles, by hand, until every copy is asked for, and three more while they
  are in flight (steady cycles). Every repetition retires workers not retired
  before, and cancels its retirements at the end;
- the loop share, live: the scheduler's event loop runs the operator's default
  cadence: ``amm_core_scaling`` every adaptive look (1 s, ``spec.adaptive.interval``'s
  default), ``amm_core_status`` every scaling pass (once a second idle, every 0.5 s
  tick while a retirement is in progress), the main AMM every 2 s. Idle first, for
  ``--cadence-seconds``; then ``--retiring`` workers retire, the engine cycling every
  0.5 s (sooner while a cycle's slice left copies to ask for), its copies landing as
  their holders send them, one after another at ``--bandwidth`` (200 MiB/s; the
  recipient's ``add-keys``, through ``Scheduler.add_keys``), until the retirements are
  done. The share is the cost of plugin code (the calls and both AMMs' cycles) over
  the wall time of the phase;
- the memory history's sampler (amm_core.history): one sample of every worker's
  memory, timed with the operator's calls, and its share of the loop at its
  interval (``history_share``: the median sample over the interval); in the live
  phases it runs on its own periodic callback and counts in the loop share;
- the longest single event-loop block among all of the above (``max_block_ms``),
  the plugin's live registration aside (reported on its own).

The garbage collector's pauses are reported on their own and taken out of the costs
of the calls they land in: they come with allocating anywhere, and last as long as
the process holds objects (the benchmark freezes the built state out of the
collector's walks, as a long-running scheduler cannot).

The last line::

    scaling_ms=… candidates_ms=… engine_cycle_ms=… max_block_ms=… loop_share_idle=…
    loop_share_retiring=… scaling_ratio=… candidates_ratio=… engine_cycle_ratio=…
    history_sample_ms=… history_share=…

``scaling_ms``, ``candidates_ms``: medians of the static measures above;
``engine_cycle_ms``: the median first cycle or the median steady cycle, whichever is
longer; the ratios are ours over upstream's equivalent, measured in the same run:
scaling over ``adaptive_target``, candidates over ``workers_to_close``, the engine's
first cycle over upstream ``RetireWorker``'s.

Run: python benchmarks/scheduler_cost.py [--workers 500] [--keys 1000000]
(about 2 minutes and 1.5 GB at the defaults). To measure another checkout of amm_core
(e.g. before a change): ``PYTHONPATH=/path/to/checkout python benchmarks/...``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import dask
from distributed import Scheduler
from distributed.active_memory_manager import ActiveMemoryManagerExtension, RetireWorker
from distributed.comm.core import CommClosedError
from distributed.core import Status

import amm_core
from amm_core.plugin import PLUGIN_NAME, MemoryPolicyPlugin

GB = 2**30
MB = 2**20
#: Worker memory limit, threads, and what each holds besides its keys
MEMORY_LIMIT = 16 * GB
NTHREADS = 4
UNMANAGED = 300 * MB
#: The operator's default cadence (seconds): an adaptive look, a scaling pass while a
#: retirement is in progress, a pass otherwise; the main AMM's interval
ADAPTIVE_LOOK = 1.0
BUSY_PASS = 0.5
IDLE_PASS = 1.0
AMM_INTERVAL = 2.0
#: The main AMM's policies (README's examples)
POLICIES = [
    {"class": "ReduceReplicas"},
    {"class": "Replicate"},
    {"class": "Rebalance"},
    {"class": "RetirePaused"},
]
OWNER = {"uid": "bench", "namespace": "bench", "name": "bench", "generation": 1}


class ParkedComm:
    """The scheduler's end of a worker's stream that takes what the scheduler writes
    and never answers, until aborted."""

    def __init__(self, address: str):
        self.peer_address = address
        self.local_address = "tcp://127.0.0.1:0"
        self.name = ""
        self._closed = asyncio.get_running_loop().create_future()

    async def write(self, msg: Any, **kwargs: Any) -> int:
        if self._closed.done():
            raise CommClosedError()
        return 0

    async def read(self, **kwargs: Any) -> Any:
        await self._closed
        raise CommClosedError()

    def closed(self) -> bool:
        return self._closed.done()

    def abort(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)

    async def close(self) -> None:
        self.abort()


def metrics(memory: int, managed: int) -> dict[str, Any]:
    """A worker heartbeat's metrics, as much as the scheduler reads of them."""
    return {
        "memory": memory,
        "managed_bytes": managed,
        "spilled_bytes": {"memory": 0, "disk": 0},
        "bandwidth": {"total": 100e6, "workers": {}, "types": {}},
        "digests_total_since_heartbeat": {},
        "task_counts": {},
        "event_loop_interval": 0.02,
        "cpu": 0.0,
        "time": time.time(),
    }


def address(i: int) -> str:
    return f"tcp://10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}:40000"


#: The workers' registrations (Scheduler.add_worker runs as long as the worker's
#: stream): kept here, as the event loop keeps only weak references to tasks
STREAMS: list[asyncio.Task] = []


async def build(s: Scheduler, nworkers: int, nkeys: int, seed: int) -> None:
    """``nworkers`` workers, ``nkeys`` keys spread evenly (one copy each)."""
    rng = random.Random(seed)
    for i in range(nworkers):
        STREAMS.append(asyncio.create_task(s.add_worker(
            ParkedComm(address(i)), address=address(i), status="running",
            server_id=uuid.uuid4().hex, nthreads=NTHREADS, name=f"w{i}",
            resolve_address=False, now=time.time(), resources={}, host_info=None,
            memory_limit=MEMORY_LIMIT, metrics=metrics(UNMANAGED, 0), pid=i,
            services={}, local_directory="/tmp", versions={},
            nanny=address(i).replace("40000", "40001"), extra={},
            stimulus_id=f"bench-add-{i}",
        )))
        await asyncio.sleep(0)
    while len(s.workers) < nworkers:
        await asyncio.sleep(0.01)
    per_worker = nkeys // nworkers
    for i in range(nworkers):
        keys = [("data", i * per_worker + k) for k in range(per_worker)]
        s.update_data(
            who_has={key: [address(i)] for key in keys},
            nbytes={key: rng.randint(200_000, 800_000) for key in keys},
        )
    # Balanced (as Rebalance leaves a cluster), within a percent
    for ws in s.workers.values():
        process = ws.nbytes + UNMANAGED + rng.randint(0, MEMORY_LIMIT // 100)
        s.heartbeat_worker(address=ws.address, resolve_address=False,
                           metrics=metrics(process, ws.nbytes))


#: What a call costs: the CPU time of the event loop's thread while it runs. On a
#: machine shared with other processes, wall time also counts the moments the
#: thread waited for a CPU; on a quiet machine the two agree.
cost_clock = time.thread_time


class Collections:
    """The garbage collector's pauses. They land in whatever code allocates, and last
    as long as the process holds objects (the scheduler's state): they are reported
    on their own, and taken out of the cost of the calls they land in."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        #: Seconds of pauses so far
        self.total = 0.0
        self._start = 0.0
        gc.callbacks.append(self.callback)

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = cost_clock()
        else:
            self.pauses.append(cost_clock() - self._start)
            self.total += self.pauses[-1]

    def since(self, n: int) -> str:
        pauses = self.pauses[n:]
        return f"{len(pauses)} GC pause(s), longest {ms(max(pauses, default=0)):.1f} ms"


COLLECTIONS = Collections()


def timed(fn: Callable[[], Any]) -> float:
    start, paused = cost_clock(), COLLECTIONS.total
    fn()
    return cost_clock() - start - (COLLECTIONS.total - paused)


def ms(seconds: float) -> float:
    return seconds * 1000


class Meter:
    """Time spent in plugin code: every wrapped call (a wrapped call inside another,
    as the engine's first cycle inside amm_core_retire, counts once), and the
    longest one."""

    def __init__(self) -> None:
        self.spent = 0.0
        self.longest = 0.0
        self.by_name: dict[str, list[float]] = {}
        self._depth = 0

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            start, paused = cost_clock(), COLLECTIONS.total
            try:
                return fn(*args, **kwargs)
            finally:
                took = cost_clock() - start - (COLLECTIONS.total - paused)
                self._depth -= 1
                if not self._depth:
                    self.spent += took
                    self.longest = max(self.longest, took)
                    self.by_name.setdefault(name, []).append(took)

        return timed_call


def set_status(s: Scheduler, workers: list[str], status: Status) -> None:
    for a in workers:
        s.handle_worker_status_change(status.name, s.workers[a], f"bench-{time.time()}")


def upstream_first_cycle(s: Scheduler, workers: list[str]) -> float:
    """The first cycle of upstream RetireWorker for ``workers``, set closing_gracefully
    as Scheduler.retire_workers sets them; put back running after."""
    set_status(s, workers, Status.closing_gracefully)
    amm = ActiveMemoryManagerExtension(
        s, policies={RetireWorker(a) for a in workers}, register=False, start=False
    )
    took = timed(amm.run_once)
    set_status(s, workers, Status.running)
    return took


class Landing:
    """Copies the scheduler asks for land (the recipient's add-keys) once their holder
    has sent them: each holder sends one copy after another at ``bandwidth`` bytes per
    second, as if the workers fetched them."""

    def __init__(self, s: Scheduler, bandwidth: float):
        self.s = s
        self.bandwidth = bandwidth
        self.enabled = False
        self.asked = 0
        #: When each holder is done sending what it was asked for so far
        self.busy_until: dict[str, float] = {}
        request = s.request_acquire_replicas

        def request_acquire_replicas(addr: str, keys: Any, *, stimulus_id: str) -> None:
            keys = list(keys)
            self.asked += len(keys)
            request(addr, keys, stimulus_id=stimulus_id)
            if self.enabled:
                # after the AMM cycle asking: the simulation costs the cycle nothing
                asyncio.get_running_loop().call_soon(self.schedule, addr, keys)

        s.request_acquire_replicas = request_acquire_replicas  # type: ignore[method-assign]

    def schedule(self, addr: str, keys: list) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for key in keys:
            ts = self.s.tasks[key]
            sender = min(ws.address for ws in ts.who_has or ())
            lands = max(now, self.busy_until.get(sender, now)) + ts.nbytes / self.bandwidth
            self.busy_until[sender] = lands
            loop.call_at(lands, self.land, addr, key)

    def land(self, addr: str, key: Any) -> None:
        if addr in self.s.workers:
            self.s.add_keys(worker=addr, keys=[key], stimulus_id=f"bench-land-{time.time()}")


async def cadence(
    s: Scheduler,
    meter: Meter,
    seconds: float,
    busy: Callable[[], bool],
    until_idle: bool = False,
) -> float:
    """Run the operator's calls at their default cadence for ``seconds`` at most
    (with ``until_idle``, until ``busy`` says nothing is in progress any more); the
    wall time of the phase."""
    scaling = meter.wrap("scaling", s.handlers["amm_core_scaling"])
    status = meter.wrap("status", s.handlers["amm_core_status"])
    start = time.perf_counter()
    next_look = next_pass = start
    while time.perf_counter() - start < seconds:
        now = time.perf_counter()
        if now >= next_look:
            scaling()
            next_look += ADAPTIVE_LOOK
        if now >= next_pass:
            in_progress = busy()
            if until_idle and not in_progress:
                break
            status()
            next_pass += BUSY_PASS if in_progress else IDLE_PASS
        await asyncio.sleep(max(0.0, min(next_look, next_pass) - time.perf_counter()))
    return time.perf_counter() - start


def median_ms(values: list[float]) -> float:
    return ms(statistics.median(values)) if values else float("nan")


async def run(args: argparse.Namespace) -> str:
    config = {
        "distributed.scheduler.active-memory-manager.start": False,
        "distributed.scheduler.active-memory-manager.policies": [],
        "distributed.scheduler.validate": False,
        "distributed.worker.memory.pause": 0.8,
        "distributed.admin.system-monitor.interval": "1h",
    }
    with dask.config.set(config):
        s = Scheduler(port=0, dashboard=False, dashboard_address=None)
        await s
    say = (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"amm_core from {os.path.dirname(amm_core.__file__)}")
    t0 = time.perf_counter()
    gc.disable()  # a million new objects would set off one full collection after another
    await build(s, args.workers, args.keys, args.seed)
    gc.enable()
    gc.freeze()  # the built state is long-lived: keep the GC from walking it again
    collections = COLLECTIONS
    say(f"built {len(s.workers)} workers, {len(s.tasks)} keys in "
        f"{time.perf_counter() - t0:.1f}s")

    plugin = MemoryPolicyPlugin()
    install = cost_clock()
    s.add_plugin(plugin, name=PLUGIN_NAME)
    await plugin.start(s)
    install = cost_clock() - install
    say(f"plugin registered live in {ms(install):.0f} ms (one block; none when preloaded)")
    s.handlers["amm_core_apply"](
        config={"start": False, "interval": AMM_INTERVAL, "measure": "optimistic",
                "policies": POLICIES},
        owner=OWNER,
    )
    main_amm: ActiveMemoryManagerExtension = s.extensions["amm"]
    engine = plugin.retirement
    # the engine's cycle (before: an AMM of its own, with the same run_once and stop)
    cycle = getattr(engine, "cycle", None) or engine.amm
    landing = Landing(s, args.bandwidth * MB)
    names = [str(ws.name) for ws in s.workers.values()]
    #: The longest event-loop block of each kind of plugin code: (seconds, what)
    blocks: list[tuple[float, str]] = []

    # --- the operator's calls, and upstream's equivalents, interleaved -----------
    calls: dict[str, list[float]] = {k: [] for k in (
        "scaling", "adaptive_target", "candidates", "workers_to_close", "status",
        "main_amm_cycle", "history_sample", "memory_history")}
    ours = {
        "scaling": lambda: s.handlers["amm_core_scaling"](),
        "candidates": lambda: s.handlers["amm_core_retirement_candidates"](
            workers=names, n=args.retiring),
        "status": lambda: s.handlers["amm_core_status"](),
        "main_amm_cycle": main_amm.run_once,
        "history_sample": plugin.history.sample,
        "memory_history": lambda: s.handlers["amm_core_memory_history"](),
    }
    upstream = {
        "adaptive_target": s.adaptive_target,
        "workers_to_close": lambda: s.workers_to_close(n=args.retiring),
    }
    for rep in range(args.repeat):
        sides = [ours, upstream] if rep % 2 == 0 else [upstream, ours]
        for side in sides:
            for name, fn in side.items():
                calls[name].append(timed(fn))
    blocks += [(max(calls[k]), k) for k in ours]
    for name, values in calls.items():
        say(f"{name:>18}: median {median_ms(values):8.2f} ms, max {ms(max(values)):8.2f} ms")

    # --- the engine, next to upstream RetireWorker, interleaved ------------------
    first: list[float] = []
    retire_call: list[float] = []
    steady: list[float] = []
    cycles_to_ask: list[int] = []
    upstream_first: list[float] = []
    engine_run_once = cycle.run_once
    cycle_times: list[float] = []

    def timed_engine_cycle() -> None:
        cycle_times.append(timed(engine_run_once))

    cycle.run_once = timed_engine_cycle  # type: ignore[method-assign]
    order = list(range(len(names)))
    random.Random(args.seed).shuffle(order)
    fresh = iter(order)
    for rep in range(args.repeat):
        batch = [names[next(fresh)] for _ in range(args.retiring)]
        addresses = [s.aliases[n] for n in batch]
        unsafe = sum(len(s.workers[a].has_what) for a in addresses)

        def engine_side() -> None:
            cycle_times.clear()
            asked0 = landing.asked
            retire_call.append(timed(lambda: s.handlers["amm_core_retire"](
                workers=batch, limit=3600.0, reason="bench")))
            first.append(cycle_times[0])
            cycle.stop()  # cycles by hand from here
            n = 1
            while landing.asked - asked0 < unsafe and n < 100:
                cycle.run_once()
                n += 1
            cycles_to_ask.append(n)
            for _ in range(3):
                cycle.run_once()
            steady.extend(cycle_times[n:])
            blocks.extend((c, "engine cycle") for c in cycle_times)
            s.handlers["amm_core_cancel_retirement"](workers=batch)
            s.handlers["amm_core_forget_retirement"](workers=batch)
            # No worker fetches the copies asked for here: forget them now, as their
            # time being up would, so that every repetition starts alike (the version
            # before kept them in the records just forgotten)
            if hasattr(engine, "in_flight"):
                engine.in_flight.settle(float("inf"))

        def upstream_side() -> None:
            upstream_first.append(upstream_first_cycle(s, addresses))

        for side in ([engine_side, upstream_side] if rep % 2 == 0
                     else [upstream_side, engine_side]):
            side()
    blocks += [(c, "amm_core_retire") for c in retire_call]
    say(f"{'retire (4)':>18}: median {median_ms(retire_call):8.2f} ms "
        f"(first cycle {median_ms(first):.2f} ms; all copies asked within "
        f"{statistics.median(cycles_to_ask):.0f} cycle(s))")
    say(f"{'steady cycle':>18}: median {median_ms(steady):8.2f} ms, max "
        f"{ms(max(steady, default=0)):8.2f} ms")
    say(f"{'upstream 1st cycle':>18}: median {median_ms(upstream_first):8.2f} ms")

    # --- live: the operator's cadence, idle then while workers retire -------------
    main_run_once = main_amm.run_once
    idle_meter = Meter()
    gcs = len(collections.pauses)
    main_amm.run_once = idle_meter.wrap("main_amm", main_run_once)  # type: ignore
    history_sample = plugin.history.sample
    # its periodic callback looks sample() up at each call
    plugin.history.sample = idle_meter.wrap("history", history_sample)  # type: ignore
    main_amm.start()  # its periodic callback takes the wrapped run_once
    idle_wall = await cadence(s, idle_meter, args.cadence_seconds, busy=lambda: False)
    main_amm.stop()
    share_idle = idle_meter.spent / idle_wall
    blocks += [(max(v), f"{k} (live, idle)") for k, v in idle_meter.by_name.items()]
    say(f"idle: {share_idle:.2%} of {idle_wall:.1f}s in plugin code (longest "
        f"{ms(idle_meter.longest):.1f} ms; " + ", ".join(
            f"{k}: {len(v)}x median {median_ms(v):.1f} max {ms(max(v)):.1f} ms"
            for k, v in idle_meter.by_name.items()) + f"; {collections.since(gcs)})")

    busy_meter = Meter()
    gcs = len(collections.pauses)
    main_amm.run_once = busy_meter.wrap("main_amm", main_run_once)  # type: ignore
    plugin.history.sample = busy_meter.wrap("history", history_sample)  # type: ignore
    cycle.run_once = busy_meter.wrap("engine", engine_run_once)  # type: ignore
    main_amm.start()
    batch = [names[next(fresh)] for _ in range(args.retiring)]
    landing.enabled = True
    retire = busy_meter.wrap("retire", s.handlers["amm_core_retire"])
    start = time.perf_counter()
    retire(workers=batch, limit=3600.0, reason="bench")

    def in_progress() -> bool:
        return any(r["state"] in ("draining", "moving")
                   for r in s.handlers["amm_core_retirements"]())

    await cadence(s, busy_meter, args.cadence_seconds * 4, busy=in_progress,
                  until_idle=True)
    busy_wall = time.perf_counter() - start
    states = {r["worker"]: r["state"] for r in s.handlers["amm_core_retirements"]()
              if r["worker"] in batch}
    share_busy = busy_meter.spent / busy_wall
    blocks += [(max(v), f"{k} (live, retiring)") for k, v in busy_meter.by_name.items()]
    say(f"retiring: {share_busy:.2%} of {busy_wall:.1f}s in plugin code "
        f"(longest {ms(busy_meter.longest):.1f} ms; "
        + ", ".join(f"{k}: {len(v)}x median {median_ms(v):.1f} max {ms(max(v)):.1f} ms"
                    for k, v in busy_meter.by_name.items())
        + f"; {collections.since(gcs)}); states {sorted(set(states.values()))}")
    main_amm.stop()

    longest, what = max(blocks)
    say(f"longest block: {ms(longest):.1f} ms ({what}); GC: "
        f"{collections.since(0)} (not counted in the costs)")
    scaling = median_ms(calls["scaling"])
    candidates = median_ms(calls["candidates"])
    engine_cycle = max(median_ms(first), median_ms(steady))
    return (
        f"scaling_ms={scaling:.2f} candidates_ms={candidates:.2f} "
        f"engine_cycle_ms={engine_cycle:.2f} max_block_ms={ms(longest):.2f} "
        f"loop_share_idle={share_idle:.4f} loop_share_retiring={share_busy:.4f} "
        f"scaling_ratio={scaling / median_ms(calls['adaptive_target']):.2f} "
        f"candidates_ratio={candidates / median_ms(calls['workers_to_close']):.2f} "
        f"engine_cycle_ratio={median_ms(first) / median_ms(upstream_first):.2f} "
        f"history_sample_ms={median_ms(calls['history_sample']):.2f} "
        f"history_share={statistics.median(calls['history_sample']) / plugin.history.interval:.5f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=500)
    parser.add_argument("--keys", type=int, default=1_000_000,
                        help="keys in the cluster, spread evenly over the workers")
    parser.add_argument("--retiring", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cadence-seconds", type=float, default=8.0,
                        help="length of the idle phase (the retiring phase lasts until "
                        "its retirements are done, at most four times this)")
    parser.add_argument("--bandwidth", type=float, default=200.0,
                        help="MiB/s each retiring worker sends its copies at")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("distributed", "amm_core"):
        logging.getLogger(name).setLevel(logging.ERROR)
    asyncio.run(run_and_exit(args))


async def run_and_exit(args: argparse.Namespace) -> None:
    print(await run(args), flush=True)
    # Tearing down a million keys (the scheduler forgets every one, loudly: it was
    # scattered data) takes longer than measuring them
    os._exit(0)


if __name__ == "__main__":
    main()
