"""What `dask-memory-operator run` was told, as the controllers read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OperatorConfig:
    """What `dask-memory-operator run` was told."""

    #: Dotted paths or glob patterns of policy classes a MemoryPolicy may name
    allowed_policy_classes: tuple[str, ...] = ()
    #: Seconds between level-triggered resyncs of every MemoryPolicy
    resync_interval: float = 10.0
    #: How deletion handles an unreachable scheduler: retries before giving up
    delete_retries: int = 3
