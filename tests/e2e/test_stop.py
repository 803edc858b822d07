"""A stop is a stop: `timeout` bounds a whole request, and the first signal ends the
process within seconds whatever Gleap (a trickling answer) or the source (a slow
query) is doing, recording every run's state and losing nothing."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from audsync import locks
from audsync.defaults import DEFAULT_STOP_GRACE
from audsync.errors import GleapUnavailable, Interrupted
from audsync.gleap import GleapClient
from audsync.sandbox import Sandbox
from audsync.state import open_state
from tests.helpers import (
    AUDIENCES,
    TOKEN,
    Process,
    Warehouse,
    assert_counts_add_up,
    query,
    seed,
    source_mismatches,
    wait_for,
    write_config,
)

TRICKLE = 1.0
"""Seconds between the bytes of a trickled answer: Identify's 17-byte answer takes 17 s."""

STOPPED_WITHIN = 10.0
"""What "within a few seconds" must at least mean, on a loaded 2-core machine."""


def test_timeout_is_a_deadline_for_the_whole_request(gleap: Sandbox) -> None:
    gleap.trickle = TRICKLE
    with GleapClient(gleap.url, TOKEN, rate_limit=0, timeout=2.0, max_retries=0) as client:
        started = time.monotonic()
        with pytest.raises(GleapUnavailable, match=r"within 2s"):
            client.identify({"userId": "u1"})
        # Every byte came well inside the 2 s a read may take; the whole answer did not.
        assert time.monotonic() - started < 5
        assert client.stats.network_errors == 1
        # An answer that trickles in under the deadline is complete and accepted.
        gleap.trickle = 0.05
        assert client.identify({"userId": "u2"}).ok
    assert gleap.contact("u2") == {"userId": "u2"}


def test_a_stop_abandons_a_trickling_call_after_the_grace(gleap: Sandbox) -> None:
    arrived = threading.Event()
    stopping = threading.Event()
    gleap.on_identify = lambda body: arrived.set()
    gleap.trickle = TRICKLE
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(client.identify({"userId": "u1"}, stop=stopping.is_set))
        except Interrupted as exc:
            outcome.append(exc)

    with GleapClient(gleap.url, TOKEN, rate_limit=0, timeout=60.0, max_retries=0) as client:
        caller = threading.Thread(target=call)
        caller.start()
        assert arrived.wait(10)
        stopping.set()
        asked = time.monotonic()
        caller.join(15)
        assert not caller.is_alive()
        assert DEFAULT_STOP_GRACE - 0.5 < time.monotonic() - asked < DEFAULT_STOP_GRACE + 2
    assert len(outcome) == 1 and isinstance(outcome[0], Interrupted)


def test_a_stop_lets_a_call_that_answers_within_the_grace_finish(gleap: Sandbox) -> None:
    arrived = threading.Event()
    stopping = threading.Event()

    def hold(body: dict[str, Any]) -> None:
        arrived.set()
        stopping.wait(10)  # answer only once the stop was asked for ...
        time.sleep(DEFAULT_STOP_GRACE / 4)  # ... and a little later, inside the grace

    gleap.on_identify = hold
    with GleapClient(gleap.url, TOKEN, rate_limit=0, timeout=60.0, max_retries=0) as client:
        def stop_once_arrived() -> None:
            if arrived.wait(10):
                stopping.set()

        threading.Timer(0, stop_once_arrived).start()
        outcome = client.identify({"userId": "u1"}, stop=stopping.is_set)
    assert outcome.ok and gleap.contact("u1") == {"userId": "u1"}


@pytest.mark.slow
def test_sigterm_while_answers_trickle_exits_130_within_seconds(
    tmp_path: Path, warehouse: Warehouse, gleap: Sandbox, processes: list[Process]
) -> None:
    seed(warehouse, 60)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    path = write_config(
        tmp_path,
        base_url=gleap.url,
        source_url=warehouse.url,
        state_url=state_url,
        body=AUDIENCES,
        # Long enough that only the stop, not the deadline, can end the calls.
        gleap_extra='timeout = "60s"\n',
    )
    trickling = threading.Event()

    def start_trickling(body: dict[str, Any]) -> None:
        # From the first Identify on, every answer trickles (the token check has
        # been answered by then, untouched).
        gleap.trickle = TRICKLE
        trickling.set()

    gleap.on_identify = start_trickling
    sync = Process(tmp_path, "sync", "-c", str(path), "sync", "--progress", "off")
    processes.append(sync)
    wait_for(trickling.is_set, what="an answer trickling")
    sync.signal(signal.SIGTERM)
    asked = time.monotonic()
    assert sync.wait(timeout=60) == 130, sync.output()
    assert time.monotonic() - asked < STOPPED_WITHIN, sync.output()
    runs = query(state_url, "SELECT audience_key, status, queued FROM sync_runs")
    assert runs and {r["status"] for r in runs if r["queued"]} == {"interrupted"}, runs
    assert query(state_url, "SELECT holder FROM leases WHERE holder IS NOT NULL") == []
    assert_counts_add_up(state_url)

    gleap.on_identify = None
    gleap.trickle = 0.0
    again = Process(tmp_path, "again", "-c", str(path), "sync", "--progress", "off")
    processes.append(again)
    assert again.wait(timeout=60) == 0, again.output()
    assert source_mismatches(gleap, warehouse) == []
    assert_counts_add_up(state_url)


