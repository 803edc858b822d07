"""Plan benchmark: audsync's plan against the bare minimum SQL, at a million members.

    python benchmarks/plan.py [--members 1000000] [--churn 0.01] [--state sqlite|postgres|both]

For each state database, two cases: initial (empty ledger) and incremental
(the ledger holds the previous result, 1 % of members left and 1 % joined).

audsync: query -> snapshot -> diff into the outbox (audsync.plan.plan_definition,
everything a real run does: counts, circuit breaker, supersede accounting).
Baseline, in the same run: stream the same query sorted, bulk-load it
(executemany on SQLite, COPY on PostgreSQL) and anti-join it against the ledger
into an outbox table — the minimum any correct diff must do.

PostgreSQL needs AUDSYNC_BENCH_POSTGRES_URL (or AUDSYNC_TEST_POSTGRES_URL);
each run creates and drops its own database.
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from audsync.config import Definition
from audsync.history import start_run
from audsync.plan import plan_definition
from audsync.state import open_state

SQL = "SELECT id AS user_id FROM users WHERE member = 1"
DEFINITION = Definition("audience", "Members", "members", SQL)


def build_warehouse(path: Path, members: int) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, member INTEGER NOT NULL)")
    batch = 100_000
    for start in range(1, members + 1, batch):
        db.executemany(
            "INSERT INTO users VALUES (?, 1)",
            ((i,) for i in range(start, min(start + batch, members + 1))),
        )
    db.commit()
    db.close()


def churn(path: Path, members: int, ratio: float) -> None:
    """ratio of the members leave; as many new users join."""
    step = int(1 / ratio)
    db = sqlite3.connect(path)
    db.execute("UPDATE users SET member = 0 WHERE id % ? = 0", (step,))
    joined = members // step
    db.executemany(
        "INSERT INTO users VALUES (?, 1)", ((members + i,) for i in range(1, joined + 1))
    )
    db.commit()
    db.close()


# -- the bare baseline ----------------------------------------------------------------


BASELINE_DDL = [
    "CREATE TABLE b_snapshot (user_id VARCHAR(400) PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE b_ledger (user_id VARCHAR(400) PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE b_outbox (user_id VARCHAR(400) PRIMARY KEY, value TEXT NOT NULL)",
]


def baseline_plan(state: Engine, source: Engine, chunk: int = 5000) -> int:
    """Stream sorted, bulk-load, anti-join both ways into b_outbox. Returns changes."""
    with state.begin() as conn:
        conn.exec_driver_sql("DELETE FROM b_snapshot")
        conn.exec_driver_sql("DELETE FROM b_outbox")
        with source.connect() as src:
            result = src.execution_options(stream_results=True, yield_per=chunk).execute(
                # Sorted in the key's own (text) order, as any bulk loader would.
                text(f"SELECT * FROM ({SQL}) q ORDER BY CAST(user_id AS TEXT)")
            )
            if conn.dialect.name == "postgresql":
                cursor: Any = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                with cursor.copy("COPY b_snapshot (user_id, value) FROM STDIN") as copy:
                    for part in result.partitions(chunk):
                        for (user_id,) in part:
                            copy.write_row((str(user_id), "true"))
            else:
                for part in result.partitions(chunk):
                    conn.exec_driver_sql(
                        "INSERT INTO b_snapshot VALUES (?, 'true')",
                        [(str(user_id),) for (user_id,) in part],
                    )
        conn.exec_driver_sql(
            "INSERT INTO b_outbox SELECT s.user_id, s.value FROM b_snapshot s"
            " WHERE NOT EXISTS (SELECT 1 FROM b_ledger l WHERE l.user_id = s.user_id"
            " AND l.value = s.value)"
        )
        conn.exec_driver_sql(
            "INSERT INTO b_outbox SELECT l.user_id, 'false' FROM b_ledger l"
            " WHERE l.value = 'true' AND NOT EXISTS"
            " (SELECT 1 FROM b_snapshot s WHERE s.user_id = l.user_id)"
        )
        return int(conn.exec_driver_sql("SELECT COUNT(*) FROM b_outbox").scalar_one())


def baseline_ack(state: Engine) -> None:
    with state.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO b_ledger SELECT user_id, value FROM b_outbox WHERE true"
            " ON CONFLICT (user_id) DO UPDATE SET value = excluded.value"
        )
        conn.exec_driver_sql("DELETE FROM b_outbox")


# -- audsync ----------------------------------------------------------------------------


def audsync_plan(state: Engine, source: Engine) -> int:
    run_id = start_run(state, DEFINITION.key, "manual", "bench")
    with state.begin() as conn:
        result = plan_definition(conn, source, DEFINITION, run_id=run_id, force=True)
    return result.queued


def audsync_ack(state: Engine) -> None:
    """What the deliverer's acknowledgements leave behind, done in bulk."""
    with state.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO ledger (audience_key, user_id, value, acked_at)"
            " SELECT audience_key, user_id, value, queued_at FROM outbox WHERE true"
            " ON CONFLICT (audience_key, user_id) DO UPDATE SET value = excluded.value"
        )
        conn.exec_driver_sql("DELETE FROM outbox")


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


