"""The state DB's bookkeeping: every write that upholds an invariant, each a named function.

The callers (the deliverer, the daemon, ``forget``, the event sender) decide
*what* happens; this module is *how* it is written, so that an invariant is
kept in one place rather than re-implemented by each caller:

- ``queued = delivered + failed + superseded + pending`` for every run
  (docs/design.md, invariant 10): an outbox row leaves only through :func:`acknowledge`,
  :func:`reject` (parking it), or :func:`supersede_pending`, each of which
  credits the run that queued it (:func:`credit_runs`); :func:`finalize_runs`
  closes a run once nothing of it is pending.
- The ledger moves only on Gleap's 2xx (invariant 1), and an outbox row goes
  only with the version Gleap acknowledged (invariant 3): :func:`acknowledge`.
- A forgotten user is confirmed to ``forget`` only by the deliverer
  (:func:`confirm_calls_stopped`) and wiped in one transaction (:func:`wipe_users`)
  (invariant 9; docs/design.md, "Forget").

Functions take a :class:`~sqlalchemy.Connection` and write in the caller's
transaction (the caller fences it with the lease first), unless they say they
open their own. Not here: leases (:mod:`audsync.locks` is their only writer, and
their compare-and-set is one with its expiry decision); a run's own row
(:mod:`audsync.history`: start, set, close); retention (:mod:`audsync.prune`,
whose deletes mirror its pure ``keep_reason``); and the plan's own snapshot and
queue statements (:mod:`audsync.plan`, :mod:`audsync.plan_in_db`: bulk, by dialect,
they are the plan). What a plan writes besides them — parking spent changes,
requeueing rejected ones, dropping the forgotten, recording its audience — is here.
Long statements are module-level constants, each with the reason it exists.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.sql.elements import ColumnElement

from audsync import models
from audsync.clock import utcnow
from audsync.config import Definition
from audsync.history import set_run
from audsync.models import NO_RUN, NOT_FORGOTTEN, PRIORITY_RETRY, PRIORITY_ROUTINE

RunColumn = Literal["delivered", "failed", "superseded"]
"""The counters a run's queued changes end in (``pending`` is what is left)."""


class Queued(Protocol):
    """One outbox row as the deliverer holds it (:class:`audsync.deliver.Change`)."""

    @property
    def audience_key(self) -> str: ...
    @property
    def user_id(self) -> str: ...
    @property
    def value(self) -> str: ...
    @property
    def run_id(self) -> int: ...
    @property
    def version(self) -> int: ...

    def contact_after_ack(self) -> str | None: ...


Q = TypeVar("Q", bound=Queued)

# -- runs ---------------------------------------------------------------------------


def credit_runs(conn: Connection, column: RunColumn, by_run: Mapping[int, int]) -> None:
    """Add ``by_run``'s counts to those runs' ``column`` (rows of no run are left out)."""
    r = models.sync_runs.c
    for run_id, count in sorted(by_run.items()):  # one lock order, whoever credits
        if run_id != NO_RUN and count:
            conn.execute(
                update(models.sync_runs).where(r.id == run_id).values({column: r[column] + count})
            )


# A run is done once every change it queued ended delivered, failed or superseded:
# decided from its own counters, so closing runs never scans a million-row outbox.
FINALIZE_RUNS = text(
    "UPDATE sync_runs"
    " SET status = CASE WHEN failed > 0 THEN 'partial' ELSE 'succeeded' END,"
    " finished_at = :now"
    " WHERE status = 'delivering' AND delivered + failed + superseded >= queued"
)

# An audience's last success is its newest succeeded run: what health and alerts read.
REFRESH_LAST_SUCCESS = text(
    "UPDATE audiences SET last_success_at = ("
    " SELECT MAX(r.finished_at) FROM sync_runs r WHERE r.audience_key = audiences.key"
    " AND r.status = 'succeeded')"
    " WHERE EXISTS (SELECT 1 FROM sync_runs r WHERE r.audience_key = audiences.key"
    " AND r.status = 'succeeded')"
)


def finalize_runs(conn: Connection) -> None:
    """Close every delivering run none of whose changes is still pending.

    Decided from the run's own counters (every queued change ends delivered,
    failed or superseded), so it never scans a million-row outbox.
    """
    conn.execute(FINALIZE_RUNS, {"now": utcnow()})
    conn.execute(REFRESH_LAST_SUCCESS)


