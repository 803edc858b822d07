"""Opening the state database: engine settings that make SQLite and PostgreSQL behave alike."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError

from audsync import migrate
from audsync.errors import StateError, redact


def open_state(url: str, *, upgrade: bool = True) -> Engine:
    """An engine on the state DB, upgraded to the current schema when ``upgrade``."""
    try:
        engine = create_engine(url, **_engine_options(url))
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise StateError(f"state DB {redact(url, _password(url))}: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        if upgrade:
            migrate.upgrade(engine)
        else:
            with engine.connect():
                pass
    except SQLAlchemyError as exc:
        raise StateError(
            f"state DB {engine.url.render_as_string(hide_password=True)} is unusable: "
            f"{_first_line(exc)}"
        ) from None
    return engine


def _engine_options(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # A second process (the daemon beside a manual sync) waits for the
        # write lock instead of failing at once.
        return {"connect_args": {"timeout": 30}}
    return {"pool_pre_ping": True}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (status, history, SQL by the user) run beside a writer;
    # NORMAL sync is durable across process crashes, which is what we promise.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _password(url: str) -> str | None:
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
        return None if password is None else str(password)
    except Exception:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
