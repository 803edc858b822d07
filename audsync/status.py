"""What ``audsync status`` reports: per audience the last plan, the backlog and its ETA."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Engine, func, select

from audsync import models
from audsync.clock import utcnow
from audsync.config import Config
from audsync.deliver import pending_user_count
from audsync.locks import DELIVER_LEASE, current_holder

DAEMON_STALE_AFTER = 120.0
"""A daemon that has not beaten for two minutes (it beats every 15 s) is gone."""


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
    fresh = utcnow() - dt.timedelta(seconds=DAEMON_STALE_AFTER)
    with engine.connect() as conn:
        daemons = [
            dict(row._mapping)
            for row in conn.execute(
                select(models.daemons)
                .where(models.daemons.c.beat_at >= fresh, models.daemons.c.state != "stopped")
                .order_by(models.daemons.c.started_at)
            )
        ]
    next_runs = [d["next_run_at"] for d in daemons if d["next_run_at"] is not None]
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
