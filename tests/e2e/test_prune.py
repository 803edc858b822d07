"""History pruning: the keep-or-prune decision (a table), and a year of runs through the CLI."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from audsync.clock import utcnow
from audsync.config import load_config
from audsync.errors import ConfigError
from audsync.locks import DELIVER_LEASE
from audsync.prune import RunFacts, keep_reason
from tests.helpers import Warehouse, assert_counts_add_up, query, run_cli

NOW = dt.datetime(2026, 6, 1, 12, 0)
CUTOFF = NOW - dt.timedelta(days=90)
OLD = CUTOFF - dt.timedelta(seconds=1)


def run(status: str = "succeeded", finished_at: dt.datetime | None = OLD, **kw: object) -> RunFacts:
    """An old finished incremental run with newer runs of every kind, unless told otherwise."""
    facts: dict[str, object] = {
        "status": status,
        "mode": "incremental",
        "finished_at": finished_at,
        "pending": 0,
        "newer_run": True,
        "newer_alerted": True,
        "newer_success": True,
        "newer_plan": True,
        "recent_failures": False,
    }
    facts.update(kw)
    return RunFacts(**facts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        (run("succeeded"), None),
        (run("partial"), None),
        (run("failed"), None),
        (run("held"), None),
        (run("interrupted"), None),
        (run("succeeded", mode="retry", newer_plan=None), None),
        # at the cut-off exactly is not older than keep
        (run(finished_at=CUTOFF), "recent"),
        (run(finished_at=NOW), "recent"),
        # open runs, whatever their age (a deliverer may still credit them)
        (run("planning", None), "open"),
        (run("delivering", None, pending=3), "open"),
        (run("delivering", OLD), "open"),
        # its counts must keep adding up while the outbox holds its changes
        (run("interrupted", pending=2), "pending changes"),
        (run("failed", pending=1, newer_run=False), "pending changes"),
        # status/history show the newest run; alerts, last_success_at, metrics theirs
        (run(newer_run=False), "last run"),
        (run("held", newer_alerted=False), "last alerted run"),
        (run("failed", newer_alerted=False, newer_success=None), "last alerted run"),
        (run("interrupted", newer_alerted=False, newer_success=False), None),
        (run("succeeded", newer_success=False), "last success"),
        (run("partial", newer_success=False), None),
        (run("interrupted", newer_plan=False), "last finished plan"),
        (run("succeeded", mode="forget", newer_plan=False), None),
        # a rejection newer than keep still joins its run
        (run("partial", recent_failures=True), "recent failures"),
    ],
)
def test_keep_reason(facts: RunFacts, reason: str | None) -> None:
    assert keep_reason(facts, CUTOFF) == reason


@pytest.mark.parametrize("value", ["0", "0s"])
def test_history_keep_must_be_positive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    path = tmp_path / "audsync.toml"
    path.write_text(f'[history]\nkeep = "{value}"\n', encoding="utf-8")
    monkeypatch.delenv("AUDSYNC_HISTORY_KEEP", raising=False)
    with pytest.raises(ConfigError, match=r"history\.keep.*longer than 0"):
        load_config(str(path))
    path.write_text("", encoding="utf-8")
    monkeypatch.setenv("AUDSYNC_HISTORY_KEEP", value)
    with pytest.raises(ConfigError, match="AUDSYNC_HISTORY_KEEP"):
        load_config(str(path))
    monkeypatch.setenv("AUDSYNC_HISTORY_KEEP", "30d")
    assert load_config(str(path)).history.keep == 30 * 86400
    monkeypatch.delenv("AUDSYNC_HISTORY_KEEP")
    assert load_config(str(path)).history.keep == 90 * 86400


# -- a year of two-hourly runs ------------------------------------------------------------

RUNS_PER_AUDIENCE = 4380  # a year, every two hours
KEEP_SLOTS = 1080  # 90 days / 2 h: slots 0..1079 finished less than 90 days ago
STUCK_SLOT = 4000  # ~333 days ago: runs that still own pending outbox rows
PARKED_SLOT = 3500  # an old run whose rejected change is parked (counted as failed)
FAILED_LATE_SLOT = 3000  # an old run with a rejection recorded yesterday
IDLE_FROM = 1200  # idle audiences' newest run (~100 days ago) is a failure ...
IDLE_SUCCESS = 1201  # ... and their last success the run before it


def run_id(slot: int, audience: int, audiences: int) -> int:
    """Ids grow with time: slot 0 (the newest) has the highest ids."""
    return (RUNS_PER_AUDIENCE - 1 - slot) * audiences + audience + 1


def insert_year(state_url: str, now: dt.datetime, audiences: int) -> set[int]:
    """A year of two-hourly runs for ``audiences`` audiences, set-wise, plus the cases
    pruning must keep; returns the ids of runs older than 90 days that must stay.

    The last 5 audiences went idle ~100 days ago. Audiences 0-4 have an old
    interrupted run still owning two pending changes; audience 5 an old run
    with a parked change; audience 6 an old run with a rejection from yesterday.
    """
    engine = create_engine(state_url)
    pg = engine.dialect.name == "postgresql"
    if pg:
        slots = (
            "SELECT a.a, i.i FROM generate_series(0, :audiences - 1) AS a(a)"
            " CROSS JOIN generate_series(0, :runs - 1) AS i(i)"
        )

        def ago(hours: str) -> str:
            return f"CAST(:now AS timestamp) - ({hours}) * interval '1 minute'"
    else:
        slots = (
            "WITH RECURSIVE a(a) AS"
            " (SELECT 0 UNION ALL SELECT a + 1 FROM a WHERE a < :audiences - 1),"
            " i(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM i WHERE i < :runs - 1)"
            " SELECT a.a, i.i FROM a CROSS JOIN i"
        )

        def ago(hours: str) -> str:
            return (
                f"strftime('%Y-%m-%d %H:%M:%S', :now, '-' || ({hours}) || ' minutes') || '.000000'"
            )

    status = (
        "CASE WHEN s.i % 89 = 7 THEN 'partial' WHEN s.i % 97 = 3 THEN 'failed' ELSE 'succeeded' END"
    )
    idle = audiences - 5
    params = {"audiences": audiences, "runs": RUNS_PER_AUDIENCE, "now": now, "idle": idle}
    if not pg:
        params["now"] = now.strftime("%Y-%m-%d %H:%M:%S")
    stuck = [run_id(STUCK_SLOT, a, audiences) for a in range(5)]
    idle_kept = [
        run_id(slot, a, audiences)
        for a in range(idle, audiences)
        for slot in (IDLE_FROM, IDLE_SUCCESS)
    ]
    failed_late = run_id(FAILED_LATE_SLOT, 6, audiences)
    parked = run_id(PARKED_SLOT, 5, audiences)
    started = time.monotonic()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO sync_runs (id, audience_key, trigger, mode, status, started_at,"
                " finished_at, members, entered, exited, changed, queued, delivered, failed,"
                " superseded, skipped_ids, duplicate_ids)"
                f" SELECT {(RUNS_PER_AUDIENCE - 1)} * :audiences - s.i * :audiences + s.a + 1,"
                " 'aud_' || CAST(s.a AS VARCHAR(10)), 'schedule', 'incremental',"
                f" {status}, {ago('s.i * 120 + 60')}, {ago('s.i * 120 + 50')},"
                f" 1000, 5, 0, 0,"
                f" CASE WHEN {status} = 'failed' THEN 0 ELSE 5 END,"
                f" CASE WHEN {status} = 'succeeded' THEN 5 WHEN {status} = 'partial' THEN 4"
                " ELSE 0 END,"
                f" CASE WHEN {status} = 'partial' THEN 1 ELSE 0 END, 0, 0, 0"
                f" FROM ({slots}) s WHERE NOT (s.a >= :idle AND s.i < {IDLE_FROM})"
            ),
            params,
        )
        if pg:
            conn.execute(
                text(
                    "SELECT setval(pg_get_serial_sequence('sync_runs', 'id'), MAX(id))"
                    " FROM sync_runs"
                )
            )
        conn.execute(
            text(
                "INSERT INTO delivery_failures (run_id, audience_key, user_id, http_status, reason,"
                " failed_at) SELECT id, audience_key, 'rejected-' || CAST(id AS VARCHAR(20)), 422,"
                " 'Invalid email', finished_at FROM sync_runs WHERE status = 'partial'"
            )
        )
        # the idle audiences' newest run failed; their last success is the one before
        for run in idle_kept[::2]:
            conn.execute(
                text(
                    "UPDATE sync_runs SET status = 'failed', error = 'source down', queued = 0,"
                    " delivered = 0, failed = 0 WHERE id = :id"
                ),
                {"id": run},
            )
        conn.execute(
            text(
                "UPDATE sync_runs SET status = 'interrupted', queued = 5, delivered = 3, failed = 0"
                " WHERE id IN (" + ", ".join(map(str, stuck)) + ")"
            )
        )
        for number, run in enumerate(stuck):
            for user in ("stuck-1", "stuck-2"):
                conn.execute(
                    text(
                        "INSERT INTO outbox (audience_key, user_id, value, run_id, version,"
                        " priority, state, attempts, queued_at, attempted)"
                        " VALUES (:key, :user, 'true', :run, 1, 0, 'pending', 0, :at, :no)"
                    ),
                    {"key": f"aud_{number}", "user": user, "run": run, "at": now, "no": False},
                )
        conn.execute(
            text(
                "UPDATE sync_runs SET status = 'partial', queued = 5, delivered = 4, failed = 1"
                " WHERE id IN (:parked, :late)"
            ),
            {"parked": parked, "late": failed_late},
        )
        conn.execute(
            text(
                "INSERT INTO outbox (audience_key, user_id, value, run_id, version, priority,"
                " state, attempts, last_status, queued_at, attempted)"
                " VALUES ('aud_5', 'parked-1', 'true', :run, 1, 0, 'failed', 5, 422, :at, :yes)"
            ),
            {"run": parked, "at": now - dt.timedelta(days=300), "yes": True},
        )
        conn.execute(
            text(
                "INSERT INTO delivery_failures (run_id, audience_key, user_id, http_status, reason,"
                " failed_at) VALUES (:run, 'aud_6', 'late-1', 422, 'Invalid email', :at)"
            ),
            {"run": failed_late, "at": now - dt.timedelta(days=1)},
        )
    engine.dispose()
    print(f"inserted a year of runs for {audiences} audiences in {time.monotonic() - started:.1f}s")
    return {*stuck, *idle_kept, failed_late}


def hold_delivery_elsewhere(state_url: str) -> None:
    """A daemon on another host holds the delivery lease: `sync` hands its changes over,
    so the old runs' pending changes stay pending through the sync."""
    engine = create_engine(state_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO leases (name, holder, token, expires_at, host, pid, acquired_at)"
                " VALUES (:name, 'other-host:1:x', 1, :until, 'other-host', 1, :now)"
            ),
            {"name": DELIVER_LEASE, "until": time.time() + 3600, "now": utcnow()},
        )
    engine.dispose()


