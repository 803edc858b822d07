"""Planning decisions (tables of cases) and the SQL diff on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine

from audsync.config import Definition
from audsync.history import start_run
from audsync.plan import breaker_verdict, choose_mode, plan_definition
from audsync.state import open_state
from tests.helpers import Warehouse, plan, query


@pytest.mark.parametrize(
    ("ledger_rows", "full", "mode"),
    [(0, False, "initial"), (5, False, "incremental"), (0, True, "full"), (5, True, "full")],
)
def test_choose_mode(ledger_rows: int, full: bool, mode: str) -> None:
    assert choose_mode(ledger_rows, full) == mode


@pytest.mark.parametrize(
    ("previous", "members", "exits", "ratio", "force", "held"),
    [
        (0, 0, 0, 0.5, False, None),  # brand new, empty: nothing to protect
        (100, 0, 100, 0.5, False, "returned no rows"),
        (100, 0, 100, 0.5, True, None),  # forced
        (100, 60, 40, 0.5, False, None),
        (100, 50, 50, 0.5, False, None),  # exactly at the ratio is allowed
        (100, 49, 51, 0.5, False, "51 of 100 users would be removed"),
        (100, 90, 51, 0.5, False, "51 of 100"),  # churn with newcomers still counts exits
        (10, 9, 1, 0.05, False, "1 of 10"),
        (100, 1, 99, 1.0, False, None),
    ],
)
def test_breaker_verdict(
    previous: int, members: int, exits: int, ratio: float, force: bool, held: str | None
) -> None:
    verdict = breaker_verdict(previous, members, exits, ratio, force)
    if held is None:
        assert verdict is None
    else:
        assert verdict is not None and held in verdict and "--force" in verdict


VIP = Definition("audience", "VIP", "vip", "SELECT id AS user_id FROM people WHERE vip = 1")
REVENUE = Definition(
    "trait", "Revenue", "revenue", "SELECT id AS user_id, revenue AS value FROM people"
)


def outbox(state_url: str) -> dict[str, tuple[Any, int, int]]:
    return {
        r["user_id"]: (json.loads(r["value"]), r["version"], r["run_id"])
        for r in query(state_url, "SELECT * FROM outbox ORDER BY user_id")
    }


def ack_all(state_url: str) -> None:
    """Pretend Gleap acknowledged every pending row (what deliver does on 2xx)."""
    from sqlalchemy import text

    engine = create_engine(state_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO ledger (audience_key, user_id, value, acked_at)"
                " SELECT audience_key, user_id, value, queued_at FROM outbox WHERE true"
                " ON CONFLICT (audience_key, user_id) DO UPDATE SET value = excluded.value"
            )
        )
        conn.execute(text("DELETE FROM outbox"))
    engine.dispose()


def test_newer_plan_replaces_pending_value_and_credits_superseded(
    state_url: str, warehouse: Warehouse
) -> None:
    state, source = open_state(state_url), create_engine(warehouse.url)
    for i in range(1, 5):
        warehouse.add(i, vip=True)
    first = plan(state, source, VIP)
    assert (first.mode, first.entered, first.queued) == ("initial", 4, 4)
    assert {u: v for u, (v, _, _) in outbox(state_url).items()} == dict.fromkeys("1234", True)

    # Before anything is delivered: 4 leaves, 5 joins.
    warehouse.execute("UPDATE people SET vip = 0 WHERE id = 4")
    warehouse.add(5, vip=True)
    second = plan(state, source, VIP)
    # Still initial (nothing acknowledged yet); 4's pending `true` is withdrawn,
    # not turned into a `false` Gleap never needed.
    assert second.mode == "initial"
    rows = outbox(state_url)
    assert set(rows) == {"1", "2", "3", "5"}  # docs/design.md invariant 2: one row per pair
    assert rows["5"][2] != rows["1"][2]  # 1-3 still belong to the first run
    runs = {r["id"]: r for r in query(state_url, "SELECT * FROM sync_runs")}
    assert runs[rows["1"][2]]["superseded"] == 1
    assert second.queued == 1


def test_incremental_and_full_after_acknowledgement(state_url: str, warehouse: Warehouse) -> None:
    state, source = open_state(state_url), create_engine(warehouse.url)
    for i in range(1, 6):
        warehouse.add(i, vip=i <= 3)
    plan(state, source, VIP)
    ack_all(state_url)
    warehouse.execute("UPDATE people SET vip = 0 WHERE id = 1")
    warehouse.execute("UPDATE people SET vip = 1 WHERE id = 4")
    result = plan(state, source, VIP)
    assert (result.mode, result.entered, result.exited, result.queued) == ("incremental", 1, 1, 2)
    assert {u: v for u, (v, _, _) in outbox(state_url).items()} == {"1": False, "4": True}
    ack_all(state_url)

    warehouse.execute("UPDATE people SET vip = 0 WHERE id = 2")
    full = plan(state, source, VIP, full=True)
    assert full.mode == "full"
    # members 3, 4 re-asserted true; 1 (left earlier) and 2 (left now) false.
    assert {u: v for u, (v, _, _) in outbox(state_url).items()} == {
        "1": False,
        "2": False,
        "3": True,
        "4": True,
    }
    assert (full.entered, full.exited, full.reasserted, full.queued) == (0, 1, 3, 4)


def test_change_while_pending_bumps_version(state_url: str, warehouse: Warehouse) -> None:
    state, source = open_state(state_url), create_engine(warehouse.url)
    warehouse.add(1, revenue=10.0)
    plan(state, source, REVENUE)
    assert outbox(state_url)["1"][:2] == (10, 1)
    plan(state, source, REVENUE)  # same value: untouched
    assert outbox(state_url)["1"][:2] == (10, 1)
    warehouse.execute("UPDATE people SET revenue = 11 WHERE id = 1")
    plan(state, source, REVENUE)
    assert outbox(state_url)["1"][:2] == (11, 2)


def test_trait_values_and_null_when_gone(state_url: str, warehouse: Warehouse) -> None:
    state, source = open_state(state_url), create_engine(warehouse.url)
    warehouse.add(1, revenue=10.0)
    warehouse.add(2, revenue=20.5)
    warehouse.add(3, revenue=None)
    first = plan(state, source, REVENUE)
    assert first.members == 2
    ack_all(state_url)
    warehouse.execute("UPDATE people SET revenue = NULL WHERE id = 1")
    warehouse.execute("UPDATE people SET revenue = 21 WHERE id = 2")
    warehouse.execute("UPDATE people SET revenue = 5 WHERE id = 3")
    second = plan(state, source, REVENUE)
    assert (second.entered, second.changed, second.exited) == (1, 1, 1)
    assert {u: v for u, (v, _, _) in outbox(state_url).items()} == {"1": None, "2": 21, "3": 5}


def test_held_plan_writes_nothing(state_url: str, warehouse: Warehouse, tmp_path: Path) -> None:
    state, source = open_state(state_url), create_engine(warehouse.url)
    for i in range(1, 5):
        warehouse.add(i, vip=True)
    plan(state, source, VIP)
    ack_all(state_url)
    plan(state, source, VIP)  # a first plan writes no snapshot; the second does
    warehouse.execute("UPDATE people SET vip = 0")
    run_id = start_run(state, "vip", "manual", "?")
    with state.connect() as conn:
        tx = conn.begin()
        result = plan_definition(conn, source, VIP, run_id=run_id)
        assert result.held and "no rows" in result.held
        tx.rollback()
    assert query(state_url, "SELECT COUNT(*) AS n FROM outbox")[0]["n"] == 0
    assert query(state_url, "SELECT COUNT(*) AS n FROM snapshot")[0]["n"] == 4


def test_value_that_may_have_reached_gleap_is_overwritten_not_withdrawn(
    state_url: str, warehouse: Warehouse
) -> None:
    """A crash mid-call leaves an attempted row whose value Gleap may hold: a newer
    plan that no longer wants it must send what Gleap should hold instead."""
    from sqlalchemy import text

    state, source = open_state(state_url), create_engine(warehouse.url)
    warehouse.add(1, vip=True, revenue=5.0)
    warehouse.add(2, vip=True, revenue=6.0)
    plan(state, source, VIP)
    plan(state, source, REVENUE)
    with state.begin() as conn:  # what the deliverer writes before sending user 1
        conn.execute(text("UPDATE outbox SET attempted = true WHERE user_id = '1'"))
    warehouse.execute("UPDATE people SET vip = 0, revenue = NULL")
    warehouse.add(3, vip=True, revenue=1.0)  # keeps the breaker quiet
    vip = plan(state, source, VIP)
    revenue = plan(state, source, REVENUE)
    rows = {
        (r["audience_key"], r["user_id"]): (json.loads(r["value"]), r["version"])
        for r in query(state_url, "SELECT * FROM outbox")
    }
    assert rows[("vip", "1")] == (False, 2)  # overwritten with the exit value
    assert rows[("revenue", "1")] == (None, 2)
    assert ("vip", "2") not in rows and ("revenue", "2") not in rows  # never sent: withdrawn
    assert vip.queued == 2 and revenue.queued == 2  # user 1's overwrite + user 3


TRICKY = Definition(
    "audience",
    "Tricky",
    "tricky",
    "SELECT id AS user_id, email, plan, score, seen FROM tricky",
)


def _tricky_source(path: Path) -> Engine:
    """Ids of every shape the edges rules name, with contact columns of several types."""
    import sqlite3

    db = sqlite3.connect(path)
    db.execute("CREATE TABLE tricky (id, email TEXT, plan TEXT, score REAL, seen TEXT)")
    rows = [
        (42, "a@x.io", "pro", 1.5, "2024-01-02T03:04:05Z"),
        (42.0, "dup@x.io", None, None, None),  # the same user as 42: collapsed
        ("42-1", "b@x.io", "free", 2.0, None),
        ("abc", None, None, None, None),
        ("abc", "again@x.io", None, None, None),  # repeat
        (None, "no-id@x.io", None, None, None),  # no id: skipped
        ("", "empty@x.io", None, None, None),  # empty: skipped
        ("  ", "blank@x.io", None, None, None),
        ("bad\x01id", "ctl@x.io", None, None, None),  # control character: invalid
        ("x" * 600, "long@x.io", None, None, None),  # too long: invalid
        (7.5, "frac@x.io", "pro", 3.0, None),
        ("ünï", "u@x.io", "plan \"quoted\"", -1.0, None),
        (10, "ten@x.io", None, 10.0, None),
        ("forgotten", "gone@x.io", None, None, None),
    ]
    db.executemany("INSERT INTO tricky VALUES (?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    return create_engine(f"sqlite:///{path}")


def test_first_plan_writes_members_once_exactly_as_the_snapshot_holds_them(
    state_url: str, tmp_path: Path
) -> None:
    """Issue 15: a first plan streams its members straight into the outbox (the
    snapshot is not written), and those rows are exactly the ones the next
    plan's snapshot holds for the same data — ids, values, contacts, skips."""
    state, source = open_state(state_url), _tricky_source(tmp_path / "tricky.db")
    with state.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO suppressions (user_id, suppressed_at) VALUES ('forgotten', '2024-01-01')"
        )
    first = plan(state, source, TRICKY)
    assert first.mode == "initial"
    assert query(state_url, "SELECT COUNT(*) AS n FROM snapshot")[0]["n"] == 0
    queued = {
        (r["user_id"], r["value"], r["contact"])
        for r in query(state_url, "SELECT user_id, value, contact FROM outbox")
    }
    assert {u for u, _, _ in queued} == {"42", "42-1", "abc", "7.5", "ünï", "10"}
    assert first.members == first.queued == first.entered == 6
    assert first.stats.skipped_ids == 3 and first.stats.invalid_ids == 2
    assert first.stats.duplicate_ids == 2
    contact = json.loads(next(c for u, _, c in queued if u == "42"))
    assert contact["email"] == "a@x.io" and contact["plan"] == "pro"

    # The second plan loads the snapshot from the same rows: it must hold the same.
    plan(state, source, TRICKY)
    snapshot = {
        (r["user_id"], r["value"], r["contact"])
        for r in query(state_url, "SELECT user_id, value, contact FROM snapshot")
    }
    assert snapshot == queued
    assert query(state_url, "SELECT DISTINCT run_id, version, priority, state FROM outbox") == [
        {"run_id": 1, "version": 1, "priority": 1, "state": "pending"}
    ]