@contextmanager
def state_db(kind: str, folder: Path) -> Iterator[Engine]:
    if kind == "sqlite":
        engine = open_state(f"sqlite:///{folder / 'state.db'}")
        yield engine
        engine.dispose()
        return
    admin_url = os.environ.get("AUDSYNC_BENCH_POSTGRES_URL") or os.environ.get(
        "AUDSYNC_TEST_POSTGRES_URL"
    )
    if not admin_url:
        raise SystemExit("set AUDSYNC_BENCH_POSTGRES_URL for the PostgreSQL case")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"audsync_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    engine = open_state(url)
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def bench(kind: str, members: int, ratio: float) -> list[tuple[str, float, float, int, int]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        warehouse = folder / "warehouse.db"
        build_warehouse(warehouse, members)
        source = create_engine(f"sqlite:///{warehouse}")
        with state_db(kind, folder) as state:
            with state.begin() as conn:
                for ddl in BASELINE_DDL:
                    conn.exec_driver_sql(ddl)
            # Interleave so both see the same cache state.
            t_base, n_base = timed(lambda: baseline_plan(state, source))
            t_aud, n_aud = timed(lambda: audsync_plan(state, source))
            rows.append(("initial", t_base, t_aud, n_base, n_aud))
            baseline_ack(state)
            audsync_ack(state)
            churn(warehouse, members, ratio)
            t_base, n_base = timed(lambda: baseline_plan(state, source))
            t_aud, n_aud = timed(lambda: audsync_plan(state, source))
            rows.append(("incremental", t_base, t_aud, n_base, n_aud))
        source.dispose()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--churn", type=float, default=0.01)
    parser.add_argument("--state", choices=["sqlite", "postgres", "both"], default="both")
    args = parser.parse_args()
    python = sys.version.split()[0]
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, Python {python}")
    print(f"{args.members:,} members, {args.churn:.0%} churn; source: SQLite")
    worst = 0.0
    kinds = ["sqlite", "postgres"] if args.state == "both" else [args.state]
    print(f"\n{'state':10} {'case':12} {'baseline s':>11} {'audsync s':>10} {'ratio':>6}"
          f" {'changes':>10}")
    for kind in kinds:
        for case, t_base, t_aud, n_base, n_aud in bench(kind, args.members, args.churn):
            assert n_base == n_aud, (case, n_base, n_aud)
            ratio = t_aud / t_base
            worst = max(worst, ratio)
            print(f"{kind:10} {case:12} {t_base:11.2f} {t_aud:10.2f} {ratio:6.2f} {n_aud:10,}")
    print(f"\nworst ratio {worst:.2f} (target <= 1.5) -> {'PASS' if worst <= 1.5 else 'MISS'}")
    return 0 if worst <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