def fail_runs_left_waiting(engine: Engine, run_ids: list[int], reason: str) -> int:
    """Fail this sync's runs that finished as succeeded while their audience
    still has changes waiting, because delivery stopped on Gleap trouble.

    A run that queued nothing new (its audience's changes belong to an earlier
    run that Gleap's outage stopped) has nothing pending of its own and would
    otherwise read ``succeeded`` while Gleap is down — and move the audience's
    last success, its health metric and its alerts with it.
    """
    if not run_ids:
        return 0
    r = models.sync_runs.c
    o = models.outbox.c
    waiting = select(o.audience_key).where(o.audience_key == r.audience_key).exists()
    with engine.begin() as conn:
        ids = (
            conn.execute(select(r.id).where(r.id.in_(run_ids), r.status == "succeeded", waiting))
            .scalars()
            .all()
        )
        for run_id in ids:
            set_run(conn, run_id, status="failed", error=reason)
    return len(ids)


def discard_run(conn: Connection, run_id: int) -> None:
    """Delete a run that queued nothing (``retry`` with nothing rejected): no history
    row for a retry that had nothing to do. Only a run with nothing queued may go."""
    r = models.sync_runs.c
    conn.execute(delete(models.sync_runs).where(r.id == run_id, r.queued == 0))


# -- the outbox ---------------------------------------------------------------------


def supersede_pending(conn: Connection, *conditions: ColumnElement[bool]) -> int:
    """Delete outbox rows matching ``conditions``, crediting the pending ones as
    superseded to the runs that queued them (so those runs' counts still add up).

    The credit is taken from the rows this DELETE removed (RETURNING), never from
    an earlier read: a row an acknowledgement removed first is the deliverer's to
    count, and counting it here too would break ``queued = delivered + failed +
    superseded + pending``. Returns how many rows were deleted.
    """
    o = models.outbox.c
    gone = delete(models.outbox).where(*conditions).returning(o.run_id, o.state)
    by_run: dict[int, int] = {}
    deleted = 0
    if conn.dialect.name == "postgresql":
        # Counted in the database: a million withdrawn rows never cross the wire.
        cte = gone.cte("gone")
        rows = conn.execute(
            select(cte.c.run_id, cte.c.state, func.count()).group_by(cte.c.run_id, cte.c.state)
        )
        for run_id, state, count in rows:
            deleted += int(count)
            if state == "pending":
                by_run[run_id] = by_run.get(run_id, 0) + int(count)
    else:
        for run_id, state in conn.execute(gone):
            deleted += 1
            if state == "pending":
                by_run[run_id] = by_run.get(run_id, 0) + 1
    credit_runs(conn, "superseded", by_run)
    return deleted


def mark_attempted(conn: Connection, users: list[str]) -> None:
    """Written before the calls go out: from here on their values may reach Gleap
    (a plan never withdraws an attempted row, it overwrites it)."""
    o = models.outbox.c
    conn.execute(
        update(models.outbox)
        .where(o.state == "pending", o.user_id.in_(bindparam("users", expanding=True)))
        .values(attempted=True),
        {"users": users},
    )


# What Gleap acknowledged is what the ledger holds (invariant 1): set-wise, one
# statement for a whole batch of acknowledgements.
UPSERT_LEDGER = text(
    "INSERT INTO ledger (audience_key, user_id, value, contact, acked_at)"
    " VALUES (:audience_key, :user_id, :value, :contact, :acked_at)"
    " ON CONFLICT (audience_key, user_id)"
    " DO UPDATE SET value = excluded.value, contact = excluded.contact,"
    " acked_at = excluded.acked_at"
)


def _delete_acknowledged(count: int) -> Any:
    """DELETE ... RETURNING of ``count`` (user, key, version) triples: only the
    acknowledged version goes (invariant 3); a newer plan's value stays queued."""
    rows = ", ".join(f"(:u{i}, :k{i}, :v{i})" for i in range(count))
    return text(
        f"DELETE FROM outbox WHERE (user_id, audience_key, version) IN (VALUES {rows})"
        " RETURNING user_id, audience_key"
    )


