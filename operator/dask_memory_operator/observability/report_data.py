"""What ``dask-memory-operator report`` shows, read: the cluster's memory history and
savings counters from its scheduler, its Events and its policy's status from the
Kubernetes API, made into :class:`~.report.ReportData`.

Why a module apart from the drawing: everything here is untrusted input, read under
the operator's rules. The scheduler is asked over the operator's own RPC
(:mod:`..schedulers.rpc`: plain msgpack, bounded, never unpickled; found by
:mod:`..schedulers.locator`, its own pod, never its Service), and whatever it says
is checked field by field (a row of another shape is skipped, a name is cut to a
line). Events are written by anyone who may write Events in the namespace: one page
of each object's, their texts bounded. A report that cannot be made raises
:class:`ReportError`, whose message is meant for the user as it is.

Markers: the scheduler's own (retirements done or aborted, workers that left with
data only they held, from ``amm_core_savings``' departures) and the Events of the
DaskCluster (the operator's scale-ups, scale-downs, retirements, policy changes, OOM
kills) and of the MemoryPolicy (those not mirrored on the cluster). A retirement both
report (the scheduler's marker and the operator's ``WorkerRetired`` Event) is shown
once, from the Event, whose text says more.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import kr8s

from dask_memory_operator import kubeclient
from dask_memory_operator.api.memorypolicy import DASK_GROUP, DASK_VERSION
from dask_memory_operator.observability.report import (
    Marker, ReportData, format_bytes, plausible_time, samples_of, write,
)
from dask_memory_operator.schedulers import rpc
from dask_memory_operator.schedulers.locator import SchedulerLocator
from dask_memory_operator.untrusted import describe

POLICY_GROUP = "amm.dask.org/v1alpha1"
#: Events of one object read (one page; the newest are the API's last)
MAX_EVENTS = 500
#: MemoryPolicies of a namespace looked at for the one governing a cluster
MAX_POLICIES = 100
#: Parts (by who, by why) of a savings count kept
MAX_PARTS = 8
#: Characters of an Event's message or a worker's name kept
MAX_TEXT = 300
#: A Kubernetes object's name (DNS-1123 subdomain): what a cluster's name must be to
#: become part of a file name
NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
#: Seconds apart within which an Event and a scheduler marker are the same retirement
SAME_RETIREMENT = 60.0

#: The kind of marker of each Event reason of the operator (and of an OOM kill,
#: whatever reason names it); reasons not here are listed, as "other", not drawn
EVENT_KINDS = {
    "ScaledUp": "scale-up",
    "RetirementStarted": "scale-down",
    "PendingWorkersRemoved": "scale-down",
    "WorkerRetired": "retirement",
    "WorkerRetiredByHook": "retirement",
    "WorkerLeftMidRetirement": "lost",
    "PausedWorkerReplaced": "retirement",
    "RetiringWorkerLost": "lost",
    "RetirementAborted": "aborted",
    "MemoryPolicyApplied": "policy",
    "MemoryPolicyReleased": "policy",
    "Invalid": "policy",
    "RestoreFailed": "policy",
}
#: The policy's Events mirrored on the cluster (read there)
MIRRORED_ON_CLUSTER = {"Applied", "Degraded"}
#: The scheduler's marker kinds drawn, and as what
SCHEDULER_KINDS = {"retirement-done": "retirement", "retirement-aborted": "aborted"}


class ReportError(Exception):
    """A report that cannot be made; the message says why, for the user."""


@dataclass(frozen=True)
class Access:
    """How the report reaches schedulers."""

    #: The locator's mode: pod-ip, port-forward, or auto (pod-ip in a pod)
    mode: str = "auto"
    #: A scheduler address given by the user (their own port-forward), used as is
    address: str | None = None
    #: Seconds each scheduler call may take
    timeout: float = 10.0


async def build(namespace: str, cluster: str | None, policy: str | None,
                access: Access = Access()) -> list[ReportData]:
    """One ReportData for ``cluster``, or one for each cluster ``policy`` governs."""
    api = await _api()
    policies = await _policies(api, namespace, cluster, policy)
    if access.address is not None and len(policies) > 1:
        raise ReportError(f"--scheduler-address names one scheduler, and MemoryPolicy {namespace}/{policy} "
                          f"governs {len(policies)} clusters: name one, NAMESPACE/CLUSTER")
    locator = SchedulerLocator(access.mode) if access.address is None else None
    try:
        return [await _cluster(api, locator, access, namespace, name, body) for name, body in policies.items()]
    except ReportError as e:
        if locator is not None and locator.mode == "port-forward" and "unreachable" in str(e):
            raise ReportError(f"{e} (through a port-forward of the API server: where that does not work, "
                              "as in the sandbox, try --scheduler-access pod-ip where pod IPs are "
                              "reachable, or --scheduler-address with your own kubectl port-forward)") from None
        raise
    finally:
        if locator is not None:
            await locator.close()


async def _policies(api: Any, namespace: str, cluster: str | None,
                    policy: str | None) -> dict[str, dict[str, Any] | None]:
    """The clusters to report, each with the MemoryPolicy governing it (None: none)."""
    if policy is None:
        assert cluster is not None
        if await _get(api, f"{DASK_GROUP}/{DASK_VERSION}", "daskclusters", namespace, cluster) is None:
            raise ReportError(f"DaskCluster {namespace}/{cluster} not found")
        return {cluster: await _governing(api, namespace, cluster)}
    body = await _get(api, POLICY_GROUP, "memorypolicies", namespace, policy)
    if body is None:
        raise ReportError(f"MemoryPolicy {namespace}/{policy} not found")
    names = [e["name"] for e in _entries(body) if isinstance(e.get("name"), str) and NAME.fullmatch(e["name"])]
    names = [n for n in names if cluster is None or n == cluster]
    if not names:
        raise ReportError(f"MemoryPolicy {namespace}/{policy} governs no DaskCluster"
                          + (f" named {cluster}" if cluster else "") + " (its status.clusters)")
    return dict.fromkeys(names, body)


async def _cluster(api: Any, locator: SchedulerLocator | None, access: Access, namespace: str,
                   cluster: str, policy: Mapping[str, Any] | None) -> ReportData:
    address = access.address or await _address(locator, namespace, cluster)
    history, savings = await _scheduler(address, namespace, cluster, access.timeout)
    policy_name = str(((policy or {}).get("metadata") or {}).get("name") or "")
    entry = next((e for e in _entries(policy) if e.get("name") == cluster), {}) if policy else {}
    events, notes = await _events(api, namespace, cluster, policy_name)
    data = ReportData(namespace, cluster, policy_name, samples=samples_of(_list(history.get("rows"))),
                      scheduler_savings=scheduler_savings(savings),
                      status_savings=entry.get("savings") if isinstance(entry.get("savings"), dict) else None,
                      governed=policy is not None, started=_time(savings.get("started")))
    data.markers = merged(scheduler_markers(history, savings), events)
    data.notes = notes + _truncations(history, savings)
    return data


# --- the scheduler ------------------------------------------------------------------


async def _address(locator: SchedulerLocator | None, namespace: str, cluster: str) -> str:
    assert locator is not None
    try:
        return await locator.address(namespace, cluster)
    except (LookupError, RuntimeError) as e:  # SchedulerServiceMissing, SchedulerAccessError
        raise ReportError(f"cannot find the scheduler of DaskCluster {namespace}/{cluster}: {e}") from None


async def _scheduler(address: str, namespace: str, cluster: str,
                     timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The memory history and the savings counters (plain, bounded answers)."""
    try:
        history = await rpc.memory_history(address, timeout=timeout)
        savings = await rpc.savings(address, timeout=timeout)
        return history, {**savings["counters"], "departures": savings["departures"]}
    except rpc.PluginMissing:
        raise ReportError(f"the scheduler of DaskCluster {namespace}/{cluster} ({address}) has no amm_core "
                          "plugin: no MemoryPolicy has governed it yet") from None
    except rpc.SchedulerRPCError as e:
        raise ReportError(f"cannot read the scheduler of DaskCluster {namespace}/{cluster}: {e}") from None


