"""Drain the outbox: coalesce each user's pending changes into Identify calls, advance the ledger.

The ledger moves only after Gleap answers 2xx (docs/design.md, invariant 1); an
outbox row is removed only when the version it held was the one acknowledged (invariant 3),
so a value replaced while its call was in flight stays queued and goes again.
HTTP runs on a small thread pool; every database write happens on the calling
thread, one short transaction per acknowledged call, fenced by the delivery lease.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    case,
    exists,
    func,
    insert,
    select,
    text,
    update,
)

from audsync import models
from audsync.clock import utcnow
from audsync.config import CONTACTS_KEY, Kind
from audsync.contact import INVALID_MARK
from audsync.defaults import (
    DEFAULT_CONCURRENCY,
    DEFAULT_DELIVER_BATCH,
    DEFAULT_MAX_ATTEMPTS,
)
from audsync.errors import (
    AudsyncError,
    CallAbandoned,
    GleapAuthError,
    GleapError,
    GleapRejectingAll,
    GleapUnavailable,
    Interrupted,
    PayloadError,
)
from audsync.events import EventKinds, pending_events, queue_event, send_events
from audsync.gleap import (
    IDENTIFY_PATH,
    MAX_EVENTS_PER_CALL,
    GleapClient,
    identify_bodies,
)
from audsync.locks import Lease, still_held
from audsync.outage import outage_message, outage_verdict
from audsync.plan import (
    NO_RUN,
    PRIORITY_BACKFILL,
    PRIORITY_RETRY,
    PRIORITY_ROUTINE,
    credit_runs,
    withdraw,
)
from audsync.values import dumps

ACK_BATCH = 64
"""Call results committed per acknowledging transaction, at most."""

ACK_INTERVAL = 0.1
"""Seconds an acknowledgement may wait for others before it is committed."""

UNAVAILABLE_STREAK = 20
"""Consecutive users whose calls all failed before the drain stops: Gleap is down."""

MAX_SKIPPED_USERS = 1000
"""Users left queued in one drain before it stops: beyond this, retrying later is wiser."""

SUPPRESSION_POLL = 0.1
"""Seconds between two looks for users ``audsync forget`` is waiting on: how long a
forget waits for a drain with nothing of those users in flight."""

LOOP_TICK = 0.25
"""Seconds the drain waits for a call to end before it looks around again, so a
forget is answered even while every call in flight is slow."""


@dataclass(frozen=True)
class Change:
    """One pending outbox row."""

    audience_key: str
    user_id: str
    value: str
    contact: str | None
    run_id: int
    version: int
    queued_at: Any = None
    last_status: int | None = None  # set once Gleap rejected this row (a known rejection)
    contact_only: bool = False  # Gleap holds the value: send only the contact fields that moved
    acked_contact: str | None = None  # ledger.contact: what Gleap acknowledged of them

    @property
    def keyed(self) -> bool:
        """Whether the call carries this change's key (``[contacts]``' key is never sent)."""
        return not self.contact_only and self.audience_key != CONTACTS_KEY

    def contact_to_send(self) -> dict[str, Any]:
        """The contact fields this change puts in the call: all of them with a value
        change, otherwise only those that differ from what Gleap acknowledged."""
        if not self.contact:
            return {}
        contact: dict[str, Any] = json.loads(self.contact)
        if not self.contact_only or INVALID_MARK in contact:
            return contact
        told = json.loads(self.acked_contact) if self.acked_contact else {}
        return {f: v for f, v in contact.items() if f not in told or told[f] != v}

    def contact_after_ack(self) -> str | None:
        """ledger.contact once Gleap acknowledges this change: what it held, updated
        with what this change told it (a field the query dropped stays as Gleap has it)."""
        if not self.contact:
            return self.acked_contact
        told = json.loads(self.acked_contact) if self.acked_contact else {}
        return dumps({**told, **json.loads(self.contact)})


@dataclass
class CallResult:
    """Gleap's answer for the changes one call carried."""

    changes: list[Change]
    ok: bool
    status: int | None = None
    reason: str | None = None
    attempts: int = 0


FAILED_OUTCOMES = ("rejected", "auth_failed", "server_error", "network_error")
"""Attempts that were not acknowledged and were not a 429 (a wait, never a failure)."""


