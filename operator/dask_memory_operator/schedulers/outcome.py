"""What one reconcile pass found and did for one cluster: the record every consumer reads.

The status, the metrics and the Events are each written from an :class:`Outcome`;
it lives apart from the reconciler (converge.py) so that they need not import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from dask_memory_operator.untrusted import describe

ClusterStateName = Literal["Applied", "Pending", "Degraded", "Conflict"]


@dataclass
class Outcome:
    """What one reconcile pass found and did for one cluster."""

    cluster: str
    state: ClusterStateName
    message: str = ""
    plugin_source: str | None = None
    #: Why the scheduler's amm_core is not the operator's (a preloaded older one)
    plugin_warning: str | None = None
    applied_generation: int | None = None
    #: The scheduler's report of its AMM, in status form
    amm: dict[str, Any] | None = None
    #: Changes made to the scheduler in this pass, each a short sentence for Events
    actions: list[str] = field(default_factory=list)
    #: Why a Degraded cluster is degraded, as a condition reason: Unreachable,
    #: ProtocolError, Rejected, CallFailed, AccessDenied, DidNotTake, Unexpected
    cause: str = ""
    #: The plugin's savings counters (amm_core.savings; None: not read, or an older
    #: plugin), and its latest departures with the scheduler's time, when read (only
    #: when the counters' seq moved past what the caller had handled)
    savings: dict[str, Any] | None = None
    departures: list[dict[str, Any]] | None = None
    scheduler_now: float | None = None

    def __post_init__(self) -> None:
        # Texts quote schedulers (errors, names in their status) and end up in logs,
        # the status and Events, and are kept per cluster (the backoff): one line,
        # bounded, whatever a scheduler sent
        self.message = describe(self.message, MAX_OUTCOME_TEXT)
        if self.plugin_warning is not None:
            self.plugin_warning = describe(self.plugin_warning, MAX_OUTCOME_TEXT)
        self.actions = [describe(a, MAX_OUTCOME_TEXT) for a in self.actions]


#: Characters of an outcome's message, warning and each action
MAX_OUTCOME_TEXT = 1024
