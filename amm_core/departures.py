"""Workers on their way out, and the rules that keep their data safe whatever else
runs on the scheduler.

A scheduler runs many mechanisms that copy, drop, retire and close: the AMM policies
of the main AMM (amm_core's, upstream ``ReduceReplicas``, a user's), upstream
``retire_workers`` with its ``RetireWorker`` policies and ad-hoc AMMs, the retirement
engine (amm_core.retirement) serving the operator and the preStop hooks, P2P
shuffles. Each is safe on its own; together they lost data, because each judged a
copy safe by its own light. The rules below are therefore enforced here, where every
mechanism passes, not policy by policy:

**In service.** A worker is *in service* when it is running or paused and its pod is
not going. A worker is *leaving* when its pod is going: a preStop hook retires it, or
the operator committed to deleting it (its retirement reached ``done``). Only copies
on workers in service count as safe (:func:`in_service`).

**A leaving worker stays out.** It is kept ``closing_gracefully``, whoever sets it
running or paused (the worker itself after a restart, an aborted
``retire_workers``, RetirePaused putting a worker back to paused):
:meth:`Departures.status_changed` sets it back synchronously, before the scheduler
acts on the change. So it is never in ``Scheduler.running``: no task is assigned to
it and no AMM picks it as a recipient (upstream ``_find_recipient`` draws from
``running``). New P2P shuffles do not pin output partitions to it either.

**No last copy dropped.** Every drop suggestion of every policy, in every AMM of
the scheduler, passes ``ActiveMemoryManagerExtension._find_dropper``. Upstream's
only refuses to drop the very last replica among the candidates a policy names,
which a policy can defeat (by naming the worker in service and keeping the copy on a
retiring one), and upstream ``RetireWorker`` drops any copy once a key has two,
wherever the other sits. Here a candidate is dropped from only if, with the drops
already pending in the cycle, a holder in service is left; otherwise the suggestion
is refused and the policy sees it refused (upstream ``RetireWorker`` then copies the
key to a worker in service). That also pins the safe copies of a retirement that is
``done``: nothing can take them away before its worker has left.

Drops outside the AMM (``Scheduler.rebalance``, ``Scheduler.replicate``) pass
``Scheduler.delete_worker_data``: wrapped on the scheduler instance, it frees a key on
a worker only if a holder in service is left, counting the deletions still under way
as gone; and ``rebalance`` moves data only between workers in service.

**Upstream retirements count only copies in service.** ``RetireWorker.done()``
(what ``Scheduler.retire_workers`` polls before it calls a worker retired) counts any
second copy, also one on a leaving worker.

Both are methods of upstream classes that ``retire_workers`` instantiates inside its
own call (an ad-hoc AMM when the main one is off), so the one place to change them is
the class (:func:`_patch_upstream`): on a scheduler with :class:`Departures` they
follow the rules above; on any other scheduler in the process they are upstream's.

**Who may not go at all** (:func:`downscaling_vetoes`): a worker holding actors or
running seceded tasks, or one a scheduler plugin keeps (P2P's
``valid_workers_downscaling``), asked once for all the workers in question, as
``Scheduler.workers_to_close`` asks: the retirement engine and the scaling handlers
ask about hundreds of workers at a time.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

from dask.typing import Key
from distributed.active_memory_manager import ActiveMemoryManagerExtension, RetireWorker
from distributed.comm.core import CommClosedError
from distributed.core import Status
from distributed.metrics import time

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler, TaskState, WorkerState

logger = logging.getLogger(__name__)

#: Key of the Departures in ``Scheduler.extensions`` (one per scheduler)
EXTENSION = "amm_core_departures"
#: Statuses in which a worker holds data others may rely on
SERVING = (Status.running, Status.paused)


def set_status(
    scheduler: Scheduler, ws: WorkerState, status: Status, prefix: str = "amm-core"
) -> None:
    """Change a worker's status as Scheduler.retire_workers does: on the scheduler at
    once, so that no task or copy lands on the worker meanwhile, and tell the worker."""
    stimulus_id = f"{prefix}-{time()}"
    scheduler.handle_worker_status_change(status, ws, stimulus_id)
    comm = scheduler.stream_comms.get(ws.address)
    if comm is None:
        return  # the worker is gone
    try:
        comm.send(
            {
                "op": "worker-status-change",
                "status": status.name,
                "stimulus_id": stimulus_id,
            }
        )
    except CommClosedError:
        logger.info("Could not tell %s its status is %s: comm closed", ws.address, status)


class Departures:
    """The leaving workers of one scheduler, and the guards that follow from them.

    Built by the amm_core scheduler plugin when it starts; found by anyone with
    :meth:`of`."""

    scheduler: Scheduler
    #: Workers whose pods are going (never put back in service)
    leaving: set[WorkerState]
    #: Drops refused because they would have left a key with no holder in service
    drops_refused: int
    #: Deletions of replicas under way outside the AMM: key -> workers
    _deleting: defaultdict[Key, set[WorkerState]]

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.leaving = set()
        self.drops_refused = 0
        self._deleting = defaultdict(set)
        scheduler.extensions[EXTENSION] = self
        self._guard_deletions()
        self._guard_shuffles()
        _patch_upstream()

    @staticmethod
    def of(scheduler: Scheduler) -> Departures | None:
        """The scheduler's Departures; None without the amm_core plugin."""
        found = scheduler.extensions.get(EXTENSION)
        return found if isinstance(found, Departures) else None

    def in_service(self, ws: WorkerState) -> bool:
        """Running or paused, and its pod not going: its copies count as safe."""
        return ws.status in SERVING and ws not in self.leaving

    def out_of_service(self) -> set[WorkerState]:
        """Workers whose copies go with them: retiring, closing, or leaving."""
        # dict.values: the scheduler's SortedDict iterates its own views in Python
        return {ws for ws in dict.values(self.scheduler.workers) if not self.in_service(ws)}

    def add(self, ws: WorkerState, why: str) -> None:
        """``ws``'s pod is going: keep it out from now on."""
        if ws in self.leaving:
            return
        self.leaving.add(ws)
        logger.info("Worker %s (%s) is leaving: %s", ws.name, ws.address, why)
        # A worker still in init is in no task or recipient set; it is set back when it
        # says running (status_changed)
        if ws.status in SERVING:
            set_status(self.scheduler, ws, Status.closing_gracefully)

    def worker_left(self, address: str) -> None:
        """The worker at ``address`` left the cluster: nothing more to keep out."""
        self.leaving = {ws for ws in self.leaving if ws.address != address}

    def status_changed(self, address: str, event: dict[str, Any]) -> None:
        """Called synchronously by ``handle_worker_status_change`` through the
        plugin's ``log_event``, after it set the new status and before it acts on it
        (it reads the status again): a leaving worker set running or paused is set
        back to closing_gracefully, so the scheduler never gives it work."""
        if event.get("status") not in (Status.running.name, Status.paused.name):
            return
        ws = self.scheduler.workers.get(address)
        if ws is not None and ws in self.leaving and ws.status in SERVING:
            logger.info(
                "Worker %s (%s) is leaving: kept closing_gracefully (%s asked %s)",
                ws.name,
                address,
                event.get("stimulus_id"),
                ws.status.name,
            )
            set_status(self.scheduler, ws, Status.closing_gracefully)

    # --- no last copy dropped -------------------------------------------------

    def may_drop(
        self, ts: TaskState, ws: WorkerState, pending: Collection[WorkerState] = ()
    ) -> bool:
        """Whether ``ws`` may drop its copy of ``ts`` (with the drops ``pending``): a
        holder in service is left."""
        return any(
            other is not ws and other not in pending and self.in_service(other)
            for other in ts.who_has or ()
        )

    def droppers(
        self,
        ts: TaskState,
        candidates: set[WorkerState] | None,
        pending: set[WorkerState],
    ) -> set[WorkerState]:
        """The ``candidates`` (default: every holder) that may drop ``ts``. A
        suggestion none of whose holders may drop counts as refused."""
        holders = ts.who_has or set()
        pool = holders if candidates is None else candidates & holders
        serving = {w for w in holders if w not in pending and self.in_service(w)}
        # a candidate may drop if a holder in service other than itself is left: with
        # two in service, any; with one, any but that one
        if len(serving) >= 2:
            allowed = set(pool)
        elif serving:
            allowed = pool - serving
        else:
            allowed = set()
        if pool and not allowed:
            self.drops_refused += 1
            logger.debug("Drop of %s refused: no other copy on a worker in service", ts.key)
        return allowed

    def _guard_deletions(self) -> None:
        """``delete_worker_data`` (rebalance, replicate) frees only what leaves a copy
        in service; ``rebalance`` moves data between workers in service only. Wrapped
        on the scheduler instance (see the module docstring)."""
        scheduler = self.scheduler
        delete = scheduler.delete_worker_data
        find_msgs = scheduler._rebalance_find_msgs

        @functools.wraps(delete)
        async def delete_worker_data(
            worker_address: str, keys: Collection[Key], stimulus_id: str
        ) -> None:
            ws = scheduler.workers.get(worker_address)
            if ws is None:
                return await delete(worker_address, keys, stimulus_id)
            allowed = []
            for key in keys:
                ts = scheduler.tasks.get(key)
                if ts is None or self.may_drop(ts, ws, self._deleting.get(key, ())):
                    allowed.append(key)
                else:
                    self.drops_refused += 1
            for key in allowed:
                self._deleting[key].add(ws)
            try:
                if allowed:
                    await delete(worker_address, allowed, stimulus_id)
            finally:
                for key in allowed:
                    self._deleting[key].discard(ws)
                    if not self._deleting[key]:
                        del self._deleting[key]

        @functools.wraps(find_msgs)
        def rebalance_find_msgs(keys: Any, workers: Iterable[WorkerState]) -> Any:
            return find_msgs(keys, [ws for ws in workers if self.in_service(ws)])

        scheduler.delete_worker_data = delete_worker_data  # type: ignore[method-assign]
        scheduler._rebalance_find_msgs = rebalance_find_msgs  # type: ignore[method-assign]

    # --- P2P ------------------------------------------------------------------

    def _guard_shuffles(self) -> None:
        """New P2P shuffles pin output partitions over ``scheduler.workers`` when the
        barrier has no restrictions, leaving workers included: their outputs would be
        lost with them and the shuffle restarted. Wrap the shuffle plugin's
        ``_calculate_worker_for`` on its instance so that, while workers are leaving,
        it draws from the workers in service."""
        shuffle = self.scheduler.plugins.get("shuffle")
        calculate = getattr(shuffle, "_calculate_worker_for", None)
        try:  # a private module of distributed: without it, no guard
            from distributed.shuffle._core import barrier_key
        except ImportError:
            return
        if calculate is None:
            return

        @functools.wraps(calculate)
        def calculate_worker_for(spec: Any) -> dict[Any, str]:
            barrier = self.scheduler.tasks.get(barrier_key(spec.id))
            if barrier is None or not self.leaving:
                return calculate(spec)
            restrictions = barrier.worker_restrictions
            # in upstream's order (scheduler.workers), the restrictions kept
            serving = {
                address for address, ws in self.scheduler.workers.items()
                if self.in_service(ws) and (not restrictions or address in restrictions)
            }
            if not serving:
                return calculate(spec)
            barrier.worker_restrictions = serving
            try:
                return calculate(spec)
            finally:
                barrier.worker_restrictions = restrictions

        shuffle._calculate_worker_for = calculate_worker_for  # type: ignore[union-attr]


