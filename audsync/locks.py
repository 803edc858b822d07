"""Leases: at most one deliverer per state DB and one planner per audience, across hosts.

A lease is a row in ``leases`` with a holder, an expiry and a fencing token.
Acquiring is a compare-and-set on the token (no ``SELECT ... FOR UPDATE``), so
the same code works on SQLite and PostgreSQL. A holder that dies simply stops
renewing; once ``expires_at`` passes, the next process takes the lease with a
larger token, and the old holder's writes — which check the token — are refused.

Every expiry is computed and compared with the state DB's clock (:func:`db_now`),
never a host's: hosts whose clocks disagree by minutes still agree on whether a
lease has expired, so a host running ahead cannot take a live lease.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Float,
    cast,
    extract,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.sql.elements import ColumnElement

from audsync import models
from audsync.clock import utcnow
from audsync.defaults import DEFAULT_LEASE_TTL

DELIVER_LEASE = "deliver"


def plan_lease_name(key: str) -> str:
    """The lease that guards planning of one audience or trait."""
    return f"plan:{key}"


UNIX_EPOCH_JULIAN_DAY = 2440587.5
"""The Julian day number of 1970-01-01 00:00 UTC (SQLite's ``julianday`` counts from 4713 BC)."""


def db_now(dialect: str) -> ColumnElement[float]:
    """The state DB's clock as unix seconds, as a SQL expression for ``dialect``.

    PostgreSQL's ``clock_timestamp()`` is the server's time at the moment of the
    statement (not of the transaction's start, which may be old). A SQLite file
    has no server: its clock is the host's, which every process sharing the file
    has in common.
    """
    if dialect == "postgresql":
        return cast(extract("epoch", func.clock_timestamp()), Float)
    if dialect == "sqlite":
        return (func.julianday("now") - UNIX_EPOCH_JULIAN_DAY) * 86400.0
    # No other state DB is supported; the host's clock is the best there is.
    return literal(time.time(), Float)


def may_take(holder: str | None, expires_at: float, now: float, me: str, dead_here: bool) -> bool:
    """Whether ``me`` may take a lease row held by ``holder`` until ``expires_at``.

    ``now`` is the state DB's time; ``dead_here`` says the holder is a process
    on this host that no longer exists. Free, ours, expired or dead: take it.
    """
    return holder is None or holder == me or expires_at <= now or dead_here


def holder_identity() -> str:
    """A holder id unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Lease:
    """A held lease. ``token`` is the fencing token to check before writing."""

    name: str
    holder: str
    token: int
    ttl: float
    expires_at: float


def acquire(engine: Engine, name: str, holder: str, ttl: float = DEFAULT_LEASE_TTL) -> Lease | None:
    """Take the lease if it is free, expired or already ours; None when someone else holds it.

    Expired means by the state DB's clock, and the new expiry is the DB's time
    plus ``ttl``: this host's clock plays no part.
    """
    now = db_now(engine.dialect.name)
    try:
        with engine.begin() as conn:
            row = conn.execute(
                select(
                    models.leases.c.holder,
                    models.leases.c.token,
                    models.leases.c.expires_at,
                    models.leases.c.host,
                    models.leases.c.pid,
                    now.label("db_now"),
                ).where(models.leases.c.name == name)
            ).first()
            values: dict[str, Any] = {
                "holder": holder,
                "expires_at": now + ttl,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "acquired_at": utcnow(),
            }
            if row is None:
                conn.execute(insert(models.leases).values(name=name, token=1, **values))
                token = 1
            else:
                if not may_take(row.holder, row.expires_at, row.db_now, holder, _dead_here(row)):
                    return None
                token = row.token + 1
                # The expiry seen is part of the compare-and-set: a renewal that
                # lands between our read and this write keeps the lease its holder's.
                done = conn.execute(
                    update(models.leases)
                    .where(
                        models.leases.c.name == name,
                        models.leases.c.token == row.token,
                        models.leases.c.expires_at == row.expires_at,
                    )
                    .values(token=token, **values)
                )
                if done.rowcount != 1:
                    return None
            return Lease(name, holder, token, ttl, _expiry(conn, name))
    except IntegrityError:
        return None  # another process inserted the row first


def _expiry(conn: Connection, name: str) -> float:
    # Read back what the DB computed, so Lease.expires_at is in the DB's time too.
    return float(
        conn.execute(
            select(models.leases.c.expires_at).where(models.leases.c.name == name)
        ).scalar_one()
    )


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_here(row: Any) -> bool:
    # A holder on this very host whose process is gone (SIGKILL, OOM) cannot
    # renew: no need to make the user wait out the TTL.
    return bool(
        row.host == socket.gethostname()
        and row.pid is not None
        and row.pid != os.getpid()
        and not pid_alive(row.pid)
    )


def renew(engine: Engine, lease: Lease) -> bool:
    """Push the expiry to the DB's time plus the TTL; False when the lease was lost (taken)."""
    with engine.begin() as conn:
        done = conn.execute(
            update(models.leases)
            .where(
                models.leases.c.name == lease.name,
                models.leases.c.holder == lease.holder,
                models.leases.c.token == lease.token,
            )
            .values(expires_at=db_now(engine.dialect.name) + lease.ttl)
        )
        if done.rowcount != 1:
            return False
        lease.expires_at = _expiry(conn, lease.name)
    return True


def release(engine: Engine, lease: Lease) -> None:
    """Give the lease up so the next process need not wait for the expiry."""
    with engine.begin() as conn:
        conn.execute(
            update(models.leases)
            .where(
                models.leases.c.name == lease.name,
                models.leases.c.holder == lease.holder,
                models.leases.c.token == lease.token,
            )
            .values(holder=None, expires_at=0.0)
        )


def still_held(conn: Connection, lease: Lease) -> bool:
    """Fencing check inside a writer's transaction: is ``lease`` still the current one?"""
    row = conn.execute(
        select(models.leases.c.holder, models.leases.c.token).where(
            models.leases.c.name == lease.name
        )
    ).first()
    return row is not None and row.holder == lease.holder and row.token == lease.token


def current_holder(engine: Engine, name: str) -> dict[str, Any] | None:
    """Who holds ``name`` now (holder, host, pid, expires_at), or None when it is free.

    ``expires_at`` is unix seconds by the state DB's clock, like every lease expiry.
    """
    with engine.connect() as conn:
        row = conn.execute(
            select(models.leases, db_now(engine.dialect.name).label("db_now")).where(
                models.leases.c.name == name
            )
        ).first()
    if row is None or row.holder is None or row.expires_at <= row.db_now or _dead_here(row):
        return None
    held = dict(row._mapping)
    del held["db_now"]
    return held


class Heartbeat:
    """Renews leases from a background thread every ttl/3 while work goes on."""

    def __init__(self, engine: Engine, *leases: Lease) -> None:
        self.engine = engine
        self.leases = list(leases)
        self.lost = threading.Event()
        self._stop = threading.Event()
        ttl = min((lease.ttl for lease in leases), default=DEFAULT_LEASE_TTL)
        self._period = max(ttl / 3, 0.05)
        self._thread = threading.Thread(target=self._run, name="audsync-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            for lease in list(self.leases):
                try:
                    if not renew(self.engine, lease):
                        self.lost.set()
                except OperationalError:
                    # SQLite busy behind a long write: the expiry is generous
                    # enough to try again next beat.
                    continue
