"""The memory report of governed DaskClusters: a self-contained HTML page (and, on
request, PNGs) that answers "what did the operator do for this cluster".

Its parts, for each cluster, as the AMM's announcement showed its result:

- the savings table: keys and bytes rescued at scale-downs, lost and why, duplicate
  copies dropped, OOM kills, worker-hours under ``adaptive``; as the scheduler
  counted them since it started, and as the policy's status keeps them (across
  restarts), "not reported" where a source has no such number;
- the cluster's memory over time, split into managed, unmanaged and spilled bytes
  (distributed's ``MemorySampler`` measures), with the fullest worker's share of its
  limit beside it: imbalance shows as that line running above the average;
- the number of workers over time;
- a mark on both at each retirement, scale-up, scale-down, OOM kill, lost worker and
  policy change, and the list of them.

This module only draws: :class:`ReportData` holds plain numbers, already read
(bounded) from the scheduler and the API by :mod:`.report_data`. The page embeds its
figures as SVG: no script, no external resource.
"""

from __future__ import annotations

import html
import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

MarkerKind = Literal["retirement", "scale-up", "scale-down", "oom", "lost", "aborted", "policy", "other"]

#: Colour and legend of each marker kind ("other" is listed, not drawn)
MARKERS: dict[str, tuple[str, str]] = {
    "retirement": ("#009E73", "worker retired"),
    "scale-up": ("#56B4E9", "scale-up"),
    "scale-down": ("#0072B2", "scale-down"),
    "oom": ("#D55E00", "OOM kill"),
    "lost": ("#CC0000", "worker lost with data"),
    "aborted": ("#E69F00", "retirement aborted"),
    "policy": ("#777777", "policy change"),
    "other": ("#444444", "other"),
}
#: The memory split's colours, as Dask's dashboard draws them
MEMORY_COLOURS = {"managed": "#0072B2", "unmanaged": "#9fc5e8", "spilled": "#888888"}
FULLEST_COLOUR = "#CC79A7"
GiB = 2**30
NOT_REPORTED = "not reported"


@dataclass(frozen=True)
class Sample:
    """The cluster at one moment (sums over its workers)."""

    at: float
    workers: float
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
    #: The worker it is about ("" for none)
    worker: str = ""


@dataclass
class ReportData:
    namespace: str
    cluster: str
    policy: str = ""
    samples: list[Sample] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    #: The scheduler's ``amm_core_savings`` (counted since ``started``)
    scheduler_savings: Mapping[str, Any] = field(default_factory=dict)
    #: The cluster's ``savings`` of its policy's status entry (None: not reported)
    status_savings: Mapping[str, Any] | None = None
    #: Whether a MemoryPolicy governs the cluster
    governed: bool = True
    #: Seconds since the epoch at which the scheduler's counters started
    started: float | None = None
    #: What the reader left out or cut, said on the page
    notes: list[str] = field(default_factory=list)
    #: Seconds since the epoch at which the data was read
    generated: float = field(default_factory=time.time)

    @property
    def title(self) -> str:
        return f"DaskCluster {self.namespace}/{self.cluster}"


# --- the figure ---------------------------------------------------------------------


