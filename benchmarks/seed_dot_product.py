"""The Active Memory Manager announcement's benchmark, scaled to this machine.

The 2021 announcement (the seed text ``seed/000_b26fd8aca74d3a12.txt``) measured
``(A @ A.T).sum()`` for ``A = da.random.random((40_000, 40_000), chunks=(4_000,
4_000))`` on 48 workers with ``MemorySampler``: 166 GiB peak cluster memory without
the AMM, 135 GiB with ReduceReplicas. Here the same workload, by default 8000^2 in
1000^2 chunks (64 chunks of 8 MB, as the original's 100 chunks of 122 MiB), runs on
4 worker processes x 1 thread, in three configurations:

- ``off``: no Active Memory Manager;
- ``upstream``: distributed's ``ReduceReplicas`` (the default policy);
- ``amm_core``: :class:`amm_core.reduce.PressureReduceReplicas`.

Every run gets a fresh ``LocalCluster`` built under its configuration, so that no run
inherits another's worker heaps (process memory) or scheduler state, and the runs are
interleaved round-robin (the starting configuration rotates every repetition): the
machine is shared, and interleaving spreads the noise of other work over all three.
The AMM interval is the default (2 s) for both AMM configurations.

Printed per configuration: peak cluster memory (``managed``: bytes of keys the
scheduler knows to be on the workers, counting every copy; ``process``: RSS of the
worker processes, from their heartbeats), wall time of ``compute()``, CPU seconds of
the worker processes (what dropping too eagerly would cost in re-fetches, and nearly
immune to the machine's other load) and bytes the workers fetched from each other, as
median and [min, max] over the repetitions; then the ratios of the medians against
``upstream``, and the ratios within each round (median [min, max]).

**The single-copy floor.** No replica policy can hold less than the bytes of the keys
in memory, each counted once. Every run samples that on the scheduler (the sum of
``nbytes`` of the tasks in state memory, every ``--interval`` seconds, by a
:class:`FloorSampler` plugin) next to the cluster memory, and its peak is the run's
floor. Each configuration's managed peak is printed against the floor of its own run
(``managed / floor``, median [min, max]): what is above 1 is extra copies.

A plot of cluster memory over time (aligned on each run's start, as the
announcement's ``ms.plot(align=True)``, with the floor dashed) goes to ``--out``. The
last line is::

    peak_ratio_vs_upstream=<managed peak median ratio> wall_ratio_vs_upstream=<wall
    median ratio> peak_ratio_vs_floor=<amm_core's managed / floor, median over runs>

(on one line).

Usage::

    python benchmarks/seed_dot_product.py --repeat 3
    python benchmarks/seed_dot_product.py --quick      # a smoke test, a few seconds a run
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import pandas as pd
import psutil
from distributed import Client, LocalCluster
from distributed.diagnostics import MemorySampler
from distributed.diagnostics.plugin import SchedulerPlugin
from tornado.ioloop import PeriodicCallback

GiB = 2**30

#: The AMM policies of each configuration; None turns the AMM off.
CONFIGS: dict[str, list[dict[str, Any]] | None] = {
    "off": None,
    "upstream": [{"class": "distributed.active_memory_manager.ReduceReplicas"}],
    "amm_core": [{"class": "amm_core.reduce.PressureReduceReplicas"}],
}


class FloorSampler(SchedulerPlugin):
    """Samples, on the scheduler, the bytes of the keys in memory, each counted once
    however many workers hold it: the least any replica policy can hold."""

    name = "seed-floor-sampler"

    #: Seconds between samples
    interval: float
    #: (scheduler time, bytes) samples since start()
    samples: list[tuple[float, int]]

    def __init__(self, interval: float):
        self.interval = interval
        self.samples = []

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.callback = PeriodicCallback(self.sample, self.interval * 1000)
        self.callback.start()
        self.sample()

    def sample(self) -> None:
        tasks = self.scheduler.tasks.values()
        nbytes = sum(ts.nbytes for ts in tasks if ts.state == "memory")
        self.samples.append((time.time(), nbytes))

    async def close(self) -> None:
        self.callback.stop()


def _floor_samples(dask_scheduler: Any) -> list[tuple[float, int]]:
    """Stop the FloorSampler and return its samples, with a last one taken now."""
    sampler = dask_scheduler.plugins[FloorSampler.name]
    sampler.callback.stop()
    sampler.sample()
    return sampler.samples


@dataclass
class Run:
    """One computation under one configuration."""

    config: str
    #: Repetition (round) number, from 1
    rep: int
    #: Peak cluster memory during compute(), bytes
    peak_managed: int
    peak_process: int
    #: Seconds spent in compute()
    wall: float
    #: Peak bytes of the keys in memory, each counted once (the single-copy floor)
    peak_floor: int
    #: Cluster memory over time, seconds since the start -> bytes
    managed: pd.Series
    process: pd.Series
    floor: pd.Series
    #: Bytes the workers fetched from each other, and the part of it that a worker
    #: fetched again after having dropped its copy (the cost of dropping too early)
    transferred: int = 0
    refetched: int = 0
    #: Fetches that found the key gone from the worker they asked (worker log)
    missing: int = 0
    #: CPU seconds (user + system) the worker processes spent during compute():
    #: unlike wall time, barely moved by other work on a shared machine
    cpu: float = 0.0
    #: What the AMM policies reported (amm_core policies' report(), else repr)
    policies: list[Any] = field(default_factory=list)


def _policy_reports(dask_scheduler: Any) -> list[Any]:
    amm = dask_scheduler.extensions["amm"]
    return [
        p.report() if hasattr(p, "report") else repr(p) for p in amm.policies
    ]


def _transfers(dask_worker: Any) -> tuple[int, int, int]:
    """(bytes fetched, bytes fetched again, fetches that found the key gone)."""
    seen: set[Any] = set()
    total = again = 0
    for entry in dask_worker.transfer_incoming_log:
        for key, nbytes in entry["keys"].items():
            total += nbytes
            if key in seen:
                again += nbytes
            seen.add(key)
    missing = sum(1 for row in dask_worker.state.log if row[1] == "missing-dep")
    return total, again, missing


def _cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def _series(ms: MemorySampler, label: str) -> pd.Series:
    return ms.to_pandas(align=True)[label]


def run_once(config: str, args: argparse.Namespace, rep: int) -> Run:
    label = f"{config} #{rep}"
    policies = CONFIGS[config]
    settings: dict[str, Any] = {
        "distributed.scheduler.active-memory-manager.start": policies is not None,
        # Long enough to keep every transfer and every missing-dep of the run
        "distributed.admin.low-level-log-length": 1_000_000,
    }
    if policies is not None:
        settings["distributed.scheduler.active-memory-manager.policies"] = policies
    with (
        dask.config.set(settings),
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            memory_limit=args.memory_limit,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(args.workers)
        # Workers import numpy here rather than during the measured computation.
        client.run(lambda: __import__("numpy").ones(1).sum())
        A = da.random.random((args.size, args.size), chunks=(args.chunk, args.chunk))
        total = (A @ A.T).sum()

        ms_managed = MemorySampler()
        ms_process = MemorySampler()
        cpu_before = client.run(_cpu_seconds)
        client.register_plugin(FloorSampler(args.interval))
        start = time.perf_counter()
        with (
            ms_managed.sample(label, measure="managed", interval=args.interval),
            ms_process.sample(label, measure="process", interval=args.interval),
        ):
            total.compute()
        wall = time.perf_counter() - start
        floor_samples = client.run_on_scheduler(_floor_samples)
        cpu_after = client.run(_cpu_seconds)
        cpu = sum(cpu_after[w] - cpu_before[w] for w in cpu_before)
        reports = client.run_on_scheduler(_policy_reports) if policies else []
        transfers = list(client.run(_transfers).values())

    managed = _series(ms_managed, label)
    process = _series(ms_process, label)
    t0 = floor_samples[0][0]
    floor = pd.Series(
        [nbytes for _, nbytes in floor_samples],
        index=pd.to_timedelta([t - t0 for t, _ in floor_samples], unit="s"),
    )
    return Run(
        config=config,
        rep=rep,
        peak_managed=int(managed.max()),
        peak_process=int(process.max()),
        peak_floor=int(floor.max()),
        wall=wall,
        managed=managed,
        process=process,
        floor=floor,
        transferred=sum(t[0] for t in transfers),
        refetched=sum(t[1] for t in transfers),
        missing=sum(t[2] for t in transfers),
        cpu=cpu,
        policies=reports,
    )


def _stat(values: list[float], fmt: str) -> str:
    return (
        f"{format(statistics.median(values), fmt)} "
        f"[{format(min(values), fmt)}, {format(max(values), fmt)}]"
    )


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"off": "tab:red", "upstream": "tab:blue", "amm_core": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharex=True)
    for ax, measure in zip(axes, ("managed", "process")):
        labelled: set[str] = set()
        for run in runs:
            s: pd.Series = getattr(run, measure)
            ax.plot(
                s.index.total_seconds(),
                s.values / GiB,
                color=colors.get(run.config),
                alpha=0.7,
                label=None if run.config in labelled else run.config,
            )
            labelled.add(run.config)
            if measure == "managed":
                ax.plot(
                    run.floor.index.total_seconds(),
                    run.floor.values / GiB,
                    color=colors.get(run.config),
                    alpha=0.5,
                    linestyle="--",
                    label=None if "floor" in labelled else "single-copy floor",
                )
                labelled.add("floor")
        ax.set_title(f"cluster memory ({measure})")
        ax.set_xlabel("time since start (s)")
        ax.set_ylabel("GiB")
        ax.grid(True)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration")
    parser.add_argument("--size", type=int, default=8000, help="A is size x size")
    parser.add_argument("--chunk", type=int, default=1000, help="chunk side")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--memory-limit", default="3GB", help="per worker")
    parser.add_argument("--interval", type=float, default=0.1, help="sampling, s")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "out", help="plot folder"
    )
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="comma-separated subset of " + ", ".join(CONFIGS),
    )
    parser.add_argument(
        "--policy-kwargs",
        type=json.loads,
        default={},
        help="JSON kwargs for PressureReduceReplicas, e.g. '{\"keep_imminent\": false}'",
    )
    parser.add_argument(
        "--extra-policies",
        type=json.loads,
        default=[],
        help="JSON list of more policies for amm_core, e.g. "
        "'[{\"class\": \"amm_core.rebalance.Rebalance\"}]'",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 2000^2 in 500^2, 1 run"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.chunk, args.repeat = 2000, 500, 1
    configs = args.configs.split(",")
    CONFIGS["amm_core"] = [
        {"class": "amm_core.reduce.PressureReduceReplicas", **args.policy_kwargs},
        *args.extra_policies,
    ]
    if "upstream" not in configs:
        parser.error("the ratios need the 'upstream' configuration")

    print(
        f"(A @ A.T).sum(), A {args.size}^2 float64 in {args.chunk}^2 chunks "
        f"({args.size**2 * 8 / GiB:.2f} GiB); {args.workers} workers x 1 thread, "
        f"{args.memory_limit} each; {args.repeat} interleaved runs per configuration, "
        "a fresh cluster per run",
        flush=True,
    )
    runs: list[Run] = []
    for rep in range(args.repeat):
        # Rotate the order so that no configuration always runs first or last.
        order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
        for config in order:
            run = run_once(config, args, rep + 1)
            runs.append(run)
            print(
                f"  run {rep + 1} {config:9s} managed {run.peak_managed / GiB:.3f} GiB"
                f"  floor {run.peak_floor / GiB:.3f} GiB"
                f" (x{run.peak_managed / run.peak_floor:.3f})"
                f"  process {run.peak_process / GiB:.3f} GiB  wall {run.wall:.2f} s"
                f"  cpu {run.cpu:.1f} s"
                f"  fetched {run.transferred / GiB:.2f} GiB"
                f" (again {run.refetched / GiB:.2f}, missing {run.missing})"
                + "".join(
                    f"  {p['class']} {p['counters']}" if isinstance(p, dict) else f"  {p}"
                    for p in run.policies
                ),
                flush=True,
            )

    medians: dict[str, dict[str, float]] = {}
    print(
        f"{'config':9s} {'peak managed GiB':>24s} {'peak floor GiB':>24s} "
        f"{'managed / floor':>24s} {'peak process GiB':>24s} "
        f"{'wall s':>22s} {'worker cpu s':>22s} {'fetched GiB':>20s}"
    )
    for config in configs:
        mine = [r for r in runs if r.config == config]
        managed = [r.peak_managed / GiB for r in mine]
        process = [r.peak_process / GiB for r in mine]
        wall = [r.wall for r in mine]
        cpu = [r.cpu for r in mine]
        fetched = [r.transferred / GiB for r in mine]
        floor = [r.peak_floor / GiB for r in mine]
        vs_floor = [r.peak_managed / r.peak_floor for r in mine]
        medians[config] = {
            "managed": statistics.median(managed),
            "vs_floor": statistics.median(vs_floor),
            "process": statistics.median(process),
            "wall": statistics.median(wall),
            "cpu": statistics.median(cpu),
            "fetched": statistics.median(fetched),
        }
        print(
            f"{config:9s} {_stat(managed, '.3f'):>24s} {_stat(floor, '.3f'):>24s} "
            f"{_stat(vs_floor, '.3f'):>24s} {_stat(process, '.3f'):>24s} "
            f"{_stat(wall, '.2f'):>22s} {_stat(cpu, '.1f'):>22s} "
            f"{_stat(fetched, '.2f'):>20s}"
        )
    base = medians["upstream"]
    for config in configs:
        m = medians[config]
        print(
            f"{config:9s} vs upstream (medians): managed x{m['managed'] / base['managed']:.3f}"
            f"  process x{m['process'] / base['process']:.3f}"
            f"  wall x{m['wall'] / base['wall']:.3f}"
            f"  worker cpu x{m['cpu'] / base['cpu']:.3f}"
            f"  fetched x{m['fetched'] / base['fetched']:.3f}"
        )
    # Ratios within each round, whose runs shared the machine's load of the moment
    for config in configs:
        if config == "upstream":
            continue
        paired = [
            (mine, theirs)
            for mine in runs
            for theirs in runs
            if mine.config == config
            and theirs.config == "upstream"
            and mine.rep == theirs.rep
        ]
        managed = [m.peak_managed / t.peak_managed for m, t in paired]
        wall = [m.wall / t.wall for m, t in paired]
        print(
            f"{config:9s} vs upstream (per round): managed x{_stat(managed, '.3f')}"
            f"  wall x{_stat(wall, '.3f')}"
        )
    path = args.out / f"seed_dot_product_{args.size}_{args.chunk}.png"
    plot(runs, path)
    print(f"plot: {path}")
    if "amm_core" in configs:
        mine = medians["amm_core"]
        print(
            f"peak_ratio_vs_upstream={mine['managed'] / base['managed']:.3f} "
            f"wall_ratio_vs_upstream={mine['wall'] / base['wall']:.3f} "
            f"peak_ratio_vs_floor={mine['vs_floor']:.3f}"
        )


if __name__ == "__main__":
    main()
