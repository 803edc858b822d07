"""``audsync forget``: delete users from Gleap and keep them out of every later sync.

A forgotten user is put on the suppression list first (so no plan queues them
again, even while they are still in an audience's query), their ledger,
outbox, snapshot, event and failure rows are removed, and then their contact
is deleted in Gleap (``DELETE /admin/contacts/{id}``). Forgetting again retries
a delete that failed; ``--undo`` lifts the suppression.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from audsync import models
from audsync.clock import utcnow
from audsync.errors import GleapAuthError, GleapError
from audsync.gleap import GleapClient
from audsync.history import set_run, start_run
from audsync.plan import withdraw

FORGET_KEY = "*"
"""sync_runs.audience_key of a forget run: it concerns every audience."""


@dataclass
class ForgetReport:
    """Who was forgotten, and whose Gleap delete failed (with why)."""

    run_id: int
    deleted: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def forget(engine: Engine, client: GleapClient, user_ids: list[str]) -> ForgetReport:
    """Suppress ``user_ids``, wipe their state, delete their Gleap contacts; record a run."""
    user_ids = list(dict.fromkeys(u for u in user_ids if u.strip()))
    run_id = start_run(engine, FORGET_KEY, "manual", "forget")
    report = ForgetReport(run_id=run_id)
    now = utcnow()
    with engine.begin() as conn:
        known = set(
            conn.execute(
                select(models.suppressions.c.user_id).where(
                    models.suppressions.c.user_id.in_(user_ids)
                )
            ).scalars()
        )
        for user_id in user_ids:
            if user_id not in known:
                conn.execute(insert(models.suppressions).values(user_id=user_id, suppressed_at=now))
            withdraw(conn, models.outbox.c.user_id == user_id)
            for table in (
                models.ledger,
                models.snapshot,
                models.event_outbox,
                models.delivery_failures,
            ):
                conn.execute(delete(table).where(table.c.user_id == user_id))
        # "planning", not "delivering": a deliverer finalizing runs must not close this one.
        set_run(conn, run_id, status="planning", members=len(user_ids), queued=len(user_ids))
    for user_id in user_ids:
        try:
            outcome = client.delete_contact(user_id)
        except GleapAuthError:
            _finish(engine, report, error="Gleap rejected the API token")
            raise
        except GleapError as exc:
            report.failed[user_id] = str(exc)
            _mark(engine, user_id, error=str(exc))
            continue
        if outcome.ok:
            report.deleted.append(user_id)
            _mark(engine, user_id, error=None)
        else:
            report.failed[user_id] = outcome.reason or f"HTTP {outcome.status}"
            _mark(engine, user_id, error=report.failed[user_id])
    _finish(engine, report)
    return report


def _mark(engine: Engine, user_id: str, *, error: str | None) -> None:
    values: dict[str, Any] = {"last_error": error}
    if error is None:
        values["deleted_in_gleap_at"] = utcnow()
    with engine.begin() as conn:
        conn.execute(
            update(models.suppressions)
            .where(models.suppressions.c.user_id == user_id)
            .values(**values)
        )


def _finish(engine: Engine, report: ForgetReport, error: str | None = None) -> None:
    failed = len(report.failed)
    status = (
        "failed"
        if error or (failed and not report.deleted)
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
        failed=failed,
        error=reason,
    )


def unforget(engine: Engine, user_ids: list[str]) -> list[str]:
    """Lift the suppression of ``user_ids``; returns those that were suppressed."""
    s = models.suppressions.c
    with engine.begin() as conn:
        lifted = list(conn.execute(select(s.user_id).where(s.user_id.in_(user_ids))).scalars())
        conn.execute(delete(models.suppressions).where(s.user_id.in_(user_ids)))
    return lifted


def suppressed(engine: Engine) -> list[dict[str, Any]]:
    """The suppression list, oldest first."""
    s = models.suppressions.c
    with engine.connect() as conn:
        return [
            dict(r._mapping)
            for r in conn.execute(select(models.suppressions).order_by(s.suppressed_at, s.user_id))
        ]
