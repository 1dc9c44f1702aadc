"""The memory report of one governed DaskCluster: a self-contained HTML page (and,
on request, a PNG) that answers "what did the operator do for this cluster".

Its parts, as the AMM's announcement showed its result:

- the cluster's memory over time, split into managed, unmanaged and spilled bytes
  (distributed's ``MemorySampler`` measures), with the fullest worker's share of its
  limit beside it: imbalance shows as that line running above the average;
- the number of workers over time;
- a mark on both at each retirement, scale-up, OOM kill, lost worker and policy
  change;
- the savings table (keys and bytes rescued at scale-downs, lost and why, duplicate
  copies dropped, worker-hours under ``adaptive`` against the group's maximum).

This module only draws: :class:`ReportData` holds plain numbers, already read
(bounded) from the scheduler and the API by whoever builds it. The page embeds its
figure as SVG: no script, no external resource.
"""

from __future__ import annotations

import html
import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

MarkerKind = Literal["retirement", "scale-up", "scale-down", "oom", "lost", "policy"]

#: Colour and legend of each marker kind
MARKERS: dict[str, tuple[str, str]] = {
    "retirement": ("#009E73", "retirement"),
    "scale-up": ("#56B4E9", "scale-up"),
    "scale-down": ("#0072B2", "scale-down"),
    "oom": ("#D55E00", "OOM kill"),
    "lost": ("#CC0000", "worker lost with data"),
    "policy": ("#999999", "policy change"),
}
#: The memory split's colours, as Dask's dashboard draws them
MEMORY_COLOURS = {"managed": "#0072B2", "unmanaged": "#9fc5e8", "spilled": "#888888"}
GiB = 2**30


@dataclass(frozen=True)
class Sample:
    """The cluster at one moment (sums over its workers)."""

    at: float
    workers: int
    managed: int
    unmanaged: int
    spilled: int
    #: The fullest worker's process memory as a fraction of its limit (0 when unknown)
    fullest: float = 0.0


@dataclass(frozen=True)
class Marker:
    at: float
    kind: MarkerKind
    text: str


@dataclass
class ReportData:
    namespace: str
    cluster: str
    policy: str = ""
    samples: list[Sample] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    #: The cluster's ``savings`` of its policy's status entry
    savings: Mapping[str, Any] = field(default_factory=dict)
    #: Seconds since the epoch at which the data was read
    generated: float = field(default_factory=time.time)


def figure(data: ReportData) -> Any:
    """The report's matplotlib figure: memory above, workers below, marks on both,
    wall-clock time (UTC) along."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.dates import DateFormatter
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(11, 6.5), layout="constrained")
    fig.suptitle(f"DaskCluster {data.namespace}/{data.cluster}"
                 + (f", MemoryPolicy {data.policy}" if data.policy else ""), x=0.01, ha="left")
    memory, workers = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])
    times = [_utc(s.at) for s in data.samples]
    split = {k: [getattr(s, k) / GiB for s in data.samples] for k in MEMORY_COLOURS}
    memory.stackplot(times, *split.values(), labels=list(split), colors=list(MEMORY_COLOURS.values()),
                     alpha=0.85)
    memory.set_ylabel("cluster memory (GiB)")
    memory.set_ylim(bottom=0)
    handles, labels = memory.get_legend_handles_labels()
    if any(s.fullest for s in data.samples):
        fullest = memory.twinx()
        fullest.plot(times, [100 * s.fullest for s in data.samples], color="#CC79A7", lw=1.2)
        fullest.set_ylabel("fullest worker (% of its limit)", color="#CC79A7")
        fullest.set_ylim(0, 110)
        handles.append(Line2D([], [], color="#CC79A7", lw=1.2))
        labels.append("fullest worker")
    workers.step(times, [s.workers for s in data.samples], where="post", color="black", lw=1.5)
    workers.set_ylabel("workers")
    workers.set_xlabel("time (UTC)")
    workers.set_ylim(bottom=0)
    workers.yaxis.get_major_locator().set_params(integer=True)
    workers.xaxis.set_major_formatter(DateFormatter("%H:%M"))
    for marker in data.markers:
        for ax in (memory, workers):
            ax.axvline(_utc(marker.at), color=MARKERS[marker.kind][0], lw=1, ls="--", alpha=0.8)
    kinds = [k for k in MARKERS if any(m.kind == k for m in data.markers)]
    handles += [Line2D([], [], color=MARKERS[k][0], ls="--") for k in kinds]
    labels += [MARKERS[k][1] for k in kinds]
    memory.legend(handles, labels, loc="lower left", bbox_to_anchor=(0, 1.02), ncols=5, fontsize="small",
                  frameon=False)
    if not data.samples:
        memory.text(0.5, 0.5, "no memory samples yet", transform=memory.transAxes, ha="center")
    return fig


def _utc(at: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(at, UTC)


def savings_rows(savings: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(what, amount, meaning) rows of the savings table, zeros shown as zeros."""
    rescued = savings.get("rescued") or {}
    lost = savings.get("lost") or {}
    dropped = savings.get("duplicatesDropped") or {}
    why = ", ".join(f"{reason} {n}" for reason, n in sorted((lost.get("byReason") or {}).items()) if n)
    rows = [
        ("Rescued", f"{rescued.get('keys', 0):,} keys, {_bytes(rescued.get('bytes', 0))}",
         "moved off workers before their pods went: what a plain deletion would have lost"),
        ("Lost", f"{lost.get('keys', 0):,} keys, {_bytes(lost.get('bytes', 0))}",
         f"held only by a governed worker that left{f' ({why})' if why else ''}"),
        ("Duplicates dropped", f"{dropped.get('replicas', 0):,} copies, {_bytes(dropped.get('bytes', 0))}",
         "extra copies of keys the AMM's policies dropped"),
    ]
    ran, at_max = savings.get("workerSeconds"), savings.get("workerSecondsAtMaximum")
    if ran is not None and at_max:
        saved = 1 - ran / at_max if at_max else 0.0
        rows.append(("Worker-hours", f"{ran / 3600:,.2f} h run, {at_max / 3600:,.2f} h at maximum",
                     f"under adaptive: {100 * saved:.0f}% of the worker-hours the group's maximum would have run"))
    return rows


