"""Running totals of what the workers hold, kept exact from the scheduler's own
replica bookkeeping: the answers to "how many bytes does the cluster hold" and "what
would be lost with this worker" cost what changed since, not a walk of every key.

At 500 workers x 2,000 keys a walk of every replica takes half a second to a second
of the scheduler's event loop, and the operator asks every second.

**What is counted.** ``data_bytes``: every key some worker holds, once, by its size.
Per worker, the keys only it holds and their bytes (``sole``). A key's size is
``TaskState.get_nbytes()``, the scheduler's own (a key of unknown size counts as
``distributed.scheduler.default-data-size``, as it does in ``WorkerState.nbytes``).

**Why not the scheduler's numbers.** ``WorkerState.nbytes`` counts every copy (a key
on three workers, thrice); ``TaskGroup.nbytes_total`` sums every task ever sized,
in memory or not (a released task keeps its ``nbytes``), and never a copy.

**Why not the transition hook.** Scattered data enters memory without a transition
(``Scheduler.update_data`` sets the state itself), and copies come and go, with
workers, without one.

**Where, then.** In distributed 2026.8 (checked against its source) who holds a key
changes only through three ``Scheduler`` methods, ``add_replica``,
``remove_replica`` and ``remove_all_replicas`` (``WorkerState``'s own replica
methods are called only from them); and a key's size changes only through
``TaskState.set_nbytes``, called with copies held only from ``update_data`` (its
other caller, the processing->memory transition, sizes the key before its first copy
is added). :class:`HeldData` wraps these four on the scheduler instance, as
:mod:`amm_core.departures` wraps ``delete_worker_data``, and also the
``update_data`` handlers (the scheduler registered the unwrapped method as its
handlers when it was built).

**Registered on a scheduler that already holds data** (the operator registers the
plugin live on a scheduler whose image lacks it), the totals start from what the
scheduler keeps per worker, ``WorkerState.nbytes`` and the number of its keys, less
what the replicated tasks (``Scheduler.replicated_tasks``, walked) count more than
once: no walk of every key, which would block the event loop for a second at a
million keys. ``WorkerState.nbytes`` is the sum of its keys' ``get_nbytes()``,
except after a key of unknown size held somewhere is given its size by a later
``update_data``: the scheduler then counts the default size once too many for each
of its holders (``TaskState.set_nbytes``), and so do these totals. The scheduler's
own clients always send the sizes with the data.

:meth:`HeldData.walk` gives the same answers by walking every replica: the tests
compare the two under randomized changes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler, TaskState, WorkerState

#: Key of the HeldData in ``Scheduler.extensions`` (one per scheduler)
EXTENSION = "amm_core_held_data"
#: The scheduler methods wrapped (and its handlers that are these methods)
WRAPPED = ("add_replica", "remove_replica", "remove_all_replicas", "update_data")

logger = logging.getLogger(__name__)


class Watcher(Protocol):
    """Told of every new copy and of every key whose last copy went (the retirement
    engine: its copies in flight, amm_core.retirement.InFlight, and its keys at
    risk, amm_core.rescue.AtRisk)."""

    def copied(self, ts: TaskState, ws: WorkerState) -> None: ...

    def gone(self, ts: TaskState) -> None: ...


class HeldData:
    """What the workers of one scheduler hold, kept up to date as it changes.

    Built by the amm_core scheduler plugin when it starts; found by anyone with
    :meth:`of`."""

    scheduler: Scheduler
    #: Bytes of every key held by some worker, each key once
    data_bytes: int
    #: Per worker: [bytes, keys] of the keys it alone holds (workers holding none
    #: are left out)
    sole: dict[WorkerState, list[int]]
    #: Told of new copies and of keys gone (one: the scheduler's retirement engine)
    watcher: Watcher | None

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.watcher = None
        self.data_bytes, self.sole = self.count_from_workers(scheduler)
        scheduler.extensions[EXTENSION] = self
        self._wrap()

    @staticmethod
    def of(scheduler: Scheduler) -> HeldData | None:
        """The scheduler's HeldData; None without the amm_core plugin."""
        found = scheduler.extensions.get(EXTENSION)
        return found if isinstance(found, HeldData) else None

    def _tell(self, what: str, *args: Any) -> None:
        """The watcher, called from inside the scheduler's own state changes: whatever
        it raises is logged, never left to break the change half made."""
        if self.watcher is None:
            return
        try:
            getattr(self.watcher, what)(*args)
        except Exception:
            logger.exception("amm_core: the retirement engine failed to hear of %s", what)

    def sole_bytes(self, ws: WorkerState) -> int:
        return self.sole[ws][0] if ws in self.sole else 0

    def sole_keys(self, ws: WorkerState) -> int:
        return self.sole[ws][1] if ws in self.sole else 0

    # --- counting -------------------------------------------------------------

    @staticmethod
    def count(tasks: Iterable[TaskState]) -> tuple[int, dict[WorkerState, list[int]]]:
        """(data_bytes, sole) of ``tasks``, counted from scratch."""
        data_bytes = 0
        sole: dict[WorkerState, list[int]] = {}
        for ts in tasks:
            holders = ts.who_has
            if not holders:
                continue
            size = ts.get_nbytes()
            data_bytes += size
            if len(holders) == 1:
                for ws in holders:
                    entry = sole.setdefault(ws, [0, 0])
                    entry[0] += size
                    entry[1] += 1
        return data_bytes, sole

    @staticmethod
    def count_from_workers(
        scheduler: Scheduler,
    ) -> tuple[int, dict[WorkerState, list[int]]]:
        """(data_bytes, sole) from what the scheduler keeps per worker, less what the
        replicated tasks count more than once (see the module docstring): it costs
        the workers and the copies of replicated keys, not every key."""
        data_bytes = 0
        shared: dict[WorkerState, list[int]] = {}
        for ts in scheduler.replicated_tasks:
            holders = ts.who_has or ()
            size = ts.get_nbytes()
            data_bytes -= size * (len(holders) - 1)
            for ws in holders:
                entry = shared.setdefault(ws, [0, 0])
                entry[0] += size
                entry[1] += 1
        sole: dict[WorkerState, list[int]] = {}
        for ws in dict.values(scheduler.workers):
            data_bytes += ws.nbytes
            nbytes, nkeys = shared.get(ws, (0, 0))
            if len(ws.has_what) > nkeys:
                sole[ws] = [ws.nbytes - nbytes, len(ws.has_what) - nkeys]
        return data_bytes, sole

    def walk(self) -> tuple[int, dict[WorkerState, list[int]]]:
        """(data_bytes, sole) by walking every replica of every worker: what the
        running totals must equal (tests)."""
        seen: dict[Any, TaskState] = {}
        for ws in self.scheduler.workers.values():
            for ts in ws.has_what:
                seen[id(ts)] = ts
        return self.count(seen.values())

    def _sole(self, ws: WorkerState, nbytes: int, nkeys: int) -> None:
        entry = self.sole.get(ws)
        if entry is None:
            entry = self.sole[ws] = [0, 0]
        entry[0] += nbytes
        entry[1] += nkeys
        # Not when only its keys are 0: a resize being counted (update_data) may
        # leave bytes for a moment
        if not entry[1] and not entry[0]:
            del self.sole[ws]

    # --- the scheduler's replica bookkeeping, wrapped ---------------------------

    def _wrap(self) -> None:
        """Wrap the scheduler's methods on its instance, and the handlers the
        scheduler registered them as. A HeldData built before (by another copy of
        amm_core, uploaded by another operator) is unwrapped first: its totals stop,
        ours take over."""
        scheduler = self.scheduler
        tables = [
            getattr(scheduler, table, None)
            for table in ("handlers", "stream_handlers", "client_handlers")
        ]
        for name in WRAPPED:
            method = getattr(scheduler, name)
            original = getattr(method, "amm_core_original", method)
            wrapped = getattr(self, f"_{name}")(original)
            wrapped.amm_core_original = original  # type: ignore[attr-defined]
            setattr(scheduler, name, wrapped)
            for table in tables:
                for op, handler in list((table or {}).items()):
                    if handler == method or handler == original:
                        table[op] = wrapped  # type: ignore[index]

    def _add_replica(self, add: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(add)
        def add_replica(ts: TaskState, ws: WorkerState) -> None:
            before = len(ts.who_has) if ts.who_has else 0
            add(ts, ws)
            if len(ts.who_has or ()) == before:
                return  # it held it already
            size = ts.get_nbytes()
            if before == 0:
                self.data_bytes += size
                self._sole(ws, size, 1)
            elif before == 1:
                for other in ts.who_has or ():
                    if other is not ws:
                        self._sole(other, -size, -1)
            self._tell("copied", ts, ws)

        return add_replica

    def _remove_replica(self, remove: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(remove)
        def remove_replica(ts: TaskState, ws: WorkerState) -> None:
            before = len(ts.who_has) if ts.who_has else 0
            remove(ts, ws)
            left = ts.who_has
            if (len(left) if left else 0) == before:
                return
            size = ts.get_nbytes()
            if before == 1:
                self.data_bytes -= size
                self._sole(ws, -size, -1)
                self._tell("gone", ts)
            elif before == 2 and left:
                for other in left:
                    self._sole(other, size, 1)

        return remove_replica

    def _remove_all_replicas(self, remove_all: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(remove_all)
        def remove_all_replicas(ts: TaskState) -> None:
            holders = ts.who_has
            if holders:
                size = ts.get_nbytes()
                self.data_bytes -= size
                if len(holders) == 1:
                    for ws in holders:
                        self._sole(ws, -size, -1)
            remove_all(ts)
            if holders:
                self._tell("gone", ts)

        return remove_all_replicas

    def _update_data(self, update: Callable[..., None]) -> Callable[..., None]:
        """Scattered data: the copies it adds pass add_replica; what is counted here
        is the new size of keys already held (set_nbytes before their copies are
        added)."""

        @functools.wraps(update)
        def update_data(*, who_has: dict[Any, Any], **kwargs: Any) -> None:
            tasks = self.scheduler.tasks
            held = []
            for key in who_has:
                ts = tasks.get(key)
                if ts is not None and ts.who_has:
                    only = next(iter(ts.who_has)) if len(ts.who_has) == 1 else None
                    held.append((ts, ts.get_nbytes(), only))
            try:
                update(who_has=who_has, **kwargs)
            finally:
                for ts, size, only in held:
                    change = ts.get_nbytes() - size
                    if change:
                        self.data_bytes += change
                        if only is not None:
                            self._sole(only, change, 0)

        return update_data
