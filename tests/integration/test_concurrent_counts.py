"""Counts add up under concurrency: a plan re-planning an audience while a deliverer
acknowledges the same rows never credits a row twice, and never queues again a
change Gleap has just acknowledged.

The interleavings are forced, not hoped for: a statement-level trigger makes the
plan's session wait on an advisory lock the test holds (so the plan stops after
it has read the outbox and ledger), the sandbox holds one Identify call in flight
until the test lets it go, and the test lets the plan go on only once the
acknowledgement has either committed or is visibly waiting for the plan.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from audsync.deliver import DeliveryReport, deliver
from audsync.sandbox import Sandbox
from audsync.source import open_source
from audsync.state import open_state
from audsync.sync import SyncOutcome, make_client, plan_all
from tests.helpers import MakeConfig, Warehouse, assert_counts_add_up, ledger, query, wait_for

PLAN_APP = "audsync-test-plan"
GATE = 424242

VIP = """
[[audiences]]
name = "VIP"
sql = "SELECT id AS user_id FROM people WHERE vip = 1"
"""


@pytest.fixture
def observer(state_url: str) -> Iterator[Engine]:
    if not state_url.startswith("postgresql"):
        pytest.skip("the interleaving is forced with PostgreSQL triggers and advisory locks")
    engine = create_engine(state_url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def install_gate(observer: Engine, table: str) -> None:
    """Make the plan's session wait at its first UPDATE of ``table`` while the test
    holds advisory lock GATE (other sessions are never held)."""
    with observer.connect() as conn:
        conn.execute(
            text(
                "CREATE OR REPLACE FUNCTION audsync_test_gate() RETURNS trigger"
                " LANGUAGE plpgsql AS $$ BEGIN"
                f" IF current_setting('application_name') = '{PLAN_APP}' THEN"
                f" PERFORM pg_advisory_lock_shared({GATE});"
                f" PERFORM pg_advisory_unlock_shared({GATE});"
                " END IF; RETURN NULL; END $$"
            )
        )
        conn.execute(
            text(
                f"CREATE TRIGGER audsync_test_gate BEFORE UPDATE ON {table}"
                " FOR EACH STATEMENT EXECUTE FUNCTION audsync_test_gate()"
            )
        )


def sessions_waiting(observer: Engine, *, plan: bool) -> int:
    """Sessions of this database waiting for a lock: the plan's, or any other's."""
    op = "=" if plan else "<>"
    with observer.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()"
                    f" AND wait_event_type = 'Lock' AND application_name {op} :app"
                ),
                {"app": PLAN_APP},
            ).scalar_one()
        )


@pytest.mark.parametrize(
    ("gate_table", "user_3_leaves"),
    [
        # The plan has read that user 3's pending value is superseded (3 left the
        # audience) when the acknowledgement of that very value commits: crediting
        # it as superseded too would count it twice.
        ("sync_runs", True),
        # Nothing changed in the source; the plan has read the ledger without
        # user 3 (so 3 looks like a new member) when 3's acknowledgement commits:
        # queuing 3 again would be a redundant change.
        ("outbox", False),
    ],
    ids=["superseded-vs-ack", "unchanged-source-vs-ack"],
)
# PostgreSQL only: SQLite's plan holds the only write lock, so no ack can interleave.
@pytest.mark.parametrize("state_url", ["postgres"], indirect=True)
def test_replan_while_the_same_rows_are_acknowledged(
    gate_table: str,
    user_3_leaves: bool,
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    observer: Engine,
) -> None:
    for i in range(1, 6):
        warehouse.add(i, vip=True)
    _, config = make_config(body=VIP)
    state = open_state(state_url)
    source = open_source(warehouse.url)
    plan_all(config, config.definitions, state, source, SyncOutcome())  # run 1: the first sync

    held, release = threading.Event(), threading.Event()

    def hold_user_3(body: dict[str, Any]) -> None:
        if body["userId"] == "3" and not held.is_set():
            held.set()
            release.wait(30)

    gleap.on_identify = hold_user_3
    reports: list[DeliveryReport] = []
    client = make_client(config)
    deliverer = threading.Thread(
        target=lambda: reports.append(deliver(state, client, concurrency=2)), daemon=True
    )
    deliverer.start()
    # 3's call is in flight (marked attempted); everyone else is acknowledged.
    wait_for(held.is_set, what="user 3's call in flight")
    wait_for(lambda: len(ledger(state_url)) == 4, what="users 1, 2, 4, 5 acknowledged")

    if user_3_leaves:
        warehouse.execute("UPDATE people SET vip = 0 WHERE id = 3")
    install_gate(observer, gate_table)
    plan_state = open_state(f"{state_url}?application_name={PLAN_APP}", upgrade=False)
    errors: list[BaseException] = []

    def replan() -> None:
        try:
            plan_all(config, config.definitions, plan_state, source, SyncOutcome())
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    with observer.connect() as gate:
        gate.execute(text(f"SELECT pg_advisory_lock({GATE})"))
        planner = threading.Thread(target=replan, daemon=True)
        planner.start()
        wait_for(lambda: sessions_waiting(observer, plan=True), what="the plan at the gate")
        release.set()  # Gleap answers 3's call: the deliverer acknowledges it now
        wait_for(
            lambda: ("vip", "3") in ledger(state_url) or sessions_waiting(observer, plan=False),
            what="the acknowledgement committed or waiting for the plan",
        )
        gate.execute(text(f"SELECT pg_advisory_unlock({GATE})"))
        planner.join(30)
    deliverer.join(30)
    assert not errors and not planner.is_alive() and not deliverer.is_alive()
    assert reports and reports[0].error is None
    assert deliver(state, client).error is None  # whatever is still queued goes out
    client.close()

    runs = assert_counts_add_up(state_url)
    assert [r["status"] for r in runs] == ["succeeded", "succeeded"]
    first, second = runs
    assert first["queued"] == 5
    if user_3_leaves:
        # 3's "true" reached Gleap: the plan overwrote it with "false" (not credited
        # twice), which went out next.
        assert (first["delivered"], first["superseded"]) == (4, 1)
        assert (second["queued"], second["delivered"]) == (1, 1)
        assert gleap.contact("3")["vip"] is False  # type: ignore[index]
    else:
        assert (first["delivered"], first["superseded"]) == (5, 0)
        assert second["queued"] == 0  # an unchanged source queues nothing
        assert [c["user_id"] for c in gleap.calls("/admin/identify")].count("3") == 1
        assert gleap.contact("3")["vip"] is True  # type: ignore[index]
    assert query(state_url, "SELECT * FROM outbox") == []
    assert ledger(state_url) == {("vip", str(i)): i != 3 or not user_3_leaves for i in range(1, 6)}


def test_unchanged_source_during_an_undelivered_first_sync_queues_nothing(
    make_config: MakeConfig, gleap: Sandbox, warehouse: Warehouse, state_url: str
) -> None:
    """Re-planning while the first sync is half delivered (some acknowledged, one
    call in flight, the rest waiting) finds nothing to queue, on either state DB."""
    for i in range(1, 9):
        warehouse.add(i, vip=True)
    _, config = make_config(body=VIP)
    state = open_state(state_url)
    source = open_source(warehouse.url)
    plan_all(config, config.definitions, state, source, SyncOutcome())

    held, release = threading.Event(), threading.Event()

    def hold(body: dict[str, Any]) -> None:
        if body["userId"] == "3":
            held.set()
            release.wait(30)

    gleap.on_identify = hold
    client = make_client(config)
    deliverer = threading.Thread(
        target=lambda: deliver(state, client, concurrency=2, batch_size=2), daemon=True
    )
    deliverer.start()
    wait_for(held.is_set, what="user 3's call in flight")
    wait_for(lambda: ("vip", "1") in ledger(state_url), what="user 1 acknowledged")
    before = query(state_url, "SELECT user_id, version, run_id FROM outbox ORDER BY user_id")
    for _ in range(3):
        plan_all(config, config.definitions, state, source, SyncOutcome())
    replans = query(state_url, "SELECT * FROM sync_runs WHERE id > 1 ORDER BY id")
    assert [(r["queued"], r["status"]) for r in replans] == [(0, "succeeded")] * 3
    after = query(state_url, "SELECT user_id, version, run_id FROM outbox ORDER BY user_id")
    assert {tuple(r.values()) for r in after} <= {tuple(r.values()) for r in before}
    release.set()
    deliverer.join(30)
    client.close()
    runs = assert_counts_add_up(state_url)
    assert runs[0]["delivered"] == 8 and runs[0]["status"] == "succeeded"
    assert len(gleap.calls("/admin/identify")) == 8