def render_html(data: ReportData) -> str:
    """The self-contained page."""
    svg = io.StringIO()
    figure(data).savefig(svg, format="svg")
    body = svg.getvalue()
    body = body[body.index("<svg"):]  # the XML prolog and doctype do not belong inline
    rows = "".join(f"<tr><th>{html.escape(a)}</th><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
                   for a, b, c in savings_rows(data.savings))
    marks = "".join(
        f"<tr><td>{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(m.at))}</td>"
        f"<td style='color:{MARKERS[m.kind][0]}'>{html.escape(MARKERS[m.kind][1])}</td>"
        f"<td>{html.escape(m.text)}</td></tr>"
        for m in sorted(data.markers, key=lambda m: m.at))
    title = f"Memory report: DaskCluster {data.namespace}/{data.cluster}"
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(data.generated))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 72em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ text-align: left; padding: .3em .8em; border-bottom: 1px solid #ddd; vertical-align: top; }}
th {{ white-space: nowrap; }}
.muted {{ color: #777; }}
svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="muted">{html.escape(f"MemoryPolicy {data.policy}, " if data.policy else "")}generated {generated}
by dask-memory-operator; {len(data.samples)} samples of the scheduler's memory, {len(data.markers)} events.</p>
<h2>Savings</h2>
<table id="savings"><tr><th>what</th><th>amount</th><th>meaning</th></tr>{rows}</table>
<h2>Memory and workers</h2>
<figure id="memory">{body}</figure>
<h2>Events</h2>
<table id="events"><tr><th>when (UTC)</th><th>what</th><th>detail</th></tr>{marks or '<tr><td colspan="3">none</td></tr>'}</table>
</body></html>
"""


def render_png(data: ReportData) -> bytes:
    out = io.BytesIO()
    figure(data).savefig(out, format="png", dpi=110)
    return out.getvalue()


def _bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n):,} bytes"


def samples_of(rows: Sequence[Sequence[Any]]) -> list[Sample]:
    """Samples from the scheduler's plain rows ``[at, workers, managed, unmanaged,
    spilled, fullest]``; a row of another shape is skipped (the scheduler is
    untrusted)."""
    out = []
    for row in rows:
        try:
            at, n, managed, unmanaged, spilled, fullest = row
            out.append(Sample(float(at), int(n), int(managed), int(unmanaged), int(spilled), float(fullest)))
        except (TypeError, ValueError):
            continue
    out.sort(key=lambda s: s.at)
    return out
