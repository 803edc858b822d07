"""`audsync forget` wins every race with a sync running beside it.

Each test holds one moment of a real sync still — alice's Identify inside the
sandbox, or the plan inside a database lock — runs `audsync forget alice` in
its own process, lets the sync go on, and then checks what Gleap and the state
DB hold: no contact alice, no call about alice after the DELETE, no row of
alice, and a later sync that sends nothing about her.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from audsync.config import load_config
from audsync.defaults import DEFAULT_STOP_GRACE
from audsync.forget import forget
from audsync.sandbox import Sandbox
from audsync.state import open_state
from audsync.sync import make_client
from tests.helpers import (
    TOKEN,
    Process,
    Warehouse,
    assert_counts_add_up,
    query,
    run_cli,
    wait_for,
    write_config,
)

USER_ID = "CASE WHEN id = 1 THEN 'alice' ELSE 'user' || id END"
"""The warehouse's person 1 is alice, the others user2, user3, ..."""

USER_TABLES = ("ledger", "outbox", "snapshot", "event_outbox", "delivery_failures")

WAREHOUSE_BODY = """
[[audiences]]
name = "VIP"
key = "vip"
events = {events}
sql = "SELECT {user_id} AS user_id FROM people WHERE vip = 1"
"""

PG_BODY = """
[[audiences]]
name = "VIP"
key = "vip"
sql = "SELECT id AS user_id FROM people WHERE vip"
"""


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    for name in ("AUDSYNC_CONFIG", "AUDSYNC_STATE_URL", "AUDSYNC_SOURCE_URL"):
        monkeypatch.delenv(name, raising=False)


def mentions(call: dict[str, Any], user_id: str) -> bool:
    """Whether a logged Identify or Track call is about ``user_id``."""
    body = call["body"] or {}
    if call["path"].startswith("/admin/identify"):
        return bool(body.get("userId") == user_id)
    if call["path"].startswith("/admin/track"):
        return any(e.get("userId") == user_id for e in body.get("events", []))
    return False


def assert_forgotten(gleap: Sandbox, state_url: str, user_id: str = "alice") -> None:
    """What a user checks after `forget` exited 0: Gleap and the state DB hold nothing."""
    assert gleap.contact(user_id) is None
    calls = gleap.calls()
    deletes = [i for i, c in enumerate(calls) if c["method"] == "DELETE"]
    assert [calls[i]["path"] for i in deletes] == [f"/admin/contacts/{user_id}"]
    after = [c for c in calls[deletes[-1] :] if mentions(c, user_id)]
    assert after == [], "a call about the user reached Gleap after its DELETE"
    for table in USER_TABLES:
        rows = query(state_url, f"SELECT * FROM {table} WHERE user_id = :u", u=user_id)
        assert rows == [], table
    assert [r["user_id"] for r in query(state_url, "SELECT user_id FROM suppressions")] == [user_id]


def hold_identify(gleap: Sandbox, user_id: str) -> tuple[threading.Event, threading.Event]:
    """Hold ``user_id``'s first Identify inside the sandbox until ``release`` is set."""
    held, release = threading.Event(), threading.Event()

    def on_identify(body: dict[str, Any]) -> None:
        if body.get("userId") == user_id and not held.is_set():
            held.set()
            release.wait(60)

    gleap.on_identify = on_identify
    return held, release


@contextmanager
def forget_waiting_on_a_held_call(
    tmp_path: Path,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    processes: list[Process],
    *,
    events: bool,
) -> Iterator[tuple[Path, Process, Process]]:
    """A sync whose Identify of alice the sandbox holds, and `forget alice` waiting
    on it: yields (config, sync, forget); the call is released on leaving."""
    path = write_config(
        tmp_path,
        base_url=gleap.url,
        source_url=warehouse.url,
        state_url=state_url,
        body=WAREHOUSE_BODY.format(events=str(events).lower(), user_id=USER_ID),
    )
    held, release = hold_identify(gleap, "alice")
    try:
        sync = Process(tmp_path, "sync", "-c", str(path), "sync")
        processes.append(sync)
        wait_for(held.is_set, 30, "alice's Identify to reach the sandbox")
        forget = Process(tmp_path, "forget", "-c", str(path), "forget", "alice")
        processes.append(forget)
        wait_for(lambda: "waiting" in forget.output(), 30, "forget to wait for the call")
        yield path, sync, forget
    finally:
        release.set()


def race_forget_with_a_call_in_flight(
    tmp_path: Path,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    processes: list[Process],
    *,
    events: bool,
) -> Path:
    """Sync alice and user2; forget alice while her Identify is held in the sandbox."""
    warehouse.add(1, vip=True)
    warehouse.add(2, vip=True)
    with forget_waiting_on_a_held_call(
        tmp_path, gleap, warehouse, state_url, processes, events=events
    ) as (path, sync, forget):
        # Held past the grace a stop gives a call in flight: the deliverer must not
        # walk away from alice's call for the forget's sake (Gleap would still
        # apply it after the DELETE), so nothing may happen meanwhile.
        time.sleep(DEFAULT_STOP_GRACE + 1.5)
        assert gleap.calls("/admin/contacts/") == []  # it waits: no DELETE yet
        assert forget.proc.poll() is None
    assert forget.wait(60) == 0, forget.output()
    assert "alice: deleted in Gleap and suppressed" in forget.output()
    assert sync.wait(60) == 0, sync.output()
    assert (gleap.contact("user2") or {}).get("vip") is True
    return path


