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

from sqlalchemy import Connection, Engine, bindparam, exists, func, select

from audsync import manager, models
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
    LeaseLost,
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
from audsync.models import PRIORITY_BACKFILL, PRIORITY_RETRY, PRIORITY_ROUTINE
from audsync.outage import outage_message, outage_verdict
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
    return Drain(
        engine,
        client,
        lease=lease,
        stop=stop,
        concurrency=concurrency,
        batch_size=batch_size,
        max_attempts=max_attempts,
        on_progress=on_progress,
        event_kinds=event_kinds,
    ).run()


class Drain:
    """One drain of the outbox (:func:`deliver`), its loop as named steps.

    Each turn of :meth:`run`: answer forgets, :meth:`refill` the queue,
    :meth:`submit` calls to the sender threads, :meth:`collect` the calls that
    ended, then :meth:`flush_acks` / :meth:`flush_events` when due; :meth:`finish`
    settles what is left. Every method runs on the calling thread except
    :meth:`send_user`, which the pool runs: it reads only ``blocked`` (replaced
    whole, never mutated) and ``halt``.
    """

    def __init__(
        self,
        engine: Engine,
        client: GleapClient,
        *,
        lease: Lease | None,
        stop: Callable[[], bool],
        concurrency: int,
        batch_size: int,
        max_attempts: int,
        on_progress: Callable[[DeliveryReport], None] | None,
        event_kinds: EventKinds | None,
    ) -> None:
        self.engine = engine
        self.client = client
        self.lease = lease
        self.stop = stop
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.on_progress = on_progress
        self.event_kinds: EventKinds = event_kinds or {}
        self.report = DeliveryReport()
        self.attempts_before = client.attempts()
        self.halt = threading.Event()
        # Users whose call outlasted every retry: left queued for the next drain,
        # while the rest go on. Only a streak of such failures means Gleap is down.
        self.skipped: set[str] = set()
        self.streak = 0
        self.last_unavailable: GleapUnavailable | None = None
        # Until Gleap acknowledges a call again, a rejection may be Gleap (or a proxy
        # at base_url) refusing everything: hold it back rather than blame the user.
        self.acked_any = False
        self.outage = False
        self.held: list[tuple[str, list[CallResult]]] = []
        self.fresh: dict[str, int | None] = {}  # held users never rejected before -> status
        self.known: dict[str, int | None] = {}  # held users Gleap rejected in an earlier drain
        self.first_reason: str | None = None
        # Users `audsync forget` suppressed, as this drain last read them: not one
        # more call about them starts (the set is replaced whole, never mutated, so
        # the sender threads read it safely). See audsync/forget.py for the protocol.
        self.blocked: frozenset[str] = frozenset()
        # Users a stop gave up on mid-call: Gleap may still apply those calls.
        self.abandoned: set[str] = set()
        self.events_waiting = pending_events(engine)
        # Acknowledgements are committed a few users at a time (at most ACK_BATCH
        # results or ACK_INTERVAL seconds): one transaction per call would cap
        # delivery well below what Gleap allows. A crash repeats at most these.
        self.acks: list[CallResult] = []
        self.unacked: set[str] = set()
        self.last_ack = time.monotonic()
        self.in_flight: dict[Future[list[CallResult]], str] = {}
        self.queue: deque[tuple[str, list[Change]]] = deque()
        self.since_finalize = 0
        self.last_poll = -SUPPRESSION_POLL

    def run(self) -> DeliveryReport:
        """Drain until nothing is pending or in flight, or the drain is halted."""
        self.answer_forgets(now=True)  # the daemon calls deliver() every second: answer at once
        with ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="audsync-send"
        ) as pool:
            while True:
                self.answer_forgets()
                self.refill()
                self.submit(pool)
                if not self.in_flight:
                    break  # nothing pending, or halted with nothing left in flight
                self.collect()
                self.flush_when_due()
        return self.finish()

    def halted(self) -> bool:
        """Whether no new call may start: stopped, or the drain gave up."""
        return self.halt.is_set() or self.stop()

    def give_up(self, exc: AudsyncError, *, overrides: bool = False) -> None:
        """Halt the drain with ``exc`` as its error, unless it has one (``overrides``:
        an auth failure says more than what came before it)."""
        if self.report.error is None or overrides:
            self.report.error = exc
        self.halt.set()

    def guard(self, conn: Connection) -> None:
        """The lease's fencing check, first in every writing transaction."""
        if self.lease is not None and not still_held(conn, self.lease):
            raise LeaseLost("the delivery lease was taken over by another process")

    # -- the loop -----------------------------------------------------------------

    def refill(self) -> None:
        """Fetch the next users before the queue runs dry, so the pacer never waits on
        the database; users already queued, in flight or skipped are left out."""
        if not self.in_flight or len(self.queue) < self.concurrency:
            self.flush_acks()  # acknowledged users must not look pending to the refill
        if self.halted() or len(self.queue) >= self.concurrency:
            return
        busy = (
            self.skipped
            | self.unacked
            | set(self.fresh)
            | set(self.known)
            | set(self.in_flight.values())
            | {u for u, _ in self.queue}
        )
        with self.engine.begin() as conn:
            users = next_users(conn, self.batch_size, busy)
            if users:
                self.queue.extend(pending_changes(conn, users).items())
                manager.mark_attempted(conn, users)

    def submit(self, pool: ThreadPoolExecutor) -> None:
        """Hand queued users to the sender threads, keeping at most two calls per thread."""
        while self.queue and len(self.in_flight) < self.concurrency * 2 and not self.halted():
            user_id, changes = self.queue.popleft()
            if user_id in self.blocked:
                continue  # forgotten since it was fetched
            self.in_flight[pool.submit(self.send_user, user_id, changes)] = user_id

    def send_user(self, user_id: str, changes: list[Change]) -> list[CallResult]:
        """One user's Identify calls (on a sender thread); a payload we cannot build
        is a result of our own, never a call."""
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
            if user_id in self.blocked:
                raise Interrupted(f"{user_id} was forgotten")
            outcome = self.client.identify(
                body, stop=self.halted, skip=lambda: user_id in self.blocked
            )
            results.append(
                CallResult(carried, outcome.ok, outcome.status, outcome.reason, 1 + outcome.retries)
            )
        return results

    def collect(self) -> None:
        """Take the calls that ended (waiting at most :data:`LOOP_TICK` for one)."""
        done, _ = wait(self.in_flight, timeout=LOOP_TICK, return_when=FIRST_COMPLETED)
        for future in done:
            user_id = self.in_flight.pop(future)
            try:
                results = future.result()
            except CallAbandoned:
                # Gleap may still apply it: never confirm this user to a forget.
                self.abandoned.add(user_id)
                continue
            except Interrupted:
                continue  # stopped before its call went out: it stays queued
            except GleapUnavailable as exc:
                self.skip(user_id, exc)
                continue
            except GleapError as exc:
                self.give_up(exc, overrides=isinstance(exc, GleapAuthError))
                continue
            self.answered(user_id, results)

    def skip(self, user_id: str, exc: GleapUnavailable) -> None:
        """Leave a user whose call outlasted every retry queued; a streak of them
        (or too many) means Gleap is down."""
        self.skipped.add(user_id)
        self.streak += 1
        self.last_unavailable = exc
        if self.streak >= UNAVAILABLE_STREAK or len(self.skipped) > MAX_SKIPPED_USERS:
            self.give_up(exc)

    def answered(self, user_id: str, results: list[CallResult]) -> None:
        """Gleap answered ``user_id``'s calls: queue the acknowledgements, or hold
        the rejections until Gleap shows it works."""
        self.unacked.add(user_id)
        if any(r.ok and r.attempts for r in results) and not self.outage:
            # Gleap works: what it rejected since its last acknowledgement
            # was those users. Rejections stay held between acknowledgements,
            # so a Gleap that starts rejecting everything mid-drain is an
            # outage too (found by review), not hundreds of users parked.
            self.acked_any = True
            self.release_held()
        rejected = all(not r.ok and r.status is not None for r in results)
        if not rejected:
            self.acks.extend(results)  # (a payload we could not build is ours, not Gleap's)
        elif not self.outage:
            self.held.append((user_id, results))
            self.first_reason = self.first_reason or results[-1].reason
            before = any(c.last_status is not None for r in results for c in r.changes)
            (self.known if before else self.fresh)[user_id] = results[-1].status
            if outage_verdict(self.fresh, self.known, False, finished=False):
                self.declare_outage()
        self.streak = 0
        self.report.users += 1
        self.since_finalize += 1

    def flush_when_due(self) -> None:
        """Commit acknowledgements, send events and close runs once enough waited."""
        if len(self.acks) >= ACK_BATCH or time.monotonic() - self.last_ack >= ACK_INTERVAL:
            self.flush_acks()
        if self.events_waiting >= MAX_EVENTS_PER_CALL:
            self.flush_acks()
            self.flush_events(all_of_them=False)
        if self.on_progress is not None:
            self.on_progress(self.report)
        if self.since_finalize >= self.batch_size:
            self.flush_acks()
            with self.engine.begin() as conn:
                manager.finalize_runs(conn)
            self.since_finalize = 0

    def finish(self) -> DeliveryReport:
        """Settle the held rejections, commit and send what waits, close the runs."""
        if self.held and self.report.error is None and not self.stop():
            # The drain ran dry with rejections only: an outage, or a few bad users.
            if outage_verdict(self.fresh, self.known, self.acked_any, finished=True):
                self.declare_outage()
            else:
                self.release_held()
        self.held.clear()  # stopped early: unblamed, they stay pending for the next drain
        self.flush_acks()
        self.flush_events(all_of_them=True)
        self.answer_forgets(now=True)  # nothing is in flight any more
        with self.engine.begin() as conn:
            manager.finalize_runs(conn)
        report = self.report
        if report.error is None and self.skipped and self.last_unavailable is not None:
            report.error = GleapUnavailable(
                f"{len(self.skipped)} users stay queued after every retry failed"
                f" (last: {self.last_unavailable})"
            )
        report.skipped = len(self.skipped)
        _count_calls(report, self.attempts_before, self.client.attempts())
        if report.error is not None:
            report.stopped = str(report.error)
        elif self.stop():
            report.stopped = "shutdown requested"
        return report

    # -- acknowledgements and events ------------------------------------------------

    def flush_acks(self) -> None:
        """Commit the call results waiting, in one transaction fenced by the lease."""
        self.last_ack = time.monotonic()
        if not self.acks:
            return
        batch, self.acks = self.acks, []
        self.unacked.clear()
        try:
            self.events_waiting += _acknowledge(
                self.engine, batch, self.lease, self.max_attempts, self.report, self.event_kinds
            )
        except LeaseLost as exc:
            self.report.error = exc
            self.halt.set()

    def flush_events(self, all_of_them: bool) -> None:
        """Send queued events in calls of 100; all of them at the end of a drain."""
        threshold = 1 if all_of_them else MAX_EVENTS_PER_CALL
        while self.events_waiting >= threshold and not self.halted():
            try:
                batch = send_events(self.engine, self.client, stop=self.halted, guard=self.guard)
            except Interrupted:
                return
            except (GleapError, LeaseLost) as exc:
                self.give_up(exc, overrides=isinstance(exc, GleapAuthError))
                return
            self.report.events += batch.sent
            self.report.event_keys_dropped += batch.dropped_keys
            self.events_waiting = pending_events(self.engine)

    # -- rejections held back --------------------------------------------------------

    def declare_outage(self) -> None:
        """Gleap rejects everything: stop, and record none of the held rejections."""
        self.outage = True
        message = outage_message(
            "users' Identify calls",
            {**self.known, **self.fresh},
            self.first_reason,
            "POST",
            self.client.request_path(IDENTIFY_PATH),
        )
        if self.report.error is None or not isinstance(self.report.error, GleapAuthError):
            self.report.error = GleapRejectingAll(message)
        self.held.clear()  # never recorded: nobody's attempts are spent on an outage
        self.halt.set()

    def release_held(self) -> None:
        """Gleap works: the held rejections were those users', record them."""
        for user, results in self.held:
            self.unacked.add(user)
            self.acks.extend(results)
        self.held.clear()
        self.fresh.clear()
        self.known.clear()

    # -- forgets -----------------------------------------------------------------------

    def answer_forgets(self, now: bool = False) -> None:
        """Block users a forget is waiting on; confirm those with no call in flight.

        A confirmation (``suppressions.calls_stopped_at``) is written only for
        users in ``blocked`` with no sender working on them and every result of
        theirs acknowledged: from then on this drain sends nothing about them.
        """
        if not now and time.monotonic() - self.last_poll < SUPPRESSION_POLL:
            return
        self.last_poll = time.monotonic()
        s = models.suppressions.c
        with self.engine.connect() as conn:
            waiting = set(
                conn.execute(select(s.user_id).where(s.calls_stopped_at.is_(None))).scalars()
            )
        if not waiting:
            return
        if not waiting <= self.blocked:
            self.blocked = self.blocked | waiting
            kept = [(u, c) for u, c in self.queue if u not in self.blocked]
            self.queue.clear()
            self.queue.extend(kept)
        ready = sorted(waiting - set(self.in_flight.values()) - self.abandoned)
        if self.unacked & set(ready):
            self.flush_acks()  # their results are committed before the forget goes on
        if not ready:
            return
        try:
            with self.engine.begin() as conn:
                self.guard(conn)
                # Their queued changes will never be sent: credit them as superseded.
                manager.supersede_pending(conn, models.outbox.c.user_id.in_(ready))
            # A transaction of its own that touches nothing else: on PostgreSQL it
            # may wait for a plan's SHARE lock (manager.drop_forgotten) while holding
            # no row that plan could be waiting for.
            with self.engine.begin() as conn:
                self.guard(conn)
                manager.confirm_calls_stopped(conn, ready)
        except LeaseLost as exc:
            self.report.error = self.report.error or exc
            self.halt.set()


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
    """Record one batch of call results; returns how many events the acks queued."""
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
                elif manager.reject(conn, change, result.status, result.reason, now, max_attempts):
                    failed_by_run[change.run_id] = failed_by_run.get(change.run_id, 0) + 1
                    report.failed += 1
        for change in manager.acknowledge(conn, acknowledged, now):
            delivered_by_run[change.run_id] = delivered_by_run.get(change.run_id, 0) + 1
        manager.credit_runs(conn, "delivered", delivered_by_run)
        manager.credit_runs(conn, "failed", failed_by_run)
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
