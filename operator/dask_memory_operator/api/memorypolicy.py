"""The MemoryPolicy API: names, and turning a spec into what a scheduler should run.

The CRD in ``crds/memorypolicy.yaml`` rejects what a schema can (enums, patterns,
unknown fields). What it cannot check lives here (and, for ``retirement`` and
``adaptive``, in :mod:`dask_memory_operator.api.scaling`): which policy classes this operator
allows, and that the interval is a duration dask understands. A spec that fails here
is reported as the ``Invalid`` condition and nothing is applied.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dask.utils import parse_timedelta

from amm_core import BUILTIN_POLICIES
from amm_core.config import MIN_INTERVAL, build_policy

from dask_memory_operator.api.errors import InvalidPolicy
from dask_memory_operator.api.scaling import parse_scaling

GROUP = "amm.dask.org"
VERSION = "v1alpha1"
PLURAL = "memorypolicies"
KIND = "MemoryPolicy"

DASK_GROUP = "kubernetes.dask.org"
DASK_VERSION = "v1"

MEASURES = (
    "managed",
    "managed_total",
    "optimistic",
    "process",
    "spilled",
    "unmanaged",
    "unmanaged_old",
    "unmanaged_recent",
)


UPSTREAM_REDUCE_REPLICAS = "distributed.active_memory_manager.ReduceReplicas"


@dataclass(frozen=True)
class PolicyRef:
    """One AMM policy of a MemoryPolicy, resolved to its class path."""

    #: Dotted path of the class, e.g. ``amm_core.rebalance.Rebalance``
    cls: str
    #: Keyword arguments of its constructor
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AMMConfig:
    """What a scheduler's Active Memory Manager should be: the dask config section
    ``distributed.scheduler.active-memory-manager``, as plain data."""

    enabled: bool
    #: Seconds between cycles
    interval: float
    measure: str
    policies: tuple[PolicyRef, ...]

    def to_dask_config(self) -> dict[str, Any]:
        """The shape the scheduler plugin (and dask config) takes."""
        return {
            "start": self.enabled,
            "interval": self.interval,
            "measure": self.measure,
            "policies": [{**p.args, "class": p.cls} for p in self.policies],
        }


def resolve_policy_class(name: str, allowed: Iterable[str]) -> str:
    """A built-in short name or an allowed dotted path -> the class path.

    ``allowed`` holds dotted paths or glob patterns (``mycompany.amm.*``).
    """
    if name in BUILTIN_POLICIES:
        return BUILTIN_POLICIES[name]
    if "." in name and any(fnmatch.fnmatchcase(name, pat) for pat in allowed):
        return name
    known = ", ".join(sorted(BUILTIN_POLICIES))
    if "." not in name:
        raise InvalidPolicy("class", f"unknown policy {name!r}; built-in names: {known}")
    raise InvalidPolicy(
        "class",
        f"class {name!r} is not allowed by this operator; use a built-in name "
        f"({known}) or ask the operator's admin to allow it (--allow-policy-class)",
    )


def check_selector(selector: Mapping[str, Any] | None) -> None:
    """What the API server checks of a LabelSelector beyond its schema."""
    for i, expr in enumerate((selector or {}).get("matchExpressions") or ()):
        where = f"spec.clusterSelector.matchExpressions[{i}].values"
        values = expr.get("values") or []
        if expr.get("operator") in ("In", "NotIn") and not values:
            raise InvalidPolicy(where, f"must be specified when `operator` is {expr['operator']}")
        if expr.get("operator") in ("Exists", "DoesNotExist") and values:
            raise InvalidPolicy(where, f"may not be specified when `operator` is {expr['operator']}")


def _reserved_key(value: Any) -> str | None:
    """The first ``__dunder__`` map key anywhere in ``value``, if any."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if isinstance(k, str) and k.startswith("__") and k.endswith("__"):
                return k
            found = _reserved_key(v)
            if found:
                return found
    elif isinstance(value, list):
        for v in value:
            found = _reserved_key(v)
            if found:
                return found
    return None


def parse_spec(spec: Mapping[str, Any], allowed: Iterable[str] = ()) -> AMMConfig:
    """Check a MemoryPolicy spec beyond its schema and return the wanted config.

    Raises :class:`InvalidPolicy` naming the offending field.
    """
    check_selector(spec.get("clusterSelector"))
    amm = spec.get("activeMemoryManager")
    if not isinstance(amm, Mapping):
        raise InvalidPolicy("spec.activeMemoryManager", "required")
    prefix = "spec.activeMemoryManager"

    interval_text = amm.get("interval", "2s")
    try:
        interval = parse_timedelta(interval_text)
    except (ValueError, KeyError, TypeError, AttributeError):  # AttributeError: a list, a map
        interval = None
    if interval is None or interval <= 0:
        raise InvalidPolicy(
            f"{prefix}.interval", f"{interval_text!r} is not a positive duration"
        )
    if interval < MIN_INTERVAL:
        raise InvalidPolicy(
            f"{prefix}.interval",
            f"{interval_text!r} is below the minimum of {MIN_INTERVAL * 1000:g}ms: the AMM "
            "would spin on the scheduler's event loop",
        )

    measure = amm.get("measure", "optimistic")
    if measure not in MEASURES:
        raise InvalidPolicy(
            f"{prefix}.measure",
            f"unsupported value {measure!r}; supported: {', '.join(MEASURES)}",
        )

    policies = []
    for i, item in enumerate(amm.get("policies") or ()):
        where = f"{prefix}.policies[{i}]"
        if not isinstance(item, Mapping) or not isinstance(item.get("class"), str):
            raise InvalidPolicy(f"{where}.class", "required")
        args = item.get("args") or {}
        if not isinstance(args, Mapping):
            raise InvalidPolicy(f"{where}.args", "must be an object")
        reserved = _reserved_key(args)
        if reserved:
            # the scheduler's msgpack decoder gives meaning to such keys (__Enum__
            # imports a module): a policy's author must not reach into it that way
            raise InvalidPolicy(f"{where}.args", f"may not contain the key {reserved!r}")
        if "class" in args:
            # dask config puts kwargs beside `class`; one in args would replace the
            # class that the allowlist checked
            raise InvalidPolicy(f"{where}.args", "may not contain the key 'class'")
        try:
            cls = resolve_policy_class(item["class"], allowed)
        except InvalidPolicy as e:
            raise InvalidPolicy(f"{where}.class", str(e).split(": ", 1)[1]) from None
        if item["class"] in BUILTIN_POLICIES:
            # Built-in classes are importable here too: refuse bad arguments now, as
            # Invalid, rather than as a scheduler's rejection later.
            try:
                build_policy(cls, dict(args))
            except ValueError as e:
                raise InvalidPolicy(f"{where}.args", str(e)) from None
        policies.append(PolicyRef(cls, dict(args)))

    classes = {p.cls for p in policies}
    if BUILTIN_POLICIES["Replicate"] in classes and UPSTREAM_REDUCE_REPLICAS in classes:
        # upstream's reducer keeps one copy per key: it would drop every copy
        # Replicate makes, every cycle
        raise InvalidPolicy(
            f"{prefix}.policies",
            f"Replicate does not work with {UPSTREAM_REDUCE_REPLICAS}, which drops the "
            f"copies it makes: use ReduceReplicas or PressureReduceReplicas",
        )
    # checked here too, so that one call says whether a spec is valid; the
    # scaling controller reads it with parse_scaling
    parse_scaling(spec)
    return AMMConfig(
        enabled=bool(amm.get("enabled", True)),
        interval=float(interval),
        measure=measure,
        policies=tuple(policies),
    )
