"""What the operator did for each governed cluster, measured: ``status.clusters[].savings``
of its MemoryPolicy, the metrics of the same, the Warning Event of an OOM kill and the
Event of each preStop hook's retirement.

Where the numbers come from:

- **rescued, lost, duplicates dropped**: the scheduler counts them as they happen
  (amm_core.savings), cumulative since its plugin started, and reports the counters
  in every ``amm_core_status`` answer, which each converge pass reads anyway. A
  scheduler (or its plugin) that restarts starts again from zero under a new ``id``:
  the status keeps ``base`` (the totals of the plugins before, each as last read) and
  ``source`` (the current plugin's id and counters), so the totals are ``base +
  source`` and never go backwards, across operator restarts too (everything is in the
  status). Reading the same answer twice changes nothing (the counters of one id are
  taken as they are, not added). What a plugin counted between the operator's last
  read and its restart is not known to anyone: at most one resync interval's worth.
- **departures**: ``amm_core_savings`` (read only when the status's ``seq`` moved
  past ``source.seq``, or at the first sight of a plugin that has some) lists the
  latest workers that left, each handled once by its ``seq`` (those older than
  :data:`TELL_HORIZON` when first read are counted, not told):
  a preStop hook's retirement gets an Event on the DaskCluster (what moved, what was
  lost), and a worker that left without a retirement (``killed``) is matched with an
  OOM kill the pod shows (same worker name or pod IP, within :data:`MATCH_WINDOW`):
  its keys then count as ``lost.byReason.oomKilled``, not ``killed``.
- **OOM kills**: a worker pod whose container ended ``OOMKilled`` (``lastState``, or
  ``state`` once it is not restarted), seen in the operator's pod cache; a kill is
  known by its pod and ``finishedAt`` and counted once (the last :data:`MAX_KILLS`
  are listed in the status). One kill waits up to :data:`MATCH_WINDOW` for its
  departure (the scheduler and the kubelet report it separately), and a ``killed``
  departure as long for its kill, then each goes on alone.
- **worker-seconds** (a policy with ``adaptive``): of the pods of the scaled group,
  from each pod's ``creationTimestamp`` to its end (its container's ``finishedAt``
  once it ended for good, else when the pod left the API), against ``maximum`` pods
  over the same time. The status holds the totals as of ``asOf``; a pass adds what
  ran since (the pods there now and those that went since, which the cache keeps a
  while), and writes it when a pod came or went, ``maximum`` changed or
  :data:`WORKER_SECONDS_REFRESH` passed: a status write wakes every watcher of the
  policy, the metrics follow every pass. Pods that came and went while no operator ran
  are not seen.

Everything here is a pure function of the previous status and what a pass read
(:func:`update`): level-triggered, and idempotent.
"""

from __future__ import annotations

import copy
import datetime
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dask_memory_operator.untrusted import describe

#: Seconds an OOM kill holds its group's size (adaptive's memory floor)
OOM_FLOOR_SECONDS = 600.0
#: Seconds an OOM kill waits for the scheduler's record of its worker leaving, and a
#: worker that left without a retirement for its pod's OOM kill
MATCH_WINDOW = 30.0
#: OOM kills listed in the status (the latest)
MAX_KILLS = 16
#: Seconds at most between two writes of the worker-seconds to the status
WORKER_SECONDS_REFRESH = 300.0
#: Departures older than this (by the scheduler's clock) when first read are counted
#: but not told in an Event (a plugin's history from before the operator looked)
TELL_HORIZON = 600.0

WHO = ("operator", "hook")
#: Why the scheduler lost keys (amm_core.savings)
SCHEDULER_WHY = ("killed", "retirementAborted", "retired")
#: ... and as shown: killed split into killed and oomKilled
WHY = ("killed", "oomKilled", "retirementAborted", "retired")


# --- times -----------------------------------------------------------------------


