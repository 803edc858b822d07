"""Metrics scrape benchmark: reading the state DB's gauges against bare counts.

    python benchmarks/metrics.py [--ledger 1000000] [--outbox 200000] [--postgres URL]

A state DB with ``--ledger`` ledger rows over three audiences and ``--outbox``
pending changes (a backfill in progress). One uncached read of every gauge
``audsync run --metrics-port`` serves, against the baseline of the two bare
``SELECT COUNT(*)`` a hand-written exporter would at least need. Reads are
cached for DEFAULT_METRICS_CACHE seconds, so this cost is paid at most that often.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import Engine, create_engine, text

from audsync.config import load_config
from audsync.defaults import DEFAULT_METRICS_CACHE
from audsync.metrics import StateCollector
from audsync.state import open_state

KEYS = ("vip_customers", "buyers", "revenue")


def fill(engine: Engine, ledger: int, outbox: int) -> None:
    now = dt.datetime(2026, 11, 1)
    per_key = ledger // len(KEYS)
    with engine.begin() as conn:
        for key in KEYS:
            rows = [
                {"k": key, "u": f"{i:09d}", "v": "true", "t": now} for i in range(per_key)
            ]
            conn.execute(
                text("INSERT INTO ledger (audience_key, user_id, value, acked_at)"
                     " VALUES (:k, :u, :v, :t)"),
                rows,
            )
            conn.execute(
                text("INSERT INTO audiences (key, kind, name, sql_hash, active, created_at,"
                     " last_planned_at, members) VALUES (:k, 'audience', :name, 'x', true, :t,"
                     " :t2, :m)"),
                {"k": key, "name": key, "t": now, "t2": now, "m": per_key},
            )
        conn.execute(
            text("INSERT INTO sync_runs (audience_key, trigger, mode, status, started_at,"
                 " members, entered, exited, changed, queued, delivered, failed, superseded,"
                 " skipped_ids, duplicate_ids) VALUES ('buyers', 'startup', 'initial',"
                 " 'delivering', :t, :n, :n, 0, 0, :n, 0, 0, 0, 0, 0)"),
            {"t": now, "n": outbox},
        )
        conn.execute(
            text("INSERT INTO outbox (audience_key, user_id, value, run_id, version, priority,"
                 " state, attempts, queued_at, attempted) VALUES ('buyers', :u, 'true', 1, 1, 1,"
                 " 'pending', 0, :t, false)"),
            [{"u": f"n{i:09d}", "t": now} for i in range(outbox)],
        )


def best_of(fn: object, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ledger", type=int, default=1_000_000)
    parser.add_argument("--outbox", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--postgres", help="a PostgreSQL URL whose database may be filled")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        url = args.postgres or f"sqlite:///{Path(folder) / 'state.db'}"
        engine = open_state(url)
        started = time.perf_counter()
        fill(engine, args.ledger, args.outbox)
        print(f"filled {args.ledger:,} ledger and {args.outbox:,} outbox rows"
              f" in {time.perf_counter() - started:.1f}s ({engine.dialect.name})")
        config_path = Path(folder) / "audsync.toml"
        config_path.write_text(f'[state]\nurl = "{url}"\n', encoding="utf-8")
        config = load_config(str(config_path), env=dict(os.environ))
        collector = StateCollector(engine, config, cache_seconds=0)

        bare = create_engine(url)

        def baseline() -> None:
            with bare.connect() as conn:
                conn.execute(text("SELECT COUNT(*) FROM ledger")).scalar_one()
                conn.execute(text("SELECT COUNT(*) FROM outbox")).scalar_one()

        def scrape() -> None:
            families = list(collector.collect())
            assert any(f.name == "audsync_state_db_up" for f in families)

        baseline()
        scrape()  # warm caches alike
        base = best_of(baseline, args.rounds)
        ours = best_of(scrape, args.rounds)
        samples = {
            s.name: s.value
            for family in collector.collect()
            for s in family.samples
            if s.name == "audsync_state_db_up"
        }
        assert samples == {"audsync_state_db_up": 1.0}
        print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python"
              f" {platform.python_version()}")
        print(f"bare counts:     {base * 1000:8.1f} ms")
        print(f"metrics gauges:  {ours * 1000:8.1f} ms   ratio {ours / base:.2f}"
              f"   (at most once per {DEFAULT_METRICS_CACHE:g} s)")
        print(f"share of one core at one read per {DEFAULT_METRICS_CACHE:g} s:"
              f" {statistics.fmean([ours]) / DEFAULT_METRICS_CACHE:.1%}")
        bare.dispose()
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
