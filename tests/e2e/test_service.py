"""The daemon: the next-run decision (a table), the wiring (paused), real processes."""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from freezegun import freeze_time

from audsync.config import load_config
from audsync.defaults import DEFAULT_CONCURRENCY
from audsync.deliver import ACK_INTERVAL
from audsync.gleap import GleapClient
from audsync.sandbox import Sandbox
from audsync.service import Daemon, JitteredInterval, next_fire_time
from tests.helpers import (
    AUDIENCES,
    PG_URL,
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

T0 = dt.datetime(2026, 11, 29, 10, 0, tzinfo=dt.UTC)
H = 3600.0


def at(hours: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=hours)


@pytest.mark.parametrize(
    ("previous", "now", "interval", "jitter", "rand", "expected"),
    [
        # first tick: one interval (+ jitter) after start-up
        (None, at(0), 2 * H, 1 * H, 0.0, at(2)),
        (None, at(0), 2 * H, 1 * H, 0.5, at(2.5)),
        (None, at(0), 2 * H, 1 * H, 0.999, at(2.999)),
        # regular ticks: from the previous scheduled time, so runs do not drift
        (at(2), at(2.01), 2 * H, 1 * H, 0.25, at(4.25)),
        (at(2), at(2), 2 * H, 0.0, 0.7, at(4)),
        # a long run: the next tick is computed after it ended, still on schedule
        (at(2), at(3.9), 2 * H, 0.0, 0.0, at(4)),
        # the machine slept through several ticks: exactly one catch-up, now
        (at(2), at(9), 2 * H, 1 * H, 0.5, at(9)),
        (at(2), at(4.5), 2 * H, 0.0, 0.0, at(4.5)),
        # seconds-scale schedules used in tests
        (None, at(0), 4.0, 1.0, 1.0, T0 + dt.timedelta(seconds=5)),
    ],
)
def test_next_fire_time(
    previous: dt.datetime | None,
    now: dt.datetime,
    interval: float,
    jitter: float,
    rand: float,
    expected: dt.datetime,
) -> None:
    assert next_fire_time(previous, now, interval, jitter, rand) == expected


def test_next_fire_time_always_moves_forward() -> None:
    now = at(5)
    first = next_fire_time(at(1), now, 2 * H, 0.0, 0.0)
    assert first == now
    assert next_fire_time(first, now, 2 * H, 0.0, 0.0) > now  # no busy loop


@pytest.fixture
def daemon_config(tmp_path: Path, warehouse: Warehouse, gleap: Sandbox) -> Path:
    return write_config(
        tmp_path,
        base_url=gleap.url,
        source_url=warehouse.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        extra='[schedule]\ninterval = "2h"\njitter = "1h"\n',
    )


def test_scheduler_wiring_paused(daemon_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    config = load_config(str(daemon_config), env=dict(os.environ))
    scheduler = BackgroundScheduler(timezone=dt.UTC)
    daemon = Daemon(config, install_signals=False, scheduler=scheduler)
    with freeze_time(T0):
        daemon.schedule()
        scheduler.start(paused=True)
        try:
            job = scheduler.get_job("plan")
            assert job.max_instances == 1 and job.coalesce is True
            assert job.misfire_grace_time is None
            assert isinstance(job.trigger, JitteredInterval)
            assert job.args == ("schedule",)
            assert at(2) <= job.next_run_time <= at(3)
            job.trigger.rand = lambda: 0.5
            # after a suspend of a day, one run now, then back on the 2-3 h rhythm
            assert job.trigger.get_next_fire_time(at(2), at(26)) == at(26)
            assert job.trigger.get_next_fire_time(at(26), at(26)) == at(28.5)
        finally:
            scheduler.shutdown(wait=False)
            daemon.client.close()


# -- real processes --------------------------------------------------------------


def truth_reached(gleap: Sandbox, warehouse: Warehouse) -> bool:
    """Gleap holds exactly what the source says (never-members may lack the key)."""
    return not source_mismatches(gleap, warehouse)


def open_runs(state_url: str) -> list[dict[str, Any]]:
    return query(state_url, "SELECT * FROM sync_runs WHERE status IN ('planning', 'delivering')")


@pytest.mark.slow
def test_daemon_syncs_at_start_picks_up_changes_and_stops_on_sigterm(
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
        extra='[schedule]\ninterval = "4s"\njitter = "1s"\n',
    )
    daemon = Process(tmp_path, "daemon", "-c", str(path), "run")
    processes.append(daemon)
    wait_for(lambda: truth_reached(gleap, warehouse), what="the start-up sync")
    startup = query(state_url, "SELECT * FROM sync_runs")
    assert {r["trigger"] for r in startup} == {"startup"} and len(startup) == 3

    warehouse.execute("UPDATE people SET vip = 1 WHERE id = 1")
    warehouse.execute("UPDATE people SET buyer = 0 WHERE id = 2")
    gleap.reset_calls()
    wait_for(lambda: truth_reached(gleap, warehouse), timeout=15, what="the scheduled tick")
    assert sorted(c["user_id"] for c in gleap.calls("/admin/identify")) == ["1", "2"]
    assert "schedule" in {r["trigger"] for r in query(state_url, "SELECT * FROM sync_runs")}

    stopped = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=10) == 0
    assert time.monotonic() - stopped < 5
    assert open_runs(state_url) == []
    assert query(state_url, "SELECT holder FROM leases WHERE holder IS NOT NULL") == []
    assert_counts_add_up(state_url)


@pytest.mark.slow
def test_manual_full_resync_beside_the_daemon(
    tmp_path: Path, warehouse: Warehouse, gleap: Sandbox, processes: list[Process]
) -> None:
    seed(warehouse, 40)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    path = write_config(
        tmp_path,
        base_url=gleap.url,
        source_url=warehouse.url,
        state_url=state_url,
        body=AUDIENCES,
        extra='[schedule]\ninterval = "1h"\njitter = "0s"\n',
    )
    daemon = Process(tmp_path, "daemon", "-c", str(path), "run")
    processes.append(daemon)
    wait_for(lambda: truth_reached(gleap, warehouse), what="the start-up sync")
    warehouse.execute("UPDATE people SET vip = 0 WHERE id = 3")
    gleap.reset_calls()
    manual = Process(tmp_path, "manual", "-c", str(path), "sync", "--full", "--wait")
    assert manual.wait(timeout=30) == 0, manual.output()
    assert "is sending them" in manual.output()
    assert truth_reached(gleap, warehouse)
    sent = [c["user_id"] for c in gleap.calls("/admin/identify")]
    assert len(sent) == len(set(sent))  # never double delivery
    assert gleap.contact("3")["vip_customers"] is False  # type: ignore[index]
    manual_runs = query(state_url, "SELECT * FROM sync_runs WHERE trigger = 'manual'")
    assert {r["status"] for r in manual_runs} == {"succeeded"}
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=10) == 0
    assert_counts_add_up(state_url)


@pytest.mark.slow
def test_sigterm_mid_delivery_then_restart_loses_nothing(
    tmp_path: Path, warehouse: Warehouse, processes: list[Process]
) -> None:
    seed(warehouse, 300)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    with Sandbox(TOKEN, latency=0.01) as gleap:
        path = write_config(
            tmp_path,
            base_url=gleap.url,
            source_url=warehouse.url,
            state_url=state_url,
            body=AUDIENCES,
            extra='[schedule]\ninterval = "1h"\njitter = "0s"\n',
            # 100 calls/s: the start-up sync of ~240 users takes a few seconds.
            rate_limit=6000,
        )
        daemon = Process(tmp_path, "daemon", "-c", str(path), "run")
        processes.append(daemon)
        wait_for(lambda: len(gleap.contacts()) > 40, what="delivery to start")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0
        assert open_runs(state_url) == []
        interrupted = query(state_url, "SELECT * FROM sync_runs WHERE status = 'interrupted'")
        assert interrupted, "the stop came mid-delivery"
        pending = query(state_url, "SELECT COUNT(*) AS n FROM outbox WHERE state = 'pending'")
        assert pending[0]["n"] > 0
        assert not truth_reached(gleap, warehouse)
        # Every acknowledged change is in the ledger; nothing acknowledged is pending.
        ledger_pairs = {
            (r["audience_key"], r["user_id"])
            for r in query(state_url, "SELECT audience_key, user_id FROM ledger")
        }
        outbox_pairs = {
            (r["audience_key"], r["user_id"])
            for r in query(state_url, "SELECT audience_key, user_id FROM outbox")
        }
        assert not ledger_pairs & outbox_pairs

        again = Process(tmp_path, "daemon2", "-c", str(path), "run")
        processes.append(again)
        wait_for(lambda: truth_reached(gleap, warehouse), timeout=30, what="the resumed sync")
        again.signal(signal.SIGTERM)
        assert again.wait(timeout=10) == 0
        sent = [c["user_id"] for c in gleap.calls("/admin/identify") if c["status"] == 200]
        # A warm stop commits every acknowledgement: only calls handed to the
        # senders and cut short can repeat.
        assert len(sent) - len(set(sent)) <= 2 * DEFAULT_CONCURRENCY
        assert_counts_add_up(state_url)


