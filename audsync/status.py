"""What ``audsync status`` reports: per audience the last plan, the backlog and its ETA."""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, func, select

from audsync import models
from audsync.clock import utcnow
from audsync.config import Config
from audsync.deliver import pending_user_count
from audsync.locks import DELIVER_LEASE, current_holder, pid_alive

DAEMON_BEAT_INTERVAL = 15.0
"""Seconds between two health records of a running daemon (``audsync run``)."""

DAEMON_FORGOTTEN_AFTER = dt.timedelta(days=1)
"""Records of daemons gone for longer are not shown (the daemon deletes them)."""


def daemon_liveness(
    recorded: str,
    host: str,
    pid: int | None,
    beat_age: float,
    *,
    this_host: str,
    alive: Callable[[int], bool],
    stale_after: float,
) -> str:
    """What a daemon record means now: its recorded state while its process lives,
    else ``exited`` (its pid is gone from this host) or ``stale`` (no heartbeat for
    ``stale_after`` seconds: it died, or its host is cut off). ``stopped`` stays."""
    if recorded == "stopped":
        return "stopped"
    if host == this_host and pid is not None and not alive(pid):
        return "exited"
    if beat_age > stale_after:
        return "stale"
    return recorded


def daemon_stale_after(lease_ttl: float) -> float:
    """Heartbeat age past which a daemon is taken for gone: the lease TTL (after which
    its leases are free anyway), but never less than three missed beats."""
    return max(lease_ttl, 3 * DAEMON_BEAT_INTERVAL)


def eta_seconds(calls: int, rate_limit: int, rate_window: float) -> float:
    """How long ``calls`` Identify calls take at the configured budget."""
    if rate_limit <= 0:
        return 0.0
    return calls * rate_window / rate_limit


def collect_status(engine: Engine, config: Config) -> dict[str, Any]:
    """Per-audience state plus the delivery lease holder and the total backlog."""
    o = models.outbox.c
    with engine.connect() as conn:
        known = {row.key: dict(row._mapping) for row in conn.execute(select(models.audiences))}
        pending: dict[str, int] = dict(
            conn.execute(
                select(o.audience_key, func.count())
                .where(o.state == "pending")
                .group_by(o.audience_key)
            ).all()
        )
        parked: dict[str, int] = dict(
            conn.execute(
                select(o.audience_key, func.count())
                .where(o.state == "failed")
                .group_by(o.audience_key)
            ).all()
        )
        users = pending_user_count(conn)
        last_runs = {
            row.audience_key: row.status
            for row in conn.execute(
                select(models.sync_runs.c.audience_key, models.sync_runs.c.status).where(
                    models.sync_runs.c.id.in_(
                        select(func.max(models.sync_runs.c.id)).group_by(
                            models.sync_runs.c.audience_key
                        )
                    )
                )
            )
        }
    configured = {d.key: d for d in config.definitions}
    audiences = []
    for key in sorted(set(known) | set(configured)):
        row = known.get(key, {})
        definition = configured.get(key)
        audiences.append(
            {
                "key": key,
                "kind": definition.kind if definition else row.get("kind"),
                "configured": definition is not None,
                "members": row.get("members"),
                "last_planned_at": row.get("last_planned_at"),
                "last_success_at": row.get("last_success_at"),
                "last_status": last_runs.get(key),
                "pending": int(pending.get(key, 0)),
                "parked_failures": int(parked.get(key, 0)),
            }
        )
    holder = current_holder(engine, DELIVER_LEASE)
    now = utcnow()
    with engine.connect() as conn:
        daemons = [
            dict(row._mapping)
            for row in conn.execute(
                select(models.daemons)
                .where(
                    models.daemons.c.beat_at >= now - DAEMON_FORGOTTEN_AFTER,
                    models.daemons.c.state != "stopped",
                )
                .order_by(models.daemons.c.started_at)
            )
        ]
    stale_after = daemon_stale_after(config.sync.lease_ttl)
    for daemon in daemons:
        daemon["recorded_state"] = daemon["state"]
        daemon["state"] = daemon_liveness(
            daemon["state"],
            daemon["host"],
            daemon["pid"],
            (now - daemon["beat_at"]).total_seconds(),
            this_host=socket.gethostname(),
            alive=pid_alive,
            stale_after=stale_after,
        )
        daemon["alive"] = daemon["state"] in ("running", "stopping")
    next_runs = [
        d["next_run_at"] for d in daemons if d["alive"] and d["next_run_at"] is not None
    ]
    for audience in audiences:
        audience["eta_seconds"] = eta_seconds(
            int(audience["pending"] or 0), config.gleap.rate_limit, config.gleap.rate_window
        )
    return {
        "daemons": daemons,
        "next_run_at": min(next_runs) if next_runs else None,
        "audiences": audiences,
        "pending_users": int(users),
        "eta_seconds": eta_seconds(int(users), config.gleap.rate_limit, config.gleap.rate_window),
        "delivery_lease": (
            {"host": holder["host"], "pid": holder["pid"], "expires_at": holder["expires_at"]}
            if holder
            else None
        ),
    }
