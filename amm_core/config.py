"""What the AMM of a scheduler is configured with: the dask-config section
``distributed.scheduler.active-memory-manager`` parsed and compared
(:class:`AMMSpec`), the policy classes it names (:func:`policy_class`), and the
ordered set the configured policies run from (:class:`OrderedPolicies`). Used by the
scheduler plugin (amm_core.plugin) and by the operator, which validates a
MemoryPolicy with the same code before it sends anything.

**Policies run in config order.** Upstream keeps the extension's policies in a set
(no defined order); the plugin replaces it with an insertion-ordered set-like
:class:`OrderedPolicies`, so that the configured policies run in the order the
config lists them, before the retirements in progress. Without the plugin (policies
from dask config alone) the order stays upstream's: undefined.

**The scheduler's own config is read leniently, what an operator sends strictly.**
The baseline (``distributed.scheduler.active-memory-manager`` as the scheduler's dask
config has it) was already read by the AMM extension: a key that a newer distributed
adds, or a value the strict parse would refuse, must not stop the plugin. Such keys
are ignored and such values replaced by what the extension made of them, each with a
note (logged, and listed in the status as ``baseline_notes``). ``amm_core_apply``
refuses anything unknown or invalid, and an interval below :data:`MIN_INTERVAL`.
"""

from __future__ import annotations

import inspect
import math
import re
import reprlib
from collections.abc import Iterable, Iterator, MutableSet
from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed.active_memory_manager import ActiveMemoryManagerPolicy
from distributed.utils import import_term

import amm_core

#: dask config section of the AMM
AMM_CONFIG = "distributed.scheduler.active-memory-manager"
#: Shortest AMM interval an ``apply`` may ask for, in seconds. An AMM cycle runs on the
#: scheduler's event loop and walks every replicated key (Rebalance also the keys of
#: every heavy worker): much more often than this and the loop would do little else.
#: The scheduler's own config is not held to it (see ``AMMSpec.parse_baseline``).
MIN_INTERVAL = 0.1
#: The keys of the AMM config section
AMM_KEYS = ("start", "interval", "measure", "policies")