def assert_pruned(state_url: str, kept_old: set[int], audiences: int, new_runs: int) -> None:
    cutoff = utcnow() - dt.timedelta(days=90)
    old = query(state_url, "SELECT id FROM sync_runs WHERE finished_at < :c", c=cutoff)
    assert {r["id"] for r in old} == kept_old
    total = query(state_url, "SELECT COUNT(*) AS n FROM sync_runs")[0]["n"]
    # the 45 active audiences keep their last 90 days; the 5 idle ones none of it
    assert total == (audiences - 5) * KEEP_SLOTS + len(kept_old) + new_runs
    assert total <= audiences * KEEP_SLOTS + len(kept_old) + new_runs
    stale = query(
        state_url, "SELECT COUNT(*) AS n FROM delivery_failures WHERE failed_at < :c", c=cutoff
    )
    assert stale[0]["n"] == 0
    recent = query(state_url, "SELECT COUNT(*) AS n FROM delivery_failures")[0]["n"]
    assert recent > 0  # the last 90 days' rejections are still there
    # every pending change's run is still there, and every run's counts add up
    orphans = query(
        state_url,
        "SELECT o.user_id FROM outbox o LEFT JOIN sync_runs r ON r.id = o.run_id"
        " WHERE o.state = 'pending' AND r.id IS NULL",
    )
    assert orphans == []
    assert_counts_add_up(state_url)
    # a parked change is counted as failed by its run: it does not pin the run
    parked = query(state_url, "SELECT run_id FROM outbox WHERE user_id = 'parked-1'")
    assert len(parked) == 1
    assert query(state_url, "SELECT id FROM sync_runs WHERE id = :id", id=parked[0]["run_id"]) == []


