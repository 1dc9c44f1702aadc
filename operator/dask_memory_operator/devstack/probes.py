"""Functions that tests and the sandbox run ON a scheduler (``client.run_on_scheduler``)
to see what is in force there, without asking the operator.

They live in an installed module, so the scheduler unpickles them by reference.
"""

from __future__ import annotations

from typing import Any


def _class_path(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def amm_state(dask_scheduler: Any) -> dict[str, Any]:
    """The scheduler's Active Memory Manager as it runs right now."""
    amm = dask_scheduler.extensions["amm"]
    return {
        "running": amm.running,
        "interval": amm.interval,
        "measure": amm.measure,
        "policies": sorted(_class_path(p) for p in amm.policies),
        "plugin": "amm-core" in dask_scheduler.plugins,
    }


def replica_counts(keys: list[str], dask_scheduler: Any = None) -> dict[str, int]:
    """How many workers hold each key (``run_on_scheduler(replica_counts, keys)``)."""
    return {
        k: len(dask_scheduler.tasks[k].who_has or ()) if k in dask_scheduler.tasks else 0
        for k in keys
    }


def amm_cycles(dask_scheduler: Any) -> int:
    """AMM cycles run since the amm_core plugin started (it must be installed)."""
    return dask_scheduler.plugins["amm-core"].status()["amm"]["cycles"]


def amm_counters(dask_scheduler: Any) -> dict[str, int]:
    """Cycles run and replicas dropped and copied since the amm_core plugin started."""
    amm = dask_scheduler.plugins["amm-core"].status()["amm"]
    return {k: amm[k] for k in ("cycles", "replicas_dropped", "replicas_copied")}


def amm_dropped(dask_scheduler: Any) -> int:
    """Replicas the AMM dropped since the amm_core plugin started."""
    return dask_scheduler.plugins["amm-core"].status()["amm"]["replicas_dropped"]


def set_pause_fraction(fraction: float, dask_worker: Any = None) -> None:
    """Run on a worker (``client.run``): pause it once its memory passes ``fraction``
    of its limit, as if it had filled up."""
    dask_worker.memory_manager.memory_pause_fraction = fraction
