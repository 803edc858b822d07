"""Writing and reading ``sync_runs``: one row per planned audience or trait per run."""

from __future__ import annotations

import os
import socket
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update

from audsync import models
from audsync.clock import utcnow
from audsync.locks import DELIVER_LEASE, current_holder, pid_alive, plan_lease_name


def start_run(engine: Engine, key: str, trigger: str, mode: str) -> int:
    """Record a run in ``planning`` and return its id."""
    with engine.begin() as conn:
        result = conn.execute(
            insert(models.sync_runs).values(
                audience_key=key,
                trigger=trigger,
                mode=mode,
                status="planning",
                started_at=utcnow(),
                members=0,
                entered=0,
                exited=0,
                changed=0,
                queued=0,
                delivered=0,
                failed=0,
                superseded=0,
                skipped_ids=0,
                duplicate_ids=0,
                invalid_ids=0,
                host=socket.gethostname(),
                pid=os.getpid(),
            )
        )
        assert result.inserted_primary_key is not None
        return int(result.inserted_primary_key[0])


def set_run(conn: Connection | Engine, run_id: int, **values: Any) -> None:
    """Update one run's columns (in ``conn``'s transaction, or its own)."""
    if values.get("status") in models.TERMINAL_STATUSES and "finished_at" not in values:
        values["finished_at"] = utcnow()
    statement = update(models.sync_runs).where(models.sync_runs.c.id == run_id).values(**values)
    if isinstance(conn, Engine):
        with conn.begin() as c:
            c.execute(statement)
    else:
        conn.execute(statement)


def claim_delivering_runs(conn: Connection, host: str, pid: int) -> None:
    """The deliverer owns every run still delivering: a run is alive while its deliverer is."""
    conn.execute(
        update(models.sync_runs)
        .where(models.sync_runs.c.status == "delivering")
        .values(host=host, pid=pid)
    )


def close_open_runs(engine: Engine, status: str, reason: str) -> None:
    """Close this process's runs still delivering (stopped, or Gleap refused the token).

    Their pending changes stay in the outbox for the next deliverer.
    """
    r = models.sync_runs.c
    with engine.begin() as conn:
        ids = (
            conn.execute(
                select(r.id).where(
                    r.status == "delivering", r.host == socket.gethostname(), r.pid == os.getpid()
                )
            )
            .scalars()
            .all()
        )
        for run_id in ids:
            set_run(conn, run_id, status=status, error=reason)


def mark_interrupted(engine: Engine) -> int:
    """Close runs that a dead process left ``planning`` or ``delivering``; return how many.

    On this host a run's process is checked by pid; for other hosts, a run is
    abandoned when the lease of its phase has expired.
    """
    me = socket.gethostname()
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                models.sync_runs.c.id,
                models.sync_runs.c.audience_key,
                models.sync_runs.c.status,
                models.sync_runs.c.host,
                models.sync_runs.c.pid,
            ).where(models.sync_runs.c.status.in_(models.OPEN_STATUSES))
        ).all()
    dead = []
    for row in rows:
        if row.host == me and row.pid is not None:
            if row.pid != os.getpid() and not pid_alive(row.pid):
                dead.append(row)
        else:
            lease = (
                DELIVER_LEASE if row.status == "delivering" else plan_lease_name(row.audience_key)
            )
            if current_holder(engine, lease) is None:
                dead.append(row)
    for row in dead:
        set_run(
            engine,
            row.id,
            status="interrupted",
            error=f"process {row.host}:{row.pid} ended while the run was {row.status}",
        )
    return len(dead)


def runs(
    engine: Engine, *, audience: str | None = None, limit: int = 20, ids: list[int] | None = None
) -> list[dict[str, Any]]:
    """Runs, newest first, as dicts with a computed ``pending`` count."""
    r = models.sync_runs.c
    query = select(models.sync_runs).order_by(r.id.desc()).limit(limit)
    if audience:
        query = query.where(r.audience_key == audience)
    if ids is not None:
        query = query.where(r.id.in_(ids))
    with engine.connect() as conn:
        rows = [dict(row._mapping) for row in conn.execute(query)]
    for row in rows:
        row["pending"] = max(
            0, row["queued"] - row["delivered"] - row["failed"] - row["superseded"]
        )
    return rows


def failures(
    engine: Engine, *, audience: str | None = None, limit: int = 20
) -> list[dict[str, Any]]:
    """Per-user delivery failures, newest first."""
    f = models.delivery_failures.c
    query = select(models.delivery_failures).order_by(f.id.desc()).limit(limit)
    if audience:
        query = query.where(f.audience_key == audience)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def known_keys(engine: Engine) -> list[str]:
    """Every audience or trait key the state DB knows (with ``*``, forget's runs), sorted."""
    with engine.connect() as conn:
        keys = set(conn.execute(select(models.audiences.c.key)).scalars())
        keys |= set(conn.execute(select(models.sync_runs.c.audience_key).distinct()).scalars())
    return sorted(keys)
