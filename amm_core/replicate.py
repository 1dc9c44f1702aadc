"""Replicate as an Active Memory Manager policy: a wanted number of copies per key,
kept over time.

Upstream ``Client.replicate`` blocks until the copies exist, then forgets about them:
the default ``ReduceReplicas`` policy drops them again within one AMM cycle
(dask/distributed#6578), ``scatter(..., broadcast=True)`` is undone the same way
(dask/distributed#8657), and a copy lost with its worker is never recreated. The 2021
AMM announcement promised instead that replicate would tell the AMM the wanted count
and return at once, and that the AMM would keep that many copies alive, including on
workers that join later for "all".

This module provides:

- :class:`Replicate`, a policy holding the wanted count of each tracked key. Every
  cycle it creates the missing copies on workers with room (see
  :func:`amm_core._room.workers_with_room`), which recreates copies lost with a
  worker and fills workers that joined since. It never drops: dropping excess copies
  is the reducer's job.
- :func:`wanted_replicas`, what every reducer asks before dropping a copy.
- :class:`ReduceReplicas`, a drop-in replacement of upstream's policy that honours
  :func:`wanted_replicas` instead of assuming one copy per key.
- :func:`replicate` and :func:`scatter`, the client-side calls: they register the
  wanted counts on the scheduler and return at once.

A tracked key is forgotten when it leaves the cluster (its ``TaskState`` is no longer
the one in ``scheduler.tasks``). A key that is only lost and recomputed keeps its
count: the same ``TaskState`` goes back to memory. The policy holds the key and a weak
reference to its ``TaskState`` (see :func:`amm_core._room.live_task`): a released key
is not kept alive by it, even while the AMM is stopped and ``run()`` never comes to
forget it.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from dask.typing import Key
from distributed import active_memory_manager as amm_module
from distributed.active_memory_manager import (
    ActiveMemoryManagerExtension,
    ActiveMemoryManagerPolicy,
    Suggestion,
    SuggestionGenerator,
)
from distributed.client import futures_of
from distributed.core import Status

from amm_core import _room
from amm_core._room import CountingPolicy, live_task, workers_with_room

if TYPE_CHECKING:
    from distributed import Client
    from distributed.scheduler import Scheduler, TaskState

# Main logger. Terse at DEBUG level.
logger = logging.getLogger(__name__)
# Per-key logging. Verbose at DEBUG level.
task_logger = logging.getLogger(__name__ + ".tasks")

#: Worker states whose copies count as held: closing_gracefully workers are about to
#: take theirs away, paused workers keep theirs.
_HOLDING = frozenset({Status.running, Status.paused})

#: A wanted number of copies: an int >= 1, or "all" for every running worker
Wanted = int | Literal["all"]


def _check_wanted(n: Any) -> Wanted:
    if n == "all":
        return "all"
    if isinstance(n, int) and not isinstance(n, bool) and n >= 1:
        return n
    raise ValueError(f"n must be an int >= 1 or 'all'; got {n!r}")


def find_policy(
    manager: ActiveMemoryManagerExtension, cls: type[ActiveMemoryManagerPolicy]
) -> ActiveMemoryManagerPolicy | None:
    """The first policy of class ``cls`` (or a subclass) registered on ``manager``."""
    for policy in manager.policies:
        if isinstance(policy, cls):
            return policy
    return None


def wanted_replicas(manager: ActiveMemoryManagerExtension, ts: TaskState) -> int:
    """How many copies of ``ts`` the cluster should hold.

    1 for untracked keys or when no :class:`Replicate` policy is registered; for
    "all", the number of running workers (at least 1).
    """
    policy = find_policy(manager, Replicate)
    if policy is None:
        return 1
    assert isinstance(policy, Replicate)
    return policy.wanted_for(ts)


class Replicate(CountingPolicy):
    """Keep the wanted number of copies of tracked keys.

    Tracked keys are registered with :meth:`want` (from the client: :func:`replicate`
    or :func:`scatter`). The policy takes no parameters, so that it can be listed in
    the dask config::

        distributed.scheduler.active-memory-manager.policies:
        - class: amm_core.replicate.Replicate
        - class: amm_core.replicate.ReduceReplicas

    Counters: ``replicas_copied`` (copies accepted by the AMM), ``no_room`` (a copy
    was missing but no running worker without one had room for it),
    ``too_few_workers`` (more copies wanted than running workers),
    ``keys_forgotten`` (tracked keys that left the cluster),
    ``conflicting_reducer`` (cycles run alongside upstream's ReduceReplicas, which
    undoes the copies; logged as an error once).

    New copies of a key are capped per cycle at its number of holders, so that a key
    wanted on many workers spreads over a few cycles as a tree.
    """

    #: Tracked keys: a weak reference to the TaskState seen at registration and the
    #: wanted count. The reference tells a released key from a recreated one.
    wanted: dict[Key, tuple[weakref.ref[TaskState], Wanted]]
    #: Whether the conflict with upstream's ReduceReplicas was logged already
    conflict_logged: bool

    def __init__(self) -> None:
        super().__init__()
        self.wanted = {}
        self.conflict_logged = False

    def __repr__(self) -> str:
        return f"Replicate({len(self.wanted)} keys)"

    def want(self, tasks: Iterable[TaskState], n: Wanted) -> None:
        """Track ``tasks`` with ``n`` wanted copies; ``n == 1`` stops tracking."""
        n = _check_wanted(n)
        for ts in tasks:
            if n == 1:
                self.wanted.pop(ts.key, None)
            else:
                self.wanted[ts.key] = (weakref.ref(ts), n)
                task_logger.debug("Replicate: %s wants %s copies", ts.key, n)

    def wanted_for(self, ts: TaskState) -> int:
        """The wanted count of ``ts`` as a number of copies (1 if untracked)."""
        entry = self.wanted.get(ts.key)
        if entry is None or entry[0]() is not ts:
            return 1
        n = entry[1]
        if n == "all":
            return max(1, len(self.manager.scheduler.running))
        return n

    def run(self) -> SuggestionGenerator:
        manager = self.manager
        scheduler = manager.scheduler
        self._check_reducers()
        self._forget_released()
        ncopies = 0
        nkeys = 0
        for key, (ref, n) in list(self.wanted.items()):
            ts = ref()
            if ts is None or ts.state != "memory" or ts.actor:
                # Lost and being recomputed, or erred: nothing to copy yet.
                continue
            assert ts.who_has
            pending = manager.pending.get(ts)
            if pending is None and self._has_target(ts, n):
                # The steady state of most tracked keys: no set arithmetic.
                continue

            pending_repl, pending_drop = pending or (set(), set())
            # Copies on closing_gracefully workers are about to go away: don't count
            # them. Paused workers keep theirs.
            held = {ws for ws in ts.who_has if ws.status in _HOLDING}
            others = scheduler.running - held - pending_repl
            if n == "all":
                missing = len(others)
            else:
                missing = n - len(held - pending_drop) - len(pending_repl)
            if missing <= 0:
                continue

            nkeys += 1
            # At most one new copy per current holder and cycle: the copies spread
            # like Client.replicate's tree (1, 2, 4, ... holders) instead of every
            # recipient fetching from the same worker at once.
            ncap = min(missing, len(ts.who_has))
            # Room only changes on the recipient, which leaves `others`: the
            # candidates are computed once per key.
            candidates = workers_with_room(
                ts.nbytes, manager.workers_memory, others, measure=manager.measure
            )
            for _ in range(ncap):
                if not others:
                    self.count("too_few_workers")
                    break
                if not candidates:
                    self.count("no_room")
                    task_logger.debug(
                        "Replicate: no worker with room for a copy of %s (%d bytes)",
                        key,
                        ts.nbytes,
                    )
                    break
                ws = yield Suggestion("replicate", ts, candidates)
                if ws is None:
                    break
                others = others - {ws}
                candidates = candidates - {ws}
                ncopies += 1
                self.count("replicas_copied")

        if ncopies:
            logger.debug("Replicate: creating %d copies of %d keys", ncopies, nkeys)

    def _forget_released(self) -> None:
        """Stop tracking the keys that left the cluster (released by every client)."""
        scheduler = self.manager.scheduler
        for key, (ref, _) in list(self.wanted.items()):
            if live_task(scheduler, key, ref) is None:
                del self.wanted[key]
                self.count("keys_forgotten")
                task_logger.debug("Replicate: forgetting released key %s", key)

    def _has_target(self, ts: TaskState, n: Wanted) -> bool:
        """Whether ``ts`` holds its wanted copies, on running or paused workers,
        without building sets (called for every tracked key every cycle)."""
        assert ts.who_has
        if n == "all":
            running = self.manager.scheduler.running
            return len(ts.who_has) >= len(running) and running <= ts.who_has
        if len(ts.who_has) < n:
            return False
        return sum(ws.status in _HOLDING for ws in ts.who_has) >= n

    def _check_reducers(self) -> None:
        """Count (and log once) an upstream ReduceReplicas running alongside.

        Upstream's policy drops every copy beyond one (or beyond the dependents'
        needs): it would drop what this policy copies, and the two would copy and
        drop the same keys every cycle. ``register_wanted`` swaps it out, but a
        MemoryPolicy or the dask config can list both.
        """
        if not any(
            type(p) is amm_module.ReduceReplicas for p in self.manager.policies
        ):
            return
        self.count("conflicting_reducer")
        if not self.conflict_logged:
            self.conflict_logged = True
            logger.error(
                "Replicate runs alongside distributed.active_memory_manager."
                "ReduceReplicas, which drops the copies it makes: the same keys are "
                "copied and dropped every cycle. Use amm_core.replicate.ReduceReplicas "
                "or amm_core.reduce.PressureReduceReplicas instead."
            )

    def report(self) -> dict[str, Any]:
        if getattr(self, "manager", None) is not None:
            # Also while the AMM is stopped: released keys are not tracked ones
            self._forget_released()
        out = super().report()
        by_count: dict[str, int] = {}
        for _, n in self.wanted.values():
            by_count[str(n)] = by_count.get(str(n), 0) + 1
        out["tracked_keys"] = len(self.wanted)
        out["tracked_by_count"] = by_count
        return out


class ReduceReplicas(CountingPolicy, amm_module.ReduceReplicas):
    """Upstream's ReduceReplicas, but dropping only copies beyond
    :func:`wanted_replicas` instead of beyond one, and suggesting at most
    :data:`amm_core._room.MAX_DROPS_PER_CYCLE` drops per cycle (the others in the
    next cycles).

    Use it in place of ``distributed.active_memory_manager.ReduceReplicas`` in the
    dask config. Counter: ``replicas_dropped`` (drops accepted by the AMM).
    """

    def run(self) -> SuggestionGenerator:
        nkeys = 0
        ndrop = 0
        budget = _room.MAX_DROPS_PER_CYCLE
        # wanted_replicas(), with the Replicate policy looked up once per cycle
        replicate = find_policy(self.manager, Replicate)
        assert replicate is None or isinstance(replicate, Replicate)
        for ts in self.manager.scheduler.replicated_tasks:
            if budget <= 0:
                logger.debug("ReduceReplicas: drop budget spent; the rest next cycle")
                break
            desired = 1 if replicate is None else replicate.wanted_for(ts)
            assert ts.who_has

            # As upstream: keep a copy for each worker where a dependent waits, but
            # only count distinct workers when that is cheap.
            nwaiters = len(ts.waiters or ())
            if desired < nwaiters < 20:
                nwaiters = len(
                    {waiter.processing_on or waiter for waiter in ts.waiters or ()}
                )

            ndrop_key = len(ts.who_has) - max(desired, nwaiters)
            if ts in self.manager.pending:
                pending_repl, pending_drop = self.manager.pending[ts]
                ndrop_key += len(pending_repl) - len(pending_drop)

            if ndrop_key > 0:
                nkeys += 1
                for _ in range(ndrop_key):
                    if budget <= 0:
                        break
                    ws = yield Suggestion("drop", ts)
                    if ws is not None:
                        budget -= 1  # drops made, not asked: refusals must not starve others
                        ndrop += 1
                        self.count("replicas_dropped")

        if ndrop:
            logger.debug(
                "ReduceReplicas: dropping %d superfluous replicas of %d keys",
                ndrop,
                nkeys,
            )


def register_wanted(
    dask_scheduler: Scheduler, keys: list[Key], n: Wanted
) -> dict[str, Any]:
    """Scheduler side of :func:`replicate`: record ``n`` wanted copies of ``keys``.

    Adds a :class:`Replicate` policy to the AMM if it has none, and swaps upstream's
    ReduceReplicas (which would undo the copies) for :class:`ReduceReplicas`.
    Runs through ``Client.run_on_scheduler``, by reference: amm_core must be
    importable on the scheduler, as it must be for the dask config to name it.
    """
    n = _check_wanted(n)
    amm: ActiveMemoryManagerExtension = dask_scheduler.extensions["amm"]
    policy = find_policy(amm, Replicate)
    manager = _managing_owner(dask_scheduler)
    if policy is None and manager is not None:
        # The operator would take an added policy away at its next resync.
        raise RuntimeError(
            f"this scheduler's Active Memory Manager is managed by MemoryPolicy "
            f"{manager.get('namespace')}/{manager.get('name')}, which has no Replicate "
            f"policy: add `- class: Replicate` to its spec.activeMemoryManager.policies"
        )
    if policy is None:
        policy = Replicate()
        amm.add_policy(policy)
        logger.info("Added the Replicate policy to the Active Memory Manager")
    assert isinstance(policy, Replicate)
    for other in list(amm.policies) if manager is None else ():
        if type(other) is amm_module.ReduceReplicas:
            amm.policies.remove(other)
            amm.add_policy(ReduceReplicas())
            logger.info(
                "Replaced upstream ReduceReplicas with amm_core.replicate.ReduceReplicas"
                " so that replicated keys keep their copies"
            )

    tasks = [dask_scheduler.tasks[k] for k in keys if k in dask_scheduler.tasks]
    policy.want(tasks, n)
    if not amm.running:
        logger.warning(
            "Active Memory Manager is not running: replicas of %d keys will be made"
            " only when it runs (client.amm.start() or run_once())",
            len(tasks),
        )
    return {
        "tracked": len(tasks),
        "unknown": len(keys) - len(tasks),
        "amm_running": amm.running,
    }


def _managing_owner(dask_scheduler: Scheduler) -> dict[str, Any] | None:
    """The MemoryPolicy that configured this scheduler through the amm_core plugin."""
    control = getattr(dask_scheduler.plugins.get("amm-core"), "control", None)
    return getattr(control, "owner", None)


def replicate(client: Client, futures: Any, n: Wanted = 2) -> Any:
    """Ask the AMM to keep ``n`` copies of ``futures`` (or "all": one on every running
    worker, including workers that join later); return at once.

    The non-blocking counterpart of ``Client.replicate``: the copies are made by the
    AMM over its next cycles, on workers with room, and recreated if a worker holding
    one leaves. ``n=1`` stops tracking. ``futures`` may be futures or persisted
    collections. Returns ``{"tracked", "unknown", "amm_running"}`` (a coroutine with
    an asynchronous client).
    """
    n = _check_wanted(n)
    keys = [f.key for f in futures_of(futures)]
    return client.run_on_scheduler(register_wanted, keys=keys, n=n)


def scatter(
    client: Client,
    data: Any,
    broadcast: bool = False,
    n: Wanted | None = None,
    **kwargs: Any,
) -> Any:
    """``Client.scatter`` whose copies the AMM keeps.

    With ``broadcast=True`` the keys are registered as wanted on "all" workers, so
    that the default reducer does not undo the broadcast and workers that join later
    receive a copy; otherwise ``n`` copies if given. Extra ``kwargs`` go to
    ``Client.scatter``. Returns the futures (a coroutine with an asynchronous client).
    """
    wanted = "all" if broadcast else n
    if client.asynchronous:
        return _scatter_async(client, data, broadcast, wanted, kwargs)
    futures = client.scatter(data, broadcast=broadcast, **kwargs)
    if wanted is not None:
        replicate(client, futures, wanted)
    return futures


async def _scatter_async(
    client: Client,
    data: Any,
    broadcast: bool,
    wanted: Wanted | None,
    kwargs: dict[str, Any],
) -> Any:
    futures = await client.scatter(data, broadcast=broadcast, **kwargs)
    if wanted is not None:
        await replicate(client, futures, wanted)
    return futures