def figure(data: ReportData, titled: bool = True) -> Any:
    """The report's matplotlib figure: memory above, workers below, marks on both,
    wall-clock time (UTC) along; ``titled`` for a figure on its own (the PNG), not
    under the page's heading."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 6.5), layout="constrained")
    if titled:
        fig.suptitle(data.title + (f", MemoryPolicy {data.policy}" if data.policy else ""), x=0.01, ha="left")
    memory, workers = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])
    handles, labels = _memory(memory, data.samples, data.cluster)
    _workers(workers, data.samples, data.cluster)
    h, lbl = _marks((memory, workers), data.markers, data.cluster)
    memory.legend(handles + h, labels + lbl, loc="lower left", bbox_to_anchor=(0, 1.02), ncols=5,
                  fontsize="small", frameon=False)
    if not data.samples:
        memory.text(0.5, 0.5, "no memory samples yet", transform=memory.transAxes, ha="center")
    return fig


def _memory(ax: Any, samples: Sequence[Sample], gid: str) -> tuple[list[Any], list[str]]:
    """The stacked memory split and the fullest worker; each series with its SVG id
    (``<gid>-managed``, ``<gid>-fullest``...)."""
    from matplotlib.lines import Line2D

    times = [_utc(s.at) for s in samples]
    split = {k: [getattr(s, k) / GiB for s in samples] for k in MEMORY_COLOURS}
    areas = ax.stackplot(times, *split.values(), labels=list(split), colors=list(MEMORY_COLOURS.values()),
                         alpha=0.85)
    for area, name in zip(areas, split):
        area.set_gid(f"{gid}-{name}")
    ax.set_ylabel("cluster memory (GiB)")
    peak = max((sum(v) for v in zip(*split.values())), default=0)
    ax.set_ylim(0, peak * 1.15 or None)  # room at the top for the markers' numbers
    handles, labels = ax.get_legend_handles_labels()
    if any(s.fullest for s in samples):
        fullest = ax.twinx()
        fullest.plot(times, [100 * s.fullest for s in samples], color=FULLEST_COLOUR, lw=1.2, gid=f"{gid}-fullest")
        fullest.set_ylabel("fullest worker (% of its limit)", color=FULLEST_COLOUR)
        fullest.set_ylim(0, 110)
        handles.append(Line2D([], [], color=FULLEST_COLOUR, lw=1.2))
        labels.append("fullest worker")
    return handles, labels


def _workers(ax: Any, samples: Sequence[Sample], gid: str) -> None:
    from matplotlib.dates import DateFormatter

    ax.step([_utc(s.at) for s in samples], [s.workers for s in samples], where="post", color="black", lw=1.5,
            gid=f"{gid}-workers")
    ax.set_ylabel("workers")
    ax.set_xlabel("time (UTC)")
    ax.set_ylim(bottom=0)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.xaxis.set_major_formatter(DateFormatter("%H:%M:%S" if _span(samples) < 600 else "%H:%M"))


def _marks(axes: Sequence[Any], markers: Sequence[Marker], gid: str) -> tuple[list[Any], list[str]]:
    """A dashed line across both axes at each drawn marker (the upper one's SVG id
    ``<gid>-marker-<i>-<kind>``), its number (as in the Events table) atop it, and
    their legend."""
    from matplotlib.lines import Line2D

    drawn = [m for n, m in numbered(markers) if n]
    for i, marker in enumerate(drawn):
        for ax in axes:
            ax.axvline(_utc(marker.at), color=MARKERS[marker.kind][0], lw=1, ls="--", alpha=0.8,
                       gid=f"{gid}-marker-{i}-{marker.kind}" if ax is axes[0] else None)
    _numbers(axes[0], drawn)
    kinds = [k for k in MARKERS if any(m.kind == k for m in drawn)]
    return ([Line2D([], [], color=MARKERS[k][0], ls="--") for k in kinds], [MARKERS[k][1] for k in kinds])


def numbered(markers: Sequence[Marker]) -> list[tuple[int | None, Marker]]:
    """The markers in time order, each drawn one with its number (from 1), an "other"
    one with None: the figure's labels and the Events table's first column."""
    out, n = [], 0
    for m in sorted(markers, key=lambda m: m.at):
        n += m.kind != "other"
        out.append((n if m.kind != "other" else None, m))
    return out


#: Markers closer than this share of the time shown share one label ("3–5"): about
#: the width of such a label, so that none prints over another
LABEL_GROUP = 0.04


def _numbers(ax: Any, drawn: Sequence[Marker]) -> None:
    """Each marker's number at the top of ``ax``, markers close together under one
    label, so that labels do not print over each other."""
    if not drawn:
        return
    lo, hi = ax.get_xlim()  # in days (matplotlib's dates)
    near = LABEL_GROUP * (hi - lo) * 86400
    groups: list[list[int]] = []
    for i, m in enumerate(drawn):
        if groups and m.at - drawn[groups[-1][0]].at < near:
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        first = drawn[group[0]]
        text = str(group[0] + 1) if len(group) == 1 else f"{group[0] + 1}–{group[-1] + 1}"
        ax.text(_utc(first.at), 0.99, text, transform=ax.get_xaxis_transform(), ha="center", va="top",
                fontsize=8, color=MARKERS[first.kind][0],
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})


def _span(samples: Sequence[Sample]) -> float:
    return samples[-1].at - samples[0].at if samples else 0.0


def _utc(at: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(at, UTC)


# --- the savings table --------------------------------------------------------------

#: (row, the scheduler's field, the status's field, meaning)
SAVINGS = (
    ("Rescued", "rescued", "rescued",
     "moved off workers before their pods went: what a plain deletion would have lost"),
    ("Lost", "lost", "lost",
     "held only by a worker that left, by why: killed (deleted or crashed without retirement), "
     "oomKilled, retirementAborted, retired"),
    ("Duplicates dropped", "duplicates_dropped", "duplicatesDropped",
     "extra copies of keys the AMM's policies dropped"),
    ("OOM kills", None, "oomKills",
     "worker containers the kernel killed at their memory limit (the scheduler cannot tell)"),
    ("Worker-hours", None, "workerSeconds",
     "run under adaptive, and what the group's maximum would have run over the same time"),
)


def savings_rows(data: ReportData) -> list[tuple[str, str, str, str]]:
    """(what, the scheduler's amount, the status's amount, meaning) rows of the
    savings table; a zero shown as a zero, a missing number as "not reported"."""
    status = data.status_savings
    rows = []
    for what, ours, theirs, meaning in SAVINGS:
        scheduler = counts_by_part(data.scheduler_savings.get(ours)) if ours else "—"
        reported = NOT_REPORTED if status is None else _STATUS_AMOUNT[theirs](status.get(theirs))
        rows.append((what, scheduler, reported, meaning))
    return rows


def counts_by_part(value: Any) -> str:
    """Counts ({keys or replicas, bytes}) in words; of counts by part (the scheduler's
    by who or why, the status's ``byReason``), their total and each part that is not
    zero, with its workers."""
    if not isinstance(value, Mapping):
        return NOT_REPORTED
    parts = {k: v for k, v in value.items() if isinstance(v, Mapping)}
    if not parts:
        return amount(value)
    total = {f: sum(_num(p.get(f)) for p in parts.values()) for f in ("keys", "bytes")}
    detail = "; ".join(f"{k}: {_num(p.get('keys')):,.0f} keys, {_num(p.get('workers')):,.0f} workers"
                       for k, p in parts.items() if _num(p.get("keys")))
    return amount(total) + (f" ({detail})" if detail else "")


def _status_rescued(value: Any) -> str:
    if not isinstance(value, Mapping):
        return NOT_REPORTED
    return counts_by_part({k: value.get(k) for k in ("operator", "hook") if isinstance(value.get(k), Mapping)}
                          or value)


def _status_lost(value: Any) -> str:
    if not isinstance(value, Mapping):
        return NOT_REPORTED
    by_reason = value.get("byReason")
    return counts_by_part(by_reason if isinstance(by_reason, Mapping) else value)


def _status_oom_kills(value: Any) -> str:
    if isinstance(value, Mapping):
        value = value.get("count")
    return amount(value)


def _status_worker_seconds(value: Any) -> str:
    """Hours under adaptive and at the group's maximum, and the share saved."""
    if not isinstance(value, Mapping):
        return NOT_REPORTED
    ran, at_maximum = _num(value.get("adaptive")), _num(value.get("atMaximum"))
    text = f"{ran / 3600:,.2f} h under adaptive, {at_maximum / 3600:,.2f} h at its maximum"
    # (a maximum lowered under a larger group makes it less than what ran: no saving)
    return text + (f" ({1 - ran / at_maximum:.0%} saved)" if ran < at_maximum else "")


#: How each of the status's savings fields reads (see controllers/savings.py)
_STATUS_AMOUNT = {
    "rescued": _status_rescued,
    "lost": _status_lost,
    "duplicatesDropped": lambda v: amount(v) if isinstance(v, Mapping) else NOT_REPORTED,
    "oomKills": _status_oom_kills,
    "workerSeconds": _status_worker_seconds,
}


def amount(value: Any) -> str:
    """A count, or counts ({keys or replicas, bytes}), in words."""
    if value is None:
        return NOT_REPORTED
    if isinstance(value, bool) or not isinstance(value, (int, float, Mapping)):
        return "?"
    if not isinstance(value, Mapping):
        return f"{value:,.0f}"
    text = [f"{_num(value[k]):,.0f} {'copies' if k == 'replicas' else k}" for k in ("keys", "replicas") if k in value]
    text += [format_bytes(_num(value["bytes"]))] if "bytes" in value else []
    return ", ".join(text) or "0"


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n):,} bytes"