def downscaling_vetoes(
    scheduler: Scheduler, workers: list[WorkerState], skip: object = None
) -> dict[WorkerState, str]:
    """Why each of ``workers`` cannot go without losing something (the workers that
    can go are left out): actors, long-running tasks, or a scheduler plugin's
    ``valid_workers_downscaling``, asked once for all the workers that are left, as
    ``Scheduler.workers_to_close`` asks (``skip``: the asking plugin)."""
    vetoes: dict[WorkerState, str] = {}
    for ws in workers:
        if ws.actors:
            vetoes[ws] = f"the worker holds actor(s) {_some(ws.actors)}, which cannot be moved"
        elif ws.long_running:
            vetoes[ws] = (
                f"the worker runs long-running (seceded) task(s) "
                f"{_some(ws.long_running)}, which would be lost"
            )
    asking = [ws for ws in workers if ws not in vetoes]
    for name, plugin in list(scheduler.plugins.items()):
        if not asking:
            break
        if plugin is skip:
            continue
        # Third-party code: whatever it raises must not break the handler or the cycle
        # asking; it counts as a veto.
        try:
            valid = set(plugin.valid_workers_downscaling(scheduler, list(asking)))
        except Exception as e:
            logger.exception("valid_workers_downscaling of plugin %r failed", name)
            why = (
                f"scheduler plugin {name!r} failed to say whether the worker may "
                f"go ({type(e).__name__}: {e})"
            )
            vetoes.update(dict.fromkeys(asking, why))
            break
        for ws in asking:
            if ws not in valid:
                vetoes[ws] = (
                    f"scheduler plugin {name!r} vetoes removing the worker "
                    "(valid_workers_downscaling; e.g. a P2P shuffle in progress on it)"
                )
        asking = [ws for ws in asking if ws not in vetoes]
    return vetoes


