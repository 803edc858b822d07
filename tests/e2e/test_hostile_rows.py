"""One bad row never stops anything else: ids the state DB or Gleap cannot take are
skipped and counted with their reason, repeats anywhere in the result collapse, and
the rest of the audience and every other audience are delivered (SQLite and
PostgreSQL state alike)."""

from __future__ import annotations

from typing import Any

import pytest

from audsync.defaults import MAX_USER_ID_LENGTH
from audsync.sandbox import Sandbox
from audsync.source import StreamStats
from audsync.values import (
    ID_HAS_CONTROL,
    ID_HAS_NUL,
    ID_NOT_UNICODE,
    ID_TOO_LONG,
    user_id_problem,
)
from tests.helpers import MakeConfig, Warehouse, assert_counts_add_up, query, run_cli


@pytest.mark.parametrize(
    ("user_id", "problem"),
    [
        ("42", None),
        ("user-42@example.com", None),
        ("with space", None),
        ("é" * MAX_USER_ID_LENGTH, None),  # 800 bytes, 400 characters: the limit is characters
        ("x" * MAX_USER_ID_LENGTH, None),
        ("x" * (MAX_USER_ID_LENGTH + 1), ID_TOO_LONG),
        ("a\x00b", ID_HAS_NUL),
        ("\x00", ID_HAS_NUL),
        ("tab\tid", ID_HAS_CONTROL),
        ("line\nbreak", ID_HAS_CONTROL),
        ("del\x7f", ID_HAS_CONTROL),
        ("c1\x85", ID_HAS_CONTROL),
        ("half\ud800", ID_NOT_UNICODE),
        ("\x00" * (MAX_USER_ID_LENGTH + 1), ID_TOO_LONG),  # length is checked first
    ],
)
def test_user_id_problem(user_id: str, problem: str | None) -> None:
    assert user_id_problem(user_id) == problem


def test_invalid_reasons_count_by_reason_with_a_safe_example() -> None:
    stats = StreamStats()
    assert stats.invalid_reasons() is None
    stats.invalid(ID_HAS_NUL, "a\x00b")
    stats.invalid(ID_HAS_NUL, "c\x00d")
    stats.invalid(ID_TOO_LONG, "y" * 500)
    assert stats.invalid_ids == 3
    assert stats.invalid_reasons() == (
        "contains a NUL character: 2 (e.g. 'a\\x00b'); "
        f"longer than 400 characters: 1 (e.g. '{'y' * 40}'…)"
    )


# Ids as a SQLite source hands them over. Sorted by their text the source gives
# 42, 42-1, 42.0: the float 42.0 becomes "42" again two rows after the first.
HOSTILE = """
[[audiences]]
name = "Odd"
sql = \"\"\"
SELECT 42 AS user_id, 'first' AS note
UNION ALL SELECT '42-1', 'x' UNION ALL SELECT 42.0, 'second'
UNION ALL SELECT 'a' || char(0) || 'b', 'x'
UNION ALL SELECT replace(hex(zeroblob(401)), '00', 'x'), 'x'
UNION ALL SELECT replace(hex(zeroblob(400)), '00', 'é'), 'x'
UNION ALL SELECT 'tab' || char(9) || 'id', 'x'
UNION ALL SELECT 'ok', 'x' UNION ALL SELECT 7, 'x' UNION ALL SELECT '7', 'x'
\"\"\"

[[audiences]]
name = "VIP"
sql = "SELECT id AS user_id FROM people WHERE vip = 1"
"""

ODD_MEMBERS = {"42", "42-1", "é" * 400, "ok", "7"}


