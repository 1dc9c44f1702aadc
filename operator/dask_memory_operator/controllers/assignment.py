"""Which policy governs which cluster, computed once per namespace per change.

Every policy runs a scaling timer twice a second and a resync; each needs the
assignment of its namespace's clusters (:func:`~dask_memory_operator.api.selection.assign`),
which costs policies × clusters. Computed per tick, 300 policies over 100 clusters
cost 6.8 CPU-seconds per second of the shared operator's one event loop (the webhook
and the liveness probe included). So the assignment is computed once per namespace
and kept until the namespace's policies or clusters change.

What "changed" means is read off kopf's indexes, cheaply: a kopf store replaces a
value only when the indexed value is not equal to the one it holds (a status write
to a DaskCluster or a MemoryPolicy leaves it as it is), so the values' identities
are a version of the namespace. The cache holds those values (so that no identity
is reused while compared), and compares them by identity: no selector is evaluated
and nothing is copied while nothing changed. A tick of a policy then costs the
identity check plus its own clusters.

The memorypolicy controller and the scaling controller both import this module
(neither imports the other for it).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dask_memory_operator.api import selection
from dask_memory_operator.api.selection import Assignment, PolicyInfo


@dataclass
class NamespaceAssignment:
    """The assignment of one namespace, as of the index values it was computed from."""

    #: The index values it was computed from (held: see the module docstring)
    policies: tuple[Any, ...]
    clusters_seen: tuple[Any, ...]
    #: Cluster name -> the index's value for it
    clusters: dict[str, dict[str, Any]]
    #: Cluster name -> its assignment (clusters no valid policy selects are absent)
    assignment: dict[str, Assignment]
    #: Policy uid -> the assignments it contends in, by cluster name (sorted)
    by_policy: dict[str, dict[str, Assignment]]
    #: Policy uid -> the policy as the index has it
    infos: dict[str, PolicyInfo]


def _same(held: tuple[Any, ...], store: Any) -> bool:
    """Whether ``store`` holds exactly the values ``held`` (the same objects, in the
    same order); in C, without touching the values."""
    return len(held) == len(store) and all(map(operator.is_, held, store))


class Assignments:
    """The namespaces' assignments, each recomputed only when its inputs changed."""

    def __init__(self) -> None:
        self._namespaces: dict[str, NamespaceAssignment] = {}
        #: Times an assignment was computed (for tests and benchmarks)
        self.computed = 0

    def of(self, namespace: str, clusters_index: Mapping[str, Iterable[Any]],
           policies_index: Mapping[str, Iterable[Any]]) -> NamespaceAssignment:
        policies = policies_index.get(namespace) or ()
        clusters = clusters_index.get(namespace) or ()
        cached = self._namespaces.get(namespace)
        if cached is not None and _same(cached.policies, policies) and _same(cached.clusters_seen, clusters):
            return cached
        fresh = self._compute(tuple(policies), tuple(clusters))
        if not fresh.policies and not fresh.clusters_seen:
            self._namespaces.pop(namespace, None)  # nothing there: nothing kept
        else:
            self._namespaces[namespace] = fresh
        return fresh

    def discard(self, namespace: str) -> None:
        """Drop a namespace's assignment (its last policy went): the values it holds go."""
        self._namespaces.pop(namespace, None)

    def _compute(self, policies: tuple[Any, ...], clusters: tuple[Any, ...]) -> NamespaceAssignment:
        self.computed += 1
        by_name = {c["name"]: c for c in clusters}
        assignment = selection.assign(policies, {n: c["labels"] for n, c in by_name.items()})
        by_policy: dict[str, dict[str, Assignment]] = {}
        for cluster in sorted(assignment):
            a = assignment[cluster]
            for p in a.contenders:
                by_policy.setdefault(p.uid, {})[cluster] = a
        return NamespaceAssignment(policies, clusters, by_name, assignment, by_policy,
                                   {p.uid: p for p in policies})


#: The operator's assignments (one operator per process)
ASSIGNMENTS = Assignments()


def _selection_of(p: PolicyInfo) -> tuple[Any, ...]:
    return (p.name, p.uid, p.created, p.selector, p.names, p.valid)


def policy_clusters(
    body: Mapping[str, Any], uid: str, namespace: str,
    daskclusters_by_namespace: Mapping[str, Iterable[Any]],
    memorypolicies_by_namespace: Mapping[str, Iterable[Any]],
    assignments: Assignments | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Assignment]]:
    """The namespace's clusters, and the assignment of those this policy selects
    (``a.governor.uid == uid``: it governs them).

    The policy counts as its ``body`` says now: the index may lag by an event. When
    the index agrees with the body (the usual case), the namespace's assignment is
    read as it is; otherwise only this policy is put in its place, cluster by cluster
    (O(clusters), no full recomputation)."""
    ns = (assignments or ASSIGNMENTS).of(namespace, daskclusters_by_namespace, memorypolicies_by_namespace)
    me = PolicyInfo.from_body(body)
    known = ns.infos.get(uid)
    if known is not None and _selection_of(known) == _selection_of(me):
        return ns.clusters, dict(ns.by_policy.get(uid, {}))
    mine = {}
    for cluster in sorted(ns.clusters):
        a = ns.assignment.get(cluster)
        others = [p for p in (a.contenders if a else ()) if p.uid != uid]
        if selection.selects(me, cluster, ns.clusters[cluster]["labels"]):
            contenders = tuple(sorted([*others, me], key=lambda p: p.precedence))
            mine[cluster] = Assignment(cluster, contenders[0], contenders)
    return ns.clusters, mine
