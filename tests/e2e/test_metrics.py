"""`audsync run --metrics-port`: Prometheus metrics scraped from a real daemon process."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from audsync.clock import unix_seconds
from audsync.config import load_config
from audsync.metrics import StateCollector
from audsync.sandbox import Sandbox
from audsync.state import open_state
from tests.helpers import (
    AUDIENCES,
    TOKEN,
    MakeConfig,
    Process,
    Warehouse,
    query,
    run_cli,
    seed,
    source_mismatches,
    wait_for,
    write_config,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


@pytest.mark.slow
def test_daemon_metrics_match_what_gleap_and_the_state_db_saw(
    tmp_path: Path, warehouse: Warehouse, processes: list[Process]
) -> None:
    seed(warehouse, 120)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    # A Gleap that throttles (the client is configured far above its limit)
    # and fails one call in ten: 429s and retries both get counted.
    with Sandbox(TOKEN, rate_limit=40, rate_window=1.0, fail_ratio=0.1, seed=7) as gleap:
        path = write_config(
            tmp_path,
            base_url=gleap.url,
            source_url=warehouse.url,
            state_url=state_url,
            body=AUDIENCES,
            # Enough retries that no call gives up: every 5xx is then retried once.
            max_retries=10,
        )
        daemon = Process(tmp_path, "daemon", "-c", str(path), "run", "--metrics-port", "0")
        processes.append(daemon)
        match = wait_for(
            lambda: re.search(r"metrics on (http://\S+/metrics)", daemon.output()),
            what="the metrics endpoint",
        )
        url = match.group(1)
        wait_for(lambda: not source_mismatches(gleap, warehouse), what="the start-up sync")
        wait_for(
            lambda: query(state_url, "SELECT id FROM sync_runs WHERE finished_at IS NULL") == [],
            what="every run to finish",
        )
        samples = scrape(url)
        stats = gleap.stats

    assert total(samples, "audsync_gleap_calls_total", endpoint="identify", outcome="ok") == (
        stats.identify_ok
    )
    assert stats.throttled > 0 and stats.injected_errors > 0
    assert total(samples, "audsync_gleap_rate_limited_total") == stats.throttled
    assert total(samples, "audsync_gleap_calls_total", outcome="throttled") == stats.throttled
    assert total(samples, "audsync_gleap_calls_total", outcome="server_error") == (
        stats.injected_errors
    )
    assert total(samples, "audsync_gleap_retries_total") == stats.injected_errors

    members = {"vip_customers": 40, "buyers": 60, "revenue": 96}
    for key, count in members.items():
        assert total(samples, "audsync_members", audience=key) == count
        assert total(samples, "audsync_outbox_depth", audience=key, state="pending") == 0
        assert total(samples, "audsync_plan_duration_seconds_count", audience=key) == 1
        assert total(samples, "audsync_last_run_duration_seconds", audience=key) > 0
        planned = total(samples, "audsync_last_successful_plan_timestamp_seconds", audience=key)
        assert abs(planned - time.time()) < 120
        assert total(samples, "audsync_audience_failing", audience=key) == 0
    ledger_sizes = {
        r["audience_key"]: r["n"]
        for r in query(state_url, "SELECT audience_key, COUNT(*) AS n FROM ledger GROUP BY 1")
    }
    assert ledger_sizes == {k: count for k, count in members.items()}
    for key, count in ledger_sizes.items():
        assert total(samples, "audsync_ledger_size", audience=key) == count
    assert total(samples, "audsync_event_outbox_depth") == 0
    assert total(samples, "audsync_state_db_up") == 1
    assert all(name.startswith("audsync_") for name, _ in samples)


def test_state_gauges_are_cached_between_scrapes_and_report_an_unreadable_db(
    tmp_path: Path, warehouse: Warehouse, gleap: Sandbox
) -> None:
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    path = write_config(tmp_path, base_url=gleap.url, source_url=warehouse.url, state_url=state_url)
    config = load_config(str(path), env={"AUDSYNC_GLEAP_API_TOKEN": "x"})
    engine = open_state(state_url)
    now = [0.0]
    collector = StateCollector(engine, config, cache_seconds=10, clock=lambda: now[0])

    def read(name: str) -> list[Any]:
        return [s for family in collector.collect() for s in family.samples if s.name == name]

    assert [s.value for s in read("audsync_state_db_up")] == [1]
    assert read("audsync_ledger_size") == []
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO ledger (audience_key, user_id, value, acked_at)"
            " VALUES ('vip_customers', '1', 'true', '2026-01-01 00:00:00')"
        )
    now[0] = 5.0
    assert read("audsync_ledger_size") == []  # still the cached reading
    now[0] = 10.0
    assert [(s.labels, s.value) for s in read("audsync_ledger_size")] == [
        ({"audience": "vip_customers"}, 1)
    ]
    engine.dispose()

    broken = create_engine(f"sqlite:///{tmp_path / 'missing' / 'state.db'}")
    collector = StateCollector(broken, config, cache_seconds=0)
    assert [s.value for s in read("audsync_state_db_up")] == [0]


def test_unix_seconds_reads_naive_utc() -> None:
    import datetime as dt

    assert unix_seconds(None) is None
    assert unix_seconds(dt.datetime(1970, 1, 1, 0, 0, 1, 500000)) == 1.5
    moment = dt.datetime(2026, 11, 29, 7, 30)
    assert unix_seconds(moment) == moment.replace(tzinfo=dt.UTC).timestamp()


def test_metrics_port_in_use_is_a_clear_usage_error(
    make_config: MakeConfig, gleap: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = make_config()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _out, err = run_cli(capsys, "-c", str(path), "run", "--metrics-port", str(port))
    assert code == 2
    assert f"--metrics-port: {port}: cannot listen on 127.0.0.1:{port}" in err
    assert gleap.calls("/admin/identify") == []  # nothing was synced
