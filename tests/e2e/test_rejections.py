"""Rejections: a Gleap that rejects everything is an outage, max_attempts bounds a user's
attempts, and one bad Track event never takes other events down with it."""

from __future__ import annotations

import datetime as dt
import json
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, insert

from audsync import models
from audsync.defaults import DEFAULT_CONCURRENCY
from audsync.gleap import GleapClient
from audsync.outage import misrouted, outage_verdict
from audsync.sandbox import Sandbox
from tests.helpers import (
    TOKEN,
    MakeConfig,
    Process,
    Receiver,
    Warehouse,
    assert_counts_add_up,
    query,
    run_cli,
    source_mismatches,
    wait_for,
    write_config,
)

OUTAGE_BODY = """
[[audiences]]
name = "VIP Customers"
sql = "SELECT id AS user_id, email FROM people WHERE vip = 1"

[[traits]]
name = "Revenue"
sql = "SELECT id AS user_id, revenue AS value FROM people WHERE revenue IS NOT NULL"
"""


def users(n: int, status: int | None = 400) -> dict[str, int | None]:
    return {str(i): status for i in range(n)}


@pytest.mark.parametrize(
    ("fresh", "known", "acked", "finished", "outage"),
    [
        (users(20), {}, False, False, True),  # the first 20 users all rejected
        (users(19), {}, False, False, False),  # not yet: wait for more
        (users(20), {}, True, False, False),  # Gleap acknowledged one: those users are bad
        (users(19), users(30), False, False, False),  # rejected before: no evidence
        (users(3, 301), {}, False, True, True),  # a drain of redirects only
        (users(1, 404), {}, False, True, True),  # no such route, even for one user
        ({"a": 301, "b": 400}, {}, False, True, False),  # a 400 may be that user's
        (users(5, 400), {}, False, True, False),  # a few bad users alone in a drain
        (users(5, 413), {}, False, True, False),
        ({}, users(2, 302), False, True, True),  # known users, but redirected
        ({}, users(25, 400), False, True, False),  # retry-failed of known-bad users
        ({}, {}, False, True, False),
        (users(3, 301), {}, True, True, False),
    ],
)
def test_outage_verdict(
    fresh: dict[str, int | None],
    known: dict[str, int | None],
    acked: bool,
    finished: bool,
    outage: bool,
) -> None:
    assert outage_verdict(fresh, known, acked, finished=finished) is outage


@pytest.mark.parametrize(
    ("fresh", "minimum", "outage"),
    [(users(1, 400), 2, False), (users(2, 400), 2, True), (users(1, 413), None, False)],
)
def test_outage_verdict_minimum_for_events(
    fresh: dict[str, int | None], minimum: int | None, outage: bool
) -> None:
    assert outage_verdict(fresh, {}, False, finished=True, minimum=minimum) is outage


@pytest.mark.parametrize(
    ("status", "expected"),
    [(301, True), (308, True), (404, True), (405, True), (400, False), (413, False), (None, False)],
)
def test_misrouted(status: int | None, expected: bool) -> None:
    assert misrouted(status) is expected


def test_a_redirect_is_a_rejection_never_followed(gleap: Sandbox) -> None:
    target = f"{gleap.url}/admin/elsewhere/identify"
    gleap.fault = lambda method, path, body: (
        (301, {"Location": target}, {}) if path == "/admin/identify" else None
    )
    with GleapClient(gleap.url, TOKEN) as client:
        outcome = client.identify({"userId": "1", "vip": True})
    assert (outcome.ok, outcome.status) == (False, 301)
    assert outcome.reason is not None and "redirect" in outcome.reason and target in outcome.reason
    assert [c["path"] for c in gleap.calls()] == ["/admin/identify"]  # not followed
    assert client.stats.rejected == 1 and client.stats.ok == 0


def answer_every_identify(status: int, gleap: Sandbox) -> Any:
    headers = {"Location": f"{gleap.url}/v2/admin/identify"} if 300 <= status < 400 else {}

    def fault(method: str, path: str, body: Any) -> Any:
        if path == "/admin/identify":
            return status, headers, {"error": f"nope {status}"}
        return None

    return fault