@dataclass
class DeliveryReport:
    """What one drain of the outbox did.

    The call counts come from the client's own count of HTTP attempts during the
    drain, so they equal what Gleap answered: ``identify_calls`` only the Identify
    calls Gleap acknowledged (2xx), Track calls and failed attempts on their own.
    """

    calls: int = 0  # HTTP requests made (Identify and Track), retries and failures included
    identify_calls: int = 0  # Identify calls Gleap acknowledged
    identify_failed: int = 0  # Identify attempts that failed (rejected, 5xx, network, auth)
    track_calls: int = 0  # Track calls Gleap acknowledged
    track_failed: int = 0  # Track attempts that failed
    throttled: int = 0  # answers of 429 (waits, not failures)
    skipped: int = 0  # users left queued because their call failed every retry
    events: int = 0  # Track events Gleap accepted
    event_keys_dropped: int = 0  # event data keys beyond Gleap's ten
    users: int = 0
    delivered: int = 0
    failed: int = 0
    stopped: str | None = None
    error: AudsyncError | None = None
    per_key: dict[str, int] = field(default_factory=dict)


class LeaseLost(AudsyncError):
    """Another process took the delivery lease: stop writing at once."""


def next_users(conn: Connection, limit: int, exclude: Collection[str] = ()) -> list[str]:
    """The next users to call: routine changes first, then the backfill, by user id.

    Two queries, each served by an index: the partial one on routine changes,
    then the primary key's user_id order for the backfill.
    """
    o = models.outbox.c
    users: list[str] = []
    # A forgotten user's rows may linger until the forget removes them: never fetch them.
    forgotten = exists().where(models.suppressions.c.user_id == o.user_id)
    for priority in (PRIORITY_ROUTINE, PRIORITY_BACKFILL):
        query = select(o.user_id).where(o.priority == priority, o.state == "pending", ~forgotten)
        if exclude:
            query = query.where(o.user_id.not_in(list(exclude)))
        wanted = limit - len(users)
        users.extend(conn.execute(query.order_by(o.user_id).limit(wanted)).scalars())
        if len(users) >= limit:
            break
    return list(dict.fromkeys(users))


def pending_user_count(conn: Connection) -> int:
    """Users with a pending change: the Identify calls still to make (before splits)."""
    o = models.outbox.c
    return int(
        conn.execute(
            # Rows waiting for their next run after a rejection are not this drain's calls.
            select(func.count(func.distinct(o.user_id))).where(
                o.state == "pending", o.priority != PRIORITY_RETRY
            )
        ).scalar_one()
    )


def pending_changes(conn: Connection, users: list[str]) -> dict[str, list[Change]]:
    """Every pending change of ``users``, across all audiences and traits."""
    by_user: dict[str, list[Change]] = {u: [] for u in users}
    o, lg = models.outbox.c, models.ledger.c
    rows = conn.execute(
        select(
            o.audience_key,
            o.user_id,
            o.value,
            o.contact,
            o.run_id,
            o.version,
            o.queued_at,
            o.last_status,
            o.contact_only,
            lg.contact.label("acked_contact"),
        )
        .select_from(
            models.outbox.outerjoin(
                models.ledger,
                (lg.audience_key == o.audience_key) & (lg.user_id == o.user_id),
            )
        )
        .where(
            o.state == "pending",
            o.priority != PRIORITY_RETRY,  # a rejected change waits for its next run
            o.user_id.in_(bindparam("users", expanding=True)),
        )
        .order_by(o.user_id, o.audience_key),
        {"users": users},
    )
    for row in rows:
        by_user[row.user_id].append(
            Change(
                row.audience_key,
                row.user_id,
                row.value,
                row.contact,
                row.run_id,
                row.version,
                row.queued_at,
                row.last_status,
                bool(row.contact_only),
                row.acked_contact,
            )
        )
    return {u: c for u, c in by_user.items() if c}


def mark_attempted(conn: Connection, users: list[str]) -> None:
    """Written before the calls go out: from here on their values may reach Gleap."""
    o = models.outbox.c
    conn.execute(
        update(models.outbox)
        .where(o.state == "pending", o.user_id.in_(bindparam("users", expanding=True)))
        .values(attempted=True),
        {"users": users},
    )


