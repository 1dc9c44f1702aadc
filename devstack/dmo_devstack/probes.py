"""Functions that tests and the sandbox run ON a scheduler (``client.run_on_scheduler``)
to see what is in force there, without asking the operator.

They live in an installed module, so the scheduler unpickles them by reference.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin


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


def amm_savings(dask_scheduler: Any) -> dict[str, Any]:
    """Run on the scheduler: what the amm_core plugin counted as rescued, lost and
    dropped, with its latest departures (its ``amm_core_savings`` answer)."""
    return dask_scheduler.plugins["amm-core"].savings_report()


def grow_memory(step: int = 10 * 2**20, every: float = 0.1, most: int = 4 * 2**30, dask_worker: Any = None) -> int:
    """Run on a worker (``client.run``): a thread that holds ``step`` more bytes every
    ``every`` seconds, outside of what Dask manages (up to ``most``), as a task's
    library leaking would: past its container's memory limit the kernel (or the
    process kubelet) OOM-kills the pod's processes. Returns the worker's pid."""
    import os
    import threading
    import time

    def grow() -> None:
        held = []
        while len(held) * step < most:
            held.append(b"x" * step)  # written: resident (zeroed pages would not be)
            time.sleep(every)
        time.sleep(3600)

    threading.Thread(target=grow, daemon=True, name="grow-memory").start()
    return os.getpid()


def set_pause_fraction(fraction: float, dask_worker: Any = None) -> None:
    """Run on a worker (``client.run``): pause it once its memory passes ``fraction``
    of its limit, as if it had filled up."""
    dask_worker.memory_manager.memory_pause_fraction = fraction


#: Stimuli of a worker leaving: a task processing there when one of them moves it
#: back is wasted (its progress is lost)
_WORKER_LOSS = ("handle-worker-cleanup", "remove-worker", "worker-send-comm-fail", "check-worker-ttl")


class TaskLedger(SchedulerPlugin):
    """What the scheduler saw happen to each task, to tell "nothing lost" from the
    scheduler rather than from a result that recomputation would also give:

    - ``computed[key]``: times it finished (processing -> memory); above 1 it ran again;
    - ``lost[key]``: times it left memory because a worker holding it left;
    - ``wasted[key]``: times it was running on a worker that left, and started over.

    Install with ``client.register_plugin(TaskLedger())``; read with
    ``client.run_on_scheduler(task_ledger)``.
    """

    name = "dmo-task-ledger"

    def __init__(self) -> None:
        self.computed: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()
        self.wasted: Counter[str] = Counter()

    def transition(self, key: Any, start: str, finish: str, *args: Any, stimulus_id: str = "", **kwargs: Any) -> None:
        from_loss = str(stimulus_id).startswith(_WORKER_LOSS)
        if start == "processing" and finish == "memory":
            self.computed[str(key)] += 1
        elif start == "memory" and finish != "memory" and from_loss:
            self.lost[str(key)] += 1
        elif start == "processing" and finish not in ("memory", "erred") and from_loss:
            self.wasted[str(key)] += 1


def task_ledger(dask_scheduler: Any) -> dict[str, Any]:
    """Run on the scheduler: the :class:`TaskLedger`'s counts, as plain data."""
    ledger = dask_scheduler.plugins[TaskLedger.name]
    return {
        "computed": sum(ledger.computed.values()),
        "rerun": {k: n - 1 for k, n in ledger.computed.items() if n > 1},
        "lost": dict(ledger.lost),
        "wasted": dict(ledger.wasted),
    }


def worker_statuses(dask_scheduler: Any) -> dict[str, str]:
    """Run on the scheduler: worker name -> status."""
    return {str(ws.name): ws.status.name for ws in dask_scheduler.workers.values()}


def amm_config(dask_scheduler: Any) -> dict[str, Any]:
    """Run on the scheduler: its dask config's AMM section, which only the process's
    environment and files set (a live apply changes the extension, not this)."""
    import dask

    return dict(dask.config.get("distributed.scheduler.active-memory-manager"))
