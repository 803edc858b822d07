"""Shared fixtures: a real Gleap sandbox, real SQLite files and (when set) real PostgreSQL."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from audsync.config import Config, load_config
from audsync.sandbox import Sandbox

TOKEN = "test-token-5ecr3t-value"
PG_URL = os.environ.get("AUDSYNC_TEST_POSTGRES_URL")


@pytest.fixture
def gleap() -> Iterator[Sandbox]:
    """A Gleap sandbox with no rate limit (tests that need one build their own)."""
    with Sandbox(TOKEN, seed=1) as server:
        yield server


def _fresh_pg_database() -> Iterator[str]:
    assert PG_URL is not None
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"audsync_t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new, empty PostgreSQL database (skipped without AUDSYNC_TEST_POSTGRES_URL)."""
    if not PG_URL:
        pytest.skip("AUDSYNC_TEST_POSTGRES_URL is not set")
    yield from _fresh_pg_database()


@pytest.fixture(params=["sqlite", "postgres"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The state DB URL: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    if not PG_URL:
        pytest.skip("AUDSYNC_TEST_POSTGRES_URL is not set")
    yield from _fresh_pg_database()


class Warehouse:
    """A SQLite source database with a ``people`` table the tests edit between syncs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        with self.connect() as db:
            db.executescript(
                "CREATE TABLE people (id INTEGER PRIMARY KEY, email TEXT, first_name TEXT,"
                " last_name TEXT, vip INTEGER DEFAULT 0, buyer INTEGER DEFAULT 0,"
                " revenue REAL);"
            )

    def connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None)

    def add(
        self,
        user_id: int,
        *,
        vip: bool = False,
        buyer: bool = False,
        revenue: float | None = None,
        first_name: str | None = None,
    ) -> None:
        with self.connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO people VALUES (?, ?, ?, NULL, ?, ?, ?)",
                (
                    user_id,
                    f"p{user_id}@example.com",
                    first_name or f"P{user_id}",
                    int(vip),
                    int(buyer),
                    revenue,
                ),
            )

    def execute(self, sql: str, *params: Any) -> None:
        with self.connect() as db:
            db.execute(sql, params)

    def members(self, column: str) -> set[str]:
        with self.connect() as db:
            return {str(r[0]) for r in db.execute(f"SELECT id FROM people WHERE {column} = 1")}

    def revenue(self) -> dict[str, float]:
        with self.connect() as db:
            rows = db.execute("SELECT id, revenue FROM people WHERE revenue IS NOT NULL")
            return {str(i): v for i, v in rows}


@pytest.fixture
def warehouse(tmp_path: Path) -> Warehouse:
    return Warehouse(tmp_path / "warehouse.db")


AUDIENCES = """
[[audiences]]
name = "VIP Customers"
sql = "SELECT id AS user_id, email, first_name, last_name FROM people WHERE vip = 1"

[[audiences]]
name = "Buyers"
sql = "SELECT id AS user_id FROM people WHERE buyer = 1"

[[traits]]
name = "Revenue"
sql = "SELECT id AS user_id, revenue AS value FROM people WHERE revenue IS NOT NULL"
"""


def write_config(
    tmp_path: Path,
    *,
    base_url: str,
    source_url: str,
    state_url: str,
    body: str = AUDIENCES,
    gleap_extra: str = "",
    state_extra: str = "",
    extra: str = "",
    name: str = "audsync.toml",
    rate_limit: int = 100000,
    rate_window: str = "60s",
    max_retries: int = 3,
) -> Path:
    """A config file; the defaults leave pacing out of the way and fail fast."""
    path = tmp_path / name
    path.write_text(
        f'[gleap]\nbase_url = "{base_url}"\nrate_limit = {rate_limit}\n'
        f'rate_window = "{rate_window}"\nmax_retries = {max_retries}\n{gleap_extra}\n'
        f'[source]\nurl = "{source_url}"\n[state]\nurl = "{state_url}"\n{state_extra}\n'
        f"{extra}\n{body}",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def make_config(
    tmp_path: Path,
    gleap: Sandbox,
    warehouse: Warehouse,
    state_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Any:
    """Write a config for the sandbox + warehouse + state DB; returns (path, Config)."""
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    for name in (
        "AUDSYNC_CONFIG",
        "AUDSYNC_STATE_URL",
        "AUDSYNC_SOURCE_URL",
        "AUDSYNC_GLEAP_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)

    def make(**kwargs: Any) -> tuple[Path, Config]:
        path = write_config(
            tmp_path, base_url=gleap.url, source_url=warehouse.url, state_url=state_url, **kwargs
        )
        return path, load_config(str(path))

    return make


def source_mismatches(gleap: Sandbox, warehouse: Warehouse) -> list[tuple[str, str, Any]]:
    """Where Gleap differs from the source for the AUDIENCES config: (user, key, held).

    Members must hold ``true``; others ``false`` or nothing (never told);
    trait holders their value; others ``null`` or nothing.
    """
    contacts = gleap.contacts()
    vip, buyers, revenue = warehouse.members("vip"), warehouse.members("buyer"), warehouse.revenue()
    wrong = []
    for user_id in set(contacts) | vip | buyers | set(revenue):
        contact = contacts.get(user_id, {})
        for key, members in (("vip_customers", vip), ("buyers", buyers)):
            held = contact.get(key)
            if held is not (user_id in members) and not (user_id not in members and held is None):
                wrong.append((user_id, key, held))
        if contact.get("revenue") != revenue.get(user_id):
            wrong.append((user_id, "revenue", contact.get("revenue")))
    return wrong


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or condition}")


class Process:
    """``python -m audsync.cli ...`` in its own process, output to a file."""

    def __init__(self, tmp_path: Path, name: str, *argv: str) -> None:
        self.log = tmp_path / f"{name}.log"
        env = {**os.environ, "AUDSYNC_GLEAP_API_TOKEN": TOKEN}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "audsync.cli", *argv],
            stdin=subprocess.DEVNULL,  # never a terminal: nothing may wait for an answer
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
        )

    def output(self) -> str:
        return self.log.read_text()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def seed(warehouse: Warehouse, users: int) -> None:
    with warehouse.connect() as db:
        db.executemany(
            "INSERT INTO people (id, email, vip, buyer, revenue) VALUES (?, ?, ?, ?, ?)",
            [
                (i, f"p{i}@x.io", int(i % 3 == 0), int(i % 2 == 0), float(i) if i % 5 else None)
                for i in range(1, users + 1)
            ],
        )


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Processes a test starts; killed at its end whatever happened."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()