def test_dry_run_of_a_first_sync_counts_without_queueing(
    state_url: str, warehouse: Warehouse
) -> None:
    """Issue 15: the dry run of a first sync loads the snapshot and counts; the
    calls it reports are the users already pending plus its members, each once."""
    from audsync.plan import dry_run_calls

    state, source = open_state(state_url), create_engine(warehouse.url)
    for i in range(1, 8):
        warehouse.add(i, vip=i <= 4, buyer=3 <= i <= 6)
    buyers = Definition(
        "audience", "Buyers", "buyers", "SELECT id AS user_id FROM people WHERE buyer = 1"
    )
    plan(state, source, buyers)  # 3..6 pending, never acknowledged
    with state.connect() as conn:
        tx = conn.begin()
        result = plan_definition(conn, source, VIP, run_id=-1, dry_run=True)
        assert result.counted_only and result.members == result.entered == 4
        assert conn.exec_driver_sql(
            "SELECT COUNT(*) FROM outbox WHERE audience_key = 'vip'"
        ).scalar_one() == 0
        assert dry_run_calls(conn, ["vip"]) == 6  # 1..6: 3 and 4 are in both
        assert dry_run_calls(conn, []) == 4
        late = Definition(
            "audience", "Late", "late", "SELECT id AS user_id FROM people WHERE id >= 5"
        )
        assert plan_definition(conn, source, late, run_id=-2, dry_run=True).counted_only
        assert dry_run_calls(conn, ["vip", "late"]) == 7  # 1..4, 3..6, 5..7
        tx.rollback()
