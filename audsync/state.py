"""Opening the state database: engine settings that make SQLite and PostgreSQL behave alike."""

from __future__ import annotations

import functools
from collections.abc import Collection
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from audsync import migrate, models
from audsync.config import Config
from audsync.defaults import DEFAULT_BUSY_TIMEOUT
from audsync.drivers import is_missing_driver, missing_driver_hint
from audsync.errors import DriverMissing, StateError, StateMoved, first_line, redact, safe_url


def open_state(
    url: str, *, upgrade: bool = True, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
) -> Engine:
    """An engine on the state DB, upgraded to the current schema when ``upgrade``."""
    try:
        engine = create_engine(url, **_engine_options(url, busy_timeout))
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        if is_missing_driver(exc):
            raise DriverMissing(f"state DB {safe_url(url)}: {missing_driver_hint(url)}") from None
        raise StateError(f"state DB {redact(url, _password(url))}: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", functools.partial(_sqlite_pragmas, busy_timeout))
    try:
        if upgrade:
            migrate.upgrade(engine)
        else:
            with engine.connect():
                pass
    except SQLAlchemyError as exc:
        raise StateError(
            f"state DB {engine.url.render_as_string(hide_password=True)} is unusable: "
            f"{first_line(exc)}"
        ) from None
    return engine


def _engine_options(url: str, busy_timeout: float) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # A second process (the daemon beside a manual sync) waits for the
        # write lock instead of failing at once.
        return {"connect_args": {"timeout": busy_timeout}}
    return {"pool_pre_ping": True}


def _sqlite_pragmas(busy_timeout: float, dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (status, history, SQL by the user) run beside a writer;
    # NORMAL sync is durable across process crashes, which is what we promise.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    cursor.close()


def _password(url: str) -> str | None:
    try:
        password = make_url(url).password
        return None if password is None else str(password)
    except Exception:
        return None


def open_configured(config: Config, *, upgrade: bool = True) -> Engine:
    """The state DB of ``config``, upgraded to the current schema when ``upgrade``."""
    refuse_second_ledger(config)
    return open_state(config.state_url, upgrade=upgrade, busy_timeout=config.state_busy_timeout)


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL, or None for another engine or an in-memory DB."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    if parsed.database == ":memory:" or parsed.database.startswith("file:"):
        return None
    return Path(parsed.database)


def state_db_exists(config: Config) -> bool:
    """False only for a SQLite state DB whose file is not there (a server DB is
    taken to exist; connecting says otherwise)."""
    path = sqlite_file(config.state_url)
    return path is None or path.exists()


def describe_state(config: Config) -> str:
    """The state DB as the user should see it: the URL without its password."""
    return safe_url(config.state_url)


def refuse_second_ledger(config: Config) -> None:
    """Raise StateMoved when the config's SQLite state DB does not exist but the file
    its relative path named in older versions (from the working directory) does."""
    # Before relative SQLite paths were taken relative to the config file, they
    # were relative to the working directory. Creating a fresh ledger beside
    # the old one would resend every member to Gleap: refuse, and say how to
    # keep the old one.
    if config.state_url_written is None or state_db_exists(config):
        return
    old = sqlite_file(config.state_url_written)
    if old is None or not old.exists():
        return
    raise StateMoved(
        f"state DB {describe_state(config)} does not exist, but {old.resolve()} in the"
        " working directory does: a relative SQLite path in the config file is"
        f" taken relative to the file's folder; to keep that ledger set [state] url ="
        f' "sqlite:///{old.resolve()}" (or move the file); starting a new one would'
        " resend every member to Gleap"
    )


def open_for_reading(config: Config) -> Engine:
    """The state DB for ``history``/``status``: never created or migrated by a read.

    Raises StateError when it does not exist yet or needs ``audsync db upgrade``.
    """
    url = make_url(config.state_url)
    refuse_second_ledger(config)
    if not state_db_exists(config):
        raise StateError(
            f"state DB {url.render_as_string(hide_password=True)} does not exist yet:"
            " run `audsync sync` (or `audsync db upgrade`) first"
        )
    engine = open_configured(config, upgrade=False)
    current, head = migrate.current_revision(engine), migrate.head_revision()
    if current != head:
        raise StateError(
            f"state DB {url.render_as_string(hide_password=True)} is at schema revision"
            f" {current or 'none'}, this audsync needs {head}: run `audsync db upgrade`"
        )
    return engine


def keys_in_ledger(url: str, busy_timeout: float, keys: Collection[str]) -> set[str]:
    """Which of ``keys`` have ledger rows in the state DB at ``url`` (Gleap holds them).

    Read only: a state DB that does not exist yet (or has no ledger table) holds
    none, and is not created. Raises StateError when it exists but cannot be read,
    rather than guess: a wrong guess would move an audience to a new key.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and (
        not parsed.database or parsed.database == ":memory:" or not Path(parsed.database).exists()
    ):
        return set()
    engine = open_state(url, upgrade=False, busy_timeout=busy_timeout)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("ledger"):
                return set()
            ledger = models.ledger.c
            return set(
                conn.execute(
                    select(ledger.audience_key).distinct().where(ledger.audience_key.in_(keys))
                ).scalars()
            )
    except SQLAlchemyError as exc:
        raise StateError(
            f"state DB {parsed.render_as_string(hide_password=True)}: cannot read which keys"
            f" Gleap holds: {first_line(exc)}"
        ) from None
    finally:
        engine.dispose()
