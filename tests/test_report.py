"""The memory report (dask_memory_operator.observability: report, report_data) from
known data: the page carries the series, the markers and the savings, and nothing
external; the reader turns Events and the scheduler's answers into markers; a
hostile scheduler (a fake one speaking distributed's framing, as in
test_scheduler_rpc) gives a clear error or a report that says what was cut, never a
traceback. The report of a real sandbox run is checked in test_sandbox.
"""

from __future__ import annotations

import re
import struct

import pytest
from test_scheduler_rpc import FakeScheduler, message, wire

from amm_core.savings import Savings
from dask_memory_operator.observability import report_data
from dask_memory_operator.observability.report import (
    NOT_REPORTED,
    Marker,
    ReportData,
    Sample,
    render_html,
    render_png,
    samples_of,
    savings_rows,
)
from dask_memory_operator.observability.report_data import ReportError
from dask_memory_operator.schedulers.rpc import MAX_HISTORY_ROWS

MiB = 2**20
T0 = 1_800_000_000.0  # 2027-01-15 08:00 UTC


def known_data() -> ReportData:
    """40 samples every 2 s: 6 workers, then 3 from the 20th; two markers."""
    samples = [Sample(T0 + 2 * i, 6 if i < 20 else 3, (100 + i) * MiB, 50 * MiB, 0, 0.25) for i in range(40)]
    markers = [
        Marker(T0 + 38, "scale-down", "RetirementStarted: retiring 3 workers"),
        Marker(T0 + 40, "lost", "worker demo-default-worker-a left (killed) with 12 keys <b>only</b> it held",
               "demo-default-worker-a"),
        Marker(T0 + 41, "other", "WorkersWithoutRetirementHook: 3 worker pod(s)"),
    ]
    savings = {
        "started": T0,
        "rescued": {"operator": {"workers": 3, "keys": 24, "bytes": 192 * MiB},
                    "hook": {"workers": 0, "keys": 0, "bytes": 0}},
        "lost": {"killed": {"workers": 3, "keys": 38, "bytes": 304 * MiB},
                 "retirementAborted": {"workers": 0, "keys": 0, "bytes": 0},
                 "retired": {"workers": 0, "keys": 0, "bytes": 0}},
        "duplicates_dropped": {"replicas": 80, "bytes": 640 * MiB},
    }
    # the policy's status as the operator reports it (controllers/savings.py), some
    # fields left out
    status = {"rescued": {"keys": 24, "bytes": 192 * MiB,
                          "operator": {"workers": 3, "keys": 24, "bytes": 192 * MiB},
                          "hook": {"workers": 0, "keys": 0, "bytes": 0}},
              "oomKills": {"count": 0, "recent": []}}
    return ReportData("default", "demo", "analytics", samples, markers, savings, status, started=T0)


def test_the_page_has_the_series_the_markers_and_the_savings_and_nothing_external():
    data = known_data()
    page = render_html([data])

    # self-contained: no script, no resource fetched (the only URLs are SVG namespaces)
    assert "<script" not in page.lower() and "src=" not in page
    assert not re.search(r"""(href|url)\s*[=(]\s*["']?[^#"'\s]""", page)
    assert set(re.findall(r"https?://[^\s\"'<]+", page)) == {"http://www.w3.org/2000/svg",
                                                              "http://www.w3.org/1999/xlink"}

    # the series: the three memory areas, and the workers' step line through every sample
    for series in ("managed", "unmanaged", "spilled", "fullest"):
        assert f'id="demo-{series}"' in page, series
    workers = re.search(r'<g id="demo-workers">\s*<path d="([^"]+)"', page)
    assert workers, "the workers line"
    vertices = re.findall(r"[ML]\s*[-\d.]+\s+[-\d.]+", workers[1])
    assert len(vertices) == 2 * len(data.samples) - 1  # a step line: two vertices a sample but the first
    # drawn: the scale-down and the loss; "other" is listed, not drawn
    assert 'id="demo-marker-0-scale-down"' in page and 'id="demo-marker-1-lost"' in page
    assert "marker-2" not in page
    assert "RetirementStarted: retiring 3 workers" in page and "WorkersWithoutRetirementHook" in page
    assert "<b>only</b>" not in page and "&lt;b&gt;only&lt;/b&gt;" in page  # Event text escaped
    # numbered as on the figure: the drawn ones from 1, the others not
    events = page[page.index("class='events'"):]
    assert re.findall(r"<tr><td class='num'>(\d*)</td>", events) == ["1", "2", ""]
    assert re.search(r"<text[^>]*>1–2</text>", page)  # two seconds apart: one label

    # the savings table: the scheduler's counts, the status's where it has them
    table = page[page.index('class="savings"'):page.index("</table>", page.index('class="savings"'))]
    assert "24 keys, 192.00 MiB" in table
    assert "38 keys, 304.00 MiB (killed: 38 keys, 3 workers)" in table
    assert "80 copies, 640.00 MiB" in table
    assert NOT_REPORTED in table