def unsendable(changes: list[Change]) -> tuple[list[Change], list[tuple[Change, str]]]:
    """``changes`` split into those that can be sent and those whose own row holds
    a column Gleap cannot store, each with a reason naming its audience and column.

    One audience's bad column fails that audience's change alone: the user's
    other audiences and traits still go in the call, with their own contact fields.
    """
    good: list[Change] = []
    bad: list[tuple[Change, str]] = []
    for change in changes:
        problem = json.loads(change.contact).get(INVALID_MARK) if change.contact else None
        if problem:
            bad.append((change, f"not sendable: {change.audience_key!r}: {problem}"))
        else:
            good.append(change)
    return good, bad


def plan_calls(user_id: str, changes: list[Change]) -> list[tuple[dict[str, Any], list[Change]]]:
    """The Identify bodies for one user's changes, each with the changes it carries.

    A change that sends no key (contact fields only) is carried by the last body:
    when Gleap acknowledges it, every body before it was acknowledged too. When
    no change has anything left to tell Gleap (the contact fields that moved were
    acknowledged meanwhile), there is no call: an empty list.
    Raises PayloadError when the user's contact data cannot be sent (see
    :func:`unsendable` to set such changes apart first).
    """
    contacts = [sent for c in changes if (sent := c.contact_to_send())]
    values = [(c.audience_key, json.loads(c.value)) for c in changes if c.keyed]
    if not values and not contacts:
        return []
    bodies = identify_bodies(user_id, values, contacts)
    by_key = {c.audience_key: c for c in changes if c.keyed}
    calls = []
    for body in bodies:
        carried = [by_key[k] for k in body if k in by_key]
        calls.append((body, carried))
    calls[-1][1].extend(c for c in changes if not c.keyed)
    return calls


