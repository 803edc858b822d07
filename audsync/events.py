"""Engage-style Track events: Audience Entered / Audience Exited / Trait Computed.

An event is born when Gleap acknowledges a transition (the ledger moves from
one value to another), in the same transaction as the ledger update, so each
transition yields its event exactly once — a repeated acknowledgement of the
same value is no transition. Events wait in ``event_outbox`` and go out up to
100 per Track call under the same budget as Identify; a row is deleted only
after Gleap answered 2xx (at-least-once for a call in flight at a crash), or
once Gleap refused that one event on its own (recorded in delivery_failures).
Events of a user ``audsync forget`` suppressed are dropped before each batch is
read, never sent.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, func, select

from audsync import manager, models
from audsync.clock import utcnow
from audsync.config import Kind
from audsync.defaults import DEFAULT_OUTAGE_PROBE
from audsync.errors import GleapRejectingAll, PayloadError
from audsync.gleap import (
    MAX_EVENTS_PER_CALL,
    TRACK_PATH,
    GleapClient,
    track_event,
)
from audsync.outage import outage_message, outage_verdict
from audsync.values import JSON_FALSE, JSON_NULL, JSON_TRUE

T = TypeVar("T")

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
    manager.queue_event_row(conn, key, user_id, name, data, occurred_at, run_id)
    return True


def pending_events(engine: Engine) -> int:
    """How many events wait for Gleap."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(models.event_outbox)).scalar_one())


@dataclass
class EventBatch:
    """What sending one batch of events did."""

    sent: int = 0
    rejected: int = 0  # events Gleap refused, or that could not be built: recorded, dropped
    dropped_keys: int = 0
    calls: int = 0  # Track requests made (a rejected batch is split to find the bad events)


def split(group: Sequence[T]) -> list[Sequence[T]]:
    """The two halves a rejected batch is retried as (a single event is not split)."""
    if len(group) < 2:
        return []
    middle = (len(group) + 1) // 2
    return [group[:middle], group[middle:]]


def send_events(
    engine: Engine,
    client: GleapClient,
    *,
    limit: int = MAX_EVENTS_PER_CALL,
    stop: Callable[[], bool] | None = None,
    guard: Callable[[Connection], None] = lambda conn: None,
    probe: int = DEFAULT_OUTAGE_PROBE,
) -> EventBatch:
    """Send the oldest ``limit`` queued events, forgetting each once Gleap took it (2xx).

    A batch Gleap rejects (4xx) is split in halves, again and again, until the
    events it refuses are alone: each of those is recorded in delivery_failures
    and dropped, and every other event is delivered. One bad event among 100
    costs about 15 calls of the shared budget. An event that cannot be built
    (no user id, no date) is recorded and dropped without a call.

    A batch in which Gleap accepts nothing — every event refused on its own,
    ``probe`` of them, or two or more, or only redirects — is Gleap refusing
    Track, not bad events: GleapRejectingAll is raised and the events stay
    queued (audsync builds events from acknowledged changes, so several bad
    ones at once are far less likely than an outage).
    Raises GleapAuthError / GleapUnavailable / Interrupted like the client.
    ``guard`` runs first in every writing transaction (the lease's fencing check).
    """
    e = models.event_outbox.c
    with engine.begin() as conn:
        manager.drop_forgotten_events(conn)
        rows = conn.execute(
            select(e.id, e.audience_key, e.user_id, e.name, e.data, e.occurred_at)
            .order_by(e.id)
            .limit(limit)
        ).all()
    batch = EventBatch()
    if not rows:
        return batch
    events: list[tuple[Any, dict[str, Any]]] = []
    unbuildable: list[tuple[Any, int | None, str]] = []
    for row in rows:
        try:
            event, dropped = track_event(
                row.name, row.user_id, row.occurred_at, json.loads(row.data)
            )
        except (PayloadError, ValueError) as exc:
            unbuildable.append((row, None, f"not sendable: {exc}"))
            continue
        batch.dropped_keys += dropped
        events.append((row, event))
    if unbuildable:
        _forget(engine, guard, unbuildable)
        batch.rejected += len(unbuildable)
    # Depth-first, oldest first: a group Gleap rejects is replaced by its halves.
    todo: list[Sequence[tuple[Any, dict[str, Any]]]] = [events] if events else []
    refused: list[tuple[Any, int | None, str]] = []  # single events, held until an ack
    acked = False
    while todo:
        group = todo.pop(0)
        outcome = client.track({"events": [event for _, event in group]}, stop=stop)
        batch.calls += 1
        if outcome.ok:
            acked = True
            _forget(engine, guard, [(row, None, None) for row, _ in group])
            batch.sent += len(group)
        elif len(group) > 1:
            todo[0:0] = split(group)
            continue
        else:
            refused.append((group[0][0], outcome.status, outcome.reason or "rejected"))
            statuses = {str(row.id): status for row, status, _ in refused}
            if not acked and outage_verdict(statuses, {}, False, finished=False, probe=probe):
                raise _rejecting_all(client, refused)
        if acked and refused:
            _forget(engine, guard, refused)
            batch.rejected += len(refused)
            refused = []
    if refused:  # nothing in the batch was accepted
        statuses = {str(row.id): status for row, status, _ in refused}
        if outage_verdict(statuses, {}, False, finished=True, probe=probe, minimum=2):
            raise _rejecting_all(client, refused)
        _forget(engine, guard, refused)
        batch.rejected += len(refused)
    return batch


def _rejecting_all(client: GleapClient, refused: list[tuple[Any, int | None, str]]) -> Exception:
    statuses = {str(row.id): status for row, status, _ in refused}
    return GleapRejectingAll(
        outage_message(
            "Track events", statuses, refused[0][2], "POST", client.request_path(TRACK_PATH)
        )
    )


def _forget(
    engine: Engine,
    guard: Callable[[Connection], None],
    rows: Sequence[tuple[Any, int | None, str | None]],
) -> None:
    """Delete these events from the queue; those with a reason are recorded as failures."""
    now = utcnow()
    with engine.begin() as conn:
        guard(conn)
        for row, status, reason in rows:
            if reason is not None:
                user_id = row.user_id if row.user_id is not None else ""
                manager.record_failure(
                    conn, 0, row.audience_key, user_id, status, f"event {row.name!r}: {reason}", now
                )
        manager.drop_events(conn, [row.id for row, _, _ in rows])


EventKinds = Mapping[str, Kind]