def test_savings_rows_say_not_reported_per_field_and_per_source():
    data = known_data()
    rows = {what: (scheduler, status) for what, scheduler, status, _ in savings_rows(data)}
    assert rows["Rescued"] == ("24 keys, 192.00 MiB (operator: 24 keys, 3 workers)",) * 2
    assert rows["OOM kills"] == ("—", "0")  # a zero is a zero
    assert rows["Lost"][1] == rows["Worker-hours"][1] == NOT_REPORTED
    data.status_savings = None
    assert {status for _, _, status, _ in savings_rows(data)} == {NOT_REPORTED}
    data.status_savings = {
        "workerSeconds": {"adaptive": 7200, "atMaximum": 14400, "asOf": "2026-12-06T00:00:00Z", "maximum": 6},
        "lost": {"keys": 40, "bytes": 310 * MiB, "byReason": {
            "killed": {"workers": 3, "keys": 38, "bytes": 304 * MiB},
            "oomKilled": {"workers": 1, "keys": 2, "bytes": 6 * MiB},
            "retirementAborted": {"workers": 0, "keys": 0, "bytes": 0}}},
        "oomKills": {"count": 1, "recent": [{"pod": "demo-default-worker-a-1"}]}}
    reported = {w: s for w, _, s, _ in savings_rows(data)}
    assert reported["Worker-hours"] == "2.00 h under adaptive, 4.00 h at its maximum (50% saved)"
    assert reported["Lost"] == "40 keys, 310.00 MiB (killed: 38 keys, 3 workers; oomKilled: 2 keys, 1 workers)"
    assert reported["OOM kills"] == "1"


def test_png_and_a_page_of_several_clusters():
    data = known_data()
    assert render_png(data)[:8] == b"\x89PNG\r\n\x1a\n"
    other = ReportData("default", "other", "analytics")  # nothing sampled yet
    page = render_html([data, other], "Memory report: MemoryPolicy default/analytics")
    assert page.count("<section") == 2 and "no memory samples yet" in page
    assert "DaskCluster default/other" in page


def test_rows_of_another_shape_are_skipped():
    rows = [[T0, 2, 10, 5, 0, 0.5, 2.0], [T0 - 2, 2, 1, 1, 0, 0.1, 2.0], "abcdef", [1e300, 1, 1, 1, 1, 1, 1],
            [T0, float("nan"), 1, 1, 1, 1, 1], {"at": T0}, [T0, 1, 1], [T0, "x", 1, 1, 1, 1, 1]]
    assert [s.at for s in samples_of(rows)] == [T0 - 2, T0]


def test_events_become_markers_and_a_retirement_is_shown_once():
    def event(reason, message, at="2027-01-15T08:00:40Z", **extra):
        return {"reason": reason, "message": message, "lastTimestamp": at, **extra}

    retired = report_data.event_marker(event("WorkerRetired", "Worker w1 retired in 2.0s: 4 keys moved"))
    assert (retired.kind, retired.worker, retired.at) == ("retirement", "w1", T0 + 40)
    assert report_data.event_marker(event("WorkerOOMKilled", "Worker w2 ...")).kind == "oom"
    assert report_data.event_marker(event("ScaledUp", "demo-default: replicas 3 -> 6")).kind == "scale-up"
    assert report_data.event_marker(event("Something", "else")).kind == "other"
    assert report_data.event_marker(event("ScaledUp", "x", at="yesterday")) is None
    # a policy's Event: mirrored ones and those about other clusters are left to those
    assert report_data.event_marker(event("Applied", "DaskCluster demo: x"), about="demo") is None
    assert report_data.event_marker(event("RestoreFailed", "DaskCluster b: x"), about="demo") is None
    assert report_data.event_marker(event("RestoreFailed", "DaskCluster demo: x"), about="demo").kind == "policy"

    history = {"markers": [{"at": T0 + 39, "kind": "retirement-done", "worker": "w1"},
                           {"at": T0 + 50, "kind": "retirement-done", "worker": "w3"},
                           {"at": T0 + 51, "kind": "worker-added", "worker": "w4"},
                           {"at": "soon", "kind": "retirement-done", "worker": "w5"}]}
    savings = {"departures": [{"at": T0 + 45, "worker": "w2", "keys": 5, "bytes": 10 * MiB, "why": "killed"},
                              {"at": T0 + 46, "worker": "w3", "keys": 0, "bytes": 0, "why": "retired"}]}
    markers = report_data.merged(report_data.scheduler_markers(history, savings), [retired])
    assert [(m.kind, m.worker) for m in markers] == [("retirement", "w1"), ("lost", "w2"), ("retirement", "w3")]
    assert markers[0] is retired and "10.00 MiB" in markers[1].text


