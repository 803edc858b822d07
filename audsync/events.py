"""Engage-style Track events: Audience Entered / Audience Exited / Trait Computed.

An event is born when Gleap acknowledges a transition (the ledger moves from
one value to another), in the same transaction as the ledger update, so each
transition yields its event exactly once — a repeated acknowledgement of the
same value is no transition. Events wait in ``event_outbox`` and go out up to
100 per Track call under the same budget as Identify; a row is deleted only
after Gleap answered 2xx (at-least-once for a call in flight at a crash).
Events of a user ``audsync forget`` suppressed are dropped before each batch is
read, never sent.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, select

from audsync import models
from audsync.clock import utcnow
from audsync.config import Kind
from audsync.gleap import (
    MAX_EVENTS_PER_CALL,
    GleapClient,
    PayloadError,
    track_bodies,
    track_event,
)
from audsync.values import JSON_FALSE, JSON_NULL, JSON_TRUE

AUDIENCE_ENTERED = "Audience Entered"
AUDIENCE_EXITED = "Audience Exited"
TRAIT_COMPUTED = "Trait Computed"


def transition_event(
    kind: Kind, key: str, old: str | None, new: str
) -> tuple[str, dict[str, Any]] | None:
    """The event (name, data) for a ledger move from ``old`` to ``new`` (JSON text), or None.

    ``old`` is None when Gleap never held a value for this key and user.
    """
    if kind == "audience":
        if new == JSON_TRUE and old != JSON_TRUE:
            return AUDIENCE_ENTERED, {"audience_key": key, key: True}
        if new == JSON_FALSE and old == JSON_TRUE:
            return AUDIENCE_EXITED, {"audience_key": key, key: False}
        return None
    if new == (old if old is not None else JSON_NULL):
        return None
    return TRAIT_COMPUTED, {"trait_key": key, key: json.loads(new)}


def queue_event(
    conn: Connection,
    kind: Kind,
    key: str,
    user_id: str,
    old: str | None,
    new: str,
    occurred_at: dt.datetime,
    run_id: int,
) -> bool:
    """Queue the event of an acknowledged transition; True when there was one."""
    event = transition_event(kind, key, old, new)
    if event is None:
        return False
    name, data = event
    conn.execute(
        insert(models.event_outbox).values(
            audience_key=key,
            user_id=user_id,
            name=name,
            data=json.dumps(data),
            occurred_at=occurred_at,
            run_id=run_id,
        )
    )
    return True


def pending_events(engine: Engine) -> int:
    """How many events wait for Gleap."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(models.event_outbox)).scalar_one())


@dataclass
class EventBatch:
    """What sending one batch of events did."""

    sent: int = 0
    rejected: int = 0
    dropped_keys: int = 0


def send_events(
    engine: Engine,
    client: GleapClient,
    *,
    limit: int = MAX_EVENTS_PER_CALL,
    stop: Callable[[], bool] | None = None,
    guard: Callable[[Connection], None] = lambda conn: None,
) -> EventBatch:
    """Send the oldest ``limit`` queued events in one Track call and forget them on 2xx.

    A batch Gleap rejects (4xx) is recorded in delivery_failures and dropped.
    Raises GleapAuthError / GleapUnavailable / Interrupted like the client.
    ``guard`` runs first in the acknowledging transaction (the lease's fencing check).
    """
    e = models.event_outbox.c
    with engine.begin() as conn:
        # Never an event about a forgotten user, not even one queued before the
        # forget (or by an acknowledgement racing it): they are dropped unsent.
        conn.execute(
            delete(models.event_outbox).where(e.user_id.in_(select(models.suppressions.c.user_id)))
        )
        rows = conn.execute(
            select(e.id, e.audience_key, e.user_id, e.name, e.data, e.occurred_at)
            .order_by(e.id)
            .limit(limit)
        ).all()
    batch = EventBatch()
    if not rows:
        return batch
    events = []
    for row in rows:
        try:
            event, dropped = track_event(
                row.name, row.user_id, row.occurred_at, json.loads(row.data)
            )
        except PayloadError:
            continue
        batch.dropped_keys += dropped
        events.append(event)
    (body,) = track_bodies(events, per_call=limit) or [{"events": []}]
    outcome = client.track(body, stop=stop) if body["events"] else None
    with engine.begin() as conn:
        guard(conn)
        if outcome is not None and not outcome.ok:
            batch.rejected = len(rows)
            _record_rejection(conn, rows, outcome.status, outcome.reason or "rejected")
        else:
            batch.sent = len(events)
        conn.execute(delete(models.event_outbox).where(e.id.in_([r.id for r in rows])))
    return batch


def _record_rejection(conn: Connection, rows: Any, status: int | None, reason: str) -> None:
    now = utcnow()
    for row in rows:
        conn.execute(
            insert(models.delivery_failures).values(
                run_id=0,
                audience_key=row.audience_key,
                user_id=row.user_id,
                http_status=status,
                reason=f"event {row.name!r}: {reason}",
                failed_at=now,
            )
        )


EventKinds = Mapping[str, Kind]