@pytest.mark.parametrize("status", [301, 400, 413])
def test_gleap_rejecting_every_call_is_an_outage_and_nothing_is_blamed(
    status: int,
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
    receiver: Receiver,
) -> None:
    for i in range(1, 61):
        warehouse.add(i, vip=True, revenue=float(i))
    path, _ = make_config(body=OUTAGE_BODY, extra=f'[alerts]\nwebhook_url = "{receiver.url}"\n')
    gleap.fault = answer_every_identify(status, gleap)
    code, _out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert f"HTTP {status}" in line and "POST /admin/identify" in line, err
    assert TOKEN not in err
    if status == 301:
        assert "redirect" in line
    # Stopped after the first users (and those already in flight), not after all sixty.
    assert len(gleap.calls("/admin/identify")) < 60
    runs = query(state_url, "SELECT * FROM sync_runs ORDER BY id")
    assert {r["status"] for r in runs} == {"failed"}
    assert all(f"HTTP {status}" in r["error"] and TOKEN not in r["error"] for r in runs)
    assert sorted((m["audience"], m["event"]) for m in receiver.received) == [
        ("revenue", "failing"),
        ("vip_customers", "failing"),
    ]
    assert TOKEN not in json.dumps(receiver.received)
    # Nobody blamed: every change still pending, no attempt spent, no failure row.
    outbox = query(state_url, "SELECT state, attempts, run_id FROM outbox")
    assert len(outbox) == 120
    assert {(r["state"], r["attempts"]) for r in outbox} == {("pending", 0)}
    assert query(state_url, "SELECT * FROM delivery_failures") == []
    assert_counts_add_up(state_url)
    code, out, _ = run_cli(capsys, "-c", str(path), "status", "--json")
    assert {a["last_status"] for a in json.loads(out)["audiences"]} == {"failed"}

    gleap.fault = None  # Gleap (or the base_url) is fixed
    code, _out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    assert source_mismatches(gleap, warehouse) == []
    assert query(state_url, "SELECT * FROM outbox") == []
    assert sorted(m["event"] for m in receiver.received[2:]) == ["recovered", "recovered"]
    assert_counts_add_up(state_url)