def deliver(
    engine: Engine,
    client: GleapClient,
    *,
    lease: Lease | None = None,
    stop: Callable[[], bool] = lambda: False,
    concurrency: int = DEFAULT_CONCURRENCY,
    batch_size: int = DEFAULT_DELIVER_BATCH,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    on_progress: Callable[[DeliveryReport], None] | None = None,
    event_kinds: EventKinds | None = None,
) -> DeliveryReport:
    """Send every pending change until the outbox is empty, ``stop()`` or Gleap gives out.

    Changes that were not acknowledged stay in the outbox. Raises nothing for
    Gleap trouble: ``report.error`` carries it (auth, unavailable, rejecting
    everything, lease lost).

    Rejections are held back until Gleap next acknowledges something: when
    :data:`DEFAULT_OUTAGE_PROBE` users in a row are rejected instead — at the
    start of the drain or in its middle (:func:`outage_verdict`) — the drain
    stops with :class:`GleapRejectingAll` and those rejections are never
    recorded — no attempt counted, no failure row — so the changes stay pending
    for the next run.
    """
    report = DeliveryReport()
    attempts_before = client.attempts()
    halt = threading.Event()
    # Users whose call outlasted every retry: left queued for the next drain,
    # while the rest go on. Only a streak of such failures means Gleap is down.
    skipped: set[str] = set()
    streak = 0
    last_unavailable: GleapUnavailable | None = None
    # Until Gleap acknowledges a call again, a rejection may be Gleap (or a proxy
    # at base_url) refusing everything: hold it back rather than blame the user.
    acked_any = False
    outage = False
    held: list[tuple[str, list[CallResult]]] = []
    fresh: dict[str, int | None] = {}  # held users never rejected before -> status
    known: dict[str, int | None] = {}  # held users Gleap rejected in an earlier drain
    first_reason: str | None = None

    def halted() -> bool:
        return halt.is_set() or stop()

    # Users `audsync forget` suppressed, as this drain last read them: not one
    # more call about them starts (the set is replaced whole, never mutated, so
    # the sender threads read it safely). See audsync/forget.py for the protocol.
    blocked: frozenset[str] = frozenset()
    # Users a stop gave up on mid-call: Gleap may still apply those calls.
    abandoned: set[str] = set()

    def send_user(user_id: str, changes: list[Change]) -> list[CallResult]:
        changes, bad = unsendable(changes)
        results = [CallResult([c], ok=False, status=None, reason=why) for c, why in bad]
        if not changes:
            return results
        try:
            calls = plan_calls(user_id, changes)
        except PayloadError as exc:
            results.append(
                CallResult(changes, ok=False, status=None, reason=f"not sendable: {exc}")
            )
            return results
        if not calls:  # nothing left to tell: settled without a call (attempts 0)
            results.append(CallResult(changes, ok=True))
            return results
        for body, carried in calls:
            # A call about a forgotten user never starts; one already sent is
            # never abandoned for the forget's sake: Gleap might still apply it
            # after the DELETE. The forget waits for it instead.
            if user_id in blocked:
                raise Interrupted(f"{user_id} was forgotten")
            outcome = client.identify(body, stop=halted, skip=lambda: user_id in blocked)
            results.append(
                CallResult(carried, outcome.ok, outcome.status, outcome.reason, 1 + outcome.retries)
            )
        return results

    event_kinds = event_kinds or {}
    events_waiting = pending_events(engine)

    def guard(conn: Connection) -> None:
        if lease is not None and not still_held(conn, lease):
            raise LeaseLost("the delivery lease was taken over by another process")

    def flush_events(all_of_them: bool) -> None:
        """Send queued events in calls of 100; all of them at the end of a drain."""
        nonlocal events_waiting
        while events_waiting >= (1 if all_of_them else MAX_EVENTS_PER_CALL) and not halted():
            try:
                batch = send_events(engine, client, stop=halted, guard=guard)
            except Interrupted:
                return
            except (GleapError, LeaseLost) as exc:
                if report.error is None or isinstance(exc, GleapAuthError):
                    report.error = exc
                halt.set()
                return
            report.events += batch.sent
            report.event_keys_dropped += batch.dropped_keys
            events_waiting = pending_events(engine)

    # Acknowledgements are committed a few users at a time (at most ACK_BATCH
    # results or ACK_INTERVAL seconds): one transaction per call would cap
    # delivery well below what Gleap allows. A crash repeats at most these.
    acks: list[CallResult] = []
    unacked: set[str] = set()
    last_ack = time.monotonic()

    def flush_acks() -> None:
        nonlocal events_waiting, acks, last_ack
        last_ack = time.monotonic()
        if not acks:
            return
        batch, acks = acks, []
        unacked.clear()
        try:
            events_waiting += _acknowledge(engine, batch, lease, max_attempts, report, event_kinds)
        except LeaseLost as exc:
            report.error = exc
            halt.set()

    def declare_outage() -> None:
        nonlocal outage
        outage = True
        message = outage_message(
            "users' Identify calls",
            {**known, **fresh},
            first_reason,
            "POST",
            client.request_path(IDENTIFY_PATH),
        )
        if report.error is None or not isinstance(report.error, GleapAuthError):
            report.error = GleapRejectingAll(message)
        held.clear()  # never recorded: nobody's attempts are spent on an outage
        halt.set()

    def release_held() -> None:
        for user, results in held:
            unacked.add(user)
            acks.extend(results)
        held.clear()
        fresh.clear()
        known.clear()

    in_flight: dict[Future[list[CallResult]], str] = {}
    queue: deque[tuple[str, list[Change]]] = deque()
    since_finalize = 0
    last_poll = -SUPPRESSION_POLL

    def answer_forgets(now: bool = False) -> None:
        """Block users a forget is waiting on; confirm those with no call in flight.

        A confirmation (``suppressions.calls_stopped_at``) is written only for
        users in ``blocked`` with no sender working on them and every result of
        theirs acknowledged: from then on this drain sends nothing about them.
        """
        nonlocal blocked, last_poll
        if not now and time.monotonic() - last_poll < SUPPRESSION_POLL:
            return
        last_poll = time.monotonic()
        s = models.suppressions.c
        with engine.connect() as conn:
            waiting = set(
                conn.execute(select(s.user_id).where(s.calls_stopped_at.is_(None))).scalars()
            )
        if not waiting:
            return
        if not waiting <= blocked:
            blocked = blocked | waiting
            kept = [(u, c) for u, c in queue if u not in blocked]
            queue.clear()
            queue.extend(kept)
        ready = sorted(waiting - set(in_flight.values()) - abandoned)
        if unacked & set(ready):
            flush_acks()  # their results are committed before the forget goes on
        if not ready:
            return
        try:
            with engine.begin() as conn:
                guard(conn)
                # Their queued changes will never be sent: credit them as superseded.
                withdraw(conn, models.outbox.c.user_id.in_(ready))
            # A transaction of its own that touches nothing else: on PostgreSQL it
            # may wait for a plan's SHARE lock (plan.drop_forgotten) while holding
            # no row that plan could be waiting for.
            with engine.begin() as conn:
                guard(conn)
                conn.execute(
                    update(models.suppressions)
                    .where(s.user_id.in_(ready), s.calls_stopped_at.is_(None))
                    .values(calls_stopped_at=utcnow())
                )
        except LeaseLost as exc:
            report.error = report.error or exc
            halt.set()

    answer_forgets(now=True)  # the daemon calls deliver() every second: answer at once
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="audsync-send") as pool:
        while True:
            answer_forgets()
            # Refill before the queue runs dry, so the pacer never waits on the
            # database; users already queued, in flight or skipped are left out.
            if not in_flight or len(queue) < concurrency:
                flush_acks()  # acknowledged users must not look pending to the refill
            if not halted() and len(queue) < concurrency:
                busy = (
                    skipped
                    | unacked
                    | set(fresh)
                    | set(known)
                    | set(in_flight.values())
                    | {u for u, _ in queue}
                )
                with engine.begin() as conn:
                    users = next_users(conn, batch_size, busy)
                    if users:
                        queue.extend(pending_changes(conn, users).items())
                        mark_attempted(conn, users)
            while queue and len(in_flight) < concurrency * 2 and not halted():
                user_id, changes = queue.popleft()
                if user_id in blocked:
                    continue  # forgotten since it was fetched
                in_flight[pool.submit(send_user, user_id, changes)] = user_id
            if not in_flight:
                break  # nothing pending, or halted with nothing left in flight
            done, _ = wait(in_flight, timeout=LOOP_TICK, return_when=FIRST_COMPLETED)
            for future in done:
                user_id = in_flight.pop(future)
                try:
                    results = future.result()
                except CallAbandoned:
                    # Gleap may still apply it: never confirm this user to a forget.
                    abandoned.add(user_id)
                    continue
                except Interrupted:
                    continue  # stopped before its call went out: it stays queued
                except GleapUnavailable as exc:
                    skipped.add(user_id)
                    streak += 1
                    last_unavailable = exc
                    if streak >= UNAVAILABLE_STREAK or len(skipped) > MAX_SKIPPED_USERS:
                        report.error = report.error or exc
                        halt.set()
                    continue
                except GleapError as exc:
                    if report.error is None or isinstance(exc, GleapAuthError):
                        report.error = exc
                    halt.set()
                    continue
                unacked.add(user_id)
                if any(r.ok and r.attempts for r in results) and not outage:
                    # Gleap works: what it rejected since its last acknowledgement
                    # was those users. Rejections stay held between acknowledgements,
                    # so a Gleap that starts rejecting everything mid-drain is an
                    # outage too (found by review), not hundreds of users parked.
                    acked_any = True
                    release_held()
                rejected = all(not r.ok and r.status is not None for r in results)
                if not rejected:
                    acks.extend(results)  # (a payload we could not build is ours, not Gleap's)
                elif not outage:
                    held.append((user_id, results))
                    first_reason = first_reason or results[-1].reason
                    before = any(c.last_status is not None for r in results for c in r.changes)
                    (known if before else fresh)[user_id] = results[-1].status
                    if outage_verdict(fresh, known, False, finished=False):
                        declare_outage()
                streak = 0
                report.users += 1
                since_finalize += 1
            if len(acks) >= ACK_BATCH or time.monotonic() - last_ack >= ACK_INTERVAL:
                flush_acks()
            if events_waiting >= MAX_EVENTS_PER_CALL:
                flush_acks()
                flush_events(all_of_them=False)
            if on_progress is not None:
                on_progress(report)
            if since_finalize >= batch_size:
                flush_acks()
                with engine.begin() as conn:
                    finalize_runs(conn)
                since_finalize = 0
    if held and report.error is None and not stop():
        # The drain ran dry with rejections only: an outage, or a few bad users.
        if outage_verdict(fresh, known, acked_any, finished=True):
            declare_outage()
        else:
            release_held()
    held.clear()  # stopped early: unblamed, they stay pending for the next drain
    flush_acks()
    flush_events(all_of_them=True)
    answer_forgets(now=True)  # nothing is in flight any more
    with engine.begin() as conn:
        finalize_runs(conn)
    if report.error is None and skipped and last_unavailable is not None:
        report.error = GleapUnavailable(
            f"{len(skipped)} users stay queued after every retry failed (last: {last_unavailable})"
        )
    report.skipped = len(skipped)
    _count_calls(report, attempts_before, client.attempts())
    if report.error is not None:
        report.stopped = str(report.error)
    elif stop():
        report.stopped = "shutdown requested"
    return report


