"""Which namespaces the operator acts in: ``--namespace-selector LABEL=VALUE``.

A shared install governs only the namespaces a cluster admin labelled (tenants with
rights in their own namespace only cannot label a Namespace). kopf's namespace
patterns are name globs, so the label is checked by a ``when=`` filter on every
MemoryPolicy and DaskCluster handler, backed by a kopf index of the labelled
Namespaces (kopf runs no handler before every index is filled).

kopf evaluates filters only on an object's own events, so a Namespace labelled or
unlabelled later would reach its existing policies only at their next change: the
Namespace's watch event annotates them (``amm.dask.org/governed``), which makes kopf
look at them again at once (start them, or stop their timers and drop its finalizer).

The indexes of policies and clusters are not filtered: an index filter runs during
kopf's initial listing, possibly before the Namespaces are listed, and would leave
policies of a governed namespace out until their next change. They hold data only;
every handler that acts is filtered.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

import kopf
import kr8s

from dask_memory_operator import kubeclient
from dask_memory_operator.api.memorypolicy import GROUP, PLURAL, VERSION

logger = logging.getLogger(__name__)

#: The index of the labelled Namespaces (the kwarg name of the ``when=`` filters)
INDEX = "governed_namespaces"
#: Written on a namespace's policies when its label changes, to have kopf re-filter them
NUDGE_ANNOTATION = f"{GROUP}/governed"


def register_namespace_scope(registry: kopf.OperatorRegistry,
                             selector: tuple[str, str] | None) -> Callable[..., bool] | None:
    """The Namespace index and watch for ``selector``, and the ``when=`` filter for
    the handlers (None without a selector: every namespace)."""
    if selector is None:
        return None
    key, value = selector
    unmatched: set[str] = set()  # namespaces already logged as ignored
    governed: set[str] = set()  # as last seen by the watch, to notice label changes

    def governed_namespaces(name: str, labels: kopf.Labels, **_: Any) -> dict[str, bool]:
        # False, not None: kopf keeps an object's previous entry when its function
        # returns None (engines/indexing.py replace), so an unlabelled namespace would stay
        return {name: labels.get(key) == value}

    def in_governed_namespace(namespace: str, **kwargs: Any) -> bool:
        if any(kwargs[INDEX].get(namespace, ())):
            return True
        if namespace not in unmatched:
            unmatched.add(namespace)
            logger.debug("Ignoring namespace %s: it is not labelled %s=%s", namespace, key, value)
        return False

    async def relabelled_namespace(type: str | None, name: str, labels: kopf.Labels, **_: Any) -> None:
        now = type != "DELETED" and labels.get(key) == value
        before = name in governed
        if now:
            governed.add(name)
        else:
            governed.discard(name)
        unmatched.discard(name)
        # only a change of an existing namespace's label (not the initial listing, nor a new
        # namespace, which has no policies yet)
        if type == "MODIFIED" and now != before:
            await _nudge_policies(name, now)

    kopf.index("v1", "namespaces", registry=registry, id=INDEX)(governed_namespaces)
    kopf.on.event("v1", "namespaces", registry=registry, id="relabelled_namespace")(relabelled_namespace)
    return in_governed_namespace


def checked_at_each_tick(fn: Callable[..., Any], governed: Callable[..., bool] | None) -> Callable[..., Any]:
    """A timer handler that does nothing in a namespace no longer governed: kopf
    re-evaluates a timer's filter only at its object's next event."""
    if governed is None:
        return fn

    @functools.wraps(fn)
    async def tick(**kwargs: Any) -> Any:
        if not governed(**kwargs):
            return None
        return await fn(**kwargs)

    return tick


def governed_or_gone(governed: Callable[..., bool] | None) -> Callable[..., bool] | None:
    """The filter of a DaskCluster's events: a deletion is seen in every namespace,
    so that what the operator kept for the cluster goes with it."""
    if governed is None:
        return None
    return lambda **kwargs: kwargs.get("type") == "DELETED" or governed(**kwargs)


async def _nudge_policies(namespace: str, governed: bool) -> None:
    """Annotate every MemoryPolicy of the namespace: kopf re-filters them on the event."""
    api = await kubeclient.client()
    where = {"version": f"{GROUP}/{VERSION}", "base": "/apis", "namespace": namespace}
    async with api.call_api("GET", url=PLURAL, **where) as response:
        names = [p["metadata"]["name"] for p in response.json().get("items", [])]
    patch = json.dumps({"metadata": {"annotations": {NUDGE_ANNOTATION: str(governed).lower()}}})
    for name in names:
        # one policy that cannot be patched (deleted meanwhile, annotations full) does not
        # keep the others from being looked at; its timers check the label at each tick
        try:
            async with api.call_api("PATCH", url=f"{PLURAL}/{name}", content=patch,
                                    headers={"Content-Type": "application/merge-patch+json"}, **where):
                pass
        except kr8s.ServerError as e:
            if e.response is None or e.response.status_code != 404:
                logger.warning("Namespace %s relabelled: MemoryPolicy %s not annotated: %s", namespace, name, e)
    logger.info("Namespace %s is %s: its %d MemoryPolicies are looked at again", namespace,
                "governed now" if governed else "no longer governed", len(names))