def test_forget_waits_for_a_call_in_flight(
    tmp_path: Path,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    processes: list[Process],
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    path = race_forget_with_a_call_in_flight(
        tmp_path, gleap, warehouse, state_url, processes, events=False
    )
    # The held Identify landed (and was answered 200) before the DELETE.
    identifies = [c for c in gleap.calls() if mentions(c, "alice")]
    assert [c["status"] for c in identifies] == [200]
    assert_forgotten(gleap, state_url)
    assert_counts_add_up(state_url)

    gleap.reset_calls()  # alice is still in the query
    assert run_cli(capsys, "-c", str(path), "sync", "--full")[0] == 0
    assert {c["user_id"] for c in gleap.calls("/admin/identify")} == {"user2"}
    assert gleap.contact("alice") is None


def test_an_acknowledgement_racing_forget_queues_no_event(
    tmp_path: Path,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    processes: list[Process],
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    path = race_forget_with_a_call_in_flight(
        tmp_path, gleap, warehouse, state_url, processes, events=True
    )
    assert_forgotten(gleap, state_url)
    assert [(e["userId"], e["name"]) for e in gleap.events()] == [("user2", "Audience Entered")]

    warehouse.execute("UPDATE people SET vip = 0")  # both leave: only user2's exit is news
    assert run_cli(capsys, "-c", str(path), "sync", "--force")[0] == 0
    assert [(e["userId"], e["name"]) for e in gleap.events()] == [
        ("user2", "Audience Entered"),
        ("user2", "Audience Exited"),
    ]
    # Only the Identify the forget waited for was ever about alice.
    assert len([c for c in gleap.calls() if mentions(c, "alice")]) == 1
    assert gleap.contact("alice") is None


TWO_AUDIENCES = f"""
[[audiences]]
name = "VIP"
key = "vip"
events = true
sql = "SELECT {USER_ID} AS user_id FROM people WHERE vip = 1"

[[audiences]]
name = "Buyers"
key = "buyers"
sql = "SELECT {USER_ID} AS user_id FROM people WHERE buyer = 1"
"""


def test_a_forget_that_cannot_confirm_exits_1_and_queued_events_stay_unsent(
    tmp_path: Path,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    processes: list[Process],
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    """alice's Audience Entered is queued (Track was down); a new Identify of hers is
    held past the forget's bound. The forget deletes nothing and says why; the
    held call's acknowledgement writes nothing and her queued event never goes out."""
    warehouse.add(1, vip=True)
    warehouse.add(2, vip=True)
    path = write_config(
        tmp_path,
        base_url=gleap.url,
        source_url=warehouse.url,
        state_url=state_url,
        body=TWO_AUDIENCES,
        max_retries=0,
    )
    gleap.fault = lambda method, path, body: (
        (503, {}, {"error": "down"}) if path == "/admin/track" else None
    )
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 1  # Track is down
    gleap.fault = None
    queued = query(state_url, "SELECT user_id FROM event_outbox ORDER BY user_id")
    assert [r["user_id"] for r in queued] == ["alice", "user2"]

    warehouse.add(1, vip=True, buyer=True)  # alice has news: a call to hold
    held, release = hold_identify(gleap, "alice")
    config = load_config(str(path))
    try:
        sync = Process(tmp_path, "sync", "-c", str(path), "sync")
        processes.append(sync)
        wait_for(held.is_set, 30, "alice's Identify to reach the sandbox")
        with make_client(config) as client:
            report = forget(open_state(state_url), client, ["alice"], wait=1.0)
    finally:
        release.set()
    assert report.deleted == [] and "may still be in flight" in report.failed["alice"]
    assert gleap.calls("/admin/contacts/") == []
    assert sync.wait(60) == 0, sync.output()
    assert query(state_url, "SELECT * FROM ledger WHERE audience_key = 'buyers'") == []
    assert [(e["userId"], e["name"]) for e in gleap.events()] == [("user2", "Audience Entered")]

    code, _, err = run_cli(capsys, "-c", str(path), "forget", "alice")  # finishes the job
    assert code == 0, err
    assert_forgotten(gleap, state_url)
    assert [(e["userId"], e["name"]) for e in gleap.events()] == [("user2", "Audience Entered")]
    assert_counts_add_up(state_url)


@pytest.fixture
def pg_source(pg_url: str) -> Iterator[str]:
    """A PostgreSQL source with ``people(id, vip)``: the tests lock it to hold a plan."""
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE people (id TEXT PRIMARY KEY, vip BOOLEAN NOT NULL)"))
    engine.dispose()
    yield pg_url


def source_execute(url: str, sql: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(sql))
    engine.dispose()


def waiting_on_audiences(state_url: str) -> bool:
    """Whether a backend of the state DB waits for the lock on ``audiences``."""
    rows = query(
        state_url,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND query ILIKE '%FROM audiences%'",
    )
    return bool(rows)


@pytest.mark.parametrize("side", ["entered", "exited"])
def test_forget_committed_mid_plan_is_honoured(
    tmp_path: Path,
    gleap: Sandbox,
    pg_source: str,
    state_url: str,
    processes: list[Process],
    capsys: pytest.CaptureFixture[str],
    env: None,
    side: str,
) -> None:
    """A plan of alice's audience is held inside a lock while `forget alice` runs.

    On PostgreSQL state the plan has already diffed (alice is in its changes)
    and waits on a lock of ``audiences`` it reads before writing the outbox;
    the forget commits alice's suppression meanwhile (its wipe may then wait
    for the plan's row locks). On SQLite state a plan is the only writer, so
    the forget comes wholly before or after it.
    """
    users = ["bob", "carol", "dave"] + (["alice"] if side == "exited" else [])
    source_execute(
        pg_source, "INSERT INTO people VALUES " + ", ".join(f"('{u}', true)" for u in users)
    )
    path = write_config(
        tmp_path, base_url=gleap.url, source_url=pg_source, state_url=state_url, body=PG_BODY
    )
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    if side == "exited":
        assert gleap.contact("alice") == {"userId": "alice", "vip": True}
        source_execute(pg_source, "UPDATE people SET vip = false WHERE id = 'alice'")
    else:
        source_execute(pg_source, "INSERT INTO people VALUES ('alice', true)")
    gleap.reset_calls()

    on_pg = state_url.startswith("postgresql")
    source = create_engine(pg_source)
    state = create_engine(state_url)
    source_lock = source.connect()
    state_lock = state.connect()
    try:
        source_lock.begin()
        source_lock.exec_driver_sql("LOCK TABLE people IN ACCESS EXCLUSIVE MODE")
        sync = Process(tmp_path, "sync", "-c", str(path), "sync")
        processes.append(sync)
        wait_for(
            lambda: query(state_url, "SELECT id FROM sync_runs WHERE status = 'planning'"),
            30,
            "the plan to start",
        )
        if on_pg:
            state_lock.begin()
            state_lock.exec_driver_sql("LOCK TABLE audiences IN ACCESS EXCLUSIVE MODE")
            source_lock.commit()  # the query runs, the snapshot loads, the diff is made ...
            wait_for(lambda: waiting_on_audiences(state_url), 30, "the plan to reach the lock")
            forgetting = Process(tmp_path, "forget", "-c", str(path), "forget", "alice")
            processes.append(forgetting)
            wait_for(
                lambda: query(state_url, "SELECT * FROM suppressions WHERE user_id = 'alice'"),
                30,
                "the forget to commit alice's suppression",
            )
            assert sync.proc.poll() is None  # committed mid-plan: the plan is still held
            state_lock.commit()
        else:
            forgetting = Process(tmp_path, "forget", "-c", str(path), "forget", "alice")
            processes.append(forgetting)
            source_lock.commit()
    finally:
        source_lock.close()
        state_lock.close()
        source.dispose()
        state.dispose()
    assert forgetting.wait(60) == 0, forgetting.output()
    assert sync.wait(60) == 0, sync.output()

    assert_forgotten(gleap, state_url)
    if on_pg:  # the plan queued nothing for alice: not `true`, not `false`
        assert [c for c in gleap.calls() if mentions(c, "alice")] == []
    assert_counts_add_up(state_url)
    gleap.reset_calls()
    assert run_cli(capsys, "-c", str(path), "sync", "--full")[0] == 0
    assert {c["user_id"] for c in gleap.calls("/admin/identify")} == {"bob", "carol", "dave"}
    assert gleap.contact("alice") is None


def test_forget_undone_while_it_waits_deletes_nothing(
    tmp_path: Path,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    processes: list[Process],
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    """`forget --undo` during the wait: the user is no longer suppressed, so the
    forget must neither wipe nor delete, and must say so (exit 1)."""
    warehouse.add(1, vip=True)
    with forget_waiting_on_a_held_call(
        tmp_path, gleap, warehouse, state_url, processes, events=False
    ) as (path, sync, forget):
        assert run_cli(capsys, "-c", str(path), "forget", "--undo", "alice")[0] == 0
    assert forget.wait(60) == 1, forget.output()
    assert "forget --undo" in forget.output()
    assert sync.wait(60) == 0, sync.output()
    assert gleap.calls("/admin/contacts/") == []
    assert (gleap.contact("alice") or {}).get("vip") is True
    assert query(state_url, "SELECT user_id FROM ledger") == [{"user_id": "alice"}]
    assert query(state_url, "SELECT user_id FROM suppressions") == []