def test_hostile_ids_are_skipped_and_counted_and_everything_else_is_delivered(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(1, 6):
        warehouse.add(i, vip=i % 2 == 1)
    path, _ = make_config(body=HOSTILE)

    # The daemon's start-up sync: a clean exit, not a crash (README: run exits 0).
    code, _, err = run_cli(capsys, "-c", str(path), "run", "--once")
    assert code == 0, err
    assert "Traceback" not in err

    contacts = gleap.contacts()
    assert {u for u, c in contacts.items() if c.get("odd") is True} == ODD_MEMBERS
    assert {u for u, c in contacts.items() if c.get("vip") is True} == {"1", "3", "5"}
    assert contacts["42"]["note"] == "first"  # the first row of a repeated id wins
    runs = {r["audience_key"]: r for r in query(state_url, "SELECT * FROM sync_runs")}
    odd = runs["odd"]
    assert odd["status"] == "succeeded"
    assert (odd["members"], odd["delivered"]) == (5, 5)
    assert (odd["skipped_ids"], odd["duplicate_ids"], odd["invalid_ids"]) == (0, 2, 3)
    reasons = odd["invalid_reasons"]
    assert "contains a NUL character: 1 (e.g. 'a\\x00b')" in reasons
    assert "contains a control character: 1 (e.g. 'tab\\tid')" in reasons
    assert f"longer than 400 characters: 1 (e.g. '{'x' * 40}'…)" in reasons
    assert odd["error"] is None
    assert runs["vip"]["status"] == "succeeded" and runs["vip"]["delivered"] == 3

    # Planning again finds the same rows and queues nothing: no crash loop either.
    code, out, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    latest = query(state_url, "SELECT * FROM sync_runs WHERE audience_key = 'odd' ORDER BY id")
    assert (latest[-1]["queued"], latest[-1]["invalid_ids"], latest[-1]["status"]) == (
        0,
        3,
        "succeeded",
    )
    assert_counts_add_up(state_url)

    code, out, _ = run_cli(capsys, "-c", str(path), "history", "--audience", "odd")
    assert code == 0
    header = out.splitlines()[0].split()
    assert {"skipped_ids", "duplicate_ids", "invalid_ids", "invalid_reasons"} <= set(header)
    assert "contains a NUL character: 1 (e.g. 'a\\x00b')" in out


NONADJACENT = """
[[audiences]]
name = "Mixed"
sql = "SELECT id AS user_id FROM mixed"
"""


def test_repeats_far_apart_in_the_source_order_collapse(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Numbers stored as text and as numbers sort apart but are one id to us; more
    of them than a chunk holds, so the loader must set some aside more than once."""
    with warehouse.connect() as db:
        db.execute("CREATE TABLE mixed (id)")  # no type affinity: each value keeps its type
        rows: list[tuple[Any]] = []
        for i in range(1, 301):
            rows += [(i,), (f"{i}-x",), (float(i),)]
        db.executemany("INSERT INTO mixed VALUES (?)", rows)
    path, _ = make_config(body=NONADJACENT, extra="[sync]\nchunk_size = 50\n")
    code, _, err = run_cli(capsys, "-c", str(path), "sync")
    assert code == 0, err
    (run,) = query(state_url, "SELECT * FROM sync_runs")
    assert (run["members"], run["duplicate_ids"], run["invalid_ids"]) == (600, 300, 0)
    expected = {str(i) for i in range(1, 301)} | {f"{i}-x" for i in range(1, 301)}
    assert set(gleap.contacts()) == expected
    assert_counts_add_up(state_url)


BAD_UTF8 = """
[[audiences]]
name = "VIP"
sql = "SELECT user_id, email FROM raw_people WHERE vip = 1"
"""


def test_bytes_that_are_not_utf8_fail_their_row_alone(
    make_config: MakeConfig,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Found by review: one TEXT value of invalid UTF-8 in a SQLite source made the
    driver fail the whole query, and the error carried the row's value."""
    warehouse.execute("CREATE TABLE raw_people (user_id TEXT, email TEXT, vip INTEGER)")
    for i in range(1, 6):
        warehouse.execute("INSERT INTO raw_people VALUES (?, ?, 1)", str(i), f"p{i}@x.io")
    warehouse.execute("INSERT INTO raw_people VALUES ('6', CAST(X'66ff6f' AS TEXT), 1)")
    warehouse.execute("INSERT INTO raw_people VALUES (CAST(X'31ff32' AS TEXT), 'z@x.io', 1)")
    path, _ = make_config(body=BAD_UTF8)

    code, _, err = run_cli(capsys, "-c", str(path), "sync")
    assert "Traceback" not in err and "decode" not in err, err
    contacts = gleap.contacts()
    assert {u for u, c in contacts.items() if c.get("vip") is True} == {"1", "2", "3", "4", "5"}
    run = query(state_url, "SELECT * FROM sync_runs WHERE audience_key = 'vip'")[0]
    assert (run["members"], run["delivered"], run["failed"], run["invalid_ids"]) == (6, 5, 1, 1)
    assert "not valid Unicode" in run["invalid_reasons"]
    assert run["status"] == "partial" and code == 0
    failure = query(state_url, "SELECT user_id, reason FROM delivery_failures")
    assert [(f["user_id"], "not valid UTF-8" in f["reason"]) for f in failure] == [("6", True)]
    assert_counts_add_up(state_url)