def plain(value: Any) -> Any:
    """Tuples to lists, recursively: distributed's msgpack decodes lists as tuples,
    and configs must compare equal however they travelled."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def is_plain(value: Any) -> bool:
    """Whether msgpack carries ``value`` as is (anything else would go as a pickle,
    which the operator refuses)."""
    if value is None or isinstance(value, (str, bytes, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def dotted_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class AMMSpec:
    """A validated AMM configuration, normalized for comparison."""

    #: Start the AMM (run every ``interval`` seconds)
    start: bool
    #: Seconds between AMM cycles
    interval: float
    #: Attribute of MemoryState used as the memory measure
    measure: str
    #: [(dotted class path as given, kwargs)] in config order
    policies: list[tuple[str, dict[str, Any]]]

    def __init__(
        self,
        start: bool,
        interval: float,
        measure: str,
        policies: list[tuple[str, dict[str, Any]]],
    ):
        self.start = start
        self.interval = interval
        self.measure = measure
        self.policies = policies

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AMMSpec) and self.to_config() == other.to_config()

    def to_config(self) -> dict[str, Any]:
        """Back to the dask-config shape (interval in seconds)."""
        return {
            "start": self.start,
            "interval": self.interval,
            "measure": self.measure,
            "policies": [{"class": cls, **kwargs} for cls, kwargs in self.policies],
        }

    @classmethod
    def parse(
        cls, config: Any, measures: set[str], defaults: AMMSpec | None = None
    ) -> AMMSpec:
        """Validate a dask-config-shaped AMM section sent by an operator, strictly.
        Keys left out take their value from ``defaults`` (which are not validated
        again: the interval floor is for what the operator asks). Raises ValueError
        with a message meant for a person."""
        if not isinstance(config, dict):
            raise ValueError(f"AMM config must be a mapping, got {config!r}")
        config = plain(config)
        unknown = set(config) - set(AMM_KEYS)
        if unknown:
            raise ValueError(
                f"unknown AMM config key(s) {sorted(unknown)}; expected start, "
                "interval, measure, policies"
            )
        if defaults is None and set(config) != set(AMM_KEYS):
            raise ValueError("AMM config needs start, interval, measure and policies")
        values = defaults.to_config() if defaults is not None else {}
        values.update(
            (key, _check(key, config[key], measures, floor=True))
            for key in AMM_KEYS
            if key in config
        )
        return cls._from_values(values)

    @classmethod
    def parse_baseline(
        cls, config: Any, measures: set[str], found: AMMSpec
    ) -> tuple[AMMSpec, list[str]]:
        """The scheduler's own AMM section, parsed leniently; with one note per thing
        that was not taken as written.

        The AMM extension has already read this section (or failed the scheduler's
        start-up), so nothing in it may stop the plugin: a key a newer distributed
        added is ignored, a value :meth:`parse` would refuse is replaced by what the
        extension made of it (``found``: its running, interval and measure), and a
        policy entry that cannot be read is left out. An interval below
        :data:`MIN_INTERVAL` is kept: it is the scheduler's own choice.
        """
        notes: list[str] = []
        if config is None:
            notes.append(f"no {AMM_CONFIG} section in the dask config")
            config = {}
        elif not isinstance(config, dict):
            notes.append(f"the AMM config is not a mapping: {config!r}")
            config = {}
        config = plain(config)
        notes += [
            f"unknown AMM config key {key!r} ignored"
            for key in sorted(set(config) - set(AMM_KEYS), key=str)
        ]
        values = found.to_config()
        for key in ("start", "interval", "measure"):
            if key not in config:
                notes.append(
                    f"AMM {key} missing; the extension's {values[key]!r} taken"
                )
                continue
            try:
                values[key] = _check(key, config[key], measures, floor=False)
            except ValueError as e:
                if key == "start":
                    # The extension only asks "if start:"; e.g. a string from a
                    # hand-written env var counts as it does there
                    values[key] = bool(config[key])
                notes.append(f"{e}; the AMM extension's {values[key]!r} taken")
        if values["interval"] < MIN_INTERVAL:
            notes.append(
                f"AMM interval {values['interval']:g}s is below the minimum of "
                f"{MIN_INTERVAL:g}s an apply may ask for; kept, as the scheduler's own"
            )
        raw_policies = config.get("policies", [])
        if not isinstance(raw_policies, list):
            notes.append(
                f"AMM policies must be a list, got {raw_policies!r}; none taken"
            )
            raw_policies = []
        values["policies"] = []
        for i, entry in enumerate(raw_policies):
            try:
                values["policies"].append(_policy_entry(i, entry))
            except ValueError as e:
                notes.append(f"{e}; left out")
        return cls._from_values(values), notes

    @classmethod
    def _from_values(cls, values: dict[str, Any]) -> AMMSpec:
        """From ``to_config()``-shaped values (validated already)."""
        return cls(
            values["start"],
            float(values["interval"]),
            values["measure"],
            [
                (entry["class"], {k: v for k, v in entry.items() if k != "class"})
                for entry in values["policies"]
            ],
        )


def _check(key: str, value: Any, measures: set[str], *, floor: bool) -> Any:
    """One value of the AMM section, validated; ValueError (meant for a person) if it
    is not valid. Policies come back as ``{"class": ..., **kwargs}`` entries."""
    if key == "start":
        if not isinstance(value, bool):
            raise ValueError(f"AMM start must be true or false, got {value!r}")
        return value
    if key == "interval":
        return _interval(value, floor=floor)
    if key == "measure":
        if not isinstance(value, str) or value not in measures:
            raise ValueError(
                f"AMM measure {value!r} is not one of {', '.join(sorted(measures))}"
            )
        return value
    assert key == "policies"
    if not isinstance(value, list):
        raise ValueError(f"AMM policies must be a list, got {value!r}")
    return [_policy_entry(i, entry) for i, entry in enumerate(value)]


def _interval(raw: Any, *, floor: bool) -> float:
    """Seconds from a duration ('2s', '500ms', or seconds as a number); with
    ``floor``, at least :data:`MIN_INTERVAL`."""
    not_a_duration = ValueError(
        f"AMM interval {raw!r} is not a positive duration "
        "(e.g. '2s', '500ms', or seconds as a number)"
    )
    # parse_timedelta's own errors name internals ("could not convert '1-1'")
    try:
        interval = parse_timedelta(raw, default="seconds")
    except (ValueError, KeyError, TypeError):
        raise not_a_duration from None
    if (
        isinstance(raw, bool)
        or not isinstance(interval, (int, float))
        or not math.isfinite(interval)
        or interval <= 0
    ):
        raise not_a_duration
    if floor and interval < MIN_INTERVAL:
        raise ValueError(
            f"AMM interval {raw!r} is below the minimum of {MIN_INTERVAL * 1000:g}ms: "
            "the AMM would spin on the scheduler's event loop"
        )
    return float(interval)


def _policy_entry(i: int, entry: Any) -> dict[str, Any]:
    """Policy entry #``i``, checked: ``{"class": dotted path or short name,
    **kwargs}``."""
    if not isinstance(entry, dict) or not isinstance(entry.get("class"), str):
        raise ValueError(
            f"AMM policy #{i} must be a mapping with a 'class' string, got {entry!r}"
        )
    return entry


class OrderedPolicies(MutableSet[ActiveMemoryManagerPolicy]):
    """The AMM extension's ``policies``, iterated in insertion order.

    Upstream keeps the policies in a set: they run in no defined order, although the
    order matters (e.g. whether Rebalance's drop or a reducer's comes first decides
    which copy of a moved key survives). The plugin puts one of these in place of the
    set, so that configured policies run in config order. It is a drop-in: what the
    extension, ``RetireWorker`` and ``Scheduler.retire_workers`` do with the set
    (``add``, ``remove``, ``discard``, ``in``, ``len``, iteration while a policy
    removes itself from a ``list()`` copy) behaves the same, as do ``set()``,
    ``copy()``, comparisons with sets and the set operators.
    """

    __slots__ = ("_items",)

    #: The policies, as the keys of an insertion-ordered dict
    _items: dict[ActiveMemoryManagerPolicy, None]

    def __init__(self, policies: Iterable[ActiveMemoryManagerPolicy] = ()):
        self._items = dict.fromkeys(policies)

    def __contains__(self, policy: object) -> bool:
        return policy in self._items

    def __iter__(self) -> Iterator[ActiveMemoryManagerPolicy]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self._items)!r})"

    def add(self, policy: ActiveMemoryManagerPolicy) -> None:
        self._items[policy] = None

    def discard(self, policy: ActiveMemoryManagerPolicy) -> None:
        self._items.pop(policy, None)

    def clear(self) -> None:
        self._items.clear()

    def copy(self) -> OrderedPolicies:
        return type(self)(self)

    def update(self, *others: Iterable[ActiveMemoryManagerPolicy]) -> None:
        for other in others:
            self._items.update(dict.fromkeys(other))


#: dask config key: patterns of the classes an ``apply`` may name besides amm_core's
#: and distributed's own (and those the scheduler's own AMM config names)
ALLOWED_CONFIG = "amm-core.allowed-policy-classes"
#: Always allowed: amm_core's policies and distributed's AMM module
DEFAULT_ALLOWED = ("amm_core.**", "distributed.active_memory_manager.*")

#: Reprs in error messages stay short: arguments come from a MemoryPolicy
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 120
_short.maxlevel = 3


def _cut(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def class_pattern(pattern: str) -> re.Pattern[str]:
    """A class glob as a regex: ``*`` is any part of one dotted name (it does not
    cross a dot), ``**`` any number (one or more) of whole dotted names, ``?`` one
    character but a dot; the rest is literal. ``mycorp.amm.*`` allows the classes of
    module ``mycorp.amm``, ``mycorp.amm.**`` those of its submodules too."""
    out = []
    for token in re.split(r"(\*\*|\*|\?)", pattern):
        if token == "**":
            out.append(r"[^.]+(?:\.[^.]+)*")
        elif token == "*":
            out.append(r"[^.]*")
        elif token == "?":
            out.append(r"[^.]")
        else:
            out.append(re.escape(token))
    return re.compile("".join(out))


def class_allowed(path: str, patterns: Iterable[str]) -> bool:
    """Whether the dotted ``path`` matches one of the class globs ``patterns``."""
    return any(class_pattern(p).fullmatch(path) for p in patterns)


def allowed_patterns() -> tuple[str, ...]:
    """What this process may import as an AMM policy: :data:`DEFAULT_ALLOWED`, the
    classes its own AMM config names, and :data:`ALLOWED_CONFIG`'s patterns."""
    own = dask.config.get(f"{AMM_CONFIG}.policies", default=None) or []
    named = tuple(
        # re.escape-free: a glob char in a configured name would only widen it to
        # what that config could import anyway
        amm_core.BUILTIN_POLICIES.get(e["class"], e["class"])
        for e in own if isinstance(e, dict) and isinstance(e.get("class"), str)
    )
    extra = dask.config.get(ALLOWED_CONFIG, default=None) or []
    if isinstance(extra, str):
        extra = [extra]
    return DEFAULT_ALLOWED + named + tuple(p for p in extra if isinstance(p, str))