# --- the page -----------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 78em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { text-align: left; padding: .3em .8em; border-bottom: 1px solid #ddd; vertical-align: top; }
th { white-space: nowrap; }
td.num { white-space: nowrap; }
.muted { color: #666; }
.note { color: #8a5a00; }
figure { margin: 0; }
svg { width: 100%; height: auto; }
section { margin-bottom: 3em; }
"""


def render_html(reports: Sequence[ReportData], title: str = "") -> str:
    """The self-contained page: a section for each cluster."""
    title = title or "Memory report: " + ", ".join(r.title for r in reports)
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(min((r.generated for r in reports),
                                                                         default=time.time())))
    sections = "".join(_section(r, len(reports) > 1) for r in reports)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="muted">Generated {generated} by dask-memory-operator report.</p>
{sections}
</body></html>
"""


def _section(data: ReportData, several: bool) -> str:
    h = "h3" if several else "h2"
    intro = html.escape(
        (f"MemoryPolicy {data.policy}" if data.policy else "Governed by no MemoryPolicy")
        + f"; {len(data.samples)} memory samples from the scheduler, "
        + f"{sum(m.kind != 'other' for m in data.markers)} events marked")
    started = (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(data.started)) if data.started else "?")
    rows = "".join(f"<tr><th>{html.escape(a)}</th><td>{html.escape(b)}</td><td>{html.escape(c)}</td>"
                   f"<td class='muted'>{html.escape(d)}</td></tr>" for a, b, c, d in savings_rows(data))
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in data.notes)
    return f"""<section id="{html.escape(data.namespace)}-{html.escape(data.cluster)}">
{f"<h2>{html.escape(data.title)}</h2>" if several else ""}
<p class="muted">{intro}.</p>{notes}
<{h}>Savings</{h}>
<table class="savings"><tr><th>what</th><th>the scheduler, since {started}</th>
<th>the MemoryPolicy's status</th><th>meaning</th></tr>{rows}</table>
<{h}>Memory and workers</{h}>
<figure class="memory">{_svg(data)}</figure>
<{h}>Events</{h}>
{_events_table(data.markers)}
</section>
"""


