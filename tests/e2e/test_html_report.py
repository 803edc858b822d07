"""`audsync report --html`: the drawing functions, the page from a real history, and the
page as a headless Chromium renders it."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from audsync.html_report import (
    CHANGED_COLOUR,
    CHART_HEIGHT,
    ENTERED_COLOUR,
    EXITED_COLOUR,
    MEMBERS_COLOUR,
    AudienceReport,
    Report,
    changes_chart,
    changes_scale,
    members_chart,
    nice_ceiling,
    planned_runs,
    render_html,
    scale,
)
from audsync.sandbox import Sandbox
from audsync.status import AudienceStatus
from tests.helpers import TOKEN, Warehouse, query, run_cli

T0 = dt.datetime(2026, 11, 1, 6, 0)


def run(
    id: int,
    hours: float,
    members: int,
    *,
    status: str = "succeeded",
    mode: str = "incremental",
    entered: int = 0,
    exited: int = 0,
    changed: int = 0,
    queued: int | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    return {
        "id": id,
        "audience_key": "vip",
        "started_at": T0 + dt.timedelta(hours=hours),
        "mode": mode,
        "status": status,
        "members": members,
        "entered": entered,
        "exited": exited,
        "changed": changed,
        "queued": entered + exited + changed if queued is None else queued,
        "error": error,
    }


@pytest.mark.parametrize(
    ("value", "lo", "hi", "out_lo", "out_hi", "expected"),
    [
        (5, 0, 10, 0, 100, 50),
        (0, 0, 10, 200, 0, 200),  # y grows downwards in SVG
        (10, 0, 10, 200, 0, 0),
        (7, 7, 7, 0, 100, 50),  # a single point sits in the middle
    ],
)
def test_scale(
    value: float, lo: float, hi: float, out_lo: float, out_hi: float, expected: float
) -> None:
    assert scale(value, lo, hi, out_lo, out_hi) == expected


@pytest.mark.parametrize(
    ("value", "top"),
    [(0, 1), (1, 1), (3, 5), (739, 1000), (1994, 2000), (2100, 2500), (120_000, 200_000)],
)
def test_nice_ceiling(value: float, top: float) -> None:
    assert nice_ceiling(value) == top


@pytest.mark.parametrize(
    ("status", "mode", "queued", "plotted"),
    [
        ("succeeded", "incremental", 3, True),
        ("held", "incremental", 0, True),  # what the query returned: drawn, in red
        ("delivering", "initial", 10, True),
        ("failed", "incremental", 0, False),  # the query failed: no counts
        ("interrupted", "incremental", 0, False),  # stopped while planning
        ("interrupted", "full", 10, True),  # stopped while delivering
        ("failed", "full", 10, True),  # token revoked while delivering
        ("planning", "incremental", 0, False),
        ("succeeded", "retry", 3, False),  # not a plan
        ("succeeded", "forget", 3, False),
    ],
)
def test_planned_runs(status: str, mode: str, queued: int, plotted: bool) -> None:
    row = run(1, 0, 10, status=status, mode=mode, queued=queued)
    assert (planned_runs([row]) == [row]) is plotted


def test_members_chart_draws_a_line_with_held_plans_as_red_rings() -> None:
    runs = [
        run(1, 0, 100, mode="initial", entered=100),
        run(2, 2, 120, entered=20),
        run(3, 4, 0, status="held", error="the query returned no rows"),
        run(4, 6, 110, exited=10),
        run(5, 8, 0, status="failed", error="no such table"),
    ]
    svg = members_chart(runs)
    line = re.search(r'<polyline points="([^"]+)"', svg)
    assert line is not None
    points = [tuple(map(float, p.split(","))) for p in line.group(1).split()]
    assert len(points) == 3  # the held plan is not part of the line; the failed one is absent
    xs = [x for x, _ in points]
    assert xs == sorted(xs) and xs[0] < xs[-1]
    # 100, 120, 110 members: SVG's y grows downwards, so 120 is highest on screen
    assert points[1][1] < points[2][1] < points[0][1]
    assert svg.count('fill="#fff"') == 1  # one red ring: the held plan
    assert "run 3 2026-11-01 10:00: 0 members (held)" in svg
    assert svg.count("<circle") == 4


@pytest.mark.parametrize(
    ("runs", "top"),
    [
        ([], 1),
        ([run(1, 0, 900, mode="initial", entered=900)], 1000),  # only a first sync
        # a first sync among routine runs: the routine runs set the scale
        ([run(1, 0, 900, mode="initial", entered=900), run(2, 2, 890, exited=12)], 20),
        ([run(1, 0, 9, mode="initial", entered=9), run(2, 2, 9)], 10),  # nothing routine moved
        ([run(1, 0, 5, changed=3, entered=1), run(2, 2, 5, exited=2)], 5),
    ],
)
def test_changes_scale(runs: list[dict[str, Any]], top: float) -> None:
    assert changes_scale(runs) == top


def test_changes_chart_cuts_a_first_sync_and_labels_it() -> None:
    svg = changes_chart(
        [run(1, 0, 900, mode="initial", entered=900), run(2, 2, 890, entered=2, exited=12)]
    )
    assert ">900</text>" in svg  # the cut bar carries its number
    heights = [float(h) for h in re.findall(r'height="([\d.]+)" fill="#16a34a"', svg)]
    assert max(heights) <= (CHART_HEIGHT - 28 - 12) / 2 + 0.1


def test_changes_chart_has_a_bar_per_kind_of_change() -> None:
    svg = changes_chart([run(1, 0, 50, entered=40, exited=0), run(2, 2, 45, exited=5, changed=3)])
    assert svg.count(f'fill="{ENTERED_COLOUR}"') == 1
    assert svg.count(f'fill="{EXITED_COLOUR}"') == 1
    assert svg.count(f'fill="{CHANGED_COLOUR}"') == 1
    assert "+40 entered, 0 changed, -0 exited" in svg


def test_every_value_on_the_page_is_escaped() -> None:
    hostile = "<script>alert('x')</script>"
    status = AudienceStatus(
        key="vip",
        kind="audience",
        configured=True,
        members=0,
        last_planned_at=None,
        last_success_at=None,
        last_status="failed",
        pending=0,
        parked_failures=1,
        eta_seconds=0.0,
    )
    failure = {
        "run_id": 1,
        "user_id": hostile,
        "http_status": 422,
        "reason": hostile,
        "failed_at": T0,
    }
    page = render_html(
        Report(
            generated_at=T0,
            audiences=[
                AudienceReport(
                    status=status,
                    runs=[run(1, 0, 0, status="failed", error=hostile)],
                    problems=[run(1, 0, 0, status="failed", error=hostile)],
                    failures=[failure],
                )
            ],
            pending_users=0,
            eta_seconds=0.0,
            rate_text="1,000 calls per 1m",
        )
    )
    assert "<script" not in page
    assert page.count("&lt;script&gt;") == 3


def build_history(
    tmp_path: Path, gleap: Sandbox, warehouse: Warehouse, capsys: pytest.CaptureFixture[str]
) -> tuple[Path, str]:
    """Four real syncs: a first sync, churn, a held plan, and a user Gleap rejects."""
    from tests.helpers import write_config

    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    path = write_config(tmp_path, base_url=gleap.url, source_url=warehouse.url, state_url=state_url)
    for i in range(1, 41):
        warehouse.add(i, vip=i <= 20, buyer=i % 2 == 0, revenue=float(i * 10))
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    warehouse.execute("UPDATE people SET vip = 1 WHERE id BETWEEN 21 AND 30")
    warehouse.execute("UPDATE people SET buyer = 0 WHERE id <= 10")
    warehouse.execute("UPDATE people SET revenue = revenue + 1 WHERE id <= 5")
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    warehouse.execute("UPDATE people SET vip = 0")  # a broken query, to the breaker
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 1
    warehouse.execute("UPDATE people SET vip = 1 WHERE id <= 25")
    warehouse.add(41, vip=True)
    gleap.reject_users = {"41"}
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    return path, state_url


def test_report_of_a_real_history(
    tmp_path: Path,
    gleap: Sandbox,
    warehouse: Warehouse,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    path, state_url = build_history(tmp_path, gleap, warehouse, capsys)
    target = tmp_path / "report.html"
    code, out, err = run_cli(capsys, "-c", str(path), "report", "--html", str(target))
    assert code == 0, err
    assert f"wrote {target} (3 audiences and traits)" in out
    page = target.read_text()

    # self-contained: nothing fetched, nothing run
    assert "<script" not in page and "src=" not in page and "<link" not in page
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", page)
    assert TOKEN not in page

    sections = dict(re.findall(r'<h2 id="([a-z_]+)">(.*?)(?=<h2 |</body>)', page, re.S))
    assert list(sections) == ["buyers", "revenue", "vip_customers"]
    vip = sections["vip_customers"]
    sql = "SELECT members FROM sync_runs WHERE audience_key = 'vip_customers' ORDER BY id"
    assert [r["members"] for r in query(state_url, sql)] == [20, 30, 0, 26]
    line = re.search(r'<polyline points="([^"]+)"', vip)
    assert line is not None and len(line.group(1).split()) == 3  # the held plan is off the line
    for count in ("20 members", "30 members", "26 members", "0 members (held)"):
        assert count in vip
    assert "the query returned no rows but 30 users hold this key" in vip  # the held reason
    failures = vip[vip.index("Latest delivery failures") : vip.index("Outbox now")]
    assert "<td>41</td>" in failures and "HTTP 4" in failures  # the user, Gleap's reason

    assert f'fill="{CHANGED_COLOUR}"' in sections["revenue"]  # traits change values


def test_report_names_what_is_wrong(
    tmp_path: Path,
    gleap: Sandbox,
    warehouse: Warehouse,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    path, _ = build_history(tmp_path, gleap, warehouse, capsys)
    code, _, err = run_cli(
        capsys, "-c", str(path), "report", "--html", str(tmp_path / "nowhere" / "r.html")
    )
    assert code == 2 and "--html" in err and "does not exist" in err
    code, _, err = run_cli(
        capsys, "-c", str(path), "report", "--html", str(tmp_path / "r.html"), "--audience", "nope"
    )
    assert code == 2 and "'nope'" not in err and "nope: no such audience" in err
    assert not (tmp_path / "r.html").exists()


def chromium() -> str | None:
    required = os.environ.get("AUDSYNC_TEST_CHROMIUM")
    found = required or shutil.which("chromium") or shutil.which("chromium-browser")
    if required and not Path(required).exists():
        pytest.fail(f"AUDSYNC_TEST_CHROMIUM={required} does not exist")
    return found


@pytest.mark.slow
def test_headless_chromium_renders_the_charts(
    tmp_path: Path,
    gleap: Sandbox,
    warehouse: Warehouse,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium here (CI sets AUDSYNC_TEST_CHROMIUM)")
    from PIL import Image

    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    path, _ = build_history(tmp_path, gleap, warehouse, capsys)
    page = tmp_path / "report.html"
    assert run_cli(capsys, "-c", str(path), "report", "--html", str(page))[0] == 0
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1100,1400",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20) or []
    count = {colour: n for n, colour in colours}

    def pixels(hex_colour: str) -> int:
        rgb = tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
        return count.get(rgb, 0)

    # The first audience's charts are on screen: a drawn line, and bars both ways.
    assert pixels(MEMBERS_COLOUR) > 500
    assert pixels(ENTERED_COLOUR) > 100
    assert pixels(EXITED_COLOUR) > 20