def policy_class(path: str, allowed: Iterable[str] | None = None) -> type[ActiveMemoryManagerPolicy]:
    """Import an AMM policy class by dotted path or amm_core short name (e.g.
    "Rebalance"); ValueError if that is not one.

    The name is checked against ``allowed`` (by default :func:`allowed_patterns`)
    *before* anything is imported: importing runs a module's code, whatever the
    class turns out to be."""
    target = amm_core.BUILTIN_POLICIES.get(path, path)
    if not class_allowed(target, allowed_patterns() if allowed is None else allowed):
        raise ValueError(
            f"AMM policy class {_short.repr(path)} is not allowed on this scheduler "
            f"(allowed: amm_core's and distributed's policies, and {ALLOWED_CONFIG})"
        )
    try:
        cls = import_term(target)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"AMM policy class {path!r} cannot be imported: {_cut(str(e))}") from None
    if not isinstance(cls, type) or not issubclass(cls, ActiveMemoryManagerPolicy):
        raise ValueError(
            f"{path!r} is not an AMM policy (a subclass of "
            "distributed.active_memory_manager.ActiveMemoryManagerPolicy)"
        )
    if inspect.isabstract(cls):
        raise ValueError(f"AMM policy class {path!r} is abstract")
    return cls


def build_policy(path: str, kwargs: dict[str, Any]) -> ActiveMemoryManagerPolicy:
    cls = policy_class(path)
    try:
        return cls(**kwargs)
    # The constructor validates user input here; whatever it raises, the user must
    # see why their arguments were refused.
    except Exception as e:
        raise ValueError(
            f"AMM policy {path} does not accept arguments {_short.repr(kwargs)}: "
            f"{type(e).__name__}: {_cut(str(e))}"
        ) from None
