"""``status.conditions`` as Kubernetes API conventions define them.

A condition's ``lastTransitionTime`` changes only when its status changes, so a
resync that finds the same state rewrites the same conditions.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type_: str,
    status: bool | ConditionStatus,
    reason: str,
    message: str,
    generation: int,
    previous: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """One condition, keeping ``lastTransitionTime`` from ``previous`` when the
    status did not change."""
    if isinstance(status, bool):
        status = "True" if status else "False"
    since = now_rfc3339()
    for old in previous:
        if old.get("type") == type_ and old.get("status") == status:
            since = old.get("lastTransitionTime", since)
            break
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }
