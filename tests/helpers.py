"""Reading the state DB and the sandbox the way a user would check them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from audsync.cli import main

TABLES = ("audiences", "ledger", "snapshot", "outbox", "sync_runs", "delivery_failures", "leases")


def query(state_url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = create_engine(state_url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def dump_state(state_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every audsync table (empty when the DB has no schema)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    if state_url.startswith("sqlite:///") and not Path(state_url[10:]).exists():
        return {table: [] for table in TABLES}  # connecting would create the file
    engine = create_engine(state_url)
    try:
        with engine.connect() as conn:
            for table in TABLES:
                try:
                    rows = conn.execute(text(f"SELECT * FROM {table}")).all()
                except Exception:
                    conn.rollback()
                    rows = []
                out[table] = sorted(tuple(map(str, r)) for r in rows)
    finally:
        engine.dispose()
    return out


def ledger(state_url: str) -> dict[tuple[str, str], Any]:
    return {
        (r["audience_key"], r["user_id"]): json.loads(r["value"])
        for r in query(state_url, "SELECT audience_key, user_id, value FROM ledger")
    }


def assert_counts_add_up(state_url: str) -> list[dict[str, Any]]:
    """Every run: queued = delivered + failed + superseded + still pending in the outbox."""
    runs = query(state_url, "SELECT * FROM sync_runs ORDER BY id")
    pending = {
        r["run_id"]: r["n"]
        for r in query(
            state_url,
            "SELECT run_id, COUNT(*) AS n FROM outbox WHERE state = 'pending' GROUP BY run_id",
        )
    }
    for run in runs:
        still = pending.get(run["id"], 0)
        assert run["queued"] == run["delivered"] + run["failed"] + run["superseded"] + still, run
        if run["status"] == "succeeded":
            assert still == 0 and run["failed"] == 0, run
    return runs


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``audsync ARGV`` in-process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
