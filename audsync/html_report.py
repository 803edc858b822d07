"""``audsync report --html FILE``: the sync history as one self-contained page.

Per audience or trait: members over time (an SVG line chart; a plan the
circuit breaker held is a red ring), entered/exited/changed per run (SVG bars),
runs that failed or were held with their reasons, the latest per-user delivery
failures, and what the outbox holds now. Inline CSS and SVG only — no script,
no fonts, no network — so it opens from a file, an email or a CI artifact.

Reading the state DB is :func:`collect_report`; drawing is pure functions of
its result, so the charts are tested without a database.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from audsync import __version__, models
from audsync.clock import unix_seconds, utcnow
from audsync.config import Config
from audsync.defaults import DEFAULT_REPORT_FAILURES, DEFAULT_REPORT_RUNS
from audsync.history import failures, runs
from audsync.status import AudienceStatus, collect_status
from audsync.text_tables import cell, duration

PLANNED_MODES = ("initial", "incremental", "full")
PROBLEMS = ("failed", "held", "partial", "interrupted")
CHART_WIDTH = 720
CHART_HEIGHT = 200
MARGIN_LEFT = 64
MARGIN_BOTTOM = 28
MARGIN_TOP = 12

MEMBERS_COLOUR = "#2563eb"
ENTERED_COLOUR = "#16a34a"
CHANGED_COLOUR = "#d97706"
EXITED_COLOUR = "#dc2626"
HELD_COLOUR = "#dc2626"


@dataclass
class AudienceReport:
    """Everything the page shows about one audience or trait."""

    status: AudienceStatus
    runs: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    problems: list[dict[str, Any]] = field(default_factory=list)  # newest first
    failures: list[dict[str, Any]] = field(default_factory=list)  # newest first
    oldest_pending: dt.datetime | None = None


@dataclass
class Report:
    """What :func:`render_html` draws."""

    generated_at: dt.datetime
    audiences: list[AudienceReport]
    pending_users: int
    eta_seconds: float
    rate_text: str


def collect_report(
    engine: Engine,
    config: Config,
    *,
    audience: str | None = None,
    runs_per_audience: int = DEFAULT_REPORT_RUNS,
    failures_per_audience: int = DEFAULT_REPORT_FAILURES,
    now: dt.datetime | None = None,
) -> Report:
    """Read what the page shows from the state DB (read-only)."""
    status = collect_status(engine, config)
    o = models.outbox.c
    with engine.connect() as conn:
        oldest = dict(
            conn.execute(
                select(o.audience_key, func.min(o.queued_at))
                .where(o.state == "pending")
                .group_by(o.audience_key)
            ).all()
        )
    audiences = []
    for row in status.audiences:
        key = row.key
        if audience is not None and key != audience:
            continue
        history = runs(engine, audience=key, limit=runs_per_audience)
        audiences.append(
            AudienceReport(
                status=row,
                runs=list(reversed(history)),
                problems=[r for r in history if r["status"] in PROBLEMS or r["error"]],
                failures=failures(engine, audience=key, limit=failures_per_audience),
                oldest_pending=oldest.get(key),
            )
        )
    g = config.gleap
    return Report(
        generated_at=now or utcnow(),
        audiences=audiences,
        pending_users=status.pending_users,
        eta_seconds=status.eta_seconds,
        rate_text=f"{g.rate_limit:,} calls per {duration(g.rate_window)}",
    )


def write_report(path: str | Path, report: Report) -> Path:
    """Write the page atomically (a reader never sees half of it)."""
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    try:
        partial.write_text(render_html(report), encoding="utf-8")
        partial.replace(target)
    except OSError:
        partial.unlink(missing_ok=True)  # no stray half-page beside the target
        raise
    return target


# -- drawing (pure) ---------------------------------------------------------------


def scale(value: float, lo: float, hi: float, out_lo: float, out_hi: float) -> float:
    """``value`` from [lo, hi] onto [out_lo, out_hi]; a flat range maps to the middle."""
    if hi == lo:
        return (out_lo + out_hi) / 2
    return out_lo + (value - lo) * (out_hi - out_lo) / (hi - lo)


def nice_ceiling(value: float) -> float:
    """The axis top: 1, 2, 2.5 or 5 times a power of ten, at or above ``value``."""
    if value <= 0:
        return 1.0
    power = 10.0 ** (len(str(int(value))) - 1)
    for step in (1.0, 2.0, 2.5, 5.0):
        if step * power >= value:
            return step * power
    return 10.0 * power


def planned_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs whose plan finished, so their counts are real: committed, or held.

    A run that failed or was interrupted while planning has no counts; one that
    failed or was interrupted while delivering queued something.
    """
    return [
        r
        for r in runs
        if r["mode"] in PLANNED_MODES
        and (
            r["status"] in ("delivering", "succeeded", "partial", "held")
            or (r["status"] in ("failed", "interrupted") and r["queued"] > 0)
        )
    ]


