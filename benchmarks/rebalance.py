"""How evenly data is spread over workers while a job runs: no rebalancing, one
Client.rebalance() call, and the amm_core Rebalance AMM policy.

The cluster (4 worker processes x 1 thread) starts skewed: every chunk of a persisted
dataset sits on one worker. A job then runs rounds; each round ingests a few new
chunks on that same worker (think of a worker that is the only one able to read a
source) and reduces over every chunk held so far. Without rebalancing the data piles
up on that worker; Client.rebalance(), called once on the idle cluster before the job
(its documented use), fixes the start but not what the job adds; the policy keeps
moving data while the job runs.

Memory is sampled on the scheduler every 100 ms: managed bytes per worker
(``WorkerState.nbytes``; spilling is off). For each configuration the table shows the
max-min spread and the coefficient of variation (std/mean) across workers, averaged
over the job's duration and at its end, the spread at the first sample (0.1 s into
the job), and the job's wall time. The AMM runs in all three configurations with the
default reducer (amm_core's ReduceReplicas, equal to upstream's when nothing is
replicated); the AMM and Client.rebalance both measure "managed" memory, the
quantity sampled here. Client.rebalance gets its best settings: sender-min and
recipient-max opened to 0 and 1, sender-recipient-gap equal to the policy's
threshold (with the defaults it would hardly move anything here).

Each configuration runs ``--repeat`` times (default 3), interleaved in a rotating
order (none, client, amm; client, amm, none; ...) so that drift in the machine's load
hits every configuration alike; the table shows medians over the repeats and the
ratios are ratios of medians.

Run: python benchmarks/rebalance.py [--repeat N]   (about a minute per repeat on 2 cores)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import dask
import numpy as np
from distributed import Client, LocalCluster, Scheduler, wait
from tornado.ioloop import PeriodicCallback

N_WORKERS = 4
MEMORY_LIMIT = "2GiB"
CHUNK = 4 * 2**20  # bytes per chunk
INITIAL_CHUNKS = 36  # 144 MiB, all on one worker
ROUNDS = 20
NEW_CHUNKS_PER_ROUND = 6  # 24 MiB ingested per round, on the same worker
TASK_SECONDS = 0.005  # per-chunk work in the reduction (sleep: spares the 2 cores)
SAMPLE_INTERVAL = 0.1  # seconds
AMM_INTERVAL = "1s"
HEARTBEAT_WAIT = 30  # seconds at most for the workers' heartbeats to catch up
REBALANCE_POLICY = {
    "class": "amm_core.rebalance.Rebalance",
    "threshold": 0.02,  # of 2 GiB: a worker sends when > 20 MiB above the mean
    "max_bytes_per_cycle": "100MiB",
}

CONFIGS = ["none", "client_rebalance", "amm_rebalance"]


def make_chunk(i: int) -> np.ndarray:
    return np.full(CHUNK // 8, float(i))


def chunk_work(chunk: np.ndarray) -> float:
    time.sleep(TASK_SECONDS)
    return float(chunk[0])


# --- scheduler-side sampler (the LocalCluster's scheduler runs in this process) -----


def start_sampler(dask_scheduler: Scheduler, interval: float) -> None:
    samples: list[list[int]] = []

    def sample() -> None:
        samples.append([ws.nbytes for ws in dask_scheduler.workers.values()])

    pc = PeriodicCallback(sample, interval * 1000)
    dask_scheduler.periodic_callbacks["bench-sampler"] = pc
    dask_scheduler._bench_samples = samples  # type: ignore[attr-defined]
    pc.start()


def stop_sampler(dask_scheduler: Scheduler) -> list[list[int]]:
    dask_scheduler.periodic_callbacks.pop("bench-sampler").stop()
    samples = dask_scheduler._bench_samples  # type: ignore[attr-defined]
    samples.append([ws.nbytes for ws in dask_scheduler.workers.values()])
    return samples


def heartbeat_lags(dask_scheduler: Scheduler) -> bool:
    return any(ws.memory.managed < ws.nbytes for ws in dask_scheduler.workers.values())


def stats(values: list[int]) -> tuple[float, float]:
    """(max - min, coefficient of variation) of one sample."""
    mean = statistics.fmean(values)
    cv = statistics.pstdev(values) / mean if mean else 0.0
    return max(values) - min(values), cv


def run(config: str) -> dict[str, Any]:
    policies: list[dict] = [{"class": "amm_core.replicate.ReduceReplicas"}]
    if config == "amm_rebalance":
        policies.append(REBALANCE_POLICY)
    settings = {
        "distributed.worker.memory.target": False,
        "distributed.worker.memory.spill": False,
        "distributed.worker.memory.pause": False,
        "distributed.worker.memory.terminate": False,
        # Client.rebalance at its best: by default a worker below 30% of its
        # memory_limit never sends, and the dead band is 10% of memory_limit
        # (205 MiB here): it would hardly move anything. Same band as the policy.
        "distributed.worker.memory.rebalance.measure": "managed",
        "distributed.worker.memory.rebalance.sender-min": 0.0,
        "distributed.worker.memory.rebalance.recipient-max": 1.0,
        "distributed.worker.memory.rebalance.sender-recipient-gap": REBALANCE_POLICY[
            "threshold"
        ],
        "distributed.scheduler.active-memory-manager.start": True,
        "distributed.scheduler.active-memory-manager.interval": AMM_INTERVAL,
        "distributed.scheduler.active-memory-manager.measure": "managed",
        "distributed.scheduler.active-memory-manager.policies": policies,
    }
    with (
        dask.config.set(settings),
        LocalCluster(
            n_workers=N_WORKERS,
            threads_per_worker=1,
            processes=True,
            memory_limit=MEMORY_LIMIT,
            dashboard_address=":0",
        ) as lc,
        Client(lc) as c,
    ):
        c.wait_for_workers(N_WORKERS)
        heavy = sorted(c.scheduler_info()["workers"])[0]
        chunks = [
            c.submit(make_chunk, i, workers=[heavy], pure=False)
            for i in range(INITIAL_CHUNKS)
        ]
        wait(chunks)
        # Memory measures are capped by the process memory of the last heartbeat:
        # let it catch up with the data before anyone weighs the workers.
        deadline = time.monotonic() + HEARTBEAT_WAIT
        while c.run_on_scheduler(heartbeat_lags):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"worker heartbeats still lag behind the data after {HEARTBEAT_WAIT}s"
                )
            time.sleep(0.1)
        if config == "client_rebalance":
            c.rebalance()

        c.run_on_scheduler(start_sampler, interval=SAMPLE_INTERVAL)
        t0 = time.perf_counter()
        total = 0.0
        for r in range(ROUNDS):
            chunks += [
                c.submit(make_chunk, 1000 * (r + 1) + i, workers=[heavy], pure=False)
                for i in range(NEW_CHUNKS_PER_ROUND)
            ]
            parts = [c.submit(chunk_work, ch, pure=False) for ch in chunks]
            total = c.submit(sum, parts).result()
        wall = time.perf_counter() - t0
        samples = c.run_on_scheduler(stop_sampler)

        expected = sum(range(INITIAL_CHUNKS)) + sum(
            1000 * (r + 1) + i
            for r in range(ROUNDS)
            for i in range(NEW_CHUNKS_PER_ROUND)
        )
        assert total == expected, (total, expected)  # no chunk lost or mixed up

    per_sample = [stats(s) for s in samples]
    return {
        "config": config,
        "samples": len(samples),
        "spread_start": per_sample[0][0],
        "spread_avg": statistics.fmean(s for s, _ in per_sample),
        "cv_avg": statistics.fmean(cv for _, cv in per_sample),
        "spread_end": per_sample[-1][0],
        "cv_end": per_sample[-1][1],
        "wall": wall,
        "end": samples[-1],
    }


METRICS = ["spread_start", "spread_avg", "cv_avg", "spread_end", "cv_end", "wall"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per configuration (default 3)"
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    print(
        f"{N_WORKERS} workers x 1 thread, {MEMORY_LIMIT} each; "
        f"{INITIAL_CHUNKS} x {CHUNK >> 20} MiB on one worker, then {ROUNDS} rounds of "
        f"+{NEW_CHUNKS_PER_ROUND} chunks on it and a reduction over all chunks; "
        f"AMM interval {AMM_INTERVAL}; Rebalance {REBALANCE_POLICY}; "
        f"{args.repeat} repeats, interleaved",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {config: [] for config in CONFIGS}
    for i in range(args.repeat):
        k = i % len(CONFIGS)
        for config in CONFIGS[k:] + CONFIGS[:k]:
            r = run(config)
            runs[config].append(r)
            print(
                f"  repeat {i + 1}: {config}: spread avg "
                f"{r['spread_avg'] / 2**20:.0f} MiB, done in {r['wall']:.1f}s",
                flush=True,
            )

    results = {
        config: {
            "config": config,
            "samples": statistics.median(r["samples"] for r in rs),
            **{m: statistics.median(r[m] for r in rs) for m in METRICS},
            "end": rs[-1]["end"],
        }
        for config, rs in runs.items()
    }

    mib = 2**20
    print()
    print(f"medians over {args.repeat} runs:")
    print(
        f"{'config':<18}{'spread start':>14}{'spread avg':>12}{'cv avg':>8}"
        f"{'spread end':>12}{'cv end':>8}{'wall':>8}{'samples':>9}"
    )
    for r in results.values():
        print(
            f"{r['config']:<18}{r['spread_start'] / mib:>10.0f} MiB"
            f"{r['spread_avg'] / mib:>8.0f} MiB{r['cv_avg']:>8.2f}"
            f"{r['spread_end'] / mib:>8.0f} MiB{r['cv_end']:>8.2f}"
            f"{r['wall']:>7.1f}s{r['samples']:>9.0f}"
        )
    print("spread avg of each run (MiB):")
    for config, rs in runs.items():
        print(f"  {config:<18}" + " ".join(f"{r['spread_avg'] / mib:5.0f}" for r in rs))
    print("per-worker managed MiB at the end of the last run:")
    for r in results.values():
        print(f"  {r['config']:<18}" + " ".join(f"{v / mib:5.0f}" for v in r["end"]))
    base = results["none"]
    print()
    print("ratios of medians vs none (lower is better for spread and cv):")
    for r in results.values():
        print(
            f"  {r['config']:<18} spread avg {r['spread_avg'] / base['spread_avg']:.2f}"
            f"  cv avg {r['cv_avg'] / base['cv_avg']:.2f}"
            f"  spread end {r['spread_end'] / base['spread_end']:.2f}"
            f"  wall {r['wall'] / base['wall']:.2f}"
        )
    amm = results["amm_rebalance"]
    vs_none = amm["spread_avg"] / base["spread_avg"]
    vs_client = amm["spread_avg"] / results["client_rebalance"]["spread_avg"]
    print(f"spread_ratio_vs_none={vs_none:.3f} spread_ratio_vs_client_rebalance={vs_client:.3f}")


if __name__ == "__main__":
    sys.exit(main())