def iso(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch(text: Any) -> float | None:
    """Seconds since the epoch of an RFC 3339 time as the API writes them; None if not one."""
    if not isinstance(text, str) or not text:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


# --- counters ----------------------------------------------------------------------


def _counts(value: Any = None) -> dict[str, int]:
    value = value if isinstance(value, Mapping) else {}
    return {k: _int(value.get(k)) for k in ("workers", "keys", "bytes")}


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else 0


def zero() -> dict[str, Any]:
    return {"rescued": {w: _counts() for w in WHO}, "lost": {w: _counts() for w in SCHEDULER_WHY},
            "duplicatesDropped": {"replicas": 0, "bytes": 0}}


def from_scheduler(counters: Mapping[str, Any]) -> dict[str, Any]:
    """The plugin's counters (checked by rpc: every field there) in the status's form."""
    dropped = _map(counters.get("duplicates_dropped"))
    return {"rescued": {w: _counts(_map(counters.get("rescued")).get(w)) for w in WHO},
            "lost": {w: _counts(_map(counters.get("lost")).get(w)) for w in SCHEDULER_WHY},
            "duplicatesDropped": {"replicas": _int(dropped.get("replicas")), "bytes": _int(dropped.get("bytes"))}}


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _normal(value: Any) -> dict[str, Any]:
    """Counters as stored (whatever a user wrote into the status), in shape."""
    value = _map(value)
    rescued, lost, dropped = _map(value.get("rescued")), _map(value.get("lost")), _map(value.get("duplicatesDropped"))
    return {"rescued": {w: _counts(rescued.get(w)) for w in WHO},
            "lost": {w: _counts(lost.get(w)) for w in SCHEDULER_WHY},
            "duplicatesDropped": {"replicas": _int(dropped.get("replicas")), "bytes": _int(dropped.get("bytes"))}}


def _combine(a: Mapping[str, Any], b: Mapping[str, Any], op: Any) -> dict[str, Any]:
    return {
        "rescued": {w: {k: op(a["rescued"][w][k], b["rescued"][w][k]) for k in a["rescued"][w]} for w in WHO},
        "lost": {w: {k: op(a["lost"][w][k], b["lost"][w][k]) for k in a["lost"][w]} for w in SCHEDULER_WHY},
        "duplicatesDropped": {k: op(a["duplicatesDropped"][k], b["duplicatesDropped"][k])
                              for k in ("replicas", "bytes")},
    }


def add(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    return _combine(_normal(a), _normal(b), lambda x, y: x + y)


def fold(saved: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` (``base``, ``source``) after reading the plugin's counters
    ``report`` (``{"id", "seq", ...}`` as amm_core sends them). The same id: its
    counters are taken as they are (the larger of each, a counter never goes down
    within one id: an answer read twice, or late, changes nothing). Another id: the
    plugin restarted, and what the one before counted is added to ``base``."""
    out = dict(saved)
    source = saved.get("source") if isinstance(saved.get("source"), Mapping) else None
    counters = from_scheduler(report)
    rid = str(report.get("id", ""))
    if source is not None and source.get("id") == rid:
        counters = _combine(_normal(source.get("counters")), counters, max)
        out["source"] = {"id": rid, "seq": _int(source.get("seq")), "counters": counters}
        return out
    if source is not None:
        out["base"] = add(saved.get("base"), source.get("counters"))
    else:
        out["base"] = _normal(saved.get("base"))
    # every departure of a plugin seen for the first time is news (those older than
    # TELL_HORIZON are not told: history of before the operator looked)
    out["source"] = {"id": rid, "seq": 0, "counters": counters}
    return out


def totals(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The shown fields (rescued, lost by reason, duplicates dropped) of ``saved``."""
    source = _map(saved.get("source"))
    t = add(saved.get("base"), source.get("counters"))
    oom = _counts(_map(_map(saved.get("lost")).get("byReason")).get("oomKilled"))
    by = {w: dict(t["lost"][w]) for w in SCHEDULER_WHY}
    # oomKilled departures are killed ones the scheduler counted as such
    by["killed"] = {k: max(0, by["killed"][k] - oom[k]) for k in oom}
    by["oomKilled"] = oom
    rescued = {w: t["rescued"][w] for w in WHO}
    return {
        "rescued": {"keys": sum(c["keys"] for c in rescued.values()),
                    "bytes": sum(c["bytes"] for c in rescued.values()), **rescued},
        "lost": {"keys": sum(c["keys"] for c in by.values()), "bytes": sum(c["bytes"] for c in by.values()),
                 "byReason": {w: by[w] for w in WHY}},
        "duplicatesDropped": t["duplicatesDropped"],
    }


# --- one pass ------------------------------------------------------------------------


@dataclass
class Seen:
    """What one pass read for the savings of one cluster."""

    #: Operator wall time of the pass
    now: float
    #: The plugin's counters (``status["savings"]``), None when not read this pass
    report: Mapping[str, Any] | None = None
    #: ``amm_core_savings``'s departures (read when ``seq`` moved), and its ``now``
    departures: list[Mapping[str, Any]] | None = None
    scheduler_now: float | None = None
    #: The cluster's pods (watches.PodRecord), None when they could not be read
    pods: list[Any] | None = None
    #: (wall time gone, last record) of its pods that went since the worker-seconds' asOf
    gone: list[tuple[float, Any]] = field(default_factory=list)
    #: The worker group ``adaptive`` scales and its maximum (None: no adaptive)
    group: str | None = None
    maximum: int | None = None


@dataclass
class Kill:
    """An OOM kill of a worker container."""

    pod: str
    worker: str
    group: str
    ip: str
    at: str
    memory_limit: int
    #: Pods of its group when it was seen (its own included)
    workers: int
    keys: int = 0
    bytes: int = 0
    matched: bool = False

    def record(self) -> dict[str, Any]:
        return {"pod": self.pod, "worker": self.worker, "group": self.group, "at": self.at,
                "memoryLimit": self.memory_limit, "workers": self.workers,
                "keys": self.keys, "bytes": self.bytes, "matched": self.matched}


@dataclass
class Result:
    savings: dict[str, Any]
    #: Kills counted this pass (an Event and the metric each)
    kills: list[Kill] = field(default_factory=list)
    #: Departures of workers a preStop hook retired, handled this pass (an Event each)
    hook_departures: list[Mapping[str, Any]] = field(default_factory=list)
    #: Worker-seconds as of now (adaptive, at maximum), for the metrics; None without adaptive
    worker_seconds: tuple[float, float] | None = None


def wants_departures(saved: Mapping[str, Any] | None, counters: Mapping[str, Any] | None) -> bool:
    """Whether the plugin's departures hold something not handled yet: read
    ``amm_core_savings`` only then (never on an idle pass)."""
    if not counters:
        return False
    seq = _int(counters.get("seq"))
    if not saved or not isinstance(saved.get("source"), Mapping):
        return seq > 0  # first sight: its departures are news too
    source = saved["source"]
    if source.get("id") != counters.get("id"):
        return seq > 0
    return seq > _int(source.get("seq"))


def seen_source(saved: Mapping[str, Any] | None) -> tuple[str, int] | None:
    """(plugin id, last departure seq handled) of a stored savings."""
    source = (saved or {}).get("source")
    if not isinstance(source, Mapping):
        return None
    return str(source.get("id", "")), _int(source.get("seq"))


def update(previous: Mapping[str, Any] | None, seen: Seen) -> Result:
    """The cluster's new ``savings`` from its previous one and what a pass read."""
    saved: dict[str, Any] = copy.deepcopy(dict(previous)) if isinstance(previous, Mapping) else {}
    if epoch(saved.get("since")) is None:
        saved["since"] = iso(seen.now)
    saved["base"] = _normal(saved.get("base"))
    oom_lost = _counts(_map(_map(saved.get("lost")).get("byReason")).get("oomKilled"))
    kills_state = _map(saved.get("oomKills"))
    listed = kills_state.get("recent")
    recent = [k for k in listed if isinstance(k, Mapping)][-MAX_KILLS:] if isinstance(listed, list) else []
    count = _int(kills_state.get("count"))
    result = Result(saved)

    if seen.report is not None:
        saved.update(fold(saved, seen.report))

    kills = _new_kills(seen, recent, epoch(saved["since"]) or seen.now)
    if seen.departures is not None and seen.report is not None:
        _handle_departures(saved, seen, kills, oom_lost, result)

    for kill in kills:
        young = seen.now - (epoch(kill.at) or seen.now) < MATCH_WINDOW
        if not kill.matched and young:
            continue  # its departure may be on its way: looked at again next pass
        count += 1
        recent = [*recent, kill.record()][-MAX_KILLS:]
        result.kills.append(kill)
    saved["oomKills"] = {"count": count, "recent": recent}
    saved["lost"] = {"byReason": {"oomKilled": oom_lost}}
    saved.update(totals(saved))
    if seen.group is not None and seen.maximum is not None and seen.pods is not None:
        result.worker_seconds = _worker_seconds(saved, seen)
    elif seen.group is None:
        saved.pop("workerSeconds", None)
    return result


def _new_kills(seen: Seen, recent: list[Mapping[str, Any]], since: float) -> list[Kill]:
    """OOM kills the pods show that are not counted yet."""
    if seen.pods is None:
        return []
    known = {(k.get("pod"), k.get("at")) for k in recent}
    floor = min((epoch(k.get("at")) or 0.0 for k in recent), default=0.0) if len(recent) >= MAX_KILLS else 0.0
    records = [*seen.pods, *(r for _, r in seen.gone)]
    alive: dict[str, set[str]] = {}
    for r in seen.pods:
        if r.component == "worker" and not r.ended and not r.deleting:
            alive.setdefault(r.group, set()).add(r.name)
    out, found = [], set()
    for r in records:
        if r.component != "worker" or not r.last_exit or r.last_exit[0] != "OOMKilled":
            continue
        at = r.last_exit[1]
        when = epoch(at)
        key = (r.name, at)
        if when is None or when < since - 1 or key in known or key in found or (floor and when <= floor):
            continue
        found.add(key)
        # the size of its group when it was killed: the pods there, itself included
        workers = len(alive.get(r.group, set()) | {r.name})
        out.append(Kill(pod=r.name, worker=r.worker or r.name, group=r.group, ip=r.ip, at=at,
                        memory_limit=r.memory_limit, workers=workers))
    return sorted(out, key=lambda k: k.at)


def _host(address: str) -> str:
    """The host of a ``tcp://host:port`` address (brackets of IPv6 off)."""
    rest = address.split("://", 1)[-1]
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    return host.strip("[]")


def _handle_departures(saved: dict[str, Any], seen: Seen, kills: list[Kill], oom_lost: dict[str, int],
                       result: Result) -> None:
    """Each departure not handled yet, in seq order: hook retirements are told, killed
    workers matched with OOM kills. One killed departure not matched yet, younger than
    MATCH_WINDOW, stops the walk: it and those after it are read again next pass."""
    source = saved["source"]
    if str(source.get("id")) != str((seen.report or {}).get("id")):
        return  # an answer of another plugin than the counters'
    handled = _int(source.get("seq"))
    now = seen.scheduler_now if seen.scheduler_now is not None else 0.0
    for dep in sorted(seen.departures or (), key=lambda d: d["seq"]):
        if dep["seq"] <= handled:
            continue
        if dep["why"] == "killed":
            kill = _match(dep, kills)
            if kill is not None:
                kill.matched = True
                kill.keys += int(dep["keys"])
                kill.bytes += int(dep["bytes"])
                oom_lost["workers"] += 1
                oom_lost["keys"] += int(dep["keys"])
                oom_lost["bytes"] += int(dep["bytes"])
            elif now - float(dep["at"]) < MATCH_WINDOW:
                break
        if dep.get("retirement") == "hook" and now - float(dep["at"]) <= TELL_HORIZON:
            result.hook_departures.append(dep)
        handled = dep["seq"]
    source["seq"] = handled


def _match(dep: Mapping[str, Any], kills: Iterable[Kill]) -> Kill | None:
    """The OOM kill of the departed worker: the same name, or the same pod IP, within
    MATCH_WINDOW (on two clocks: the scheduler's and the node's)."""
    best, gap = None, MATCH_WINDOW * 2
    for kill in kills:
        if kill.matched or not (kill.worker == dep["worker"] or (kill.ip and kill.ip == _host(dep["address"]))):
            continue
        when = epoch(kill.at)
        d = abs(float(dep["at"]) - when) if when is not None else MATCH_WINDOW * 2
        if d < gap:
            best, gap = kill, d
    return best


def _worker_seconds(saved: dict[str, Any], seen: Seen) -> tuple[float, float]:
    """Worker-seconds of the scaled group as of now (written to the status when worth
    it, see the module docstring)."""
    assert seen.pods is not None and seen.maximum is not None
    old = saved.get("workerSeconds") if isinstance(saved.get("workerSeconds"), Mapping) else None
    # in whole seconds, as asOf holds it: a pass in the same second adds nothing twice
    now = float(int(seen.now))
    if old is None or epoch(old.get("asOf")) is None:
        saved["workerSeconds"] = {"adaptive": 0.0, "atMaximum": 0.0, "asOf": iso(now), "maximum": seen.maximum}
        return 0.0, 0.0
    start = epoch(old["asOf"]) or now
    now = max(now, start)
    ran, came = 0.0, False
    live_uids = set()
    for r in seen.pods:
        if r.component != "worker" or r.group != seen.group:
            continue
        live_uids.add(r.uid)
        created = epoch(r.created) or start
        came |= created > start
        ran += _overlap(created, epoch(r.ended) if r.ended else now, start, now)
    went = False
    for gone_at, r in seen.gone:
        if r.component != "worker" or r.group != seen.group or r.uid in live_uids or gone_at <= start:
            continue
        went = True
        end = min(epoch(r.ended) or gone_at, gone_at) if r.ended else gone_at
        ran += _overlap(epoch(r.created) or start, end, start, now)
    maximum = _int(old.get("maximum"))
    adaptive = _number(old.get("adaptive")) + ran
    at_max = _number(old.get("atMaximum")) + maximum * (now - start)
    if came or went or maximum != seen.maximum or now - start >= WORKER_SECONDS_REFRESH:
        saved["workerSeconds"] = {"adaptive": round(adaptive, 1), "atMaximum": round(at_max, 1),
                                  "asOf": iso(now), "maximum": seen.maximum}
    return adaptive, at_max


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else 0.0


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


# --- what the floor and the Events read ------------------------------------------------


def oom_floor(savings: Mapping[str, Any] | None, group: str, now: float | None = None) -> tuple[int, str, float] | None:
    """(workers, worker, until) of the latest OOM kill in ``group`` whose hold
    (OOM_FLOOR_SECONDS) still runs, the largest size first; None when none does."""
    now = time.time() if now is None else now
    best = None
    recent = _map(_map(savings).get("oomKills")).get("recent")
    for k in recent if isinstance(recent, list) else ():
        if not isinstance(k, Mapping) or k.get("group") != group:
            continue
        at = epoch(k.get("at"))
        if at is None or at + OOM_FLOOR_SECONDS <= now:
            continue
        candidate = (_int(k.get("workers")), str(k.get("worker", "")), at + OOM_FLOOR_SECONDS)
        if best is None or candidate[0] > best[0] or (candidate[0] == best[0] and candidate[2] > best[2]):
            best = candidate
    return best


def nbytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def kill_message(kill: Kill, floor_group: str | None) -> str:
    limit = f"its memory limit of {nbytes(kill.memory_limit)}" if kill.memory_limit else "its memory limit"
    lost = (f"the scheduler lost {kill.keys} keys ({nbytes(kill.bytes)}) with it" if kill.matched
            else "the scheduler recorded no loss with it (or did not see it leave)")
    text = (f"Worker {describe(kill.worker, 253)} (pod {kill.pod}) was OOM-killed at {limit} "
            f"({kill.at}); {lost}")
    if floor_group is not None and kill.group == floor_group:
        until = iso((epoch(kill.at) or time.time()) + OOM_FLOOR_SECONDS)
        text += (f"; adaptive keeps {kill.group} at {kill.workers} workers or more until {until} "
                 f"(the size it was killed at)")
    return text


def hook_message(dep: Mapping[str, Any]) -> tuple[str, str, bool]:
    """(reason, message, warning) of the Event of a worker a preStop hook retired."""
    worker = describe(str(dep.get("worker", "")), 253)
    moved = f"{_int(dep.get('moved_keys'))} keys ({nbytes(_int(dep.get('moved_bytes')))}) rescued from it"
    lost = _int(dep.get("keys"))
    if dep.get("why") == "retired" and not lost:
        return "WorkerRetiredByHook", f"Worker {worker} retired by its preStop hook: {moved}, nothing lost", False
    return "WorkerLeftMidRetirement", (
        f"Worker {worker} left before its preStop hook's retirement finished: {moved}; "
        f"{lost} keys ({nbytes(_int(dep.get('bytes')))}) lost with it"), True
