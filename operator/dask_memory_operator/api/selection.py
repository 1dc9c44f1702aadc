"""Which MemoryPolicy governs which DaskCluster.

A policy selects the DaskClusters of its namespace by a standard label selector
and/or a list of names. A cluster selected by several policies is governed by
exactly one of them, chosen the same way by every reconcile of every policy (the
oldest policy, then the name), so that policies never fight over a scheduler; the
others report a conflict for that cluster.

Everything here is pure: it works on plain dicts from kopf's indexes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PolicyInfo:
    """What selection needs to know of a MemoryPolicy."""

    name: str
    uid: str
    #: RFC 3339 timestamp; orders policies for conflict resolution
    created: str
    selector: Mapping[str, Any] | None
    names: tuple[str, ...] | None
    #: Whether its spec can be applied: only valid policies govern clusters, but every
    #: policy is known (a scheduler an invalid policy configured is not orphaned)
    valid: bool = True
    #: metadata.generation: a spec change makes the value unequal, so kopf's index
    #: (which keeps an equal value) takes the new body
    generation: int = 0
    #: The policy's manifest (apiVersion, kind, metadata, spec), for events and specs
    body: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_body(cls, body: Mapping[str, Any], valid: bool = True) -> PolicyInfo:
        meta = body.get("metadata", {})
        spec = body.get("spec", {}) or {}
        names = spec.get("clusterNames")
        return cls(
            name=meta["name"],
            uid=meta.get("uid", ""),
            created=meta.get("creationTimestamp", ""),
            selector=spec.get("clusterSelector"),
            names=tuple(names) if names is not None else None,
            valid=valid,
            generation=int(meta.get("generation") or 0),
            body={
                "apiVersion": body.get("apiVersion"),
                "kind": body.get("kind"),
                "metadata": dict(meta),
                "spec": dict(spec),
            },
        )

    @property
    def precedence(self) -> tuple[str, str]:
        return (self.created, self.name)


def matches_selector(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels AND matchExpressions)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or ():
        key, op, values = expr["key"], expr["operator"], expr.get("values") or ()
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def selects(policy: PolicyInfo, cluster: str, labels: Mapping[str, str]) -> bool:
    """Does ``policy`` select the cluster? A policy with neither a selector nor
    names selects nothing (an empty selector ``{}`` selects everything)."""
    if policy.selector is None and policy.names is None:
        return False
    if policy.names is not None and cluster not in policy.names:
        return False
    if policy.selector is not None and not matches_selector(policy.selector, labels):
        return False
    return True


@dataclass(frozen=True)
class Assignment:
    """The outcome for one cluster."""

    cluster: str
    #: The policy that governs the cluster
    governor: PolicyInfo
    #: Every policy that selects it, governor first
    contenders: tuple[PolicyInfo, ...]


def assign(
    policies: Iterable[PolicyInfo], clusters: Mapping[str, Mapping[str, str]]
) -> dict[str, Assignment]:
    """Map each selected cluster name (of one namespace) to its governing policy.

    ``clusters`` maps cluster name -> labels. Clusters no valid policy selects are
    absent: an invalid policy never holds a cluster away from a valid one.
    """
    ordered = sorted((p for p in policies if p.valid), key=lambda p: p.precedence)
    result = {}
    for cluster, labels in clusters.items():
        contenders = tuple(p for p in ordered if selects(p, cluster, labels))
        if contenders:
            result[cluster] = Assignment(cluster, contenders[0], contenders)
    return result
