"""The scheduler plugin through which an outside controller (the dask-memory-operator)
configures the Active Memory Manager of a live scheduler, retires its workers
gracefully, and scales it, with plain messages (msgpack-able dicts): the operator
never sends code for day-to-day work.

The plugin only wires things to the scheduler; each group of handlers lives, with
its message shapes, in its own module:

=================================  ===============================================
``amm_core_status``                what is in force and what it did (amm_core.status)
``amm_core_apply``,                the AMM's configuration (amm_core.control)
``amm_core_restore``
``amm_core_retire``,               graceful retirement (amm_core.retirement)
``amm_core_retirements``,
``amm_core_cancel_retirement``,
``amm_core_forget_retirement``
``amm_core_scaling``,              how big the cluster should be, which workers may
``amm_core_retirement_candidates`` go first (amm_core.scaling)
``amm_core_savings``               what was rescued, lost and dropped since the
                                   plugin started (amm_core.savings)
``amm_core_memory_history``        the cluster's memory over time, and markers
                                   (amm_core.history)
=================================  ===============================================

What the workers hold is counted as it changes (amm_core.totals), and the rules that
keep leaving workers' data safe hold for every mechanism on the scheduler
(amm_core.departures).

**A preloaded plugin never stops its scheduler.** The scheduler runs plugins'
``start()`` outside of its preload error handling, so a failure there would abort
the scheduler's start-up. Preloaded on a scheduler without the AMM extension
(``Scheduler(extensions=...)`` without ``amm``), or failing at start for any other
reason, the plugin logs the reason and stays inert: ``amm_core_status`` answers with
``"error": <reason>`` and ``"amm": None``, ``amm_core_apply``/``amm_core_restore``
raise ValueError with the reason, the other handlers are not there. Registered live,
it raises to the caller instead.

Install with ``dask scheduler --preload amm_core.plugin`` (or
``DASK_DISTRIBUTED__SCHEDULER__PRELOAD=amm_core.plugin``); the operator can also
register it on a running scheduler (see dask_memory_operator.schedulers.install).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

from distributed.diagnostics.plugin import SchedulerPlugin

from amm_core import status as status_module
from amm_core.control import AMMControl, AMMUnavailable
from amm_core.history import MemoryHistory
from amm_core.retirement import RetirementEngine
from amm_core.savings import Savings
from amm_core.scaling import Scaling
from amm_core.totals import HeldData

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler

logger = logging.getLogger(__name__)

#: Name under which the plugin is registered in ``Scheduler.plugins``
PLUGIN_NAME = "amm-core"

Source = Literal["preload", "live"]


class MemoryPolicyPlugin(SchedulerPlugin):
    """Scheduler plugin that lets an operator configure the AMM, retire workers and
    scale the cluster with plain messages.

    See the module docstring for the handlers and where they live.
    """

    name = PLUGIN_NAME
    idempotent = True

    #: How the plugin got here: "preload" (from the image) or "live" (registered by
    #: the operator over RPC)
    source: Source
    scheduler: Scheduler
    #: Why the plugin has no AMM to configure (preload on a scheduler without the AMM
    #: extension, or a failed start); None when it works
    unavailable: str | None
    #: What of the scheduler's own AMM config was not taken as written (see
    #: AMMSpec.parse_baseline)
    baseline_notes: list[str]
    #: The AMM's configuration (None: inert)
    control: AMMControl | None
    #: Graceful retirements, served by their own handlers
    retirement: RetirementEngine
    #: What the workers hold, counted as it changes
    held: HeldData
    #: The scaling questions
    scaling: Scaling
    #: What was rescued, lost and dropped
    savings: Savings
    #: The cluster's memory over time, and markers
    history: MemoryHistory
    #: Worker names by address, for the departures (the scheduler has forgotten a
    #: worker's name by the time plugins hear it left)
    names: dict[str, str]

    def __init__(self, source: Source = "live"):
        if source not in ("preload", "live"):
            raise ValueError(f"source must be 'preload' or 'live', got {source!r}")
        self.source = source
        self.unavailable = None
        self.baseline_notes = []
        self.control = None

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
        """Take the scheduler in hand; everything that can fail comes before the
        first handler is registered."""
        scheduler = self.scheduler
        control = AMMControl(scheduler)
        self.baseline_notes = control.baseline_notes
        self.held = HeldData.of(scheduler) or HeldData(scheduler)
        self.savings = Savings()
        self.history = MemoryHistory(scheduler)
        self.names = {addr: str(ws.name) for addr, ws in scheduler.workers.items()}
        self.retirement = RetirementEngine(
            scheduler,
            self,
            lambda: control.amm.measure,
            self.held,
            savings=self.savings,
            markers=self.history.markers,
        )
        self.scaling = Scaling(self.retirement, self.held, self)
        self.control = control
        scheduler.handlers.update(self.retirement.handlers())
        scheduler.handlers.update(self.scaling.handlers())
        scheduler.handlers.update(self.history.handlers())
        scheduler.handlers["amm_core_savings"] = self.savings_report
        self.history.start()
        logger.info(
            "amm_core plugin started (%s); scheduler's own AMM config: %s",
            self.source,
            control.baseline.to_config(),
        )

    def _go_inert(self, why: str, exc_info: bool = True) -> None:
        self.unavailable = why
        self.control = None
        logger.error(
            "amm_core plugin (%s) is inert, the scheduler runs on without it: %s",
            self.source,
            why,
            exc_info=exc_info,
        )

    def _check_available(self) -> AMMControl:
        if self.unavailable is not None or self.control is None:
            raise ValueError(
                f"amm_core cannot configure this scheduler: {self.unavailable}"
            )
        return self.control

    # --- scheduler hooks ------------------------------------------------------

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        # A retired worker's process restarted before its pod went: keep it out
        if self.control is not None:
            ws = scheduler.workers.get(worker)
            name = str(ws.name) if ws is not None else worker
            self.names[worker] = name
            self.history.markers.add("worker-added", name)
            self.retirement.worker_joined(worker)

    def log_event(self, topic: str, msg: Any) -> None:
        # Called synchronously by handle_worker_status_change, before a worker that
        # turned running gets tasks: the moment to keep a retired one out
        if self.control is None or not isinstance(msg, dict):
            return
        if msg.get("action") == "worker-status-change":
            self.retirement.status_changed(topic, msg)
        elif msg.get("action") == "remove-worker" and "worker" not in msg:
            # logged under the worker's address before plugins hear of the removal
            self.retirement.worker_removed(topic, msg)

    def remove_worker(
        self, scheduler: Scheduler, worker: str, *, stimulus_id: str, **kwargs: Any
    ) -> None:
        if self.control is not None:
            name = self.names.pop(worker, worker)
            self.history.markers.add("worker-removed", name)
            self.retirement.worker_left(worker, name)

    # --- handlers (methods of the plugin: tests and other copies of amm_core wrap
    # them here) -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return status_module.status(self)

    def apply(self, config: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
        self._check_available().apply(config, owner)
        return self.status()

    def restore(self) -> dict[str, Any]:
        self._check_available().restore()
        return self.status()

    def savings_report(self) -> dict[str, Any]:
        control = self._check_available()
        return self.savings.report(control.replicas_dropped, control.bytes_dropped)

    # --- what the status reports, for tests and probes ----------------------------

    @property
    def cycles(self) -> int:
        return self.control.cycles if self.control is not None else 0

    @property
    def replicas_copied(self) -> int:
        return self.control.replicas_copied if self.control is not None else 0

    @property
    def replicas_dropped(self) -> int:
        return self.control.replicas_dropped if self.control is not None else 0


def dask_setup(scheduler: Scheduler) -> None:
    """Preload entry point: ``dask scheduler --preload amm_core.plugin``. The
    scheduler calls the plugin's start() right after its preloads."""
    scheduler.add_plugin(MemoryPolicyPlugin(source="preload"), name=PLUGIN_NAME)
