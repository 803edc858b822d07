"""Bring the state database to the newest schema with Alembic, from code."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.pool import NullPool


def migrations_dir() -> str:
    """Where the revisions are: the installed ``audsync.migrations``, else the checkout's."""
    spec = importlib.util.find_spec("audsync.migrations")
    if spec is not None and spec.submodule_search_locations:
        return str(next(iter(spec.submodule_search_locations)))
    return str(Path(__file__).resolve().parent.parent / "migrations")  # pragma: no cover


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", migrations_dir())
    return cfg


def head_revision() -> str | None:
    """The newest revision this audsync knows."""
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None when it was never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Upgrade the database to the newest revision; a no-op when it already is.

    All revisions run in one transaction, so a process killed mid-upgrade leaves
    the schema as it was, and concurrent upgrades by several processes queue.
    """
    if current_revision(engine) == head_revision():
        return
    cfg = _alembic_config()
    if engine.dialect.name == "sqlite":
        with _transactional_sqlite(engine) as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        return
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7368191)")  # one migrator
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@contextlib.contextmanager
def _transactional_sqlite(engine: Engine) -> Iterator[Connection]:
    """A connection whose DDL is really transactional.

    Python's sqlite3 runs CREATE TABLE outside any transaction (autocommit),
    so a kill mid-migration would leave half a schema; taking transaction
    control from the driver (SQLAlchemy's documented pysqlite recipe) fixes it.
    BEGIN IMMEDIATE also makes a second migrating process wait its turn.
    """
    migrating = create_engine(engine.url, poolclass=NullPool)

    @event.listens_for(migrating, "connect")
    def _no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA busy_timeout=30000")

    @event.listens_for(migrating, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    try:
        with migrating.begin() as conn:
            yield conn
    finally:
        migrating.dispose()