@pytest.mark.parametrize(("status", "outage"), [(301, True), (400, False)])
def test_a_small_drain_of_rejections_is_an_outage_only_when_redirected(
    status: int,
    outage: bool,
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(1, 4):
        warehouse.add(i, vip=True)
    path, _ = make_config(body=OUTAGE_BODY.split("[[traits]]")[0])
    gleap.fault = answer_every_identify(status, gleap)
    code, _out, err = run_cli(capsys, "-c", str(path), "sync")
    failures = query(state_url, "SELECT user_id, http_status FROM delivery_failures")
    outbox = query(state_url, "SELECT state, attempts FROM outbox")
    (run,) = query(state_url, "SELECT * FROM sync_runs")
    if outage:
        assert code == 1 and "redirect" in err
        assert failures == [] and {(r["state"], r["attempts"]) for r in outbox} == {("pending", 0)}
        assert run["status"] == "failed"
    else:  # three users Gleap refuses are those users' problem: recorded, retried later
        assert code == 0, err
        assert sorted(f["user_id"] for f in failures) == ["1", "2", "3"]
        assert {(r["state"], r["attempts"]) for r in outbox} == {("pending", 1)}
        assert (run["status"], run["failed"]) == ("partial", 3)
    assert_counts_add_up(state_url)


def user_calls(gleap: Sandbox, user_id: str) -> int:
    return len([c for c in gleap.calls("/admin/identify") if c["user_id"] == user_id])


def test_max_attempts_bounds_a_rejected_user_whatever_the_value_does(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(1, 11):
        warehouse.add(i, vip=True, revenue=float(i))
    gleap.reject_users = {"4"}
    path, _ = make_config(body=OUTAGE_BODY, extra="[sync]\nmax_attempts = 3\n")

    def sync_with_a_new_value(run: int) -> None:
        warehouse.execute("UPDATE people SET revenue = ? WHERE id = 4", 1000.0 + run)
        code, _out, err = run_cli(capsys, "-c", str(path), "sync")
        assert code == 0, err

    states = []
    for run in range(1, 7):
        sync_with_a_new_value(run)
        rows = query(state_url, "SELECT state, attempts FROM outbox WHERE user_id = '4'")
        states.append({(r["state"], r["attempts"]) for r in rows})
    assert user_calls(gleap, "4") == 3  # not one per run, though the value kept changing
    assert states == [
        {("pending", 1)},  # retries left: not parked
        {("pending", 2)},
        {("failed", 3)},  # parked on the last attempt
        {("failed", 3)},
        {("failed", 3)},
        {("failed", 3)},
    ]
    assert len(query(state_url, "SELECT * FROM delivery_failures WHERE user_id = '4'")) == 6
    runs = assert_counts_add_up(state_url)
    assert [r["failed"] for r in runs if r["audience_key"] == "revenue"] == [1, 1, 1, 0, 0, 0]
    code, out, _ = run_cli(capsys, "-c", str(path), "status", "--json")
    assert code == 0

    # --full starts the count over: one more attempt, and the user has retries again.
    assert run_cli(capsys, "-c", str(path), "sync", "--full")[0] == 0
    assert user_calls(gleap, "4") == 4
    rows = query(state_url, "SELECT state, attempts FROM outbox WHERE user_id = '4'")
    assert {(r["state"], r["attempts"]) for r in rows} == {("pending", 1)}

    # retry-failed takes the waiting changes too, and the next sync sends the latest value.
    gleap.reject_users = set()
    code, out, err = run_cli(capsys, "-c", str(path), "retry-failed")
    assert code == 0, err
    assert out.count(": 1 rejected changes queued again") == 2, out
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    contact = gleap.contact("4") or {}
    assert (contact.get("vip_customers"), contact.get("revenue")) == (True, 1006.0)
    assert query(state_url, "SELECT * FROM outbox") == []
    assert_counts_add_up(state_url)


def test_an_acknowledgement_starts_the_count_over(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(1, 6):
        warehouse.add(i, vip=True, revenue=float(i))
    gleap.reject_users = {"4"}
    path, _ = make_config(body=OUTAGE_BODY, extra="[sync]\nmax_attempts = 2\n")
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    gleap.reject_users = set()
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0  # attempt 2 acknowledged
    assert query(state_url, "SELECT * FROM outbox") == []
    gleap.reject_users = {"4"}
    warehouse.execute("UPDATE people SET revenue = 99 WHERE id = 4")
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    rows = query(state_url, "SELECT state, attempts FROM outbox WHERE user_id = '4'")
    assert {(r["state"], r["attempts"]) for r in rows} == {("pending", 1)}  # not parked


EVENTS_BODY = """
[[audiences]]
name = "VIP"
events = true
sql = "SELECT id AS user_id FROM people WHERE vip = 1"
"""


def refuse_track_of(user_id: str) -> Any:
    def fault(method: str, path: str, body: Any) -> Any:
        if path == "/admin/track" and any(e.get("userId") == user_id for e in body["events"]):
            return 400, {}, {"error": f"event of {user_id} refused"}
        return None

    return fault


def test_one_rejected_event_is_isolated_and_the_rest_delivered(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(1, 151):
        warehouse.add(i, vip=True)
    path, _ = make_config(body=EVENTS_BODY)
    gleap.fault = refuse_track_of("37")
    code, _out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    delivered = sorted(int(e["userId"]) for e in gleap.events())
    assert delivered == [i for i in range(1, 151) if i != 37]
    (failure,) = query(state_url, "SELECT * FROM delivery_failures")
    assert (failure["user_id"], failure["audience_key"], failure["http_status"]) == (
        "37",
        "vip",
        400,
    )
    assert "Audience Entered" in failure["reason"] and "event of 37 refused" in failure["reason"]
    assert query(state_url, "SELECT * FROM event_outbox") == []
    # Bisecting 100 events to one costs a handful of calls, not one per event.
    assert len(gleap.calls("/admin/track")) <= 20


def test_an_unbuildable_event_is_recorded_not_silently_dropped(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    warehouse.add(1, vip=True)
    path, _ = make_config(body=EVENTS_BODY)
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    engine = create_engine(state_url)
    with engine.begin() as conn:  # a row whose user id is empty: no Track body can carry it
        conn.execute(
            insert(models.event_outbox).values(
                audience_key="vip",
                user_id="",
                name="Audience Entered",
                data="{}",
                occurred_at=dt.datetime(2026, 1, 1),
                run_id=1,
            )
        )
    engine.dispose()
    warehouse.add(2, vip=True)
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    assert sorted(e["userId"] for e in gleap.events()) == ["1", "2"]
    (failure,) = query(state_url, "SELECT * FROM delivery_failures")
    assert failure["http_status"] is None and "no userId" in failure["reason"]
    assert query(state_url, "SELECT * FROM event_outbox") == []


def test_gleap_rejecting_every_track_call_keeps_the_events(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(1, 31):
        warehouse.add(i, vip=True)
    path, _ = make_config(body=EVENTS_BODY)
    gleap.fault = lambda method, path, body: (
        (413, {}, {"error": "too large"}) if path == "/admin/track" else None
    )
    code, _out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 1
    assert "HTTP 413" in err and "POST /admin/track" in err and TOKEN not in err
    assert len(query(state_url, "SELECT * FROM event_outbox")) == 30
    assert query(state_url, "SELECT * FROM delivery_failures") == []
    assert gleap.events() == []

    gleap.fault = None
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    assert sorted(int(e["userId"]) for e in gleap.events()) == list(range(1, 31))
    assert query(state_url, "SELECT * FROM event_outbox") == []


@pytest.mark.slow
def test_daemon_stops_on_an_outage_alerts_and_blames_nobody(
    tmp_path: Path,
    warehouse: Warehouse,
    gleap: Sandbox,
    receiver: Receiver,
    processes: list[Process],
) -> None:
    for i in range(1, 61):
        warehouse.add(i, vip=True)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    path = write_config(
        tmp_path,
        base_url=gleap.url,
        source_url=warehouse.url,
        state_url=state_url,
        body=OUTAGE_BODY.split("[[traits]]")[0],
        extra=f'[alerts]\nwebhook_url = "{receiver.url}"\n',
    )
    gleap.fault = answer_every_identify(400, gleap)
    daemon = Process(tmp_path, "daemon", "-c", str(path), "run")
    processes.append(daemon)
    wait_for(lambda: receiver.received, what="the outage alert")
    (alert,) = receiver.received
    assert (alert["audience"], alert["event"]) == ("vip_customers", "failing")
    assert alert["status"] == "failed"
    assert "HTTP 400" in alert["error"] and "POST /admin/identify" in alert["error"]
    assert TOKEN not in alert["error"]
    wait_for(lambda: "delivery stopped" in daemon.output(), what="the log line")
    # It pauses instead of hammering a Gleap that refuses everything.
    assert len(gleap.calls("/admin/identify")) < 60
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=10) == 0
    outbox = query(state_url, "SELECT state, attempts FROM outbox")
    assert len(outbox) == 60 and {(r["state"], r["attempts"]) for r in outbox} == {("pending", 0)}
    assert query(state_url, "SELECT * FROM delivery_failures") == []
    assert TOKEN not in daemon.output()


def test_gleap_that_starts_rejecting_everything_mid_drain_is_an_outage(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
    receiver: Receiver,
) -> None:
    """Found by review: Gleap acknowledged 30 calls, then answered 413 to everything;
    every remaining user was blamed, parked after max_attempts, exit 0, no alert."""
    for i in range(1, 201):
        warehouse.add(i, vip=True)
    path, _ = make_config(
        body=OUTAGE_BODY,
        extra=f'[alerts]\nwebhook_url = "{receiver.url}"\n[sync]\nmax_attempts = 2\n',
    )
    answered = {"n": 0}
    lock = threading.Lock()

    def fault(method: str, path: str, body: Any) -> Any:
        if path != "/admin/identify":
            return None
        with lock:
            answered["n"] += 1
            if answered["n"] <= 30:
                return None
        return 413, {}, {"error": "Request Entity Too Large"}

    gleap.fault = fault
    code, _out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 1, err
    assert "HTTP 413" in err.strip().splitlines()[-1]
    # Only users whose rejection was processed before an acknowledgement still in
    # flight at the switch can have been blamed: a few, never the remaining 170.
    blamed = query(state_url, "SELECT user_id FROM delivery_failures")
    assert len(blamed) <= 4 * DEFAULT_CONCURRENCY
    waiting = query(state_url, "SELECT * FROM outbox WHERE state = 'pending' AND attempts = 0")
    assert len(waiting) >= 200 - 30 - 4 * DEFAULT_CONCURRENCY
    assert "failed" in {r["status"] for r in query(state_url, "SELECT status FROM sync_runs")}
    assert ("vip_customers", "failing") in {(m["audience"], m["event"]) for m in receiver.received}
    assert_counts_add_up(state_url)

    gleap.fault = None  # the next run sends the rest, the few blamed ones included
    code, _out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    assert source_mismatches(gleap, warehouse) == []


def test_a_lowered_max_attempts_parks_what_has_spent_it(
    tmp_path: Path,
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Found by review: a change rejected twice under max_attempts = 3 was sent again
    after the setting was lowered to 1."""
    for i in range(1, 6):
        warehouse.add(i, vip=True, revenue=float(i))
    gleap.reject_users = {"4"}
    path, _ = make_config(body=OUTAGE_BODY, extra="[sync]\nmax_attempts = 3\n")
    for run in (1, 2):
        warehouse.execute("UPDATE people SET revenue = ? WHERE id = 4", 1000.0 + run)
        assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    assert user_calls(gleap, "4") == 2
    path, _ = make_config(body=OUTAGE_BODY, extra="[sync]\nmax_attempts = 1\n")
    warehouse.execute("UPDATE people SET revenue = 2000 WHERE id = 4")
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    assert user_calls(gleap, "4") == 2  # not sent again
    rows = query(state_url, "SELECT state FROM outbox WHERE user_id = '4'")
    assert {r["state"] for r in rows} == {"failed"}
    assert_counts_add_up(state_url)
