"""Track events (payloads, transitions, end to end) and forgetting a user."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from audsync.errors import PayloadError
from audsync.events import transition_event
from audsync.gleap import event_name, track_bodies, track_event
from audsync.sandbox import Sandbox
from tests.helpers import MakeConfig, Warehouse, assert_counts_add_up, query, run_cli

NOW = dt.datetime(2026, 11, 29, 10, 0, 0)


@pytest.mark.parametrize(
    ("name", "sent"),
    [
        ("Audience Entered", "Audience Entered"),
        ("checkout.completed", "checkout-completed"),
        ("$purchase", "-purchase"),
        ("a.b$c", "a-b-c"),
        ("MixedCase", "MixedCase"),
    ],
)
def test_event_name(name: str, sent: str) -> None:
    assert event_name(name) == sent


@pytest.mark.parametrize(
    ("date", "iso"),
    [
        (NOW, "2026-11-29T10:00:00.000Z"),
        (
            dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            "2026-11-29T10:00:00.000Z",
        ),
        ("2026-11-29T05:00:00-05:00", "2026-11-29T10:00:00.000Z"),
        ("2026-11-29T10:00:00Z", "2026-11-29T10:00:00.000Z"),
    ],
)
def test_track_event_dates_are_utc(date: Any, iso: str) -> None:
    event, dropped = track_event("x", "u1", date)
    assert event == {"name": "x", "userId": "u1", "date": iso} and dropped == 0


@pytest.mark.parametrize(
    ("keys", "kept", "dropped"), [(0, 0, 0), (3, 3, 0), (10, 10, 0), (11, 10, 1), (12, 10, 2)]
)
def test_track_event_keeps_ten_data_keys(keys: int, kept: int, dropped: int) -> None:
    data = {f"k{i}": i for i in range(keys)}
    event, lost = track_event("x", "u1", NOW, data)
    assert len(event.get("data", {})) == kept and lost == dropped
    assert list(event.get("data", {})) == list(data)[:kept]


@pytest.mark.parametrize(
    ("name", "user_id", "date", "problem"),
    [
        ("x", None, NOW, "no userId"),
        ("x", "", NOW, "no userId"),
        ("x", "  ", NOW, "no userId"),
        ("", "u1", NOW, "needs a name"),
        ("x", "u1", None, "needs a date"),
        ("x", "u1", dt.date(2026, 1, 1), "needs a date"),
    ],
)
def test_track_event_refuses(name: str, user_id: str | None, date: Any, problem: str) -> None:
    with pytest.raises(PayloadError, match=problem):
        track_event(name, user_id, date)


@pytest.mark.parametrize(("events", "calls"), [(0, 0), (1, 1), (100, 1), (101, 2), (250, 3)])
def test_track_bodies_hold_at_most_100(events: int, calls: int) -> None:
    bodies = track_bodies([{"n": i} for i in range(events)])
    assert len(bodies) == calls
    assert sum(len(b["events"]) for b in bodies) == events
    assert all(len(b["events"]) <= 100 for b in bodies)


@pytest.mark.parametrize(
    ("kind", "old", "new", "event"),
    [
        ("audience", None, "true", ("Audience Entered", {"audience_key": "k", "k": True})),
        ("audience", "false", "true", ("Audience Entered", {"audience_key": "k", "k": True})),
        ("audience", "true", "false", ("Audience Exited", {"audience_key": "k", "k": False})),
        ("audience", "true", "true", None),  # a repeated ack is no transition
        ("audience", "false", "false", None),
        ("audience", None, "false", None),
        ("trait", None, "12.5", ("Trait Computed", {"trait_key": "k", "k": 12.5})),
        ("trait", "12.5", "13", ("Trait Computed", {"trait_key": "k", "k": 13})),
        ("trait", "13", "null", ("Trait Computed", {"trait_key": "k", "k": None})),
        ("trait", "13", "13", None),
        ("trait", None, "null", None),
        ("trait", '"gold"', '"silver"', ("Trait Computed", {"trait_key": "k", "k": "silver"})),
    ],
)
def test_transition_event(
    kind: Any, old: str | None, new: str, event: tuple[str, dict[str, Any]] | None
) -> None:
    assert transition_event(kind, "k", old, new) == event


EVENTS_BODY = """
[[audiences]]
name = "VIP"
events = true
sql = "SELECT id AS user_id FROM people WHERE vip = 1"

[[audiences]]
name = "Buyers"
sql = "SELECT id AS user_id FROM people WHERE buyer = 1"

