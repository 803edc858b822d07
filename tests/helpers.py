"""What tests share besides fixtures: the source warehouse, config files, processes,
and reading the state DB and the sandbox the way a user would check them."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Generator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from audsync.cli import main
from audsync.config import Config, Definition
from audsync.history import set_run, start_run
from audsync.plan import PlanResult, plan_definition
from audsync.sandbox import Sandbox
from audsync.state import open_state

TOKEN = "test-token-5ecr3t-value"
PG_URL = os.environ.get("AUDSYNC_TEST_POSTGRES_URL")


def fresh_pg_database() -> Generator[str, None, None]:
    """Create a new, empty PostgreSQL database; drop it afterwards."""
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


MakeConfig = Callable[..., tuple[Path, Config]]
"""The ``make_config`` fixture: write a config for the sandbox, warehouse and state DB."""


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


def plan(
    state: Engine | str,
    source: Engine | str,
    definition: Definition,
    *,
    hand_over: bool = False,
    **kwargs: Any,
) -> PlanResult:
    """Plan ``definition`` in a run of its own, committed, as ``audsync sync`` does.

    ``hand_over`` leaves the run ``delivering`` with its queued count, ready for
    ``deliver()``; keyword arguments go to ``plan_definition``.
    """
    state = open_state(state) if isinstance(state, str) else state
    source = create_engine(source) if isinstance(source, str) else source
    run_id = start_run(state, definition.key, "manual", "?")
    with state.begin() as conn:
        result = plan_definition(conn, source, definition, run_id=run_id, **kwargs)
        if hand_over:
            set_run(conn, run_id, status="delivering", queued=result.queued)
    return result


class Receiver:
    """A local webhook receiver recording the JSON it is sent."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
