"""Active Memory Manager policies and a scheduler plugin for Dask.

Imports only dask and distributed, so that it fits into any scheduler image. Every
policy here is a plain :class:`distributed.active_memory_manager.ActiveMemoryManagerPolicy`
and can be used through dask config alone::

    distributed:
      scheduler:
        active-memory-manager:
          policies:
            - class: amm_core.rebalance.Rebalance
"""

from __future__ import annotations

__version__ = "0.1.0"

#: Short names a MemoryPolicy may use instead of a dotted class path.
BUILTIN_POLICIES: dict[str, str] = {
    # upstream's ReduceReplicas, honouring Replicate's wanted counts (identical without)
    "ReduceReplicas": "amm_core.replicate.ReduceReplicas",
    "PressureReduceReplicas": "amm_core.reduce.PressureReduceReplicas",
    "Rebalance": "amm_core.rebalance.Rebalance",
    "Replicate": "amm_core.replicate.Replicate",
    "RetirePaused": "amm_core.retire_paused.RetirePaused",
}
