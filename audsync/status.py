"""What ``audsync status`` reports: per audience the last plan, the backlog and its ETA,
the daemons' heartbeats and who holds the delivery lease, as one frozen :class:`Status`."""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, select

from audsync import models
from audsync.clock import utcnow
from audsync.config import Config
from audsync.deliver import pending_user_count
from audsync.locks import DELIVER_LEASE, current_holder, pid_alive
from audsync.pacing import budget_seconds

DAEMON_BEAT_INTERVAL = 15.0
"""Seconds between two health records of a running daemon (``audsync run``)."""

DAEMON_FORGOTTEN_AFTER = dt.timedelta(days=1)
"""Records of daemons gone for longer are not shown (the daemon deletes them)."""


@dataclass(frozen=True)
class AudienceStatus:
    """One audience or trait: configured, or only known from the state DB (removed)."""

    key: str
    kind: str | None
    configured: bool
    members: int | None
    """At the last plan (None before the first one)."""
    last_planned_at: dt.datetime | None
    last_success_at: dt.datetime | None
    last_status: str | None
    """Of its newest run in ``sync_runs``."""
    pending: int
    """Changes in the outbox waiting to be sent."""
    parked_failures: int
    """Changes Gleap rejected max_attempts times (``audsync retry-failed``)."""
    eta_seconds: float
    """How long its pending changes take at the configured budget."""


@dataclass(frozen=True)
class DaemonStatus:
    """A daemon's record (``daemons`` table) and what it means now."""

    holder: str
    host: str
    pid: int
    started_at: dt.datetime
    beat_at: dt.datetime
    next_run_at: dt.datetime | None
    state: str
    """running, stopping, exited or stale (see :func:`daemon_liveness`)."""
    recorded_state: str
    """What the daemon last wrote itself."""
    alive: bool


@dataclass(frozen=True)
class LeaseHolder:
    """Who is delivering now; ``expires_at`` in unix seconds by the state DB's clock."""

    host: str
    pid: int
    expires_at: float


@dataclass(frozen=True)
class Status:
    """The state of every audience, the daemons, the backlog and who delivers it."""

    daemons: tuple[DaemonStatus, ...]
    next_run_at: dt.datetime | None
    """The soonest next plan of a live daemon; None when no daemon runs."""
    audiences: tuple[AudienceStatus, ...]
    pending_users: int
    """Users with at least one pending change: one Identify call each."""
    eta_seconds: float
    delivery_lease: LeaseHolder | None
    state_db: str = ""
    """The state DB, without its password (filled in by :func:`status`)."""

    def as_dict(self) -> dict[str, Any]:
        """Plain values with the keys of ``audsync status --json``."""
        return dataclasses.asdict(self)


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


def status(config: Config) -> Status:
    """The status of ``config``'s state DB, read-only (``audsync status``).

    Raises StateError when the state DB does not exist yet or needs an upgrade.
    """
    from audsync.state import describe_state, open_for_reading

    found = collect_status(open_for_reading(config), config)
    return dataclasses.replace(found, state_db=describe_state(config))


def collect_status(engine: Engine, config: Config) -> Status:
    """Per-audience state plus the daemons, the delivery lease holder and the backlog."""
    o = models.outbox.c
    runs = models.sync_runs.c
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
        users = int(pending_user_count(conn))
        last_runs = {
            row.audience_key: row.status
            for row in conn.execute(
                select(runs.audience_key, runs.status).where(
                    runs.id.in_(select(func.max(runs.id)).group_by(runs.audience_key))
                )
            )
        }
    g = config.gleap
    configured = {d.key: d for d in config.definitions}
    audiences = []
    for key in sorted(set(known) | set(configured)):
        row = known.get(key, {})
        definition = configured.get(key)
        waiting = int(pending.get(key, 0))
        audiences.append(
            AudienceStatus(
                key=key,
                kind=definition.kind if definition else row.get("kind"),
                configured=definition is not None,
                members=row.get("members"),
                last_planned_at=row.get("last_planned_at"),
                last_success_at=row.get("last_success_at"),
                last_status=last_runs.get(key),
                pending=waiting,
                parked_failures=int(parked.get(key, 0)),
                eta_seconds=budget_seconds(waiting, g.rate_limit, g.rate_window),
            )
        )
    holder = current_holder(engine, DELIVER_LEASE)
    daemons = _daemons(engine, config)
    next_runs = [d.next_run_at for d in daemons if d.alive and d.next_run_at is not None]
    return Status(
        daemons=daemons,
        next_run_at=min(next_runs) if next_runs else None,
        audiences=tuple(audiences),
        pending_users=users,
        eta_seconds=budget_seconds(users, g.rate_limit, g.rate_window),
        delivery_lease=(
            LeaseHolder(host=holder["host"], pid=holder["pid"], expires_at=holder["expires_at"])
            if holder
            else None
        ),
    )


def _daemons(engine: Engine, config: Config) -> tuple[DaemonStatus, ...]:
    """The daemons not stopped and heard from within a day, oldest first."""
    d = models.daemons.c
    now = utcnow()
    with engine.connect() as conn:
        records = conn.execute(
            select(models.daemons)
            .where(d.beat_at >= now - DAEMON_FORGOTTEN_AFTER, d.state != "stopped")
            .order_by(d.started_at)
        ).all()
    stale_after = daemon_stale_after(config.sync.lease_ttl)
    daemons = []
    for record in records:
        state = daemon_liveness(
            record.state,
            record.host,
            record.pid,
            (now - record.beat_at).total_seconds(),
            this_host=socket.gethostname(),
            alive=pid_alive,
            stale_after=stale_after,
        )
        daemons.append(
            DaemonStatus(
                holder=record.holder,
                host=record.host,
                pid=record.pid,
                started_at=record.started_at,
                beat_at=record.beat_at,
                next_run_at=record.next_run_at,
                state=state,
                recorded_state=record.state,
                alive=state in ("running", "stopping"),
            )
        )
    return tuple(daemons)