def _count_calls(
    report: DeliveryReport,
    before: dict[tuple[str, str], int],
    after: dict[tuple[str, str], int],
) -> None:
    """Fill the report's call counts from the attempts made between ``before`` and ``after``."""

    def made(endpoint: str, *outcomes: str) -> int:
        return sum(
            n - before.get((e, o), 0)
            for (e, o), n in after.items()
            if e == endpoint and (not outcomes or o in outcomes)
        )

    report.calls = made("identify") + made("track")
    report.identify_calls = made("identify", "ok")
    report.identify_failed = made("identify", *FAILED_OUTCOMES)
    report.track_calls = made("track", "ok")
    report.track_failed = made("track", *FAILED_OUTCOMES)
    report.throttled = made("identify", "throttled") + made("track", "throttled")


def _acknowledge(
    engine: Engine,
    results: list[CallResult],
    lease: Lease | None,
    max_attempts: int,
    report: DeliveryReport,
    event_kinds: EventKinds,
) -> int:
    """Record one user's call results; returns how many events the acks queued."""
    now = utcnow()
    events = 0
    with engine.begin() as conn:
        if lease is not None and not still_held(conn, lease):
            raise LeaseLost("the delivery lease was taken over by another process")
        delivered_by_run: dict[int, int] = {}
        failed_by_run: dict[int, int] = {}
        acknowledged: list[Change] = []
        # A user forgotten while their call was in flight: Gleap's answer moves
        # nothing (no ledger row, no event, no failure); the forget deletes the
        # contact once this transaction is committed and the user confirmed.
        users = sorted({c.user_id for r in results for c in r.changes})
        s = models.suppressions.c
        forgotten = set(
            conn.execute(
                select(s.user_id).where(s.user_id.in_(bindparam("users", expanding=True))),
                {"users": users},
            ).scalars()
        )
        for result in results:
            for change in result.changes:
                if change.user_id in forgotten:
                    continue
                if result.ok:
                    kind = event_kinds.get(change.audience_key)
                    if kind is not None:  # before the ledger moves: old -> new
                        events += _queue_transition_event(conn, kind, change, now)
                    acknowledged.append(change)
                    report.delivered += 1
                    report.per_key[change.audience_key] = (
                        report.per_key.get(change.audience_key, 0) + 1
                    )
                elif _reject(conn, change, result, now, max_attempts):
                    failed_by_run[change.run_id] = failed_by_run.get(change.run_id, 0) + 1
                    report.failed += 1
        for change in _ack_all(conn, acknowledged, now):
            delivered_by_run[change.run_id] = delivered_by_run.get(change.run_id, 0) + 1
        credit_runs(conn, "delivered", delivered_by_run)
        credit_runs(conn, "failed", failed_by_run)
    return events


