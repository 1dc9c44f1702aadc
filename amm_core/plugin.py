"""A scheduler plugin through which an outside controller (the dask-memory-operator)
configures the Active Memory Manager of a live scheduler.

Why a plugin: a running scheduler reads ``distributed.scheduler.active-memory-manager``
only once, when it builds its AMM extension, and the only run-time controls upstream
offers are ``client.amm.start()/stop()/run_once()``. Changing policies, interval or
measure of a live scheduler otherwise means shipping pickled code to it. This plugin
adds three scheduler handlers that take and return plain data (msgpack-able dicts),
so the operator never sends code for day-to-day work:

``amm_core_status()``
    What is in force: running, interval, measure, policies with their arguments,
    counters, and whatever the policies report about themselves.
``amm_core_apply(config, owner)``
    Make the AMM what ``config`` says (the dask-config shape of the AMM section).
    Everything is validated before anything changes; an invalid config raises
    ``ValueError`` and leaves the scheduler as it was. Policies hold state (the
    wanted replica counts of ``Replicate``, the paused-since times and retirements of
    ``RetirePaused``, the moves in flight of ``Rebalance``), so a policy entry whose
    class and arguments are unchanged keeps its policy object across applies, whatever
    the owner or generation; only changed or new entries get new objects. Applying
    what is already in force under the same owner and generation only repairs drift
    of start/interval/measure in place. An owner never goes back: a generation older
    than the one in force for the same uid changes nothing (a late or retried call
    from an operator that has not seen the newer generation yet).
``amm_core_restore()``
    Back to the scheduler's own configuration, as recorded when the plugin started.

**Policies run in config order, and the scheduler's own config is read leniently,
what an operator sends strictly**: see :mod:`amm_core.config`.

**A preloaded plugin never stops its scheduler.** The scheduler runs plugins'
``start()`` outside of its preload error handling, so a failure there would abort
the scheduler's start-up. Preloaded on a scheduler without the AMM extension
(``Scheduler(extensions=...)`` without ``amm``), or failing at start for any other
reason, the plugin logs the reason and stays inert: ``amm_core_status`` answers with
``"error": <reason>`` and ``"amm": None``, ``amm_core_apply``/``amm_core_restore``
raise ValueError with the reason. Registered live, it raises to the caller instead.

``RetireWorker`` policies belong to ``Scheduler.retire_workers`` calls in progress,
which poll them until done: they are never removed. When a config stops the AMM while
retirements are in progress, they are handed over to an ad-hoc AMM, exactly as
``retire_workers`` itself does when the AMM is off, so that they cannot hang.

Message shapes (all plain data)::

    config = {"start": bool, "interval": "2s" | seconds, "measure": str,
              "policies": [{"class": "dotted.path" | short name, **kwargs}, ...]}
        # keys left out keep the scheduler's own values; unknown keys are refused;
        # interval >= MIN_INTERVAL (0.1 s); policies run in this order;
        # short names are those of amm_core.BUILTIN_POLICIES
    owner = {"uid": str, "namespace": str, "name": str, "generation": int}

    status = {
        "plugin_version": 1, "amm_core_version": str | None,
        "amm_core_digest": str,          # amm_core.source_digest(): the code it runs
        "amm_core_path": str,            # where the scheduler imported amm_core from
        "distributed_version": str,
        "source": "preload" | "live",
        "baseline_notes": [str, ...],    # what of the scheduler's own AMM config
                                         # was not taken as written
        "error": str | None,             # why the plugin is inert (no AMM); then
                                         # "amm" is None, "owner" None, "in_force"
                                         # False, the lists empty
        "owner": owner | None,           # None: the scheduler's own configuration
        "in_force": bool,                # the AMM is exactly what was last applied
        "amm": None | {
            "running": bool, "interval": seconds, "measure": str,
            "policies": [{"class": str, "kwargs": dict | None,   # configured
                          "role": "configured" | "retirement" | "foreign"}, ...],
                                         # ones first, in config order
            "cycles": int, "replicas_copied": int, "replicas_dropped": int,
            "memory_bytes": int,         # cluster memory by the measure in force
            "retiring_workers": [address, ...],
            "drops_refused": int,        # drops that would have left a key with no
                                         # copy on a worker in service
                                         # (amm_core.departures)
        },
        "workers": int,
        "policy_reports": [policy.report(), ...],
        "replace": [entry, ...],         # report()["replace"] of all policies
    }

Graceful retirement (amm_core.retirement; non-blocking: each handler returns at
once, the operator polls)::

    amm_core_retire(workers: [name | address, ...], limit: seconds,
                    drain: bool = True, reason: str = "", keep_out: bool = True)
        -> {"retirements": [retirement, ...], "unknown": [name, ...]}
        # idempotent: a worker already retiring or retired keeps its record;
        # a refused one (actors, long-running tasks, a plugin's veto) comes back
        # "aborted" with the reason
    amm_core_retirements() -> [retirement, ...]
    amm_core_cancel_retirement(workers) -> {"cancelled": [name, ...],
                                            "kept": [{"worker", "reason"}, ...],
                                            # done, or its pod is going
                                            "retirements": [retirement, ...]}
    amm_core_forget_retirement(workers) -> {"forgotten": [name, ...],
                                            "kept": [{"worker", "reason"}, ...]}
    amm_core_retirement_candidates(workers, n: int)
        -> {"candidates": [{"worker", "address", "unique_bytes", "unique_keys",
                            "tasks_running", "why"}, ...],   # best first, at most n
            "excluded": [{"worker", "reason"}, ...]}

    amm_core_scaling()
        -> {"target": int,               # Scheduler.adaptive_target()
            "data_bytes": int,           # keys in memory, each counted once
            "pause_fraction": float | None,   # distributed.worker.memory.pause
            "worker_states": [{"name", "address", "status", "memory_limit",
                               "nbytes", "processing"}, ...]}

    retirement = {
        "worker": name, "address": str,
        "state": "draining" | "moving" | "done" | "aborted",
        "reason": str,                   # why aborted, else the caller's reason
        "requested": str,                # the caller's reason
        "blocked": str,                  # why a leaving worker's retirement cannot
                                         # finish now ("" if it can)
        "keys_left": int, "bytes_left": int,   # keys only it holds (not safe)
        "tasks_running": int, "keys_moved": int, "bytes_moved": int,
        "wasted_tasks": int,             # tasks lost (or to be lost, drain=False)
        "keys_lost": int, "bytes_lost": int,   # what the scheduler lost when the
                                         # worker left (its remove-worker event)
        "started": scheduler time, "seconds": float, "limit": float,
        "drain": bool,
        "left": bool,                    # the worker left the cluster
        "rejoined": int,                 # re-registrations kept closing_gracefully
        "keep_out": bool,                # False (a preStop hook): only a process of
                                         # the same pod is kept out
        "leaving": bool,                 # its pod is going: never back in service
    }

``status()`` also has ``"retirements": [retirement, ...]``.

Install with ``dask scheduler --preload amm_core.plugin`` (or
``DASK_DISTRIBUTED__SCHEDULER__PRELOAD=amm_core.plugin``); the operator can also
register it on a running scheduler (see dask_memory_operator.schedulers.install).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import dask
import distributed
from distributed.active_memory_manager import (
    ActiveMemoryManagerExtension,
    ActiveMemoryManagerPolicy,
    RetireWorker,
)
from distributed.diagnostics.plugin import SchedulerPlugin

import amm_core
from amm_core.config import (
    AMM_CONFIG,
    AMMSpec,
    OrderedPolicies,
    build_policy,
    dotted_name,
    is_plain,
    policy_class,
)
from amm_core.retirement import RetirementEngine

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler

logger = logging.getLogger(__name__)

#: Version of the message shapes below; bump on an incompatible change.
PLUGIN_VERSION = 1
#: Name under which the plugin is registered in ``Scheduler.plugins``
PLUGIN_NAME = "amm-core"
#: Interval of the ad-hoc AMM that finishes retirements when a config stops the AMM;
#: the same as upstream's ad-hoc AMM in ``Scheduler.retire_workers``.
RETIREMENT_INTERVAL = 2.0

Source = Literal["preload", "live"]


class AMMUnavailable(RuntimeError):
    """The scheduler has no AMM extension for the plugin to configure."""


class MemoryPolicyPlugin(SchedulerPlugin):
    """Scheduler plugin that lets an operator configure the AMM with plain messages.

    See the module docstring for the handlers and their semantics.
    """

    name = PLUGIN_NAME
    idempotent = True

    #: How the plugin got here: "preload" (from the image) or "live" (registered by
    #: the operator over RPC)
    source: Source
    scheduler: Scheduler
    #: The scheduler's AMM extension
    amm: ActiveMemoryManagerExtension
    #: The scheduler's own AMM configuration, recorded at plugin start
    baseline: AMMSpec
    #: What of the scheduler's own AMM config was not taken as written (ignored keys,
    #: unreadable values replaced by the extension's); see AMMSpec.parse_baseline
    baseline_notes: list[str]
    #: Why the plugin has no AMM to configure (preload on a scheduler without the AMM
    #: extension, or a failed start); None when it works
    unavailable: str | None
    #: What was last applied (the baseline until the first apply)
    applied: AMMSpec
    #: The policy objects in force for ``applied``, with the entry they came from;
    #: None for entries that had no object in force at plugin start
    configured: list[tuple[ActiveMemoryManagerPolicy | None, str, dict[str, Any]]]
    #: The MemoryPolicy in force: {uid, namespace, name, generation}; None = baseline
    owner: dict[str, Any] | None
    #: Ad-hoc AMMs finishing retirements that were in progress when a config stopped
    #: the main AMM
    retirement_amms: set[ActiveMemoryManagerExtension]
    #: Graceful retirements (amm_core.retirement), served by their own handlers
    retirement: RetirementEngine
    #: AMM cycles run since the plugin started
    cycles: int
    #: Replicate and drop suggestions the AMM enacted (sent to workers) since start
    replicas_copied: int
    replicas_dropped: int

    def __init__(self, source: Source = "live"):
        if source not in ("preload", "live"):
            raise ValueError(f"source must be 'preload' or 'live', got {source!r}")
        self.source = source
        self.owner = None
        self.baseline_notes = []
        self.unavailable = None
        self.retirement_amms = set()
        self.cycles = 0
        self.replicas_copied = 0
        self.replicas_dropped = 0

    # --- lifecycle ------------------------------------------------------------

    async def start(self, scheduler: Scheduler) -> None:
        # No await in here: a concurrent registration cannot interleave with it.
        if getattr(self, "scheduler", None) is not None:
            # Registered over RPC while the scheduler was starting: the scheduler's
            # own start-up calls start() on every plugin again.
            return
        self.scheduler = scheduler
        try:
            self._attach()
        except AMMUnavailable as e:
            if self.source == "live":
                # The caller registering the plugin gets the error
                del self.scheduler
                raise
            self._go_inert(str(e), exc_info=False)
        # The scheduler runs preloaded plugins' start() outside of its preload error
        # handling: whatever fails here would stop the scheduler from starting. On
        # that path the failure is logged and reported by the status handler instead.
        except Exception as e:
            if self.source == "live":
                del self.scheduler
                raise
            self._go_inert(f"the plugin failed to start: {type(e).__name__}: {e}")
        scheduler.handlers.update(
            {
                "amm_core_status": self.status,
                "amm_core_apply": self.apply,
                "amm_core_restore": self.restore,
            }
        )

    def _attach(self) -> None:
        """Take the scheduler's AMM extension in hand: record its own config, pair the
        config entries with the policy objects, order them, count cycles. Everything
        that can fail comes before the first change to the extension."""
        scheduler = self.scheduler
        amm = scheduler.extensions.get("amm")
        if not isinstance(amm, ActiveMemoryManagerExtension):
            raise AMMUnavailable(
                "the scheduler has no Active Memory Manager extension "
                "(scheduler.extensions['amm']): it was built without it, e.g. with "
                "Scheduler(extensions=...) or without the dask config section "
                f"{AMM_CONFIG}"
            )
        self.amm = amm
        found = AMMSpec(amm.running, amm.interval, amm.measure, [])
        self.baseline, self.baseline_notes = AMMSpec.parse_baseline(
            dask.config.get(AMM_CONFIG, default=None), self.measures(), found
        )
        for note in self.baseline_notes:
            logger.warning("amm_core plugin: the scheduler's own AMM config: %s", note)
        self.configured = self._match_baseline()
        self.applied = self.baseline
        # The baseline's policies first, in config order; then the others (in
        # progress retirements, policies added by others) in the order they had
        ordered = self._ordered()
        first = [p for p, _, _ in self.configured if p is not None]
        rest = [p for p in ordered if p not in first]
        ordered.clear()
        ordered.update(first, rest)
        self._count(amm)
        self.retirement = RetirementEngine(scheduler, self, lambda: self.amm.measure)
        scheduler.handlers.update(self.retirement.handlers())
        logger.info(
            "amm_core plugin started (%s); scheduler's own AMM config: %s",
            self.source,
            self.baseline.to_config(),
        )

    def _go_inert(self, why: str, exc_info: bool = True) -> None:
        self.unavailable = why
        logger.error(
            "amm_core plugin (%s) is inert, the scheduler runs on without it: %s",
            self.source,
            why,
            exc_info=exc_info,
        )

    def _check_available(self) -> None:
        if self.unavailable is not None:
            raise ValueError(
                f"amm_core cannot configure this scheduler: {self.unavailable}"
            )

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        # A retired worker's process restarted before its pod went: keep it out
        if getattr(self, "retirement", None) is not None:
            self.retirement.worker_joined(worker)

    def log_event(self, topic: str, msg: Any) -> None:
        # Called synchronously by handle_worker_status_change, before a worker that
        # turned running gets tasks: the moment to keep a retired one out
        if getattr(self, "retirement", None) is None or not isinstance(msg, dict):
            return
        if msg.get("action") == "worker-status-change":
            self.retirement.status_changed(topic, msg)
        elif msg.get("action") == "remove-worker" and "worker" not in msg:
            # logged under the worker's address before plugins hear of the removal
            self.retirement.worker_removed(topic, msg)

    def remove_worker(
        self, scheduler: Scheduler, worker: str, *, stimulus_id: str, **kwargs: Any
    ) -> None:
        if getattr(self, "retirement", None) is not None:
            self.retirement.worker_left(worker)

    def _count(self, amm: ActiveMemoryManagerExtension) -> None:
        """Count cycles and enacted suggestions by wrapping the extension instance's
        methods. ``run_once`` (also called directly by retire_workers) looks both up on
        the instance at every cycle, so a running periodic callback picks them up."""
        run_policies = amm._run_policies
        enact = amm._enact_suggestions

        def counting_run_policies() -> None:
            self.cycles += 1
            run_policies()

        def counting_enact() -> None:
            # Same filter as _enact_suggestions: keys with no replica left are skipped
            for ts, (pending_repl, pending_drop) in amm.pending.items():
                if ts.who_has:
                    self.replicas_copied += len(pending_repl)
                    self.replicas_dropped += len(pending_drop)
            enact()

        amm._run_policies = counting_run_policies  # type: ignore[method-assign]
        amm._enact_suggestions = counting_enact  # type: ignore[method-assign]

    def measures(self) -> set[str]:
        """Valid memory measures, computed as the AMM extension does."""
        mem = self.scheduler.memory
        return {n for n in dir(mem) if not n.startswith("_") and n != "sum"}

    def _match_baseline(
        self,
    ) -> list[tuple[ActiveMemoryManagerPolicy | None, str, dict[str, Any]]]:
        """Pair the baseline's entries with the policy objects the extension built
        from them (by exact class, in order). Entries left without an object mean that
        what is in force differs from the config. An entry whose class cannot be
        imported here is left out of the baseline, with a note (the extension built
        it, so this takes a changed environment)."""
        free = [p for p in self.amm.policies if not isinstance(p, RetireWorker)]
        matched: list[tuple[ActiveMemoryManagerPolicy | None, str, dict[str, Any]]] = []
        for path, kwargs in self.baseline.policies:
            try:
                cls = policy_class(path)
            except ValueError as e:
                self.baseline_notes.append(f"{e}; left out")
                logger.warning("amm_core plugin: the scheduler's own AMM config: %s", e)
                continue
            obj = next((p for p in free if type(p) is cls), None)
            if obj is not None:
                free.remove(obj)
            matched.append((obj, path, kwargs))
        self.baseline.policies = [(path, kwargs) for _, path, kwargs in matched]
        return matched

    def _ordered(self) -> OrderedPolicies:
        """The extension's policies as an OrderedPolicies, put in place of upstream's
        set (or of a set someone put back)."""
        amm = self.amm
        if not isinstance(amm.policies, OrderedPolicies):
            amm.policies = OrderedPolicies(amm.policies)  # type: ignore[assignment]
        assert isinstance(amm.policies, OrderedPolicies)
        return amm.policies

    # --- handlers -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        if self.unavailable is not None:
            return {
                **self._identity(),
                "error": self.unavailable,
                "owner": None,
                "in_force": False,
                "amm": None,
                "workers": len(self.scheduler.workers),
                "policy_reports": [],
                "replace": [],
            }
        amm = self.amm
        ours = [
            (p, path, kwargs)
            for p, path, kwargs in self.configured
            if p is not None and p in amm.policies
        ]
        ours_ids = {id(p) for p, _, _ in ours}
        others = sorted(
            (p for p in amm.policies if id(p) not in ours_ids),
            key=lambda p: (dotted_name(type(p)), repr(p)),
        )
        policies = [
            {"class": path, "kwargs": kwargs, "role": "configured"}
            for _, path, kwargs in ours
        ]
        for p in others:
            if isinstance(p, RetireWorker):
                policies.append(
                    {
                        "class": dotted_name(type(p)),
                        "kwargs": {"address": p.address},
                        "role": "retirement",
                    }
                )
            else:
                # Added by someone else (e.g. add_policy from a client): arguments
                # unknown
                policies.append(
                    {"class": dotted_name(type(p)), "kwargs": None, "role": "foreign"}
                )

        # In the order of "policies", then retirements handed over to ad-hoc AMMs
        in_order = [p for p, _, _ in ours] + others
        in_order += [p for side in self.retirement_amms for p in side.policies]
        reports = []
        for p in in_order:
            report = getattr(p, "report", None)
            if not callable(report):
                continue
            # One faulty policy must not blind the operator to all the others; the
            # failure is reported in its place and logged with its traceback.
            try:
                out = report()
            except Exception as e:
                logger.exception("report() of AMM policy %r failed", p)
                out = {"class": type(p).__name__, "error": f"{type(e).__name__}: {e}"}
            if not isinstance(out, dict) or not is_plain(out):
                logger.error("report() of AMM policy %r is not plain data: %r", p, out)
                out = {"class": type(p).__name__, "error": "report() is not plain data"}
            reports.append(out)

        retiring = sorted(
            p.address for p in self._all_policies() if isinstance(p, RetireWorker)
        )
        # Workers that policies (amm_core.retire_paused) want replaced by whoever runs
        # the cluster
        replace = [entry for r in reports for entry in r.get("replace", ())]
        return {
            **self._identity(),
            "error": None,
            "owner": self.owner,
            "in_force": self.in_force(self.applied),
            "amm": {
                "running": amm.running,
                "interval": amm.interval,
                "measure": amm.measure,
                "policies": policies,
                "cycles": self.cycles,
                "replicas_copied": self.replicas_copied,
                "replicas_dropped": self.replicas_dropped,
                "memory_bytes": sum(
                    getattr(ws.memory, amm.measure)
                    for ws in self.scheduler.workers.values()
                ),
                "retiring_workers": retiring,
                "drops_refused": self.retirement.departures.drops_refused,
            },
            "workers": len(self.scheduler.workers),
            "policy_reports": reports,
            "replace": replace,
            "retirements": self.retirement.reports(),
        }

    def _identity(self) -> dict[str, Any]:
        """The part of the status that tells which plugin and code answer."""
        return {
            "plugin_version": PLUGIN_VERSION,
            "amm_core_version": getattr(amm_core, "__version__", None),
            "amm_core_digest": amm_core.source_digest(),
            "amm_core_path": os.path.dirname(amm_core.__file__),
            "distributed_version": distributed.__version__,
            "source": self.source,
            "baseline_notes": list(self.baseline_notes),
        }

    def apply(self, config: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
        self._check_available()
        if not isinstance(owner, dict) or not owner.get("uid"):
            raise ValueError(f"owner must be a mapping with a uid, got {owner!r}")
        generation = owner.get("generation")
        if not isinstance(generation, int) or isinstance(generation, bool):
            raise ValueError(f"owner generation must be an int, got {generation!r}")
        if self._older_generation(owner):
            assert self.owner is not None
            logger.info(
                "Ignoring AMM config of %s/%s generation %d: generation %d of the same "
                "MemoryPolicy (uid %s) is in force",
                owner.get("namespace"),
                owner.get("name"),
                generation,
                self.owner["generation"],
                owner["uid"],
            )
            return self.status()
        spec = AMMSpec.parse(config, self.measures(), defaults=self.baseline)
        if self._same_owner(owner) and spec == self.applied:
            self._repair(spec)
        else:
            self._swap(spec, owner)
        return self.status()

    def restore(self) -> dict[str, Any]:
        self._check_available()
        if self.owner is None and self.baseline == self.applied:
            self._repair(self.baseline)
        else:
            self._swap(self.baseline, None)
        return self.status()

    # --- mechanics ------------------------------------------------------------

    def _same_owner(self, owner: dict[str, Any]) -> bool:
        return self.owner is not None and (
            (self.owner.get("uid"), self.owner.get("generation"))
            == (owner.get("uid"), owner.get("generation"))
        )

    def _older_generation(self, owner: dict[str, Any]) -> bool:
        """Whether ``owner`` is the owner in force at an older generation."""
        return (
            self.owner is not None
            and self.owner["uid"] == owner["uid"]
            and owner["generation"] < self.owner["generation"]
        )

    def _all_policies(self) -> Iterable[ActiveMemoryManagerPolicy]:
        yield from self.amm.policies
        for side in self.retirement_amms:
            yield from side.policies

    def in_force(self, spec: AMMSpec) -> bool:
        """Whether the extension is exactly what ``spec`` and its policy objects say,
        besides retirements in progress."""
        amm = self.amm
        return (
            amm.running == spec.start
            and amm.interval == spec.interval
            and amm.measure == spec.measure
            and isinstance(amm.policies, OrderedPolicies)
            # the very objects, in config order (an entry without one never matches)
            and [id(p) for p in amm.policies if not isinstance(p, RetireWorker)]
            == [id(p) for p, _, _ in self.configured]
        )

    def _repair(self, spec: AMMSpec) -> None:
        """Same config again: keep the policy objects (they may hold state) and only
        put back what someone changed behind our back: start/interval/measure,
        policies added by others, the order of ours. A policy of ours that went
        missing is built anew (the others are kept)."""
        if self.in_force(spec):
            return
        ours = [p for p, _, _ in self.configured]
        if any(p is None or p not in self.amm.policies for p in ours):
            logger.info("AMM policies were removed outside amm_core; re-applying")
            self._swap(spec, self.owner)
            return
        logger.info("AMM changed outside amm_core; putting the config back")
        self._set(spec, [p for p in ours if p is not None])

    def _swap(self, spec: AMMSpec, owner: dict[str, Any] | None) -> None:
        # Build every new policy before touching the extension: a failure here leaves
        # the scheduler as it was.
        configured, kept = self._keep_or_build(spec)
        self._set(spec, [p for p, _, _ in configured])
        self.configured = list(configured)
        self.applied = spec
        self.owner = dict(owner) if owner is not None else None
        logger.info(
            "AMM configured for %s: %s (%d policy object(s) kept, %d built)",
            "the scheduler's own config" if owner is None else owner,
            spec.to_config(),
            kept,
            len(configured) - kept,
        )

    def _keep_or_build(
        self, spec: AMMSpec
    ) -> tuple[list[tuple[ActiveMemoryManagerPolicy, str, dict[str, Any]]], int]:
        """A policy object for every entry of ``spec``, and how many were kept: an
        object in force for an entry of the same class and arguments is kept (with
        the state it holds), each at most once; any other entry gets a new object.
        Objects no longer in the extension (removed behind our back, or detached by
        themselves) are not kept. Touches nothing: raises ValueError if an entry
        cannot be built."""
        reusable = [
            (p, kwargs)
            for p, _, kwargs in self.configured
            if p is not None and p in self.amm.policies
        ]
        out: list[tuple[ActiveMemoryManagerPolicy, str, dict[str, Any]]] = []
        kept = 0
        for path, kwargs in spec.policies:
            cls = policy_class(path)
            # Same class (a short name and its dotted path are the same entry) and
            # equal arguments; kwargs are plain data on both sides (AMMSpec.parse)
            i = next(
                (
                    i
                    for i, (p, old) in enumerate(reusable)
                    if type(p) is cls and old == kwargs
                ),
                None,
            )
            if i is None:
                out.append((build_policy(path, kwargs), path, kwargs))
            else:
                out.append((reusable.pop(i)[0], path, kwargs))
                kept += 1
        return out, kept

    def _set(self, spec: AMMSpec, policies: list[ActiveMemoryManagerPolicy]) -> None:
        """Put ``spec`` in force with these policy objects. Synchronous: no AMM cycle
        can run in between."""
        amm = self.amm
        amm.stop()
        ordered = self._ordered()
        retiring = [p for p in ordered if isinstance(p, RetireWorker)]
        # Configured policies in config order, then the retirements in progress
        ordered.clear()
        for p in policies:
            amm.add_policy(p)
        ordered.update(retiring)
        amm.interval = spec.interval
        amm.measure = spec.measure
        if spec.start:
            amm.start()
        else:
            self._hand_over_retirements()

    def _hand_over_retirements(self) -> None:
        """Move RetireWorker policies of a stopped AMM to an ad-hoc running one, as
        Scheduler.retire_workers does when the AMM is off. RetireWorker.done() asks
        its own manager, so the retire_workers call in progress follows along."""
        retiring = [p for p in self.amm.policies if isinstance(p, RetireWorker)]
        if not retiring:
            return
        side = ActiveMemoryManagerExtension(
            self.scheduler,
            policies=set(),
            measure=self.amm.measure,
            register=False,
            start=False,
            interval=RETIREMENT_INTERVAL,
        )
        for p in retiring:
            self.amm.policies.discard(p)
            side.add_policy(p)
        self._stop_when_empty(side)
        self.retirement_amms.add(side)
        side.start()
        logger.info(
            "AMM stopped with %d retirement(s) in progress; they go on in an ad-hoc AMM",
            len(retiring),
        )

    def _stop_when_empty(self, side: ActiveMemoryManagerExtension) -> None:
        run_policies: Callable[[], None] = side._run_policies

        def run_then_stop_when_done() -> None:
            run_policies()
            if not side.policies:
                side.stop()
                self.retirement_amms.discard(side)

        side._run_policies = run_then_stop_when_done  # type: ignore[method-assign]


def dask_setup(scheduler: Scheduler) -> None:
    """Preload entry point: ``dask scheduler --preload amm_core.plugin``. The
    scheduler calls the plugin's start() right after its preloads."""
    scheduler.add_plugin(MemoryPolicyPlugin(source="preload"), name=PLUGIN_NAME)
