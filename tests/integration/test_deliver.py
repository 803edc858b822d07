"""The deliverer against the sandbox: docs/design.md invariants 1-3 on a real state DB."""

from __future__ import annotations

from typing import Any

from audsync.config import Definition
from audsync.deliver import Change, deliver, plan_calls
from audsync.gleap import GleapClient
from audsync.sandbox import Sandbox
from audsync.state import open_state
from tests.helpers import TOKEN, Warehouse, assert_counts_add_up, ledger, plan, query

VIP = Definition("audience", "VIP", "vip", "SELECT id AS user_id FROM people WHERE vip = 1")


def test_value_changed_in_flight_is_sent_again(
    state_url: str, warehouse: Warehouse, gleap: Sandbox
) -> None:
    """Invariant 3: the ack of an old value must not remove a newer pending value."""
    warehouse.add(1, vip=True)
    warehouse.add(2, vip=True)
    plan(state_url, warehouse.url, VIP, hand_over=True)
    replanned: list[bool] = []

    def user_leaves_while_call_in_flight(body: dict[str, Any]) -> None:
        if body["userId"] == "1" and not replanned:
            replanned.append(True)
            warehouse.execute("UPDATE people SET vip = 0 WHERE id = 1")
            plan(state_url, warehouse.url, VIP, hand_over=True)

    gleap.on_identify = user_leaves_while_call_in_flight
    state = open_state(state_url)
    with GleapClient(gleap.url, TOKEN, rate_limit=0) as client:
        report = deliver(state, client, concurrency=1)
    assert report.error is None
    sent = [(c["user_id"], c["body"]["vip"]) for c in gleap.calls("/admin/identify")]
    assert sent == [("1", True), ("2", True), ("1", False)]
    assert gleap.contact("1")["vip"] is False  # type: ignore[index]
    assert ledger(state_url) == {("vip", "1"): False, ("vip", "2"): True}
    assert query(state_url, "SELECT * FROM outbox") == []
    assert_counts_add_up(state_url)


def test_ledger_only_moves_on_2xx(state_url: str, warehouse: Warehouse, gleap: Sandbox) -> None:
    """Invariant 1: with Gleap down, nothing is acknowledged and everything stays queued."""
    for i in range(1, 4):
        warehouse.add(i, vip=True)
    plan(state_url, warehouse.url, VIP, hand_over=True)
    gleap.fail_ratio = 1.0
    state = open_state(state_url)
    with GleapClient(gleap.url, TOKEN, rate_limit=0, max_retries=2, sleep=lambda s: None) as c:
        report = deliver(state, c)
    assert report.error is not None and "did not accept" in str(report.error)
    assert ledger(state_url) == {}
    assert len(query(state_url, "SELECT * FROM outbox WHERE state = 'pending'")) == 3
    gleap.fail_ratio = 0.0
    with GleapClient(gleap.url, TOKEN, rate_limit=0) as c:
        assert deliver(state, c).delivered == 3
    assert ledger(state_url) == {("vip", str(i)): True for i in range(1, 4)}


def test_plan_calls_coalesce_one_user() -> None:
    changes = [
        Change("a", "u1", "true", '{"email": "x@y.z"}', 1, 1),
        Change("b", "u1", "false", None, 2, 3),
        Change("t", "u1", "12.5", None, 3, 1),
    ]
    ((body, carried),) = plan_calls("u1", changes)
    assert body == {"email": "x@y.z", "userId": "u1", "a": True, "b": False, "t": 12.5}
    assert carried == changes


def test_routine_changes_overtake_the_backfill(state_url: str) -> None:
    """Invariant 6: a change to an already-synced audience is not starved behind a
    long initial backfill of another one."""
    from sqlalchemy import insert

    from audsync import models
    from audsync.clock import utcnow
    from audsync.deliver import next_users
    from audsync.models import PRIORITY_BACKFILL, PRIORITY_ROUTINE

    state = open_state(state_url)
    now = utcnow()
    rows = [
        {
            "audience_key": "new_audience",
            "user_id": f"a{i:05d}",
            "value": "true",
            "run_id": 1,
            "version": 1,
            "priority": PRIORITY_BACKFILL,
            "state": "pending",
            "attempts": 0,
            "queued_at": now,
        }
        for i in range(500)
    ]
    rows.append(
        {**rows[0], "audience_key": "vip", "user_id": "zz-late-user", "priority": PRIORITY_ROUTINE}
    )
    rows.append(
        {
            **rows[0],
            "audience_key": "vip",
            "user_id": "zz-parked",
            "priority": PRIORITY_ROUTINE,
            "state": "failed",
        }
    )
    with state.begin() as conn:
        conn.execute(insert(models.outbox), rows)
        first = next_users(conn, 10)
        assert first[0] == "zz-late-user"  # jumps the 500-user backfill
        assert first[1:] == [f"a{i:05d}" for i in range(9)]  # then the backfill, in order
        assert "zz-parked" not in next_users(conn, 1000)
        assert next_users(conn, 3, exclude={"zz-late-user", "a00000"}) == [
            "a00001",
            "a00002",
            "a00003",
        ]
