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


def replica_counts(dask_scheduler: Any, keys: list[str]) -> dict[str, int]:
    """How many workers hold each key."""
    return {
        k: len(dask_scheduler.tasks[k].who_has or ()) if k in dask_scheduler.tasks else 0
        for k in keys
    }