def test_sync_prunes_a_year_of_history_to_what_keep_allows(
    make_config: object,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    for user in range(1, 6):
        warehouse.add(user, vip=user % 2 == 0, buyer=True, revenue=10.0 * user)
    path, _ = make_config(extra='[history]\nkeep = "90d"\n')  # type: ignore[operator]
    assert run_cli(capsys, "-c", str(path), "db", "upgrade")[0] == 0
    audiences = 50
    kept_old = insert_year(state_url, utcnow(), audiences)
    before = query(state_url, "SELECT COUNT(*) AS n FROM sync_runs")[0]["n"]
    assert before == audiences * RUNS_PER_AUDIENCE - 5 * IDLE_FROM
    hold_delivery_elsewhere(state_url)
    cutoff = utcnow() - dt.timedelta(days=90)
    old_runs = query(
        state_url, "SELECT COUNT(*) AS n FROM sync_runs WHERE finished_at < :c", c=cutoff
    )[0]["n"]
    old_failures = query(
        state_url, "SELECT COUNT(*) AS n FROM delivery_failures WHERE failed_at < :c", c=cutoff
    )[0]["n"]

    with caplog.at_level(logging.INFO, logger="audsync"):
        code, out, err = run_cli(capsys, "-c", str(path), "sync")

    assert code == 0, err
    assert "the daemon (other-host pid 1) is delivering them" in out
    pruned = [r.message for r in caplog.records if "pruned history" in r.message]
    assert pruned == [
        f"pruned history older than 90d: {old_runs - len(kept_old)} runs, {old_failures}"
        " delivery failures (kept older runs: 5 last run, 5 last success, 5 pending changes,"
        " 1 recent failures)"
    ]
    assert_pruned(state_url, kept_old, audiences, new_runs=3)

    # what status and history show still holds together
    code, out, err = run_cli(capsys, "-c", str(path), "status", "--json")
    assert code == 0, err
    assert {a["key"] for a in json.loads(out)["audiences"]} >= {"vip_customers", "buyers"}
    code, out, err = run_cli(capsys, "-c", str(path), "history", "--audience", "aud_49", "--json")
    assert code == 0, err
    idle = json.loads(out)
    assert [r["status"] for r in idle] == ["failed", "succeeded"]  # last run, last success
    code, out, err = run_cli(capsys, "-c", str(path), "history", "--failures", "--limit", "3")
    assert code == 0, err
    assert "Invalid email" in out

    caplog.clear()
    # a second sync has nothing older than keep left to prune, and says nothing about it
    with caplog.at_level(logging.INFO, logger="audsync"):
        code, out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    assert [r for r in caplog.records if "pruned history" in r.message] == []
    assert_pruned(state_url, kept_old, audiences, new_runs=6)


def test_the_daemon_prunes_too(
    make_config: object,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    warehouse.add(1, vip=True, buyer=True, revenue=5.0)
    path, _ = make_config(extra='[history]\nkeep = "90d"\n')  # type: ignore[operator]
    assert run_cli(capsys, "-c", str(path), "db", "upgrade")[0] == 0
    audiences = 10
    kept_old = insert_year(state_url, utcnow(), audiences)
    hold_delivery_elsewhere(state_url)

    with caplog.at_level(logging.INFO, logger="audsync"):
        code, _out, err = run_cli(capsys, "-c", str(path), "run", "--once")

    assert code == 0, err
    assert any("pruned history older than 90d" in r.message for r in caplog.records)
    assert_pruned(state_url, kept_old, audiences, new_runs=3)
