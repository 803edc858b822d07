"""``audsync forget``: delete users from Gleap and keep them out of every later sync.

``forget`` wins every race with the sync. Once it exits 0, no Identify or Track
call about the users reaches Gleap again from audsync, and no ledger, outbox,
snapshot, event or failure row of theirs is left. It works in three steps:

1. **Suppress, and commit first.** The users go on the ``suppressions`` list
   with ``calls_stopped_at`` NULL, in a transaction that touches nothing else.
2. **Wait for the deliverer.** The process holding the delivery lease reads the
   suppressions whose ``calls_stopped_at`` is NULL every 0.1 s
   (``deliver.Drain.answer_forgets``). From that read on it starts no call about those
   users (calls still queued are dropped; a sender checks before every HTTP
   attempt, retries included). Once no sender is working on a user and every
   result of theirs is acknowledged, it withdraws the user's queued changes and
   sets ``calls_stopped_at``. ``forget`` waits for that confirmation, for at
   most the Gleap timeout plus ``DEFAULT_FORGET_WAIT_MARGIN``; when no live
   process holds the delivery lease there is nothing in flight, and it goes on
   at once.
3. **Wipe, then delete.** The user's rows go, then the Gleap contact
   (``DELETE /admin/contacts/{id}``).

Why this is race-free, on SQLite and on PostgreSQL (READ COMMITTED) alike — a
statement sees every transaction committed before it started:

- *A call in flight, or fetched but not sent.* The deliverer confirms a user
  only after a read that saw the suppression (so after step 1 committed), and
  only when no sender holds that user; every later submission and every HTTP
  attempt checks the blocked set first. A Track call runs on the deliverer's
  own thread, so none is in flight while it confirms. Step 3 starts after the
  confirmation, so the DELETE comes after the last call about the user ended.
- *No deliverer.* A process that takes the delivery lease after step 1 fetches
  with a statement that excludes suppressed users, so it never sends them.
- *An acknowledgement.* It reads the suppressions in its own transaction and
  writes nothing (no ledger row, no event, no failure) for a suppressed user.
  One that slipped in before it could see step 1 committed before the
  deliverer confirmed, so step 3's wipe removes what it wrote.
- *Events.* Each Track batch is read after deleting the events of suppressed
  users, so a queued event of a forgotten user never goes out.
- *A plan.* Every statement that writes the outbox (entered side from the
  snapshot, exited side from the ledger) skips suppressed users, and a plan
  ends with ``manager.drop_forgotten``: on PostgreSQL it takes a SHARE lock on
  ``suppressions`` until it commits, then deletes what it wrote about
  suppressed users. Step 1 therefore either commits before that lock (and the
  plan removes the users itself) or waits for the plan to commit (and step 3
  wipes after it). On SQLite a plan is the only writer while it runs: step 1
  comes wholly before or after it.

When the confirmation does not come within the bound (a call still in
flight), the user stays suppressed but is neither wiped nor deleted: the
forget reports it and exits 1, and running it again finishes the job.

The limit: a process that lost the delivery lease without noticing (its
heartbeat stalled past ``lease_ttl``) is taken for dead here as everywhere
else, and Gleap may still act on a request our client already gave up on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from audsync import manager, models
from audsync.clock import utcnow
from audsync.defaults import DEFAULT_FORGET_WAIT_MARGIN, DEFAULT_TIMEOUT
from audsync.errors import GleapAuthError, GleapError
from audsync.gleap import GleapClient
from audsync.history import set_run, start_run
from audsync.locks import DELIVER_LEASE, current_holder

FORGET_KEY = "*"
"""sync_runs.audience_key of a forget run: it concerns every audience."""

UNDONE = "its suppression was lifted (forget --undo) while this forget waited; nothing deleted"
"""Why a user whose forget was undone mid-way is neither wiped nor deleted."""

WAIT_POLL = 0.1
"""Seconds between two looks at the deliverer's confirmation."""


@dataclass
class ForgetReport:
    """Who was forgotten, and whose Gleap delete failed (with why)."""

    run_id: int
    deleted: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    """Gleap had no such contact (the DELETE answered 404): suppressed and wiped all the same."""
    failed: dict[str, str] = field(default_factory=dict)


def forget_wait(timeout: float = DEFAULT_TIMEOUT) -> float:
    """Seconds a forget waits for the deliverer, given the Gleap per-request ``timeout``."""
    return timeout + DEFAULT_FORGET_WAIT_MARGIN