def member_points(
    planned: Sequence[dict[str, Any]], top: float, width: float, height: float
) -> list[tuple[float, float, dict[str, Any]]]:
    """(x, y, run) for each plan, x by time, y by members from zero to ``top``."""
    times = [unix_seconds(r["started_at"]) or 0.0 for r in planned]
    return [
        (
            scale(t, times[0], times[-1], MARGIN_LEFT, width - 8),
            scale(r["members"], 0, top, height - MARGIN_BOTTOM, MARGIN_TOP),
            r,
        )
        for t, r in zip(times, planned, strict=True)
    ]


def _svg_open(width: float, height: float, label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:g}" height="{height:g}"'
        f' viewBox="0 0 {width:g} {height:g}" role="img" aria-label="{html.escape(label)}">'
    )


def _axes(width: float, height: float, top: float, first: str, last: str) -> list[str]:
    base = height - MARGIN_BOTTOM
    parts = [
        f'<line x1="{MARGIN_LEFT}" y1="{base:g}" x2="{width - 8:g}" y2="{base:g}" class="axis"/>',
        f'<line x1="{MARGIN_LEFT}" y1="{MARGIN_TOP}" x2="{MARGIN_LEFT}" y2="{base:g}"'
        ' class="axis"/>',
        f'<text x="{MARGIN_LEFT - 6}" y="{MARGIN_TOP + 4}" text-anchor="end">{cell(int(top))}'
        "</text>",
        f'<text x="{MARGIN_LEFT - 6}" y="{base:g}" text-anchor="end">0</text>',
        f'<text x="{MARGIN_LEFT}" y="{height - 8:g}">{html.escape(first)}</text>',
        f'<text x="{width - 8:g}" y="{height - 8:g}" text-anchor="end">{html.escape(last)}</text>',
    ]
    return parts


def members_chart(
    runs: Sequence[dict[str, Any]], width: float = CHART_WIDTH, height: float = CHART_HEIGHT
) -> str:
    """Members over time as an SVG line chart; held plans are red rings."""
    planned = planned_runs(runs)
    if not planned:
        return '<p class="empty">No plan has finished yet.</p>'
    top = nice_ceiling(max(r["members"] for r in planned))
    points = member_points(planned, top, width, height)
    parts = [_svg_open(width, height, "members over time")]
    parts += _axes(width, height, top, _when(points[0][2]), _when(points[-1][2]))
    kept = [(x, y) for x, y, r in points if r["status"] != "held"]
    if len(kept) > 1:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in kept)
        parts.append(
            f'<polyline points="{path}" fill="none" stroke="{MEMBERS_COLOUR}" stroke-width="2.5"/>'
        )
    for x, y, r in points:
        held = r["status"] == "held"
        colour = HELD_COLOUR if held else MEMBERS_COLOUR
        fill = "#fff" if held else colour
        tip = f"run {r['id']} {_when(r)}: {r['members']:,} members" + (" (held)" if held else "")
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{4 if held else 3}" fill="{fill}"'
            f' stroke="{colour}" stroke-width="2"><title>{html.escape(tip)}</title></circle>'
        )
    parts.append("</svg>")
    return "".join(parts)


