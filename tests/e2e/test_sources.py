"""The same audiences on SQLite, PostgreSQL and DuckDB sources give Gleap the same contacts."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from audsync.cli import main
from audsync.sandbox import Sandbox
from tests.helpers import PG_URL, TOKEN, fresh_pg_database, write_config

ROWS = [
    (i, f"p{i}@x.io", i % 3 == 0, i % 2 == 0, None if i % 5 == 0 else round(i * 1.25, 2))
    for i in range(1, 41)
]

BODY = """
[[audiences]]
name = "VIP"
sql = "SELECT id AS user_id, email FROM people WHERE vip"

[[audiences]]
name = "Buyers"
sql = "SELECT id AS user_id FROM people WHERE buyer"

[[traits]]
name = "Revenue"
sql = "SELECT id AS user_id, revenue AS value FROM people WHERE revenue IS NOT NULL"
"""


def sqlite_source(tmp_path: Path) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "source.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE people (id INTEGER, email TEXT, vip BOOLEAN, buyer BOOLEAN, revenue REAL)"
    )
    db.executemany("INSERT INTO people VALUES (?, ?, ?, ?, ?)", ROWS)
    db.commit()
    db.close()
    return f"sqlite:///{path}"


def duckdb_source(tmp_path: Path) -> str:
    duckdb = pytest.importorskip("duckdb")
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "source.duckdb"
    db = duckdb.connect(str(path))
    db.execute(
        "CREATE TABLE people (id BIGINT, email VARCHAR, vip BOOLEAN, buyer BOOLEAN,"
        " revenue DECIMAL(10, 2))"
    )
    db.executemany("INSERT INTO people VALUES (?, ?, ?, ?, ?)", ROWS)
    db.close()
    return f"duckdb:///{path}"


def postgres_source(url: str) -> str:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE people (id BIGINT, email TEXT, vip BOOLEAN,"
                " buyer BOOLEAN, revenue NUMERIC(10, 2))"
            )
        )
        conn.execute(
            text("INSERT INTO people VALUES (:i, :e, :v, :b, :r)"),
            [{"i": i, "e": e, "v": v, "b": b, "r": r} for i, e, v, b, r in ROWS],
        )
    engine.dispose()
    return url


def sync_from(source_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    with Sandbox(TOKEN) as gleap:
        path = write_config(
            tmp_path,
            base_url=gleap.url,
            source_url=source_url,
            state_url=f"sqlite:///{tmp_path / 'state.db'}",
            body=BODY,
        )
        assert main(["-c", str(path), "sync"]) == 0
        return gleap.contacts()


@pytest.mark.parametrize("engine", ["duckdb", "postgres"])
def test_same_contacts_from_every_engine(
    engine: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    reference = sync_from(sqlite_source(tmp_path / "a"), tmp_path / "a", monkeypatch)
    assert len(reference) == 40 - len([r for r in ROWS if not r[2] and not r[3] and r[4] is None])
    assert reference["3"] == {"userId": "3", "email": "p3@x.io", "vip": True, "revenue": 3.75}
    other_dir = tmp_path / "b"
    if engine == "duckdb":
        other = sync_from(duckdb_source(other_dir), other_dir, monkeypatch)
    else:
        if not PG_URL:
            pytest.skip("AUDSYNC_TEST_POSTGRES_URL is not set")
        other_dir.mkdir()
        gen = fresh_pg_database()
        url = next(gen)
        try:
            other = sync_from(postgres_source(url), other_dir, monkeypatch)
        finally:
            gen.close()
    assert other == reference