def scheduler_markers(history: Mapping[str, Any], savings: Mapping[str, Any]) -> list[Marker]:
    """Retirements done or aborted (the history's markers) and workers that left with
    keys only they held (the savings' departures)."""
    out = []
    for m in _maps(history.get("markers")):
        kind, at = SCHEDULER_KINDS.get(m.get("kind")), _time(m.get("at"))  # type: ignore[arg-type]
        if kind is not None and at is not None:
            worker = _text(m.get("worker"))
            out.append(Marker(at, kind, f"worker {worker}: retirement {m['kind'].split('-')[1]}", worker))
    for d in _maps(savings.get("departures")):
        keys, at = _number(d.get("keys")), _time(d.get("at"))
        if keys and at is not None:
            worker = _text(d.get("worker"))
            out.append(Marker(at, "lost", f"worker {worker} left ({_text(d.get('why'))}) with {keys:,.0f} "
                                          f"keys only it held ({format_bytes(_number(d.get('bytes')) or 0)})", worker))
    return out


def scheduler_savings(savings: Mapping[str, Any]) -> dict[str, Any]:
    """The counters the report shows, and nothing else of the answer: counts by who
    or why (names cut to a word, a few of them), duplicates dropped."""
    def counts(value: Any, fields: tuple[str, ...]) -> dict[str, float] | None:
        return {f: _number(value.get(f)) or 0.0 for f in fields} if isinstance(value, dict) else None

    def parts(value: Any) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            return None
        return {describe(k, 32): counts(v, ("workers", "keys", "bytes"))
                for k, v in list(value.items())[:MAX_PARTS] if isinstance(v, dict)}

    return {"rescued": parts(savings.get("rescued")), "lost": parts(savings.get("lost")),
            "duplicates_dropped": counts(savings.get("duplicates_dropped"), ("replicas", "bytes"))}


