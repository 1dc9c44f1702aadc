"""The AMM of a live scheduler, made what an outside controller (the
dask-memory-operator) says, through plain messages: the handlers
``amm_core_apply`` and ``amm_core_restore`` of the scheduler plugin
(amm_core.plugin), and what ``amm_core_status`` reports about the AMM.

Why: a running scheduler reads ``distributed.scheduler.active-memory-manager`` only
once, when it builds its AMM extension, and the only run-time controls upstream offers
are ``client.amm.start()/stop()/run_once()``. Changing policies, interval or measure
of a live scheduler otherwise means shipping pickled code to it.

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

Both answer with the status (amm_core.status).

**Policies run in config order, and the scheduler's own config is read leniently,
what an operator sends strictly**: see :mod:`amm_core.config`.

``RetireWorker`` policies belong to ``Scheduler.retire_workers`` calls in progress,
which poll them until done: they are never removed. When a config stops the AMM while
retirements are in progress, they are handed over to an ad-hoc AMM, exactly as
``retire_workers`` itself does when the AMM is off, so that they cannot hang.

Message shapes (plain data)::

    config = {"start": bool, "interval": "2s" | seconds, "measure": str,
              "policies": [{"class": "dotted.path" | short name, **kwargs}, ...]}
        # keys left out keep the scheduler's own values; unknown keys are refused;
        # interval >= MIN_INTERVAL (0.1 s); policies run in this order;
        # short names are those of amm_core.BUILTIN_POLICIES
    owner = {"uid": str, "namespace": str, "name": str, "generation": int}
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import dask
from distributed.active_memory_manager import (
    ActiveMemoryManagerExtension,
    ActiveMemoryManagerPolicy,
    RetireWorker,
)

from amm_core.config import (
    AMM_CONFIG,
    AMMSpec,
    OrderedPolicies,
    build_policy,
    policy_class,
)

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler

logger = logging.getLogger(__name__)

#: Interval of the ad-hoc AMM that finishes retirements when a config stops the AMM;
#: the same as upstream's ad-hoc AMM in ``Scheduler.retire_workers``.
RETIREMENT_INTERVAL = 2.0


class AMMUnavailable(RuntimeError):
    """The scheduler has no AMM extension for the plugin to configure."""


class AMMControl:
    """The scheduler's AMM extension, in the plugin's hands: what it was configured
    with at start, what was applied since and by whom, and what it did."""

    scheduler: Scheduler
    #: The scheduler's AMM extension
    amm: ActiveMemoryManagerExtension
    #: The scheduler's own AMM configuration, recorded at plugin start
    baseline: AMMSpec
    #: What of the scheduler's own AMM config was not taken as written (ignored keys,
    #: unreadable values replaced by the extension's); see AMMSpec.parse_baseline
    baseline_notes: list[str]
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
    #: AMM cycles run since the plugin started
    cycles: int
    #: Replicate and drop suggestions the AMM enacted (sent to workers) since start
    replicas_copied: int
    replicas_dropped: int
    #: Bytes of the copies the AMM dropped (``replicas_dropped`` times each key's size)
    bytes_dropped: int

    def __init__(self, scheduler: Scheduler):
        """Take the scheduler's AMM extension in hand: record its own config, pair the
        config entries with the policy objects, order them, count cycles. Everything
        that can fail comes before the first change to the extension; raises
        AMMUnavailable without one."""
        self.scheduler = scheduler
        self.owner = None
        self.retirement_amms = set()
        self.cycles = 0
        self.replicas_copied = 0
        self.replicas_dropped = 0
        self.bytes_dropped = 0
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

    # --- handlers -------------------------------------------------------------

    def apply(self, config: dict[str, Any], owner: dict[str, Any]) -> None:
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
            return
        spec = AMMSpec.parse(config, self.measures(), defaults=self.baseline)
        if self._same_owner(owner) and spec == self.applied:
            self._repair(spec)
        else:
            self._swap(spec, owner)

    def restore(self) -> None:
        if self.owner is None and self.baseline == self.applied:
            self._repair(self.baseline)
        else:
            self._swap(self.baseline, None)

    # --- mechanics ------------------------------------------------------------

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
                    if pending_drop:
                        self.bytes_dropped += len(pending_drop) * max(ts.nbytes, 0)
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

    def all_policies(self) -> Iterable[ActiveMemoryManagerPolicy]:
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
