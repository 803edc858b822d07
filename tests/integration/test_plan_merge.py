"""Issue 15: an incremental plan merges the query into the previous snapshot, writing
only what moved, and must find exactly what a plan that reloads the snapshot finds."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

from audsync.config import Definition, SyncConfig
from audsync.history import start_run
from audsync.plan import plan_definition
from audsync.state import open_state

CONTACTS = Definition(
    "audience", "Tricky", "tricky", "SELECT id AS user_id, email, plan FROM tricky WHERE keep = 1"
)
TRAIT = Definition("trait", "Score", "score", "SELECT id AS user_id, score AS value FROM tricky")

ROWS = [
    (42, "a@x.io", "pro", 1.5, 1),
    ("42-1", "b@x.io", "free", 2.0, 1),
    ("abc", None, None, None, 1),
    ("abc", "again@x.io", None, 4.0, 1),  # a repeat next to itself
    (None, "no-id@x.io", None, 1.0, 1),
    ("bad\x01id", "ctl@x.io", None, 1.0, 1),
    (7.5, "frac@x.io", "pro", 3.0, 1),
    ("ünï", "u@x.io", 'plan "quoted"', -1.0, 1),
    (10, "ten@x.io", None, 10.0, 1),
    (11, None, None, 11.0, 1),
    (12, "twelve@x.io", None, None, 1),
]


def _source(path: Path) -> Engine:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE tricky (id, email TEXT, plan TEXT, score REAL, keep INTEGER)")
    db.executemany("INSERT INTO tricky VALUES (?, ?, ?, ?, ?)", ROWS)
    db.commit()
    db.close()
    return create_engine(f"sqlite:///{path}")


def _edit(path: Path, *statements: str) -> None:
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


def _committed(state: Engine, source: Engine, definition: Definition) -> None:
    run_id = start_run(state, definition.key, "manual", "?")
    with state.begin() as conn:
        plan_definition(conn, source, definition, run_id=run_id)
        # What the deliverer's acknowledgements leave behind.
        conn.execute(
            text(
                "INSERT INTO ledger (audience_key, user_id, value, contact, acked_at)"
                " SELECT audience_key, user_id, value, contact, queued_at FROM outbox"
                " WHERE audience_key = :k ON CONFLICT (audience_key, user_id) DO UPDATE"
                " SET value = excluded.value, contact = excluded.contact"
            ),
            {"k": definition.key},
        )
        conn.execute(text("DELETE FROM outbox WHERE audience_key = :k"), {"k": definition.key})


def _rolled_back(
    state: Engine, source: Engine, definition: Definition, run_id: int, reload: bool
) -> dict[str, Any]:
    """One incremental plan, rolled back: what it found and wrote. ``reload`` takes the
    path that loads the whole snapshot (in_database falls back to it here)."""
    with state.connect() as conn:
        tx = conn.begin()
        settings = SyncConfig(in_database="auto" if reload else "off")
        result = plan_definition(conn, source, definition, run_id=run_id, settings=settings)
        k = {"k": definition.key}
        found = {
            "result": {
                f.name: getattr(result, f.name)
                for f in dataclasses.fields(result)
                if f.name not in ("seconds", "stats")
            },
            "stats": dataclasses.replace(result.stats, in_database=False),
            "snapshot": sorted(
                conn.execute(
                    text("SELECT user_id, value, contact FROM snapshot WHERE audience_key = :k"),
                    k,
                ).all()
            ),
            "changes": sorted(conn.exec_driver_sql("SELECT * FROM audsync_changes").all()),
            "outbox": sorted(
                conn.execute(
                    text(
                        "SELECT user_id, value, contact, contact_only, run_id, version,"
                        " priority, state, attempts FROM outbox WHERE audience_key = :k"
                    ),
                    k,
                ).all()
            ),
        }
        tx.rollback()
    return found


def test_merge_finds_what_a_reload_finds(state_url: str, tmp_path: Path) -> None:
    state = open_state(state_url)
    path = tmp_path / "tricky.db"
    source = _source(path)
    for definition in (CONTACTS, TRAIT):
        _committed(state, source, definition)  # first plan: the outbox, no snapshot
        _committed(state, source, definition)  # the merge writes the whole snapshot
    steps = [
        (),  # nothing moved: nothing queued
        (
            "UPDATE tricky SET email = 'new@x.io', score = 5.0 WHERE id = 42",
            "UPDATE tricky SET keep = 0, score = NULL WHERE id = 10",
            "INSERT INTO tricky VALUES ('zz', 'zz@x.io', NULL, 8.0, 1)",
            "INSERT INTO tricky VALUES ('0new', NULL, 'p', 9.0, 1)",
            "INSERT INTO tricky VALUES (42.0, 'same-user@x.io', NULL, 1.0, 1)",  # a straggler
            "DELETE FROM tricky WHERE id = 11",
        ),
        ("DELETE FROM tricky",),  # everyone leaves (forced through the breaker below)
    ]
    ledger_edits = [
        # Gleap holds what no snapshot row says: an exit not yet acknowledged, a
        # value the ledger disagrees on, a contact field it never acknowledged.
        "INSERT INTO ledger (audience_key, user_id, value, contact, acked_at)"
        " VALUES ('tricky', 'ghost', 'true', NULL, '2024-01-01'),"
        " ('score', 'ghost', '3', NULL, '2024-01-01')",
        "UPDATE ledger SET value = '99' WHERE audience_key = 'score' AND user_id = '12'",
        "UPDATE ledger SET contact = NULL WHERE audience_key = 'tricky' AND user_id = '7.5'",
    ]
    with state.begin() as conn:
        for statement in ledger_edits:
            conn.exec_driver_sql(statement)
    run_id = start_run(state, "tricky", "manual", "?")
    for statements in steps:
        _edit(path, *statements)
        for definition in (CONTACTS, TRAIT):
            merged = _rolled_back(state, source, definition, run_id, reload=False)
            reloaded = _rolled_back(state, source, definition, run_id, reload=True)
            assert merged == reloaded, (definition.key, statements)
    assert merged["result"]["exited"] > 0 and merged["snapshot"] == []
