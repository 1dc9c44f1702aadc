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

import functools
import hashlib
from importlib.resources import files
from importlib.resources.abc import Traversable

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


def _sources(folder: Traversable, prefix: str = "") -> list[tuple[str, bytes]]:
    out = []
    for entry in folder.iterdir():
        if entry.is_dir():
            if entry.name != "__pycache__":
                out += _sources(entry, f"{prefix}{entry.name}/")
        elif entry.name.endswith(".py"):
            out.append((prefix + entry.name, entry.read_bytes()))
    return out


@functools.cache
def source_digest() -> str:
    """A hash of amm_core's own ``*.py`` sources (names and contents): two processes
    with the same digest run the same amm_core, whatever its version string says.
    Reads through importlib.resources, so an amm_core imported from an uploaded zip
    hashes the same as the directory it was zipped from."""
    h = hashlib.sha256()
    for name, data in sorted(_sources(files(__name__))):
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:16]