def merged(scheduler: list[Marker], events: list[Marker]) -> list[Marker]:
    """Both, a scheduler marker left out where an Event says the same of its worker."""
    def told(m: Marker) -> bool:
        return any(e.kind == m.kind and e.worker == m.worker and abs(e.at - m.at) < SAME_RETIREMENT
                   for e in events)
    return sorted([m for m in scheduler if not told(m)] + events, key=lambda m: m.at)


def _truncations(*answers: Mapping[str, Any]) -> list[str]:
    return [f"the scheduler's answer was cut: {rpc.truncation_note(a, rpc.MAX_HISTORY_ROWS)}"
            for a in answers if a.get(rpc.TRUNCATED)]


# --- the Kubernetes API ---------------------------------------------------------------


async def _api() -> Any:
    try:
        return await kubeclient.client()
    except Exception as e:  # no kubeconfig, an unreachable server: kr8s raises many kinds
        raise ReportError(f"cannot reach the Kubernetes API (kubeconfig in use): {describe(str(e))}") from None


async def _call(api: Any, version: str, namespace: str, url: str, **params: Any) -> dict[str, Any] | None:
    """One GET; None for 404."""
    base = "/apis" if "/" in version else "/api"
    try:
        async with api.call_api("GET", version=version, base=base, namespace=namespace, url=url,
                                params=params, raise_for_status=False) as response:
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise ReportError(f"the Kubernetes API answered {response.status_code} to GET {url} in "
                                  f"{namespace}: {describe(response.text, MAX_TEXT)}")
            data = response.json()
    except (kr8s.ServerError, kr8s.APITimeoutError, httpx.HTTPError, OSError, ValueError) as e:
        raise ReportError(f"cannot read {url} in {namespace} from the Kubernetes API: {describe(str(e))}") from None
    return data if isinstance(data, dict) else None


