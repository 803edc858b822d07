"""Run audience and trait queries on the user's engine and stream normalised rows.

The query runs inside the user's database (SQLite, PostgreSQL, DuckDB, Snowflake,
BigQuery, Trino ... through their SQLAlchemy dialects); audsync only reads its
result, ``chunk_size`` rows at a time, already sorted by ``user_id`` by the
source engine so duplicates arrive side by side and collapse in O(1) memory.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from audsync.config import Definition
from audsync.contact import INVALID_MARK as INVALID_MARK  # re-exported: the old home
from audsync.contact import build_contact as build_contact  # re-exported: the old home
from audsync.contact import map_columns
from audsync.drivers import is_missing_driver, missing_driver_hint
from audsync.errors import (
    AudsyncError,
    ColumnProblem,
    ConfigError,
    DriverMissing,
    Interrupted,
    SourceError,
    UnstorableValue,
    first_line,
    safe_url,
)
from audsync.values import (
    JSON_TRUE,
    attribute,
    dumps,
    normalize_user_id,
    user_id_problem,
)

log = logging.getLogger("audsync.source")

CANCEL_POLL = 0.1
"""Seconds between looks at the stop request while a source query runs."""

SnapshotRow = tuple[str, str, str | None]
"""(user_id, canonical JSON value, contact JSON or None)."""


@dataclass
class StreamStats:
    """What streaming one query saw: rows read, ids skipped, duplicates collapsed,
    ids that cannot be stored (by reason, with the first example of each)."""

    rows: int = 0
    skipped_ids: int = 0
    duplicate_ids: int = 0
    invalid_ids: int = 0
    invalid_by_reason: dict[str, tuple[int, str]] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    in_database: bool = False  # loaded by one INSERT ... SELECT in the state DB (plan_in_db)

    def invalid(self, reason: str, user_id: str) -> None:
        """Count one row skipped because its id ``user_id`` cannot be stored."""
        self.invalid_ids += 1
        count, example = self.invalid_by_reason.get(reason, (0, user_id))
        self.invalid_by_reason[reason] = (count + 1, example)

    def invalid_reasons(self) -> str | None:
        """Why rows were skipped as invalid, one clause per reason with an example."""
        if not self.invalid_ids:
            return None
        return "; ".join(
            f"{reason}: {count} (e.g. {_example(example)})"
            for reason, (count, example) in sorted(self.invalid_by_reason.items())
        )


def _example(user_id: str, width: int = 40) -> str:
    """An id shown safely: control characters escaped, long ids cut."""
    shown = repr(user_id[:width])
    return shown + "…" if len(user_id) > width else shown


def open_source(url: str) -> Engine:
    """An engine on the source DB; a clear AudsyncError when it cannot be reached."""
    missing = _missing_sqlite_file(url)
    if missing is not None:
        # Connecting would create an empty database and report "no such table".
        raise ConfigError(
            f"source DB {safe_url(url)}", "", f"file {missing} not found (check [source] url)"
        )
    try:
        engine = create_engine(url)
        if engine.dialect.name == "sqlite" and engine.dialect.driver == "pysqlite":
            event.listen(engine, "connect", _tolerate_bad_utf8)
        with engine.connect():
            pass
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        if is_missing_driver(exc):
            raise DriverMissing(f"source DB {safe_url(url)}: {missing_driver_hint(url)}") from None
        raise AudsyncError(
            f"source DB {safe_url(url)} cannot be reached: {first_line(exc)}"
        ) from None
    return engine


def _missing_sqlite_file(url: str) -> str | None:
    try:
        parsed = make_url(url)
    except Exception:
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:") or Path(database).exists():
        return None
    return database


def _tolerate_bad_utf8(dbapi_connection: Any, _record: Any) -> None:
    # SQLite stores whatever bytes it is given as TEXT; one row of bad UTF-8 made
    # the driver fail the whole query (found by review). Decoded with
    # surrogateescape, the bad bytes reach the id and value checks, which fail
    # that one row or user with a reason instead.
    dbapi_connection.text_factory = _decode_text


def _decode_text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def stream_snapshot(
    engine: Engine,
    definition: Definition,
    chunk_size: int,
    stats: StreamStats,
    stop: Callable[[], bool] | None = None,
    keys: Mapping[str, str] | None = None,
) -> Iterator[list[SnapshotRow]]:
    """Yield the query's rows as snapshot rows, in chunks, sorted by user id.

    Rows without a usable ``user_id`` are skipped and counted; so are ids that
    cannot be stored (control characters, longer than MAX_USER_ID_LENGTH), by
    reason; a user id that appears again next to itself is collapsed (the first
    row wins) and counted (the loader collapses the rest). For a trait, a
    row whose ``value`` is null means the user has no value and is left out.
    Raises SourceError naming the audience when the query fails or its columns
    cannot be sent (:func:`audsync.contact.map_columns`; ``keys`` maps every
    audience and trait key to its kind, so a column cannot overwrite one).
    """
    key = definition.key
    columns = _columns(engine, definition, stop)
    stats.columns = columns
    try:
        column_map = map_columns(columns, definition.kind, key, keys)
    except ColumnProblem as exc:
        raise SourceError(key, str(exc), definition.kind) from None
    ordered = (
        f"SELECT * FROM (\n{definition.sql}\n) audsync_q ORDER BY {text_order(engine.dialect.name)}"
    )
    last_id: str | None = None
    is_trait = definition.kind == "trait"
    # Column roles are decided once per query, not once per row: this loop runs
    # a million times for a large audience.
    id_at = column_map.user_id_at
    value_at = column_map.value_at
    contact_at = column_map.contact_at
    cancelled: Callable[[], bool] = _never
    try:
        with engine.connect() as conn, cancel_on_stop(conn, stop) as cancelled:
            for partition in fetch_chunks(conn, ordered, chunk_size):
                if stop is not None and stop():
                    raise Interrupted(f"planning {key} stopped by a shutdown request")
                out: list[SnapshotRow] = []
                stats.rows += len(partition)
                for raw in partition:
                    raw_id = raw[id_at]
                    if type(raw_id) is int:
                        # A driver's int is at most a few dozen digits of 0-9: it
                        # cannot carry a control character or run too long.
                        user_id = str(raw_id)
                    else:
                        found = normalize_user_id(raw_id)
                        if found is None:
                            stats.skipped_ids += 1
                            continue
                        if problem := user_id_problem(found):
                            stats.invalid(problem, found)
                            continue
                        user_id = found
                    if user_id == last_id:
                        stats.duplicate_ids += 1
                        continue
                    last_id = user_id
                    if is_trait:
                        try:
                            value = attribute(raw[value_at])
                        except UnstorableValue as exc:
                            raise SourceError(
                                key,
                                f"user {user_id!r} has a value Gleap cannot store: {exc}",
                                definition.kind,
                            ) from None
                        if value is None:
                            continue
                        value_json = dumps(value)
                    else:
                        value_json = JSON_TRUE
                    if contact_at:
                        contact = build_contact({name: raw[i] for i, name in contact_at})
                        out.append((user_id, value_json, dumps(contact) if contact else None))
                    else:
                        out.append((user_id, value_json, None))
                if out:
                    yield out
    except SQLAlchemyError as exc:
        if cancelled():
            raise Interrupted(f"planning {key} stopped by a shutdown request") from None
        raise SourceError(key, f"query failed: {first_line(exc)}", definition.kind) from None


def fetch_chunks(conn: Connection, sql: str, chunk_size: int) -> Iterator[Sequence[Any]]:
    """The rows of ``sql`` (no parameters), ``chunk_size`` at a time, as driver tuples.

    On SQLite (sqlite3) and PostgreSQL (psycopg 3) the driver's own cursor is read
    directly — a server-side cursor on PostgreSQL — because building a SQLAlchemy
    Row per row cost as much as everything else a plan does per row. Other
    engines stream through SQLAlchemy.
    """
    dialect = conn.dialect
    if dialect.name == "sqlite" and dialect.driver == "pysqlite":
        cursor: Any = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    elif dialect.name == "postgresql" and dialect.driver == "psycopg":
        # A named cursor lives in the transaction SQLAlchemy's connection begins.
        conn.exec_driver_sql("SELECT 1")
        cursor = conn.connection.driver_connection.cursor(name="audsync_source")  # type: ignore[union-attr]
        cursor.itersize = chunk_size
    else:
        result = conn.execution_options(stream_results=True, yield_per=chunk_size).execute(
            text(sql)
        )
        yield from result.partitions(chunk_size)
        return
    try:
        cursor.execute(sql)
        while rows := cursor.fetchmany(chunk_size):
            yield rows
    except conn.dialect.loaded_dbapi.Error as exc:
        # The same error SQLAlchemy raises, so callers tell a failing query alike.
        raise DBAPIError.instance(sql, None, exc, conn.dialect.loaded_dbapi.Error) from exc
    finally:
        cursor.close()


@contextlib.contextmanager
def cancel_on_stop(
    conn: Connection, stop: Callable[[], bool] | None
) -> Iterator[Callable[[], bool]]:
    """While the block runs, cancel the statement running on ``conn`` once ``stop()`` is true.

    A slow query (a warehouse scan, ``pg_sleep``) blocks inside the driver, where
    no Python check can run; a watcher thread asks the driver to cancel it
    instead (PostgreSQL ``cancel``, SQLite and DuckDB ``interrupt``), so a stop
    takes effect within a fraction of a second and the database stops working
    too. Yields a callable that says whether the watcher cancelled: the driver
    error that follows is then a stop, not a failing query.
    """
    if stop is None:
        yield _never
        return
    driver = conn.connection.driver_connection
    done = threading.Event()
    cancelled = threading.Event()

    def watch() -> None:
        while not done.wait(CANCEL_POLL):
            if stop():
                cancelled.set()
                # Again at every poll until the block ends: a cancel that lands
                # just before the statement starts is a no-op for the driver.
                cancel_query(driver)

    watcher = threading.Thread(target=watch, name="audsync-query-cancel", daemon=True)
    watcher.start()
    try:
        yield cancelled.is_set
    finally:
        done.set()
        watcher.join()


def _never() -> bool:
    return False


def cancel_query(driver: Any) -> bool:
    """Ask a DBAPI connection to cancel what it is running; False when it cannot."""
    # psycopg 3.2+ cancel_safe(), psycopg 2/3 cancel(), sqlite3 and DuckDB interrupt().
    for name in ("cancel_safe", "cancel", "interrupt"):
        method = getattr(driver, name, None)
        if callable(method):
            try:
                method()
            except Exception as exc:  # a failed cancel must not hide the stop itself
                log.warning("could not cancel the source query: %s", exc)
                return False
            return True
    return False


# Sorting by the id's text (byte order) makes the snapshot load append to the
# state DB's primary-key B-tree instead of inserting all over it: numeric ids
# sorted as numbers (1, 2, 10) are out of order as text ("1", "10", "2").
_TEXT_ORDER = {
    "sqlite": "CAST(user_id AS TEXT)",
    "postgresql": 'CAST(user_id AS TEXT) COLLATE "C"',
    "duckdb": "CAST(user_id AS VARCHAR)",
    "snowflake": "CAST(user_id AS VARCHAR)",
    "trino": "CAST(user_id AS VARCHAR)",
    "bigquery": "CAST(user_id AS STRING)",
}


def text_order(dialect: str) -> str:
    """ORDER BY expression putting ids in text order on ``dialect`` (plain user_id if unknown)."""
    return _TEXT_ORDER.get(dialect, "user_id")


def _columns(
    engine: Engine, definition: Definition, stop: Callable[[], bool] | None = None
) -> list[str]:
    probe = f"SELECT * FROM (\n{definition.sql}\n) audsync_q WHERE 1 = 0"
    cancelled: Callable[[], bool] = _never
    try:
        with engine.connect() as conn, cancel_on_stop(conn, stop) as cancelled:
            return list(conn.execute(text(probe)).keys())
    except SQLAlchemyError as exc:
        if cancelled():
            raise Interrupted(f"planning {definition.key} stopped by a shutdown request") from None
        raise SourceError(
            definition.key, f"query failed: {first_line(exc)}", definition.kind
        ) from None