def acknowledge(conn: Connection, changes: Sequence[Q], now: dt.datetime) -> list[Q]:
    """Record Gleap's 2xx for ``changes``; returns those that still were the queued
    value (their outbox row is gone: credit them delivered).

    Set-wise: one ledger upsert and one versioned DELETE ... RETURNING for the
    whole batch, so acknowledging costs a few statements, not a few per change.
    """
    if not changes:
        return []
    conn.execute(
        UPSERT_LEDGER,
        [
            {
                "audience_key": c.audience_key,
                "user_id": c.user_id,
                "value": c.value,
                "contact": c.contact_after_ack(),
                "acked_at": now,
            }
            for c in changes
        ],
    )
    params: dict[str, Any] = {}
    for i, c in enumerate(changes):
        params.update({f"u{i}": c.user_id, f"k{i}": c.audience_key, f"v{i}": c.version})
    deleted = {(r[0], r[1]) for r in conn.execute(_delete_acknowledged(len(changes)), params)}
    # A row not deleted was overwritten by a newer plan while its call was in
    # flight (rows marked attempted are never withdrawn), so the newer value
    # is still queued and goes next; or the user was forgotten meanwhile.
    o = models.outbox.c
    for c in changes:
        if (c.user_id, c.audience_key) not in deleted:
            # Gleap took this user: the count of rejections in a row starts over.
            conn.execute(
                update(models.outbox)
                .where(o.user_id == c.user_id, o.audience_key == c.audience_key)
                .values(attempts=0)
            )
    return [c for c in changes if (c.user_id, c.audience_key) in deleted]


def reject(
    conn: Connection,
    change: Queued,
    status: int | None,
    reason: str | None,
    now: dt.datetime,
    max_attempts: int,
) -> bool:
    """Record one rejected change; True when it still was the queued version.

    The run that sent it counts it as failed either way. Below ``max_attempts``
    rejections in a row the row stays ``pending`` but leaves its run (``NO_RUN``)
    and waits (``PRIORITY_RETRY``) for the next plan of its audience to take it
    over; at ``max_attempts`` it is parked: ``state = 'failed'``.
    """
    o = models.outbox.c
    park = o.attempts + 1 >= max_attempts
    updated = conn.execute(
        update(models.outbox)
        .where(
            o.audience_key == change.audience_key,
            o.user_id == change.user_id,
            o.version == change.version,
        )
        .values(
            state=case((park, "failed"), else_="pending"),
            run_id=case((park, o.run_id), else_=NO_RUN),
            priority=case((park, o.priority), else_=PRIORITY_RETRY),
            attempts=o.attempts + 1,
            last_status=status,
            last_error=reason,
        )
    )
    record_failure(
        conn, change.run_id, change.audience_key, change.user_id, status, reason or "rejected", now
    )
    return updated.rowcount == 1


def record_failure(
    conn: Connection,
    run_id: int,
    audience_key: str,
    user_id: str,
    status: int | None,
    reason: str,
    now: dt.datetime,
) -> None:
    """One row of ``delivery_failures``: what ``history --failures`` shows."""
    conn.execute(
        insert(models.delivery_failures).values(
            run_id=run_id,
            audience_key=audience_key,
            user_id=user_id,
            http_status=status,
            reason=reason,
            failed_at=now,
        )
    )


def retire_audience(conn: Connection, key: str) -> None:
    """An audience no longer configured: its pending changes are superseded and it
    is marked inactive. Its ledger is kept, so adding it back resumes incrementally."""
    supersede_pending(conn, models.outbox.c.audience_key == key)
    conn.execute(update(models.audiences).where(models.audiences.c.key == key).values(active=False))


# Queued as ``attempted``: like a call that may have reached Gleap, the ledger is known
# not to be what Gleap holds, so a plan that runs before delivery overwrites the row with
# what Gleap should hold (taking it into its own run) instead of withdrawing it as "no
# change" — which it would, since the ledger equals the snapshot (docs/design.md, "Verify").
QUEUE_REPAIR = text(
    "INSERT INTO outbox (audience_key, user_id, value, contact, run_id, version, priority,"
    " state, attempts, queued_at, attempted)"
    # The contact fields Gleap acknowledged; a row from before the contact ledger has
    # none, and then the last plan's snapshot is the best knowledge of them.
    " SELECT l.audience_key, l.user_id, l.value, COALESCE(l.contact, s.contact), :run, 1, :prio,"
    " 'pending', 0, :now,"
    " TRUE"
    " FROM ledger l LEFT JOIN snapshot s"
    " ON s.audience_key = l.audience_key AND s.user_id = l.user_id"
    " WHERE l.audience_key = :k AND l.user_id = :u AND "
    + NOT_FORGOTTEN.format("l.user_id")
    + " ON CONFLICT (user_id, audience_key) DO NOTHING"
)


def queue_repair(conn: Connection, run_id: int, key: str, user_id: str, now: dt.datetime) -> int:
    """Queue the ledger's value of (``key``, ``user_id``) again for ``verify --repair``;
    1 when queued, 0 when a change is already queued (it is left to go) or the user
    is forgotten."""
    params = {"run": run_id, "prio": PRIORITY_ROUTINE, "now": now, "k": key, "u": user_id}
    return int(conn.execute(QUEUE_REPAIR, params).rowcount)