def _svg(data: ReportData) -> str:
    import matplotlib

    out = io.StringIO()
    # text as text (the browser's font; found by the page's search), not as glyph paths
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure(data, titled=False).savefig(out, format="svg", metadata=dict.fromkeys(("Creator", "Date", "Format", "Type")))
    body = out.getvalue()
    return body[body.index("<svg"):]  # the XML prolog and doctype do not belong inline


def _events_table(markers: Sequence[Marker]) -> str:
    rows = "".join(
        f"<tr><td class='num'>{n or ''}</td>"
        f"<td class='num'>{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(m.at))}</td>"
        f"<td class='num' style='color:{MARKERS[m.kind][0]}'>{html.escape(MARKERS[m.kind][1])}</td>"
        f"<td>{html.escape(m.text)}</td></tr>"
        for n, m in numbered(markers))
    return (f"<table class='events'><tr><th>#</th><th>when (UTC)</th><th>what</th><th>detail</th></tr>"
            f"{rows or '<tr><td colspan=4>none</td></tr>'}</table>")


def render_png(data: ReportData) -> bytes:
    out = io.BytesIO()
    figure(data).savefig(out, format="png", dpi=110)
    return out.getvalue()


def write(reports: Sequence[ReportData], path: Path, png: bool = False, title: str = "",
          per_cluster: bool = False) -> list[Path]:
    """The page at ``path`` and, with ``png``, a PNG of each cluster's figure beside
    it (``<stem>.png``, or ``<stem>-<cluster>.png`` ``per_cluster``, as a policy's
    report names them however many clusters it has); the paths written."""
    path.write_text(render_html(reports, title), encoding="utf-8")
    written = [path]
    for r in reports if png else ():
        image = path.with_name(f"{path.stem}-{r.cluster}.png" if per_cluster else f"{path.stem}.png")
        image.write_bytes(render_png(r))
        written.append(image)
    return written


def samples_of(rows: Sequence[Any]) -> list[Sample]:
    """Samples from the scheduler's plain rows ``[at, workers, managed, unmanaged,
    spilled, fullest, ...]`` (amm_core.history); a row of another shape is skipped
    (the scheduler is untrusted)."""
    out = []
    for row in rows:
        try:
            at, n, managed, unmanaged, spilled, fullest = row[:6]
            sample = Sample(float(at), float(n), int(managed), int(unmanaged), int(spilled), float(fullest))
        except (TypeError, ValueError, OverflowError):
            continue
        if plausible_time(sample.at) and all(map(_finite, (sample.workers, sample.fullest))):
            out.append(sample)
    out.sort(key=lambda s: s.at)
    return out


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def plausible_time(at: float) -> bool:
    """Seconds since the epoch that a date can be made of (an untrusted scheduler's
    1e300 cannot)."""
    return 0 <= at < 2**35