@pytest.mark.slow
@pytest.mark.skipif(not PG_URL, reason="AUDSYNC_TEST_POSTGRES_URL is not set")
def test_two_daemons_on_postgres_one_delivers_and_the_other_takes_over(
    tmp_path: Path, warehouse: Warehouse, processes: list[Process], pg_url: str
) -> None:
    seed(warehouse, 400)
    with Sandbox(TOKEN, latency=0.005) as gleap:
        path = write_config(
            tmp_path,
            base_url=gleap.url,
            source_url=warehouse.url,
            state_url=pg_url,
            body=AUDIENCES,
            extra='[schedule]\ninterval = "1h"\njitter = "0s"\n[sync]\nlease_ttl = "3s"\n',
            rate_limit=6000,
        )
        first = Process(tmp_path, "first", "-c", str(path), "run")
        processes.append(first)
        wait_for(lambda: "holding the delivery lease" in first.output(), what="first lease")
        second = Process(tmp_path, "second", "-c", str(path), "run")
        processes.append(second)
        wait_for(lambda: "audsync daemon started" in second.output(), what="second start")
        wait_for(lambda: len(gleap.contacts()) > 60, what="delivery under way")
        assert "holding the delivery lease" not in second.output()  # exactly one delivers

        first.proc.kill()  # SIGKILL: no goodbye, the lease must expire
        killed = time.monotonic()
        wait_for(
            lambda: "holding the delivery lease" in second.output(), timeout=15, what="takeover"
        )
        assert time.monotonic() - killed < 3 + 2  # within the TTL (plus a poll)
        wait_for(lambda: truth_reached(gleap, warehouse), timeout=30, what="convergence")
        second.signal(signal.SIGTERM)
        assert second.wait(timeout=10) == 0
        sent = [c["user_id"] for c in gleap.calls("/admin/identify") if c["status"] == 200]
        # Only what was in flight at the kill repeats: calls handed to the senders
        # and acknowledgements not yet committed (ACK_INTERVAL at 100 calls/s).
        in_flight = 2 * DEFAULT_CONCURRENCY + math.ceil(100 * ACK_INTERVAL)
        assert len(sent) - len(set(sent)) <= in_flight
        tokens = query(pg_url, "SELECT token FROM leases WHERE name = 'deliver'")
        assert tokens[0]["token"] >= 2  # the fencing token moved on with the new holder
        runs = assert_counts_add_up(pg_url)
        assert not [r for r in runs if r["status"] in ("planning", "delivering")]


BUYERS_ENTRY = (
    '[[audiences]]\nname = "Buyers"\nsql = "SELECT id AS user_id FROM people WHERE buyer = 1"\n'
)