def record_alert_state(conn: Connection, key: str, state: str) -> None:
    """The alert the webhook was told for ``key``: the next check alerts only on a change."""
    a = models.audiences.c
    conn.execute(update(models.audiences).where(a.key == key).values(alert_state=state))


# -- events -------------------------------------------------------------------------


def queue_event_row(
    conn: Connection,
    key: str,
    user_id: str,
    name: str,
    data: Mapping[str, Any],
    occurred_at: dt.datetime,
    run_id: int,
) -> None:
    """Queue one Track event, in the acknowledging transaction (the ledger moves with it)."""
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


def drop_forgotten_events(conn: Connection) -> None:
    """Never an event about a forgotten user, not even one queued before the forget
    (or by an acknowledgement racing it): they are dropped unsent."""
    e = models.event_outbox.c
    conn.execute(
        delete(models.event_outbox).where(e.user_id.in_(select(models.suppressions.c.user_id)))
    )


def drop_events(conn: Connection, ids: Iterable[int]) -> None:
    """Remove these events from the queue: Gleap accepted them, or never will."""
    conn.execute(delete(models.event_outbox).where(models.event_outbox.c.id.in_(list(ids))))


# -- forget -------------------------------------------------------------------------


def suppress(conn: Connection, user_ids: list[str], now: dt.datetime) -> None:
    """Suppress ``user_ids`` and ask the deliverer (again) to confirm it stopped calling
    about them. Touches no other table (docs/design.md, "Forget")."""
    s = models.suppressions.c
    known = set(conn.execute(select(s.user_id).where(s.user_id.in_(user_ids))).scalars())
    for user_id in user_ids:
        if user_id not in known:
            conn.execute(insert(models.suppressions).values(user_id=user_id, suppressed_at=now))
    # Forgetting again asks the deliverer again.
    conn.execute(
        update(models.suppressions).where(s.user_id.in_(user_ids)).values(calls_stopped_at=None)
    )


def confirm_calls_stopped(conn: Connection, user_ids: list[str]) -> None:
    """The deliverer's answer to a forget: no call about ``user_ids`` is in flight or
    will start. In a transaction of its own that touches nothing else: on PostgreSQL it
    may wait for a plan's SHARE lock while holding no row that plan could wait for."""
    s = models.suppressions.c
    conn.execute(
        update(models.suppressions)
        .where(s.user_id.in_(user_ids), s.calls_stopped_at.is_(None))
        .values(calls_stopped_at=utcnow())
    )


WIPED_TABLES = (models.ledger, models.snapshot, models.event_outbox, models.delivery_failures)
"""Every table holding a row about a user, besides the outbox (superseded instead)."""


def wipe_users(conn: Connection, user_ids: list[str]) -> list[str]:
    """Remove every row of ``user_ids`` still suppressed; pending changes count as
    superseded. Returns those users (a forget undone meanwhile keeps its rows)."""
    s = models.suppressions.c
    still = set(conn.execute(select(s.user_id).where(s.user_id.in_(user_ids))).scalars())
    user_ids = [u for u in user_ids if u in still]
    if not user_ids:
        return []
    supersede_pending(conn, models.outbox.c.user_id.in_(user_ids))
    for table in WIPED_TABLES:
        conn.execute(delete(table).where(table.c.user_id.in_(user_ids)))
    return user_ids


def mark_forgotten(conn: Connection, user_id: str, *, error: str | None) -> None:
    """Record how the Gleap delete of ``user_id`` ended (``error`` None: deleted)."""
    values: dict[str, Any] = {"last_error": error}
    if error is None:
        values["deleted_in_gleap_at"] = utcnow()
    conn.execute(
        update(models.suppressions).where(models.suppressions.c.user_id == user_id).values(**values)
    )


def lift_suppression(conn: Connection, user_ids: list[str]) -> list[str]:
    """``forget --undo``: lift the suppression of ``user_ids``; returns those that were."""
    s = models.suppressions.c
    lifted = list(conn.execute(select(s.user_id).where(s.user_id.in_(user_ids))).scalars())
    conn.execute(delete(models.suppressions).where(s.user_id.in_(user_ids)))
    return lifted


# -- the daemon ---------------------------------------------------------------------

DAEMON_RECORD_KEPT = dt.timedelta(days=1)
"""Records of daemons gone this long are noise in ``status``: the heartbeat drops them."""