SLOW_AUDIENCE = """
[[audiences]]
name = "Slow"
sql = "SELECT id AS user_id FROM people, (SELECT pg_sleep(30)) AS s"
"""


def _slow_query_running(pg_url: str) -> bool:
    # The query runs under a server-side cursor: pg_stat_activity shows the
    # FETCH, and the backend waits on PgSleep.
    rows = query(
        pg_url,
        "SELECT COUNT(*) AS n FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event = 'PgSleep'",
    )
    return bool(rows[0]["n"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "sig", "code"),
    [
        ("sync", signal.SIGTERM, 130),
        ("sync", signal.SIGINT, 130),
        ("run", signal.SIGTERM, 0),
    ],
)
def test_a_signal_cancels_a_slow_source_query(
    tmp_path: Path,
    pg_url: str,
    gleap: Sandbox,
    processes: list[Process],
    command: str,
    sig: signal.Signals,
    code: int,
) -> None:
    source = create_engine(pg_url)
    with source.begin() as conn:
        conn.execute(text("CREATE TABLE people (id INTEGER PRIMARY KEY)"))
        conn.execute(text("INSERT INTO people SELECT generate_series(1, 10)"))
    source.dispose()
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    path = write_config(
        tmp_path,
        base_url=gleap.url,
        source_url=pg_url,
        state_url=state_url,
        body=SLOW_AUDIENCE,
        extra='[schedule]\ninterval = "1h"\njitter = "0s"\n',
    )
    argv = ["sync", "--progress", "off"] if command == "sync" else ["run"]
    process = Process(tmp_path, command, "-c", str(path), *argv)
    processes.append(process)
    wait_for(lambda: _slow_query_running(pg_url), what="the slow query running")
    assert query(state_url, "SELECT status FROM sync_runs") == [{"status": "planning"}]
    process.signal(sig)
    asked = time.monotonic()
    assert process.wait(timeout=60) == code, process.output()
    assert time.monotonic() - asked < STOPPED_WITHIN, process.output()
    runs = query(state_url, "SELECT status, error FROM sync_runs")
    assert [r["status"] for r in runs] == ["interrupted"], runs
    assert "stopped by a shutdown request" in runs[0]["error"]
    # The database stopped working too: no backend is left sleeping for us.
    assert not _slow_query_running(pg_url)
    assert gleap.contacts() == {}


SLOW_SQLITE_AUDIENCE = """
[[audiences]]
name = "Slow"
sql = '''
WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 2000000000)
SELECT id AS user_id FROM people WHERE id IN (SELECT x FROM n WHERE x < 0)
'''
"""


@pytest.mark.slow
def test_a_signal_interrupts_a_slow_sqlite_query(
    tmp_path: Path, warehouse: Warehouse, gleap: Sandbox, processes: list[Process]
) -> None:
    # SQLite runs the query in C without releasing the main thread to Python's
    # signal handlers: the stop must still arrive and interrupt it.
    seed(warehouse, 10)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    path = write_config(
        tmp_path,
        base_url=gleap.url,
        source_url=warehouse.url,
        state_url=state_url,
        body=SLOW_SQLITE_AUDIENCE,
    )
    sync = Process(tmp_path, "sync", "-c", str(path), "sync", "--progress", "off")
    processes.append(sync)
    wait_for(lambda: "planning slow ..." in sync.output(), what="the plan to start")
    sync.signal(signal.SIGTERM)
    asked = time.monotonic()
    assert sync.wait(timeout=120) == 130, sync.output()
    assert time.monotonic() - asked < STOPPED_WITHIN, sync.output()
    runs = query(state_url, "SELECT status FROM sync_runs")
    assert [r["status"] for r in runs] == ["interrupted"], runs


@pytest.mark.slow
def test_a_signal_ends_a_sync_waiting_for_another_planner(
    tmp_path: Path, warehouse: Warehouse, gleap: Sandbox, processes: list[Process]
) -> None:
    seed(warehouse, 10)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    path = write_config(
        tmp_path,
        base_url=gleap.url,
        source_url=warehouse.url,
        state_url=state_url,
        body=AUDIENCES,
    )
    engine = open_state(state_url)
    # Another planner holds `buyers` for the next ten minutes.
    assert locks.acquire(engine, locks.plan_lease_name("buyers"), "other-planner", 600)
    sync = Process(tmp_path, "sync", "-c", str(path), "sync", "--wait", "--progress", "off")
    processes.append(sync)
    wait_for(lambda: "to finish planning buyers" in sync.output(), what="the wait")
    sync.signal(signal.SIGTERM)
    asked = time.monotonic()
    assert sync.wait(timeout=60) == 130, sync.output()
    assert time.monotonic() - asked < STOPPED_WITHIN, sync.output()
    assert "stopped while waiting to plan 'buyers'" in sync.output()
    # It gave back the leases it held while waiting: only the other planner's is left.
    held = query(state_url, "SELECT name, holder FROM leases WHERE holder IS NOT NULL")
    assert held == [{"name": "plan:buyers", "holder": "other-planner"}]
    engine.dispose()