def test_audience_removed_from_config_stops_syncing_and_keeps_its_ledger(
    tmp_path: Path,
    warehouse: Warehouse,
    gleap: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from audsync.cli import main
    from audsync.service import retire_removed
    from audsync.source import open_source
    from audsync.state import open_state
    from audsync.sync import SyncOutcome, plan_all

    seed(warehouse, 30)
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    path = write_config(
        tmp_path, base_url=gleap.url, source_url=warehouse.url, state_url=state_url, body=AUDIENCES
    )
    assert main(["-c", str(path), "sync"]) == 0
    acked = query(state_url, "SELECT COUNT(*) AS n FROM ledger WHERE audience_key = 'buyers'")
    warehouse.execute("UPDATE people SET buyer = 1 - buyer WHERE id <= 3")
    # Plan the change without delivering it, as a daemon stopped mid-way would leave it.
    full_config = load_config(str(path), env={"AUDSYNC_GLEAP_API_TOKEN": TOKEN})
    source = open_source(warehouse.url)
    plan_all(
        full_config, full_config.select(["buyers"]), open_state(state_url), source, SyncOutcome()
    )
    source.dispose()
    assert len(query(state_url, "SELECT * FROM outbox WHERE audience_key = 'buyers'")) == 3
    config_without_buyers = write_config(
        tmp_path,
        base_url=gleap.url,
        source_url=warehouse.url,
        state_url=state_url,
        body=AUDIENCES.replace(BUYERS_ENTRY, ""),
        name="smaller.toml",
    )
    capsys.readouterr()
    config = load_config(str(config_without_buyers), env={"AUDSYNC_GLEAP_API_TOKEN": TOKEN})
    assert [d.key for d in config.definitions] == ["vip_customers", "revenue"]
    state = open_state(state_url)
    retire_removed(state, config)
    (buyers,) = query(state_url, "SELECT * FROM audiences WHERE key = 'buyers'")
    assert not buyers["active"]
    assert query(state_url, "SELECT * FROM outbox WHERE audience_key = 'buyers'") == []
    assert (
        query(state_url, "SELECT COUNT(*) AS n FROM ledger WHERE audience_key = 'buyers'") == acked
    )  # the ledger is kept
    runs = assert_counts_add_up(state_url)
    assert runs[-1]["audience_key"] == "buyers" and runs[-1]["superseded"] == 3
    assert runs[-1]["status"] == "succeeded"


def test_an_unexpected_error_in_delivery_never_ends_delivery(
    daemon_config: Path,
    gleap: Sandbox,
    warehouse: Warehouse,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Seen under libfaketime: an OSError from a sleep in a sender thread killed the
    deliverer thread, and the daemon went on planning with nobody delivering."""
    seed(warehouse, 30)
    monkeypatch.setenv("AUDSYNC_GLEAP_API_TOKEN", TOKEN)
    config = load_config(str(daemon_config), env=dict(os.environ))
    real = httpx.HTTPTransport()
    failures = {"left": 3}

    def flaky(request: httpx.Request) -> httpx.Response:
        # Not an httpx error: something no layer below the daemon expects.
        if request.url.path == "/admin/identify" and failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(22, "Invalid argument")
        response = real.handle_request(request)
        response.read()
        return response

    client = GleapClient(gleap.url, TOKEN, transport=httpx.MockTransport(flaky))
    daemon = Daemon(config, client=client, install_signals=False, trouble_pause=0.2)
    runner = threading.Thread(target=daemon.run)
    with caplog.at_level(logging.ERROR, logger="audsync.service"):
        runner.start()
        try:
            wait_for(
                lambda: (
                    not query(config.state_url, "SELECT 1 FROM outbox")
                    and source_mismatches(gleap, warehouse) == []
                ),
                what="every change delivered",
            )
        finally:
            daemon.stop()
            runner.join(timeout=30)
    assert not runner.is_alive()
    assert failures["left"] == 0
    unexpected = [r for r in caplog.records if "delivery stopped unexpectedly" in r.getMessage()]
    assert unexpected and all("\n" not in r.getMessage() for r in unexpected)
    assert source_mismatches(gleap, warehouse) == []