[[traits]]
name = "Revenue"
events = true
sql = "SELECT id AS user_id, revenue AS value FROM people WHERE revenue IS NOT NULL"
"""


def test_engage_style_events_once_per_transition(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with warehouse.connect() as db:
        db.executemany(
            "INSERT INTO people (id, vip, buyer, revenue) VALUES (?, ?, ?, ?)",
            [(i, 1, i % 2, float(i) if i <= 20 else None) for i in range(1, 251)],
        )
    path, _ = make_config(body=EVENTS_BODY)
    assert run_cli(capsys, "-c", str(path), "sync", "--dry-run")[0] == 0
    assert gleap.events() == [] and gleap.calls() == []

    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    events = gleap.events()
    entered = [e for e in events if e["name"] == "Audience Entered"]
    assert sorted(e["userId"] for e in entered) == sorted(str(i) for i in range(1, 251))
    assert entered[0]["data"] == {"audience_key": "vip", "vip": True}
    computed = [e for e in events if e["name"] == "Trait Computed"]
    assert {e["userId"]: e["data"]["revenue"] for e in computed} == {
        str(i): i for i in range(1, 21)
    }
    assert all(e["date"].endswith("Z") for e in events)
    track_calls = gleap.calls("/admin/track")
    assert all(len(c["body"]["events"]) <= 100 for c in track_calls)
    assert len(track_calls) == 3  # 270 events in calls of up to 100
    assert not [e for e in events if "buyers" in (e["data"] or {})]  # events off for buyers

    gleap.reset_calls()
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    assert len(gleap.events()) == len(events)  # nothing changed: no new event

    warehouse.execute("UPDATE people SET vip = 0 WHERE id = 7")
    warehouse.execute("UPDATE people SET revenue = NULL WHERE id = 3")
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    new = gleap.events()[len(events) :]
    assert sorted((e["name"], e["userId"]) for e in new) == [
        ("Audience Exited", "7"),
        ("Trait Computed", "3"),
    ]
    assert [e["data"] for e in new if e["userId"] == "3"] == [
        {"trait_key": "revenue", "revenue": None}
    ]
    assert query(state_url, "SELECT * FROM event_outbox") == []
    assert_counts_add_up(state_url)


def test_forget_deletes_suppresses_and_undo_lifts(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(1, 6):
        warehouse.add(i, vip=True, revenue=float(i))
    weird = "user/7 x?&é"
    body = EVENTS_BODY.replace(
        "SELECT id AS user_id FROM people WHERE vip = 1",
        f"SELECT id AS user_id FROM people WHERE vip = 1 UNION ALL SELECT '{weird}'",
    )
    path, _ = make_config(body=body)
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    assert gleap.contact("2") is not None and gleap.contact(weird) is not None

    code, out, _ = run_cli(capsys, "-c", str(path), "forget", "2", weird)
    assert code == 0, out
    deletes = [c for c in gleap.calls() if c["method"] == "DELETE"]
    assert [c["path"] for c in deletes] == [
        "/admin/contacts/2",
        "/admin/contacts/user%2F7%20x%3F%26%C3%A9",
    ]
    assert gleap.contact("2") is None and gleap.contact(weird) is None
    for table in ("ledger", "outbox", "snapshot", "delivery_failures", "event_outbox"):
        assert query(state_url, f"SELECT * FROM {table} WHERE user_id IN ('2', :w)", w=weird) == []

    gleap.reset_calls()
    events_before = len(gleap.events())
    assert run_cli(capsys, "-c", str(path), "sync", "--full")[0] == 0
    sent = {c["user_id"] for c in gleap.calls("/admin/identify")}
    assert sent == {"1", "3", "4", "5"}  # 2 and the weird id are still in the query
    assert gleap.events()[events_before:] == []  # a full resync re-asserts, no transitions

    code, out, _ = run_cli(capsys, "-c", str(path), "forget", "--list")
    assert code == 0 and "2" in out and weird in out
    forget_runs = query(state_url, "SELECT * FROM sync_runs WHERE mode = 'forget'")
    assert [(r["status"], r["members"], r["delivered"]) for r in forget_runs] == [
        ("succeeded", 2, 2)
    ]

    code, out, _ = run_cli(capsys, "-c", str(path), "forget", "--undo", "2")
    assert code == 0 and "2: no longer suppressed" in out
    gleap.reset_calls()
    assert run_cli(capsys, "-c", str(path), "sync")[0] == 0
    assert {c["user_id"] for c in gleap.calls("/admin/identify")} == {"2"}
    assert gleap.contact("2")["vip"] is True  # type: ignore[index]
