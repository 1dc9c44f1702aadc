"""kopf's copy of the last handled object, bounded.

kopf keeps the "essence" of every object it handled (its spec, labels and
annotations) in an annotation of that object, to tell changes from replays. The API
server refuses an object whose annotations total more than 256 KiB: a MemoryPolicy
(or DaskCluster) whose spec is large — a tenant's 130 kB of ``args`` applied with
``kubectl apply`` (whose own last-applied annotation holds the spec too), or 1.3 MB
made with ``kubectl create`` — made every patch kopf sends for it fail with 422, for
ever: its status never written, its finalizer never removed (issue 15, case 2).

:class:`BoundedDiffBaseStorage` keeps the essence as kopf does while it is small,
and a digest of each of its large fields otherwise. Old and new essences are both
built this way, so a change is still a change (and a replay still nothing); the
handlers of this operator are level-triggered and read the live body, never the
``old``/``new`` kopf passes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import kopf

#: Characters of an essence kept as it is (as JSON)
MAX_ESSENCE = 16 * 1024
#: Characters of one top-level field of a larger essence kept as it is
MAX_FIELD = 1024


def _encoded(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def bounded_essence(essence: dict[str, Any]) -> dict[str, Any]:
    """``essence`` if small; otherwise its small top-level fields as they are and the
    others as ``{"sha256": ..., "length": ...}`` of their JSON."""
    if len(_encoded(essence)) <= MAX_ESSENCE:
        return essence
    bounded: dict[str, Any] = {}
    for key, value in essence.items():
        text = _encoded(value)
        if len(text) <= MAX_FIELD:
            bounded[key] = value
        else:
            bounded[key] = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "length": len(text)}
    return bounded


class BoundedDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's annotation storage of the last handled essence, within
    :data:`MAX_ESSENCE` (plus the digests)."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        essence = super().build(body=body, extra_fields=extra_fields)
        return bounded_essence(dict(essence))  # type: ignore[return-value]
