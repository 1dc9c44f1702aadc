"""The MemoryPolicy API: names, and turning a spec into what a scheduler should run.

The CRD in ``crds/memorypolicy.yaml`` rejects what a schema can (enums, patterns,
unknown fields). What it cannot check lives here (and, for ``retirement`` and
``adaptive``, in :mod:`dask_memory_operator.api.scaling`): which policy classes this operator
allows, and that the interval is a duration dask understands. A spec that fails here
is reported as the ``Invalid`` condition and nothing is applied.

Nothing of a spec is trusted to be small: the API server accepts JSON nested 10,000
deep in ``args`` (a structural schema cannot bound depth below a
``x-kubernetes-preserve-unknown-fields`` value), and an older CRD, or none, bounds
nothing. :func:`parse_spec` first walks the spec without recursion, within
:data:`MAX_SPEC_DEPTH` levels and :data:`MAX_SPEC_BYTES`, then each policy's ``args``
within :data:`MAX_ARGS_DEPTH` and :data:`MAX_ARGS_BYTES`; the walk stops at the first
excess, so a huge spec costs no more than a small one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dask.utils import parse_timedelta

from amm_core import BUILTIN_POLICIES
from amm_core.config import MIN_INTERVAL, build_policy, class_allowed

from dask_memory_operator.api.errors import InvalidPolicy
from dask_memory_operator.api.scaling import parse_scaling
from dask_memory_operator.untrusted import describe, quoted

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

#: Levels of maps and lists in a whole spec (``args`` sits at the fifth)
MAX_SPEC_DEPTH = 12
#: Size of a whole spec, counted as JSON (about: strings, keys, 8 per other value)
MAX_SPEC_BYTES = 256 * 1024
#: Levels of maps and lists in one policy's ``args``
MAX_ARGS_DEPTH = 4
#: Size of one policy's ``args``, counted as for the spec
MAX_ARGS_BYTES = 16 * 1024


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

    ``allowed`` holds dotted paths or class globs (:func:`amm_core.config.class_pattern`):
    ``mycompany.amm.*`` is the classes of module ``mycompany.amm`` (``*`` does not
    cross a dot), ``mycompany.amm.**`` those of its submodules too.
    """
    if name in BUILTIN_POLICIES:
        return BUILTIN_POLICIES[name]
    if "." in name and class_allowed(name, allowed):
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


def _path(parts: tuple[str | int, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{describe(p, 64)}" for p in parts)


def check_bounds(
    value: Any, where: str, max_depth: int, max_bytes: int, *, reserved_keys: bool = False
) -> None:
    """InvalidPolicy if ``value`` nests maps and lists more than ``max_depth`` levels
    or counts more than ``max_bytes`` (as JSON, about); with ``reserved_keys``, also
    if a map key anywhere is a ``__dunder__``. Iterative, and it stops at the first
    excess: the work is bounded by the limits, not by ``value``."""
    size = 0
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, parts = stack.pop()
        if isinstance(item, (Mapping, list)):
            if len(parts) >= max_depth:
                raise InvalidPolicy(where + _path(parts), f"nested more than {max_depth} levels deep")
            entries = item.items() if isinstance(item, Mapping) else enumerate(item)
            for k, v in entries:
                if isinstance(k, str):
                    size += len(k) + 4
                    if reserved_keys and k.startswith("__") and k.endswith("__"):
                        # the scheduler's msgpack decoder gives meaning to such keys
                        # (__Enum__ imports a module): a policy's author must not reach
                        # into it that way
                        raise InvalidPolicy(where, f"may not contain the key {quoted(k)}")
                size += 1
                if size > max_bytes:
                    break
                stack.append((v, parts + (k,)))
        elif isinstance(item, str):
            size += len(item) + 2
        else:
            size += 8
        if size > max_bytes:
            raise InvalidPolicy(where, f"larger than the limit of {max_bytes // 1024} KiB")


def index_body(body: Mapping[str, Any], valid: bool) -> dict[str, Any]:
    """What an in-memory index keeps of a MemoryPolicy: identity and selection, and
    the spec only when it is valid (hence bounded by :func:`parse_spec`). Not the
    annotations (kopf's copy of the last spec), managed fields or status."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    kept = {k: meta[k] for k in ("name", "namespace", "uid", "generation", "creationTimestamp") if k in meta}
    if not valid:
        # selection still reads the selector and names (bounded by the CRD; cut here
        # if they are not)
        try:
            check_bounds({k: spec.get(k) for k in ("clusterSelector", "clusterNames")},
                         "spec", MAX_SPEC_DEPTH, MAX_SPEC_BYTES)
            spec = {k: spec[k] for k in ("clusterSelector", "clusterNames") if k in spec}
        except InvalidPolicy:
            spec = {}
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": kept, "spec": spec}


def parse_spec(spec: Mapping[str, Any], allowed: Iterable[str] = ()) -> AMMConfig:
    """Check a MemoryPolicy spec beyond its schema and return the wanted config.

    Raises :class:`InvalidPolicy` naming the offending field.
    """
    if not isinstance(spec, Mapping):
        raise InvalidPolicy("spec", "must be an object")
    check_bounds(spec, "spec", MAX_SPEC_DEPTH, MAX_SPEC_BYTES)
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
        check_bounds(args, f"{where}.args", MAX_ARGS_DEPTH, MAX_ARGS_BYTES, reserved_keys=True)
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
