"""Leases are timed by the state DB's clock: a host whose clock is skewed cannot take a live one."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text, update

from audsync import locks, models
from audsync.sandbox import Sandbox
from audsync.state import open_state
from tests.helpers import AUDIENCES, TOKEN, Process, Warehouse, query, seed, wait_for, write_config

# The MT build first: the daemon is multithreaded, and the plain build's sleep made
# a sender thread's time.sleep fail with EINVAL now and then.
FAKETIME_LIBS = (
    os.environ.get("AUDSYNC_TEST_FAKETIME", ""),
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
)
FAKETIME_LIB = next((lib for lib in FAKETIME_LIBS if lib and Path(lib).exists()), None)
SKEW = 90.0

SLEEP_ON_A_CONDITION = '''"""Loaded by the skewed daemon only (test_leases.py): libfaketime with
FAKETIME_DONT_FAKE_MONOTONIC hands the kernel a negative time when Python 3.11+'s
time.sleep calls clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME), and the sleep
fails with EINVAL (wolfcw/libfaketime#426). A timed wait on a condition, which it
fakes correctly, sleeps instead: the clock skew stays, the tool's bug goes."""
import threading
import time


def _sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    threading.Event().wait(seconds)


time.sleep = _sleep
'''


def db_time(engine: Engine) -> float:
    """The state DB's clock, asked the same way audsync asks it."""
    with engine.connect() as conn:
        return float(conn.execute(select(locks.db_now(engine.dialect.name))).scalar_one())


@pytest.mark.parametrize(
    ("holder", "expires_at", "dead_here", "takes"),
    [
        (None, 2000.0, False, True),  # released
        ("me", 2000.0, False, True),  # already ours
        ("other", 2000.0, False, False),  # live: expires after now (1000)
        ("other", 1000.0, False, True),  # expires exactly now
        ("other", 999.0, False, True),  # expired
        ("other", 2000.0, True, True),  # its process on this host is gone
    ],
)
def test_may_take(holder: str | None, expires_at: float, dead_here: bool, takes: bool) -> None:
    assert locks.may_take(holder, expires_at, 1000.0, "me", dead_here) is takes


def test_expiry_comes_from_the_db_clock_and_fencing_holds(state_url: str) -> None:
    engine = open_state(state_url)
    lease = locks.acquire(engine, "deliver", "first", ttl=30)
    assert lease is not None and lease.token == 1
    # Both the returned expiry and the stored one are the DB's time plus the TTL.
    assert abs(lease.expires_at - (db_time(engine) + 30)) < 2
    stored = query(state_url, "SELECT expires_at FROM leases WHERE name = 'deliver'")
    assert stored[0]["expires_at"] == lease.expires_at
    assert locks.acquire(engine, "deliver", "second", ttl=30) is None
    held = locks.current_holder(engine, "deliver")
    assert held is not None and held["holder"] == "first" and "db_now" not in held

    # Expired by the DB's clock (one second ago, by the DB): the next one takes it.
    with engine.begin() as conn:
        conn.execute(update(models.leases).values(expires_at=locks.db_now(engine.dialect.name) - 1))
    assert locks.current_holder(engine, "deliver") is None
    second = locks.acquire(engine, "deliver", "second", ttl=30)
    assert second is not None and second.token == 2
    assert not locks.renew(engine, lease)  # the old holder is fenced off
    with engine.connect() as conn:
        assert not locks.still_held(conn, lease)
        assert locks.still_held(conn, second)

    before = second.expires_at
    with engine.begin() as conn:  # renewal also counts from the DB's now
        conn.execute(update(models.leases).values(expires_at=locks.db_now(engine.dialect.name) + 1))
    assert locks.renew(engine, second)
    assert second.expires_at >= before - 1 and abs(second.expires_at - (db_time(engine) + 30)) < 2
    locks.release(engine, second)
    assert locks.current_holder(engine, "deliver") is None
    engine.dispose()


@pytest.mark.slow
@pytest.mark.skipif(FAKETIME_LIB is None, reason="libfaketime is not installed (apt: faketime)")
def test_a_host_running_90s_ahead_does_not_take_a_live_lease(
    tmp_path: Path,
    warehouse: Warehouse,
    pg_url: str,
    processes: list[Process],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed(warehouse, 30)
    ttl = 3.0
    engine = open_state(pg_url)
    with Sandbox(TOKEN) as gleap:
        path = write_config(
            tmp_path,
            base_url=gleap.url,
            source_url=warehouse.url,
            state_url=pg_url,
            body=AUDIENCES,
            extra=f'[schedule]\ninterval = "1h"\njitter = "0s"\n[sync]\nlease_ttl = "{ttl}s"\n',
        )
        # A live deliverer on a host with a correct clock: it renews every ttl/3.
        live = locks.acquire(engine, locks.DELIVER_LEASE, "live-holder", ttl)
        assert live is not None
        with locks.Heartbeat(engine, live):
            with monkeypatch.context() as env:
                env.setenv("LD_PRELOAD", str(FAKETIME_LIB))
                env.setenv("FAKETIME", f"+{SKEW:.0f}s")
                env.setenv("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                site = tmp_path / "faketime_site"
                site.mkdir()
                (site / "sitecustomize.py").write_text(SLEEP_ON_A_CONDITION)
                paths = [str(site), os.environ.get("PYTHONPATH", "")]
                env.setenv("PYTHONPATH", os.pathsep.join(filter(None, paths)))
                skewed = Process(tmp_path, "skewed", "-c", str(path), "run")
            processes.append(skewed)
            wait_for(
                lambda: query(pg_url, "SELECT 1 FROM sync_runs WHERE status = 'delivering'"),
                what="the skewed daemon's start-up plan",
            )
            # The skew is real: the daemon's own health record is dated 90 s ahead.
            ahead = query(
                pg_url,
                "SELECT EXTRACT(EPOCH FROM beat_at - (clock_timestamp() AT TIME ZONE 'UTC'))"
                " AS s FROM daemons",
            )[0]["s"]
            assert float(ahead) > SKEW - 10, ahead
            # Its deliverer asks for the lease every ttl/3; over three TTLs it
            # must never get it while the live holder renews.
            until = time.monotonic() + 3 * ttl
            while time.monotonic() < until:
                rows = query(pg_url, "SELECT holder FROM leases WHERE name = 'deliver'")
                assert rows == [{"holder": "live-holder"}]
                time.sleep(0.2)
            assert gleap.calls("/admin/identify") == []  # exactly one delivers: not it
            assert "holding the delivery lease" not in skewed.output()
        # The live holder stops renewing (without releasing): the skewed daemon
        # takes over once the lease has expired by the DB's clock, not before.
        expiry = locks.current_holder(engine, locks.DELIVER_LEASE)
        assert expiry is not None
        while db_time(engine) < expiry["expires_at"] - 0.2:
            rows = query(pg_url, "SELECT holder FROM leases WHERE name = 'deliver'")
            assert rows == [{"holder": "live-holder"}]
            time.sleep(0.1)
        wait_for(
            lambda: "holding the delivery lease" in skewed.output(),
            timeout=4 * ttl,
            what="the takeover after the TTL",
        )
        row = query(pg_url, "SELECT holder, token, expires_at FROM leases WHERE name = 'deliver'")
        assert row[0]["holder"] != "live-holder" and row[0]["token"] == 2
        # Its own expiry is the DB's time plus the TTL, not its clock's.
        assert row[0]["expires_at"] - db_time(engine) <= ttl + 1
        wait_for(lambda: len(gleap.contacts()) >= 20, what="the skewed daemon delivering")
        skewed.signal(signal.SIGTERM)
        assert skewed.wait(timeout=15) == 0
    engine.dispose()


def test_db_now_is_the_servers_clock(state_url: str) -> None:
    engine = open_state(state_url, upgrade=False)
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            server = conn.execute(text("SELECT EXTRACT(EPOCH FROM clock_timestamp())")).scalar()
        assert server is not None
        assert abs(db_time(engine) - float(server)) < 1
    else:
        assert abs(db_time(engine) - time.time()) < 1  # a SQLite file's clock is the host's
    engine.dispose()
