"""Plan benchmark: audsync's planning against a bare client-side baseline, per size.

    python benchmarks/plan.py [--sizes 1000000 5000000] [--churn 0.01]
                              [--state sqlite postgres] [--repeat 3]

The bare baseline (issue 15), measured in the same run: stream
``SELECT user_id FROM big ORDER BY user_id`` from the SQLite warehouse with
``fetchmany(50_000)``, ``executemany`` it into a one-column ``WITHOUT ROWID``
primary-key table of a scratch SQLite file, then count the rows ``NOT EXISTS``
in an empty ledger. Nothing a real plan needs (ids normalised, duplicates,
suppressions, run accounting) — the floor any client-side plan stands on.

Cases, each against that baseline, per state database (SQLite file, PostgreSQL):

- ``dry run, first sync``: ``audsync sync --dry-run`` (``run_sync(dry_run=True)``)
  of an audience never synced, the state DB migrated and empty;
- ``dry run, no state DB``: the same with no state DB at all (SQLite only);
- ``first plan``: a real first plan, committed (members go to the outbox);
- ``incremental, 1 % churn``: after every member was acknowledged, 1 % left and
  as many joined;
- ``in-database`` (PostgreSQL only): ``big`` copied into the state database
  (state in its own ``audsync`` schema, the table in ``public``), so the plan
  loads it with one ``INSERT ... SELECT``: a dry run and a first plan.

Baseline and audsync alternate, ``--repeat`` times each; the best of each is
kept and the ratio is best/best. The machine may be shared: only the ratios of
one run mean anything. Peak RSS is the whole benchmark process's
(``ru_maxrss``): an upper bound for any single plan in it.

PostgreSQL needs AUDSYNC_BENCH_POSTGRES_URL (or AUDSYNC_TEST_POSTGRES_URL);
each run creates and drops its own database.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from audsync.config import Config, Definition, SyncConfig
from audsync.history import start_run
from audsync.plan import plan_definition
from audsync.source import open_source
from audsync.state import open_state
from audsync.sync import run_sync

SQL = "SELECT user_id FROM big"
DEFINITION = Definition("audience", "Members", "members", SQL)

Case = Callable[[], object]


def build_warehouse(path: Path, members: int) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE big (user_id INTEGER PRIMARY KEY)")
    batch = 200_000
    for start in range(1, members + 1, batch):
        ids = range(start, min(start + batch, members + 1))
        db.executemany("INSERT INTO big VALUES (?)", ((i,) for i in ids))
    db.commit()
    db.close()


def churn(path: Path, members: int, ratio: float) -> None:
    """``ratio`` of the members leave; as many new users join."""
    step = round(1 / ratio)
    db = sqlite3.connect(path)
    db.execute("DELETE FROM big WHERE user_id % ? = 0", (step,))
    db.executemany(
        "INSERT INTO big VALUES (?)", ((members + i,) for i in range(1, members // step + 1))
    )
    db.commit()
    db.close()


def bare_baseline(warehouse: Path, scratch: Path) -> int:
    """The issue's floor: stream sorted ids, executemany into a one-column table, count."""
    scratch.unlink(missing_ok=True)
    src = sqlite3.connect(warehouse)
    dst = sqlite3.connect(scratch)
    dst.execute("CREATE TABLE b (user_id TEXT PRIMARY KEY) WITHOUT ROWID")
    dst.execute("CREATE TABLE bl (user_id TEXT PRIMARY KEY) WITHOUT ROWID")
    cursor = src.execute("SELECT user_id FROM big ORDER BY user_id")
    while rows := cursor.fetchmany(50_000):
        dst.executemany("INSERT INTO b VALUES (?)", rows)
    count = dst.execute(
        "SELECT COUNT(*) FROM b WHERE NOT EXISTS (SELECT 1 FROM bl WHERE bl.user_id = b.user_id)"
    ).fetchone()[0]
    dst.commit()
    src.close()
    dst.close()
    return int(count)


def plan_once(state: Engine, source: Engine, in_database: bool = False) -> int:
    """One real plan, committed, as `audsync sync` does before delivering."""
    run_id = start_run(state, DEFINITION.key, "manual", "bench")
    with state.begin() as conn:
        settings = SyncConfig(in_database="auto" if in_database else "off")
        result = plan_definition(
            conn, source, DEFINITION, run_id=run_id, settings=settings, force=True
        )
    return result.queued


def dry_run(state_url: str, source_url: str, in_database: str = "off") -> int:
    config = Config(
        path="bench",
        source_url=source_url,
        state_url=state_url,
        definitions=(DEFINITION,),
        sync=SyncConfig(in_database=in_database),
    )
    outcome = run_sync(config, dry_run=True)
    assert not outcome.errors, outcome.errors
    return outcome.dry_run_calls


def acknowledge_all(state: Engine) -> None:
    """What the deliverer's acknowledgements leave behind, done in bulk."""
    with state.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO ledger (audience_key, user_id, value, acked_at)"
            " SELECT audience_key, user_id, value, queued_at FROM outbox WHERE true"
            " ON CONFLICT (audience_key, user_id) DO UPDATE SET value = excluded.value"
        )
        conn.exec_driver_sql("DELETE FROM outbox")


def reset(state: Engine, *tables: str) -> None:
    with state.begin() as conn:
        for table in tables:
            conn.exec_driver_sql(f"DELETE FROM {table}")


