"""Workers named in a handler's arguments (the operator's, or a preStop hook's): the
names checked, then found in the scheduler by name or address. Shared by the
retirement and scaling handlers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler, WorkerState


def worker_names(workers: Any) -> list[str]:
    """``workers`` as a list of strings; ValueError (meant for the caller) if it is
    not one."""
    if not isinstance(workers, (list, tuple)) or not all(isinstance(w, str) for w in workers):
        raise ValueError(f"workers must be a list of names or addresses, got {workers!r}")
    return list(workers)


def find_workers(
    scheduler: Scheduler, names: list[str]
) -> tuple[list[WorkerState], list[str]]:
    """Workers by name or address, in the given order, each once; and the names not
    found."""
    by_name = {str(ws.name): ws for ws in dict.values(scheduler.workers)}
    found: list[WorkerState] = []
    seen: set[WorkerState] = set()
    unknown = []
    for name in names:
        ws = scheduler.workers.get(name) or by_name.get(name)
        if ws is None:
            unknown.append(name)
        elif ws not in seen:
            seen.add(ws)
            found.append(ws)
    return found, unknown
