"""History pruning benchmark: a year of two-hourly runs over 50 audiences, pruned to 90 days.

    python benchmarks/prune.py [--audiences 50] [--postgres URL]

A state DB holding a year of runs (4,380 per audience) with a delivery failure
for every tenth run, five old runs still owning pending changes, and idle
audiences whose newest runs are old. ``prune_history`` (batched, keeping what
status/alerts/metrics rely on) against the baseline of one bare ``DELETE`` of
the same rows in one transaction. While each runs, a probe thread commits a
one-row write every 5 ms and records its worst wait: how long other writers
(the deliverer's acknowledgements, a manual sync) are held up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, insert, text

from audsync import models
from audsync.clock import utcnow
from audsync.defaults import DEFAULT_HISTORY_KEEP
from audsync.prune import prune_history
from audsync.state import open_state

RUNS = 4380  # a year every two hours
IDLE = 5  # audiences that stopped ~100 days ago
STUCK = 5  # old interrupted runs still owning two pending changes each


def fill(engine: Engine, audiences: int, now: dt.datetime, analyze: bool = True) -> None:
    runs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    outbox: list[dict[str, Any]] = []
    run_id = 0
    for slot in range(RUNS - 1, -1, -1):  # oldest first: ids grow with time
        for audience in range(audiences):
            if audience >= audiences - IDLE and slot < 1200:
                continue
            run_id += 1
            started = now - dt.timedelta(hours=2 * slot + 1)
            stuck = audience < STUCK and slot == 4000
            failed = slot % 10 == 3
            runs.append(
                {
                    "id": run_id,
                    "audience_key": f"aud_{audience}",
                    "trigger": "schedule",
                    "mode": "incremental",
                    "status": "interrupted" if stuck else "partial" if failed else "succeeded",
                    "started_at": started,
                    "finished_at": started + dt.timedelta(minutes=10),
                    "members": 1000,
                    "entered": 5,
                    "exited": 0,
                    "changed": 0,
                    "queued": 5,
                    "delivered": 3 if stuck else 4 if failed else 5,
                    "failed": 1 if failed else 0,
                    "superseded": 0,
                    "skipped_ids": 0,
                    "duplicate_ids": 0,
                }
            )
            if failed:
                failures.append(
                    {
                        "run_id": run_id,
                        "audience_key": f"aud_{audience}",
                        "user_id": f"u{run_id}",
                        "http_status": 422,
                        "reason": "Invalid email",
                        "failed_at": started,
                    }
                )
            if stuck:
                for user in ("stuck-1", "stuck-2"):
                    outbox.append(
                        {
                            "audience_key": f"aud_{audience}",
                            "user_id": user,
                            "value": "true",
                            "run_id": run_id,
                            "version": 1,
                            "priority": 0,
                            "state": "pending",
                            "attempts": 0,
                            "queued_at": started,
                            "attempted": False,
                        }
                    )
    # Through the models, so timestamps are stored exactly as audsync stores them.
    with engine.begin() as conn:
        for start in range(0, len(runs), 20_000):
            conn.execute(insert(models.sync_runs), runs[start : start + 20_000])
        conn.execute(insert(models.delivery_failures), failures)
        conn.execute(insert(models.outbox), outbox)
        if engine.dialect.name == "postgresql":
            conn.execute(
                text(
                    "SELECT setval(pg_get_serial_sequence('sync_runs', 'id'), MAX(id))"
                    " FROM sync_runs"
                )
            )
            if analyze:
                conn.execute(text("ANALYZE"))


def counts(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        runs = conn.execute(text("SELECT COUNT(*) FROM sync_runs")).scalar_one()
        failures = conn.execute(text("SELECT COUNT(*) FROM delivery_failures")).scalar_one()
    return int(runs), int(failures)


class Probe:
    """Commits a tiny write every 5 ms on its own connection; records the worst wait."""

    def __init__(self, url: str) -> None:
        args = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        self.engine = create_engine(url, **args)
        self.worst = 0.0
        self.writes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            with self.engine.begin() as conn:
                conn.execute(
                    text("UPDATE leases SET expires_at = expires_at + 1 WHERE name = 'bench-probe'")
                )
            self.worst = max(self.worst, time.perf_counter() - started)
            self.writes += 1
            self._stop.wait(0.005)

    def __enter__(self) -> Probe:
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO leases (name, holder, token, expires_at)"
                    " VALUES ('bench-probe', 'bench', 0, 0)"
                )
            )
        self._thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM leases WHERE name = 'bench-probe'"))
        self.engine.dispose()


def fresh(url: str | None, folder: Path, name: str) -> str:
    if url is None:
        return f"sqlite:///{folder / name}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return str(create_engine(url).url.set(database=name).render_as_string(hide_password=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audiences", type=int, default=50)
    parser.add_argument("--postgres", help="a PostgreSQL URL (databases are created beside it)")
    args = parser.parse_args()
    now = utcnow()
    cutoff = now - dt.timedelta(seconds=DEFAULT_HISTORY_KEEP)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as folder:
        ours_url = fresh(args.postgres, Path(folder), "audsync_bench_prune")
        ours = open_state(ours_url)
        started = time.perf_counter()
        fill(ours, args.audiences, now)
        before = counts(ours)
        print(
            f"{ours.dialect.name}: a year of runs for {args.audiences} audiences:"
            f" {before[0]:,} runs, {before[1]:,} delivery failures"
            f" (filled in {time.perf_counter() - started:.1f}s)"
        )
        with Probe(ours_url) as probe:
            report = prune_history(ours, DEFAULT_HISTORY_KEEP, now=now)
        after = counts(ours)
        with ours.connect() as conn:
            kept_old = list(
                conn.execute(
                    text("SELECT id FROM sync_runs WHERE finished_at < :c"), {"c": cutoff}
                ).scalars()
            )
        again = prune_history(ours, DEFAULT_HISTORY_KEEP, now=now)
        ours.dispose()

        base_url = fresh(args.postgres, Path(folder), "audsync_bench_prune_base")
        base = open_state(base_url)
        fill(base, args.audiences, now)
        with Probe(base_url) as base_probe:
            started = time.perf_counter()
            with base.begin() as conn:
                conn.execute(
                    text(
                        "DELETE FROM sync_runs WHERE finished_at < :c"
                        " AND id NOT IN (" + ",".join(map(str, kept_old)) + ")"
                    ),
                    {"c": cutoff},
                )
                conn.execute(
                    text("DELETE FROM delivery_failures WHERE failed_at < :c"), {"c": cutoff}
                )
            bare = time.perf_counter() - started
        assert counts(base) == after, (counts(base), after)
        base.dispose()

    print(
        f"after: {after[0]:,} runs, {after[1]:,} delivery failures"
        f" (kept {sum(report.kept.values())} older runs: {dict(report.kept)})"
    )
    print("| | seconds | longest write transaction | worst wait of another writer |")
    print("|---|---|---|---|")
    print(
        f"| bare DELETE (one transaction) | {bare:.2f} | {bare:.2f} s"
        f" | {base_probe.worst * 1000:.0f} ms |"
    )
    print(
        f"| prune_history ({report.batches} batches) | {report.seconds:.2f}"
        f" | {report.longest_write * 1000:.0f} ms | {probe.worst * 1000:.0f} ms |"
    )
    print(f"ratio (prune / bare): {report.seconds / bare:.2f}")
    print(f"a second prune, nothing to delete: {again.seconds * 1000:.1f} ms ({again.pruned} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
