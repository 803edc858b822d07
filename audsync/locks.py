"""Leases: at most one deliverer per state DB and one planner per audience, across hosts.

A lease is a row in ``leases`` with a holder, an expiry and a fencing token.
Acquiring is a compare-and-set on the token (no ``SELECT ... FOR UPDATE``), so
the same code works on SQLite and PostgreSQL. A holder that dies simply stops
renewing; once ``expires_at`` passes, the next process takes the lease with a
larger token, and the old holder's writes — which check the token — are refused.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from audsync import models
from audsync.clock import utcnow, wall
from audsync.defaults import DEFAULT_LEASE_TTL

DELIVER_LEASE = "deliver"


def plan_lease_name(key: str) -> str:
    """The lease that guards planning of one audience or trait."""
    return f"plan:{key}"


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
    """Take the lease if it is free, expired or already ours; None when someone else holds it."""
    now = wall()
    try:
        with engine.begin() as conn:
            row = conn.execute(
                select(
                    models.leases.c.holder,
                    models.leases.c.token,
                    models.leases.c.expires_at,
                    models.leases.c.host,
                    models.leases.c.pid,
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
                return Lease(name, holder, 1, ttl, now + ttl)
            if row.holder not in (None, holder) and row.expires_at > now and not _dead_here(row):
                return None
            token = row.token + 1
            done = conn.execute(
                update(models.leases)
                .where(models.leases.c.name == name, models.leases.c.token == row.token)
                .values(token=token, **values)
            )
            if done.rowcount != 1:
                return None
            return Lease(name, holder, token, ttl, now + ttl)
    except IntegrityError:
        return None  # another process inserted the row first


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
    """Push the expiry forward; False when the lease was lost (expired and taken)."""
    expires = wall() + lease.ttl
    with engine.begin() as conn:
        done = conn.execute(
            update(models.leases)
            .where(
                models.leases.c.name == lease.name,
                models.leases.c.holder == lease.holder,
                models.leases.c.token == lease.token,
            )
            .values(expires_at=expires)
        )
    if done.rowcount == 1:
        lease.expires_at = expires
        return True
    return False


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
    """Who holds ``name`` now (holder, host, pid, expires_at), or None when it is free."""
    with engine.connect() as conn:
        row = conn.execute(select(models.leases).where(models.leases.c.name == name)).first()
    if row is None or row.holder is None or row.expires_at <= wall() or _dead_here(row):
        return None
    return dict(row._mapping)


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