def forget(
    engine: Engine,
    client: GleapClient,
    user_ids: list[str],
    *,
    wait: float | None = None,
    echo: Callable[[str], None] = lambda line: None,
) -> ForgetReport:
    """Suppress ``user_ids``, wait until no call about them can reach Gleap, wipe
    their state and delete their Gleap contacts; record a run.

    ``wait`` bounds the wait for the deliverer (default :func:`forget_wait`);
    a user it could not confirm lands in ``report.failed``. ``echo`` is told
    when the forget starts waiting.
    """
    user_ids = list(dict.fromkeys(u for u in user_ids if u.strip()))
    wait = forget_wait() if wait is None else wait
    run_id = start_run(engine, FORGET_KEY, "manual", "forget")
    report = ForgetReport(run_id=run_id)
    # "planning", not "delivering": a deliverer finalizing runs must not close this one.
    set_run(engine, run_id, status="planning", members=len(user_ids), queued=len(user_ids))
    _suppress(engine, user_ids)
    unconfirmed = _wait_for_deliverer(engine, user_ids, wait, echo)
    for user_id, why in unconfirmed.items():
        report.failed[user_id] = why
        _mark(engine, user_id, error=why)
    confirmed = _wipe(engine, [u for u in user_ids if u not in unconfirmed])
    for user_id in user_ids:
        if user_id not in confirmed and user_id not in report.failed:
            report.failed[user_id] = UNDONE
    for user_id in confirmed:
        try:
            outcome = client.delete_contact(user_id)
        except GleapAuthError:
            _finish(engine, report, error="Gleap rejected the API token")
            raise
        except GleapError as exc:
            report.failed[user_id] = f"the Gleap delete failed: {exc}"
            _mark(engine, user_id, error=str(exc))
            continue
        if outcome.ok:
            (report.not_found if outcome.status == 404 else report.deleted).append(user_id)
            _mark(engine, user_id, error=None)
        else:
            why = outcome.reason or f"HTTP {outcome.status}"
            report.failed[user_id] = f"the Gleap delete failed: {why}"
            _mark(engine, user_id, error=why)
    _finish(engine, report)
    return report


def _suppress(engine: Engine, user_ids: list[str]) -> None:
    """Step 1: suppress and commit, touching no other table (see the module docstring)."""
    with engine.begin() as conn:
        manager.suppress(conn, user_ids, utcnow())


def _wait_for_deliverer(
    engine: Engine, user_ids: list[str], wait: float, echo: Callable[[str], None]
) -> dict[str, str]:
    """Step 2: wait until the deliverer confirmed every user, or there is none.

    Returns the users left unconfirmed when ``wait`` ran out, each with why.
    """
    s = models.suppressions.c
    deadline = time.monotonic() + wait
    told = False
    while True:
        with engine.connect() as conn:
            rows = dict(
                conn.execute(
                    select(s.user_id, s.calls_stopped_at).where(s.user_id.in_(user_ids))
                ).all()
            )
        # `forget --undo` meanwhile: the user is no longer suppressed, so nothing
        # keeps the sync from sending them; deleting them now would be undone anyway.
        undone = dict.fromkeys((u for u in user_ids if u not in rows), UNDONE)
        unconfirmed = sorted(u for u, stopped in rows.items() if stopped is None)
        if not unconfirmed:
            return undone
        holder = current_holder(engine, DELIVER_LEASE)
        if holder is None:
            return undone  # no deliverer: nothing in flight, and the next one never fetches them
        who = f"{holder.get('host')} pid {holder.get('pid')}"
        if time.monotonic() >= deadline:
            why = (
                f"a call to Gleap about it may still be in flight: the deliverer ({who}) did not"
                f" confirm within {wait:g}s that it stopped"
            )
            return {**undone, **dict.fromkeys(unconfirmed, why)}
        if not told:
            echo(
                f"waiting up to {wait:g}s for the deliverer ({who}) to finish its calls"
                f" about {', '.join(unconfirmed)}"
            )
            told = True
        time.sleep(WAIT_POLL)


def _wipe(engine: Engine, user_ids: list[str]) -> list[str]:
    """Step 3: remove every row of ``user_ids`` still suppressed; pending changes count
    as superseded. Returns those users (a forget undone meanwhile keeps its rows)."""
    if not user_ids:
        return []
    with engine.begin() as conn:
        return manager.wipe_users(conn, user_ids)


def _mark(engine: Engine, user_id: str, *, error: str | None) -> None:
    with engine.begin() as conn:
        manager.mark_forgotten(conn, user_id, error=error)


def _finish(engine: Engine, report: ForgetReport, error: str | None = None) -> None:
    failed = len(report.failed)
    status = (
        "failed"
        if error or (failed and not (report.deleted or report.not_found))
        else ("partial" if failed else "succeeded")
    )
    reason = error or (
        "; ".join(f"{u}: {why}" for u, why in list(report.failed.items())[:5]) or None
    )
    set_run(
        engine,
        report.run_id,
        status=status,
        delivered=len(report.deleted),
        # Nothing to delete: settled, but not a delete Gleap acknowledged.
        superseded=len(report.not_found),
        failed=failed,
        error=reason,
    )


def unforget(engine: Engine, user_ids: list[str]) -> list[str]:
    """Lift the suppression of ``user_ids``; returns those that were suppressed."""
    with engine.begin() as conn:
        return manager.lift_suppression(conn, user_ids)


def suppressed(engine: Engine) -> list[dict[str, Any]]:
    """The suppression list, oldest first."""
    s = models.suppressions.c
    with engine.connect() as conn:
        return [
            dict(r._mapping)
            for r in conn.execute(select(models.suppressions).order_by(s.suppressed_at, s.user_id))
        ]