def heartbeat(conn: Connection, holder: str, state: str, next_run_at: dt.datetime | None) -> None:
    """The daemon's health record: ``status`` shows it, and a stale one means a dead daemon."""
    now = utcnow()
    d = models.daemons.c
    values: dict[str, Any] = {"beat_at": now, "state": state, "next_run_at": next_run_at}
    done = conn.execute(update(models.daemons).where(d.holder == holder).values(**values))
    if done.rowcount == 0:
        conn.execute(
            insert(models.daemons).values(
                holder=holder,
                host=socket.gethostname(),
                pid=os.getpid(),
                started_at=now,
                **values,
            )
        )
    conn.execute(delete(models.daemons).where(d.beat_at < now - DAEMON_RECORD_KEPT))


# -- what a plan writes besides its queue -------------------------------------------


def sql_hash(definition: Definition) -> str:
    """Fingerprint of the query, to tell a changed query under the same key."""
    return hashlib.sha256(definition.sql.encode()).hexdigest()


def ensure_audience(conn: Connection, definition: Definition) -> None:
    """Make ``definition`` known before its first plan, so a brand-new audience whose
    query fails shows in ``status`` and gets its alert (members stay unknown)."""
    # One statement, so two daemons meeting a new audience at once cannot collide.
    conn.execute(
        text(
            "INSERT INTO audiences (key, kind, name, sql_hash, active, created_at)"
            " VALUES (:key, :kind, :name, :hash, :active, :now) ON CONFLICT (key) DO NOTHING"
        ),
        {
            "key": definition.key,
            "kind": definition.kind,
            "name": definition.name,
            "hash": sql_hash(definition),
            "active": True,
            "now": utcnow(),
        },
    )


def record_audience(conn: Connection, definition: Definition, members: int) -> None:
    """A plan's last word on its audience: its query's fingerprint, when it was
    planned and how many members it has (made known if it was not)."""
    now = utcnow()
    values = {
        "kind": definition.kind,
        "name": definition.name,
        "sql_hash": sql_hash(definition),
        "active": True,
        "last_planned_at": now,
        "members": members,
    }
    updated = conn.execute(
        update(models.audiences).where(models.audiences.c.key == definition.key).values(**values)
    )
    if updated.rowcount == 0:
        conn.execute(insert(models.audiences).values(key=definition.key, created_at=now, **values))


def park_spent(conn: Connection, key: str, max_attempts: int) -> None:
    """Park pending changes whose rejections already reach ``max_attempts`` (the
    setting was lowered, or the value was re-queued after its user left and came
    back): counted ``failed`` by the run that owns them, never sent again."""
    parked = conn.execute(
        text(
            "UPDATE outbox SET state = 'failed' WHERE audience_key = :k AND state = 'pending'"
            " AND attempts >= :max_attempts RETURNING run_id"
        ),
        {"k": key, "max_attempts": max_attempts},
    ).scalars()
    credit_runs(conn, "failed", Counter(parked))


def drop_forgotten(conn: Connection, key: str) -> None:
    """Last statements of a plan: remove what it wrote about users forgotten meanwhile.

    On PostgreSQL a SHARE lock on ``suppressions`` (held until this plan commits)
    orders every forget against the plan: a forget's suppression either commits
    before the lock is granted — and the deletes below see it — or waits for the
    plan to commit, and the forget wipes the user's rows after it. On SQLite the
    plan's transaction is the only writer, so the same holds without a lock.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("LOCK TABLE suppressions IN SHARE MODE")
    forgotten = select(models.suppressions.c.user_id)
    o = models.outbox.c
    supersede_pending(conn, o.audience_key == key, o.user_id.in_(forgotten))
    conn.execute(
        delete(models.snapshot).where(
            models.snapshot.c.audience_key == key, models.snapshot.c.user_id.in_(forgotten)
        )
    )


def requeue_failed(conn: Connection, key: str, run_id: int) -> int:
    """Give every change Gleap rejected for ``key`` — parked, or waiting for its next run —
    a fresh set of attempts under ``run_id``."""
    o = models.outbox.c
    requeued = conn.execute(
        update(models.outbox)
        .where(
            o.audience_key == key,
            (o.state == "failed") | ((o.state == "pending") & (o.priority == PRIORITY_RETRY)),
        )
        .values(
            state="pending",
            attempts=0,
            run_id=run_id,
            version=o.version + 1,
            priority=PRIORITY_ROUTINE,
            queued_at=utcnow(),
        )
    )
    return int(requeued.rowcount)