def _queue_transition_event(conn: Connection, kind: Kind, change: Change, now: Any) -> int:
    """Before the ledger moves: queue the event of the transition, if it is one."""
    old = conn.execute(
        select(models.ledger.c.value).where(
            models.ledger.c.audience_key == change.audience_key,
            models.ledger.c.user_id == change.user_id,
        )
    ).scalar()
    occurred = change.queued_at or now
    return int(
        queue_event(
            conn,
            kind,
            change.audience_key,
            change.user_id,
            old,
            change.value,
            occurred,
            change.run_id,
        )
    )


_UPSERT_LEDGER = text(
    "INSERT INTO ledger (audience_key, user_id, value, contact, acked_at)"
    " VALUES (:audience_key, :user_id, :value, :contact, :acked_at)"
    " ON CONFLICT (audience_key, user_id)"
    " DO UPDATE SET value = excluded.value, contact = excluded.contact,"
    " acked_at = excluded.acked_at"
)


def _ack_all(conn: Connection, changes: list[Change], now: Any) -> list[Change]:
    """Record Gleap's 2xx for ``changes``; returns those that still were the queued value.

    Set-wise: one ledger upsert and one versioned DELETE ... RETURNING for the
    whole batch, so acknowledging costs a few statements, not a few per change.
    """
    if not changes:
        return []
    conn.execute(
        _UPSERT_LEDGER,
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
    # Only the acknowledged version goes: a newer plan's value stays queued.
    params: dict[str, Any] = {}
    rows = []
    for i, c in enumerate(changes):
        params.update({f"u{i}": c.user_id, f"k{i}": c.audience_key, f"v{i}": c.version})
        rows.append(f"(:u{i}, :k{i}, :v{i})")
    deleted = {
        (r[0], r[1])
        for r in conn.execute(
            text(
                "DELETE FROM outbox WHERE (user_id, audience_key, version) IN"
                f" (VALUES {', '.join(rows)}) RETURNING user_id, audience_key"
            ),
            params,
        )
    }
    # A row not deleted was overwritten by a newer plan while its call was in
    # flight (rows marked attempted are never withdrawn), so the newer value
    # is still queued and goes next; or the user was forgotten meanwhile.
    kept = [c for c in changes if (c.user_id, c.audience_key) not in deleted]
    o = models.outbox.c
    for c in kept:  # Gleap took this user: the count of rejections in a row starts over
        conn.execute(
            update(models.outbox)
            .where(o.user_id == c.user_id, o.audience_key == c.audience_key)
            .values(attempts=0)
        )
    return [c for c in changes if (c.user_id, c.audience_key) in deleted]


def _reject(
    conn: Connection, change: Change, result: CallResult, now: Any, max_attempts: int
) -> bool:
    """Record one rejected change; True when it still was the queued version.

    The run that sent it counts it as failed either way. Below ``max_attempts``
    rejections in a row the row stays ``pending`` but leaves its run (``NO_RUN``)
    and waits (``PRIORITY_RETRY``) for the next plan of its audience to take it
    over; at ``max_attempts`` it is parked: ``state = 'failed'``.
    """
    o = models.outbox.c
    last = o.attempts + 1 >= max_attempts
    parked = conn.execute(
        update(models.outbox)
        .where(
            o.audience_key == change.audience_key,
            o.user_id == change.user_id,
            o.version == change.version,
        )
        .values(
            state=case((last, "failed"), else_="pending"),
            run_id=case((last, o.run_id), else_=NO_RUN),
            priority=case((last, o.priority), else_=PRIORITY_RETRY),
            attempts=o.attempts + 1,
            last_status=result.status,
            last_error=result.reason,
        )
    )
    conn.execute(
        insert(models.delivery_failures).values(
            run_id=change.run_id,
            audience_key=change.audience_key,
            user_id=change.user_id,
            http_status=result.status,
            reason=result.reason or "rejected",
            failed_at=now,
        )
    )
    return parked.rowcount == 1


def finalize_runs(conn: Connection) -> None:
    """Close every delivering run none of whose changes is still pending.

    Decided from the run's own counters (every queued change ends delivered,
    failed or superseded), so it never scans a million-row outbox.
    """
    conn.execute(
        text(
            "UPDATE sync_runs"
            " SET status = CASE WHEN failed > 0 THEN 'partial' ELSE 'succeeded' END,"
            " finished_at = :now"
            " WHERE status = 'delivering' AND delivered + failed + superseded >= queued"
        ),
        {"now": utcnow()},
    )
    conn.execute(
        text(
            "UPDATE audiences SET last_success_at = ("
            " SELECT MAX(r.finished_at) FROM sync_runs r WHERE r.audience_key = audiences.key"
            " AND r.status = 'succeeded')"
            " WHERE EXISTS (SELECT 1 FROM sync_runs r WHERE r.audience_key = audiences.key"
            " AND r.status = 'succeeded')"
        )
    )