async def _get(api: Any, version: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    return await _call(api, version, namespace, f"{plural}/{name}")


async def _governing(api: Any, namespace: str, cluster: str) -> dict[str, Any] | None:
    """The MemoryPolicy whose status lists the cluster, if any."""
    listing = await _call(api, POLICY_GROUP, namespace, "memorypolicies", limit=MAX_POLICIES) or {}
    return next((p for p in _maps(listing.get("items"))
                 if any(e.get("name") == cluster for e in _entries(p))), None)


async def _events(api: Any, namespace: str, cluster: str, policy: str) -> tuple[list[Marker], list[str]]:
    """The markers of the cluster's Events and of its policy's own, and notes of what
    was left out."""
    markers, notes = [], []
    for kind, name in (("DaskCluster", cluster), ("MemoryPolicy", policy)):
        if not name:
            continue
        listing = await _call(api, "v1", namespace, "events", limit=MAX_EVENTS, fieldSelector=(
            f"involvedObject.kind={kind},involvedObject.name={name}")) or {}
        if (listing.get("metadata") or {}).get("continue"):
            notes.append(f"more than {MAX_EVENTS} Events of {kind} {name}: the first {MAX_EVENTS} are shown")
        for event in _maps(listing.get("items")):
            marker = event_marker(event, cluster if kind == "MemoryPolicy" else None)
            if marker is not None:
                markers.append(marker)
    return markers, notes


def event_marker(event: Mapping[str, Any], about: str | None = None) -> Marker | None:
    """The marker of one Event (None: not one to show); ``about``: a policy's Event,
    shown only when it concerns that cluster and is not mirrored on it."""
    reason, message = _text(event.get("reason")), _text(event.get("message"))
    if about is not None and (reason in MIRRORED_ON_CLUSTER or
                              (message.startswith("DaskCluster ") and not message.startswith(f"DaskCluster {about}:"))):
        return None
    at = _event_time(event)
    if at is None:
        return None
    kind = "oom" if "oom" in reason.lower() else EVENT_KINDS.get(reason, "other")
    worker = message.split()[1] if message.startswith("Worker ") and len(message.split()) > 1 else ""
    return Marker(at, kind, f"{reason}: {message}", worker)  # type: ignore[arg-type]


def _event_time(event: Mapping[str, Any]) -> float | None:
    """When it last happened: the first of its times that parses."""
    meta = event.get("metadata") if isinstance(event.get("metadata"), dict) else {}
    for value in (event.get("lastTimestamp"), event.get("eventTime"), event.get("firstTimestamp"),
                  meta.get("creationTimestamp")):
        if isinstance(value, str) and len(value) < 64:
            try:
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


# --- untrusted plain data -------------------------------------------------------------


def _entries(policy: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    return _maps(((policy or {}).get("status") or {}).get("clusters"))


def _maps(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _time(value: Any) -> float | None:
    at = _number(value)
    return at if at is not None and plausible_time(at) else None


def _text(value: Any) -> str:
    return describe(value, MAX_TEXT) if isinstance(value, str) else ""


# --- the command --------------------------------------------------------------------


def main(args: Any) -> int:
    """``dask-memory-operator report``: the page (and PNGs) written, their paths
    printed; a report that cannot be made is one line on stderr and exit 1."""
    import asyncio
    import sys

    try:
        namespace, cluster = target(args.target, args.policy)
        _check_address(args.scheduler_address)
        out = Path(args.output or default_name(namespace, cluster, args.policy))
        _check_matplotlib()
        reports = asyncio.run(_quietly(build(namespace, cluster, args.policy,
                                             Access(args.scheduler_access, args.scheduler_address, args.timeout))))
        title = f"Memory report: MemoryPolicy {namespace}/{args.policy}" if args.policy else ""
        written = write(reports, out, args.png, title, per_cluster=args.policy is not None)
    except ReportError as e:
        print(f"dask-memory-operator report: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the output path
        print(f"dask-memory-operator report: error: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    for path in written:
        print(path.resolve())
    return 0


async def _quietly(work: Any) -> Any:
    """``work``, with a port-forward cancelled at the end not reported as an error
    with its traceback (kr8s' forwarding tasks end so)."""
    import asyncio

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not isinstance(context.get("exception"), asyncio.CancelledError):
            loop.default_exception_handler(context)

    asyncio.get_running_loop().set_exception_handler(handler)
    return await work


def target(text: str, policy: str | None) -> tuple[str, str | None]:
    """(namespace, cluster) of NAMESPACE/CLUSTER, or NAMESPACE with a policy."""
    namespace, _, cluster = text.partition("/")
    names = [namespace] + ([cluster] if cluster or not policy else []) + ([policy] if policy else [])
    if not all(NAME.fullmatch(n) for n in names):
        raise ReportError(f"expected NAMESPACE/CLUSTER{' or NAMESPACE with --policy' if policy else ''} "
                          f"and Kubernetes names, got {describe(text, 100)!r}"
                          + (f" and --policy {describe(policy, 100)!r}" if policy else ""))
    return namespace, cluster or None


def _check_address(address: str | None) -> None:
    if address is None:
        return
    try:
        rpc.tcp_host_port(address)
    except (ValueError, rpc.SchedulerRPCError):
        raise ReportError(f"--scheduler-address: expected tcp://HOST:PORT, got {describe(address, 100)!r}") from None


def default_name(namespace: str, cluster: str | None, policy: str | None) -> str:
    return f"memory-report-{namespace}-" + (f"policy-{policy}" if policy else f"{cluster}") + ".html"


def _check_matplotlib() -> None:
    """Before anything is read: the report draws with matplotlib, an extra."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ReportError("the report draws with matplotlib: pip install 'dask-memory-operator[report]'")