def changes_chart(
    runs: Sequence[dict[str, Any]], width: float = CHART_WIDTH, height: float = CHART_HEIGHT
) -> str:
    """Entered (up, green), changed (up, amber) and exited (down, red) per run, as SVG bars.

    A held plan changed nothing (the run that goes ahead counts those changes), so
    it has no bar: each transition is drawn once."""
    planned = [r for r in planned_runs(runs) if r["status"] != "held"]
    if not planned:
        return '<p class="empty">No plan has finished yet.</p>'
    top = changes_scale(planned)
    base = height - MARGIN_BOTTOM
    middle = (MARGIN_TOP + base) / 2
    half = middle - MARGIN_TOP
    slot = (width - 8 - MARGIN_LEFT) / len(planned)
    bar = max(min(slot * 0.7, 24), 1.0)
    parts = [_svg_open(width, height, "entered and exited per run")]
    parts += [
        f'<line x1="{MARGIN_LEFT}" y1="{middle:g}" x2="{width - 8:g}" y2="{middle:g}"'
        ' class="axis"/>',
        f'<text x="{MARGIN_LEFT - 6}" y="{MARGIN_TOP + 4}" text-anchor="end">'
        f"+{cell(int(top))}</text>",
        f'<text x="{MARGIN_LEFT - 6}" y="{base:g}" text-anchor="end">-{cell(int(top))}</text>',
        f'<text x="{MARGIN_LEFT}" y="{height - 8:g}">{html.escape(_when(planned[0]))}</text>',
        f'<text x="{width - 8:g}" y="{height - 8:g}" text-anchor="end">'
        f"{html.escape(_when(planned[-1]))}</text>",
    ]
    for i, r in enumerate(planned):
        x = MARGIN_LEFT + i * slot + (slot - bar) / 2
        tip = html.escape(
            f"run {r['id']} {_when(r)} ({r['mode']}, {r['status']}): +{r['entered']:,} entered,"
            f" {r['changed']:,} changed, -{r['exited']:,} exited"
        )
        # Bars beyond the scale (a first sync among routine ones) are cut at
        # the edge and carry their number.
        entered = half * min(r["entered"] / top, 1.0)
        changed = half * min(r["changed"] / top, 1.0 - entered / half)
        exited = half * min(r["exited"] / top, 1.0)
        parts.append(f"<g><title>{tip}</title>")
        if r["entered"] + r["changed"] > top:
            parts.append(
                f'<text x="{x + bar + 2:.1f}" y="{MARGIN_TOP + 9}">'
                f"{cell(r['entered'] + r['changed'])}</text>"
            )
        if r["exited"] > top:
            parts.append(f'<text x="{x + bar + 2:.1f}" y="{base - 2:g}">{cell(r["exited"])}</text>')
        if entered:
            parts.append(
                f'<rect x="{x:.1f}" y="{middle - entered:.1f}" width="{bar:.1f}"'
                f' height="{entered:.1f}" fill="{ENTERED_COLOUR}"/>'
            )
        if changed:
            parts.append(
                f'<rect x="{x:.1f}" y="{middle - entered - changed:.1f}" width="{bar:.1f}"'
                f' height="{changed:.1f}" fill="{CHANGED_COLOUR}"/>'
            )
        if exited:
            parts.append(
                f'<rect x="{x:.1f}" y="{middle:.1f}" width="{bar:.1f}" height="{exited:.1f}"'
                f' fill="{EXITED_COLOUR}"/>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def changes_scale(planned: Sequence[dict[str, Any]]) -> float:
    """The changes chart's top: what routine runs reach, so one first sync of a
    million members does not flatten every later run to nothing."""
    routine = [r for r in planned if r["mode"] != "initial"]
    measured = routine if any(_biggest(r) for r in routine) else planned
    return nice_ceiling(max([*(_biggest(r) for r in measured), 1]))


def _biggest(run: dict[str, Any]) -> int:
    return max(int(run["entered"]) + int(run["changed"]), int(run["exited"]))


def _when(run: dict[str, Any]) -> str:
    started = run.get("started_at")
    return started.strftime("%Y-%m-%d %H:%M") if isinstance(started, dt.datetime) else "-"


def _td(value: Any) -> str:
    if isinstance(value, int | float):
        return '<td class="num">'
    return '<td class="time">' if isinstance(value, dt.datetime) else "<td>"


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(_td(row.get(c)) + f"{html.escape(cell(row.get(c)))}</td>" for c in columns)
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#111827;margin:24px;
max-width:1100px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 4px;border-top:1px solid #e5e7eb;
padding-top:16px}h3{font-size:14px;margin:16px 0 6px;color:#374151}
.meta{color:#6b7280}.empty{color:#6b7280;font-style:italic}
table{border-collapse:collapse;margin:4px 0 8px}th,td{padding:3px 10px;border-bottom:1px solid
#e5e7eb;text-align:left;vertical-align:top}th{font-weight:600;background:#f9fafb;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.time{white-space:nowrap}
svg text{font-size:11px;fill:#6b7280}svg .axis{stroke:#9ca3af;stroke-width:1}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
.bad{color:#b91c1c;font-weight:600}
"""


def render_html(report: Report) -> str:
    """The whole page."""
    summary_rows = [
        {
            "audience": a.status.key,
            "kind": a.status.kind,
            "members": a.status.members,
            "last plan": a.status.last_planned_at,
            "last success": a.status.last_success_at,
            "last status": a.status.last_status,
            "pending": a.status.pending,
            "parked": a.status.parked_failures,
        }
        for a in report.audiences
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        "<title>audsync report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>audsync report</h1>",
        f'<p class="meta">Generated {report.generated_at:%Y-%m-%d %H:%M} UTC by audsync'
        f" {html.escape(__version__)}. Outbox: {report.pending_users:,} users to call, about"
        f" {html.escape(duration(report.eta_seconds))} at {html.escape(report.rate_text)}.</p>",
        _table(
            summary_rows,
            [
                "audience",
                "kind",
                "members",
                "last plan",
                "last success",
                "last status",
                "pending",
                "parked",
            ],
            "No audience has been planned yet.",
        ),
    ]
    for audience in report.audiences:
        parts.append(_audience_section(audience))
    parts.append("</body></html>")
    return "\n".join(parts)


def _audience_section(a: AudienceReport) -> str:
    s = a.status
    key = html.escape(s.key)
    status = html.escape(str(s.last_status or "-"))
    css = ' class="bad"' if s.last_status in ("failed", "held", "partial") else ""
    problems = [
        {
            "run": r["id"],
            "started": r["started_at"],
            "mode": r["mode"],
            "status": r["status"],
            "reason": r["error"]
            or (f"{r['failed']:,} changes rejected by Gleap" if r["failed"] else "-"),
        }
        for r in a.problems
    ]
    outbox = [
        {
            "pending": s.pending,
            "parked (failed)": s.parked_failures,
            "oldest pending since": a.oldest_pending,
            "about": duration(s.eta_seconds),
        }
    ]
    legend = (
        f'<p class="legend">per run:<span style="background:{ENTERED_COLOUR}"></span>entered'
        f'<span style="background:{CHANGED_COLOUR}"></span>changed'
        f'<span style="background:{EXITED_COLOUR}"></span>exited</p>'
    )
    return "\n".join(
        [
            f'<h2 id="{key}">{key} <span class="meta">({html.escape(str(s.kind))})</span></h2>',
            f"<p>Last status: <span{css}>{status}</span>; {cell(s.members)} members at the"
            f" last plan; runs shown: {len(a.runs)}.</p>",
            "<h3>Members over time</h3>",
            members_chart(a.runs),
            "<h3>Entered and exited per run</h3>",
            legend,
            changes_chart(a.runs),
            "<h3>Runs that failed, were held, were interrupted or had rejections</h3>",
            _table(problems, ["run", "started", "mode", "status", "reason"], "None."),
            "<h3>Latest delivery failures</h3>",
            _table(
                a.failures,
                ["run_id", "user_id", "http_status", "reason", "failed_at"],
                "None.",
            ),
            "<h3>Outbox now</h3>",
            _table(outbox, ["pending", "parked (failed)", "oldest pending since", "about"], ""),
        ]
    )