def best_of(
    repeat: int, baseline: Case, audsync: Case, before: Callable[[], None] = lambda: None
) -> tuple[float, float]:
    """Alternate baseline and audsync ``repeat`` times; the best time of each."""
    base: list[float] = []
    ours: list[float] = []
    for _ in range(repeat):
        started = time.perf_counter()
        baseline()
        base.append(time.perf_counter() - started)
        before()
        started = time.perf_counter()
        audsync()
        ours.append(time.perf_counter() - started)
    return min(base), min(ours)


@contextmanager
def postgres_db() -> Iterator[str]:
    admin_url = os.environ.get("AUDSYNC_BENCH_POSTGRES_URL") or os.environ.get(
        "AUDSYNC_TEST_POSTGRES_URL"
    )
    if not admin_url:
        raise SystemExit("set AUDSYNC_BENCH_POSTGRES_URL for the PostgreSQL case")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"audsync_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def state_url_for(kind: str, folder: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'state.db'}"
    else:
        with postgres_db() as url:
            yield url


def copy_big_into(state: Engine, warehouse: Path) -> None:
    """Put the warehouse's ``big`` into the PostgreSQL state DB (in-database case)."""
    db = sqlite3.connect(warehouse)
    with state.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS big")
        conn.exec_driver_sql("CREATE TABLE big (user_id BIGINT PRIMARY KEY)")
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy("COPY big (user_id) FROM STDIN") as copy:
            for (user_id,) in db.execute("SELECT user_id FROM big"):
                copy.write_row((user_id,))
        conn.exec_driver_sql("ANALYZE big")
    db.close()


def bench_in_database(
    admin_url: str, warehouse: Path, base: Case, members: int, repeat: int
) -> list[tuple[str, float, float, int]]:
    """The warehouse case: ``big`` in ``public``, audsync's state in schema ``audsync``."""
    with create_engine(admin_url).begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA audsync")
    url = make_url(admin_url)
    state_url = url.update_query_dict({"options": "-csearch_path=audsync"}).render_as_string(
        hide_password=False
    )
    source_url = url.render_as_string(hide_password=False)
    source = open_source(source_url)
    copy_big_into(source, warehouse)
    state = open_state(state_url)
    out: list[tuple[str, float, float, int]] = []
    b, a = best_of(repeat, base, lambda: dry_run(state_url, source_url, "auto"))
    out.append(("in-database dry run", b, a, members))
    b, a = best_of(
        repeat, base, lambda: plan_once(state, source, in_database=True),
        before=lambda: reset(state, "outbox", "snapshot"),
    )
    out.append(("in-database first plan", b, a, members))
    state.dispose()
    source.dispose()
    return out


def bench(
    kind: str, members: int, ratio: float, repeat: int
) -> list[tuple[str, float, float, int]]:
    out: list[tuple[str, float, float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        warehouse = folder / "warehouse.db"
        scratch = folder / "bare.db"
        build_warehouse(warehouse, members)
        source_url = f"sqlite:///{warehouse}"
        source = open_source(source_url)

        def base() -> int:
            return bare_baseline(warehouse, scratch)

        with state_url_for(kind, folder) as state_url:
            if kind == "sqlite":
                b, a = best_of(repeat, base, lambda: dry_run(state_url, source_url))
                out.append(("dry run, no state DB", b, a, members))
            state = open_state(state_url)
            b, a = best_of(repeat, base, lambda: dry_run(state_url, source_url))
            out.append(("dry run, first sync", b, a, members))
            b, a = best_of(
                repeat, base, lambda: plan_once(state, source),
                before=lambda: reset(state, "outbox", "snapshot"),
            )
            out.append(("first plan", b, a, members))
            acknowledge_all(state)
            # A steady-state incremental plan replaces the previous plan's snapshot
            # (a first plan writes none): plan once, untimed, before the churn.
            plan_once(state, source)
            reset(state, "outbox")
            churn(warehouse, members, ratio)
            changes = 2 * (members // round(1 / ratio))
            b, a = best_of(
                repeat, base, lambda: plan_once(state, source),
                before=lambda: reset(state, "outbox"),
            )
            out.append((f"incremental, {ratio:.0%} churn", b, a, changes))
            b, a = best_of(repeat, base, lambda: dry_run(state_url, source_url))
            out.append((f"dry run, {ratio:.0%} churn", b, a, changes))
            state.dispose()
            if kind == "postgres":
                out.extend(bench_in_database(state_url, warehouse, base, members, repeat))
        source.dispose()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--churn", type=float, default=0.01)
    parser.add_argument(
        "--state", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"]
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    python = sys.version.split()[0]
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, Python {python}")
    print(f"load average at start: {os.getloadavg()[0]:.1f}; best of {args.repeat}, alternated")
    print(f"\n{'size':>10} {'state':9} {'case':28} {'bare s':>7} {'audsync s':>9} {'ratio':>6}")
    for members in args.sizes:
        for kind in args.state:
            for case, t_base, t_aud, _ in bench(kind, members, args.churn, args.repeat):
                print(
                    f"{members:>10,} {kind:9} {case:28} {t_base:7.2f} {t_aud:9.2f}"
                    f" {t_aud / t_base:6.2f}",
                    flush=True,
                )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {peak:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