@pytest.mark.parametrize("text, policy", [("default", None), ("a/b/c", None), ("Default/demo", None),
                                          ("default/demo", "../x"), ("", None)])
def test_a_bad_target_is_a_clear_error(text, policy):
    with pytest.raises(ReportError, match="expected NAMESPACE/CLUSTER"):
        report_data.target(text, policy)


# --- a hostile scheduler ----------------------------------------------------------------


def history_of(rows: int) -> dict:
    """Rows of one-byte numbers: many rows in few bytes."""
    return {"interval": 2.0, "columns": [], "rows": [[i % 100, 1, 1, 1, 0, 0, 2] for i in range(rows)],
            "markers": []}


def answers(history: bytes):
    """``history`` to the history's op, a fresh plugin's savings to the savings' op."""
    savings = message({**Savings().report(0, 0), "started": T0})
    return lambda msg: history if msg["op"] == "amm_core_memory_history" else savings


async def test_a_history_of_too_many_rows_is_read_in_part_and_says_so():
    async with FakeScheduler(answer=answers(message(history_of(50_000)))) as address:
        history, savings = await report_data._scheduler(address, "default", "demo", timeout=10)
    assert len(history["rows"]) == MAX_HISTORY_ROWS
    assert report_data._truncations(history, savings) == [
        f"the scheduler's answer was cut: lists longer than {MAX_HISTORY_ROWS} items, cut to their first "
        f"{MAX_HISTORY_ROWS}: 'rows' (50000 items)"]


@pytest.mark.parametrize("reply, said", [
    # a frame of 64 MiB announced: refused from its length, before it is read
    (struct.pack("Q", 16) + struct.pack("QQ", 1, 64 * MiB), "a message of 67108864 bytes"),
    # 200,000 rows: more values past the bound than are ever stepped over
    (message(history_of(200_000)), "values past the lists' bound"),
    # a pickle where the rows should be
    (wire([b"\x81\xa4rows\x81\xab__Pickled__\x00"]), "__Pickled__"),
])
async def test_a_hostile_history_is_a_clear_error(reply, said):
    async with FakeScheduler(answer=answers(reply)) as address:
        with pytest.raises(ReportError) as e:
            await report_data._scheduler(address, "default", "demo", timeout=10)
    assert str(e.value).startswith("cannot read the scheduler of DaskCluster default/demo: ")
    assert said in str(e.value) and "refused" in str(e.value)


def test_the_schedulers_savings_are_kept_to_the_counts_shown():
    hostile = {"rescued": {"x" * 100_000: {"keys": 3, "bytes": 1.5, "workers": True, "extra": "y" * 10_000}},
               "lost": {str(i): {"keys": 1} for i in range(100)}, "duplicates_dropped": [1, 2],
               "departures": "z" * 100_000}
    kept = report_data.scheduler_savings(hostile)
    [(name, counts)] = kept["rescued"].items()
    assert len(name) <= 32 and counts == {"workers": 0.0, "keys": 3.0, "bytes": 1.5}
    assert len(kept["lost"]) == report_data.MAX_PARTS and kept["duplicates_dropped"] is None
    rows = {what: scheduler for what, scheduler, _, _ in savings_rows(ReportData("n", "c", scheduler_savings=kept))}
    assert rows["Duplicates dropped"] == NOT_REPORTED and rows["Lost"].startswith("8 keys")