def downscaling_veto(scheduler: Scheduler, ws: WorkerState, skip: object = None) -> str:
    """Why ``ws`` cannot go without losing something ("" if it can): see
    :func:`downscaling_vetoes`."""
    return downscaling_vetoes(scheduler, [ws], skip).get(ws, "")


def _some(tasks: Iterable[TaskState], most: int = 5) -> str:
    """A few keys for a message (messages are bounded: the operator reads them)."""
    keys = sorted(str(ts.key)[:100] for ts in tasks)
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return f"{keys[:most]}{more}"


def out_of_service(scheduler: Scheduler) -> set[WorkerState]:
    """Workers whose copies do not count as safe (see the module docstring); without
    the amm_core plugin, those neither running nor paused."""
    departures = Departures.of(scheduler)
    if departures is not None:
        return departures.out_of_service()
    return {ws for ws in scheduler.workers.values() if ws.status not in SERVING}


def _patch_upstream() -> None:
    """On schedulers with :class:`Departures`: ``_find_dropper`` of every AMM
    chooses only among the candidates that may drop, and ``RetireWorker.done()``
    asks for a copy in service (see the module docstring). Idempotent."""
    find_dropper = ActiveMemoryManagerExtension._find_dropper
    retire_done = RetireWorker.done
    if getattr(find_dropper, "amm_core", False):
        return

    @functools.wraps(find_dropper)
    def _find_dropper(
        self: ActiveMemoryManagerExtension,
        ts: TaskState,
        candidates: set[WorkerState] | None,
        pending_drop: set[WorkerState],
    ) -> WorkerState | None:
        departures = Departures.of(self.scheduler)
        if departures is not None:
            candidates = departures.droppers(ts, candidates, pending_drop)
            if not candidates:
                return None
        return find_dropper(self, ts, candidates, pending_drop)

    @functools.wraps(retire_done)
    def done(self: RetireWorker) -> bool:
        scheduler = self.manager.scheduler
        departures = Departures.of(scheduler)
        ws = scheduler.workers.get(self.address)
        if departures is None or ws is None or self not in self.manager.policies:
            return retire_done(self)
        return all(departures.may_drop(ts, ws) for ts in ws.has_what)

    _find_dropper.amm_core = True  # type: ignore[attr-defined]
    ActiveMemoryManagerExtension._find_dropper = _find_dropper  # type: ignore[method-assign]
    RetireWorker.done = done  # type: ignore[method-assign]
