"""Bounded history: finished runs and delivery failures older than ``[history] keep`` go.

``sync_runs`` and ``delivery_failures`` grow by a row per audience per run and
per rejected user; without pruning a year of two-hourly runs over 50 audiences
is 219,000 runs. :func:`prune_history` deletes what is older than ``keep``,
except runs something still relies on (:func:`keep_reason`):

- a run still open (``planning``/``delivering``);
- a run that still owns pending changes: its counts must keep adding up
  (``queued = delivered + failed + superseded + pending``) and the deliverer
  credits its acknowledgements to it;
- the newest run of each audience, and its newest run of each kind another
  reader looks up (:data:`NEWEST_OF_KIND`): ``status``, ``history``, alerts,
  metrics and ``audiences.last_success_at`` keep saying what they said;
- a run with a delivery failure newer than the cut-off (the failure joins its
  run; an interrupted run's changes can be rejected long after it ended).

Not history, never pruned here: ``suppressions`` (they are the promise of
``audsync forget``), ``ledger``/``snapshot``/``outbox``/``event_outbox``
(state), ``daemons`` (the daemon drops records gone for a day itself).

Rows are deleted in batches of ``batch``, one short transaction each, so a
first prune of a year of history never holds SQLite's write lock for long.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, case, delete, func, select, tuple_
from sqlalchemy.exc import SQLAlchemyError

from audsync import models
from audsync.alerts import STATE_OF_STATUS
from audsync.clock import utcnow
from audsync.defaults import DEFAULT_PRUNE_BATCH
from audsync.report import duration

log = logging.getLogger("audsync.prune")

NEWEST_OF_KIND: dict[str, str] = {
    "last run": "status, history and the failing gauge show each audience's newest run",
    "last alerted run": "alerts compare the newest succeeded/partial/failed/held run",
    "last success": "audiences.last_success_at is recomputed from the newest succeeded run",
    "last finished plan": "the last-run-duration gauge reads the newest finished plan",
}
"""Per audience, the newest run of each of these kinds is kept whatever its age."""


@dataclass(frozen=True)
class RunFacts:
    """What the pruning decision needs to know about one run."""

    status: str
    finished_at: dt.datetime | None
    pending: int
    """Changes still in the outbox for the run: queued - delivered - failed - superseded."""
    newest_of: str | None = None
    """The first :data:`NEWEST_OF_KIND` kind this run is the newest of, if any."""
    recent_failures: bool = False
    """A delivery failure of this run is newer than the cut-off."""


def keep_reason(run: RunFacts, cutoff: dt.datetime) -> str | None:
    """Why ``run`` must stay, or None when it may be pruned."""
    if run.status not in models.TERMINAL_STATUSES or run.finished_at is None:
        return "open"
    if run.finished_at >= cutoff:
        return "recent"
    if run.pending > 0:
        return "pending changes"
    if run.newest_of is not None:
        return run.newest_of
    if run.recent_failures:
        return "recent failures"
    return None


@dataclass
class PruneReport:
    """What one prune deleted and kept, and how long it held the write lock."""

    cutoff: dt.datetime
    runs: int = 0
    failures: int = 0
    kept: Counter[str] = field(default_factory=Counter)
    """Runs older than the cut-off that stayed, by :func:`keep_reason`."""
    batches: int = 0
    """Write transactions (one per batch that deleted something)."""
    longest_write: float = 0.0
    """Seconds of the longest write transaction."""
    seconds: float = 0.0

    @property
    def pruned(self) -> int:
        """Rows deleted in all."""
        return self.runs + self.failures


def prune_history(
    engine: Engine,
    keep: float,
    *,
    now: dt.datetime | None = None,
    batch: int = DEFAULT_PRUNE_BATCH,
) -> PruneReport:
    """Delete runs and delivery failures older than ``keep`` seconds (see the module doc).

    Reads happen outside write transactions; each batch of deletes is its own
    short transaction. Safe beside a running sync or daemon: what it decides
    from a read is re-checked in the DELETE itself where it could have changed.
    """
    started = time.perf_counter()
    cutoff = (now or utcnow()) - dt.timedelta(seconds=keep)
    report = PruneReport(cutoff=cutoff)
    _prune_runs(engine, cutoff, batch, report)
    _prune_failures(engine, cutoff, batch, report)
    report.seconds = time.perf_counter() - started
    return report


def log_prune(report: PruneReport, keep: float) -> None:
    """One log line when something was pruned; silence otherwise."""
    if not report.pruned:
        return
    kept = ", ".join(f"{n} {reason}" for reason, n in sorted(report.kept.items()))
    log.info(
        "pruned history older than %s: %d runs, %d delivery failures%s",
        f"{keep / 86400:g}d" if keep % 86400 == 0 else duration(keep),
        report.runs,
        report.failures,
        f" (kept older runs: {kept})" if kept else "",
    )


def prune_and_log(engine: Engine, keep: float) -> PruneReport | None:
    """Prune as :func:`prune_history` and log it; a state DB error is a warning, never a
    failed sync (the rows go at the next prune)."""
    try:
        report = prune_history(engine, keep)
    except SQLAlchemyError as exc:
        log.warning("history not pruned this time: %s", str(exc).splitlines()[0])
        return None
    log_prune(report, keep)
    return report


def _prune_runs(engine: Engine, cutoff: dt.datetime, batch: int, report: PruneReport) -> None:
    r = models.sync_runs.c
    newest: dict[int, str] | None = None
    after: tuple[dt.datetime, int] | None = None
    while True:
        with engine.connect() as conn:
            # Walks ix_sync_runs_finished: open runs (no finished_at) are never read.
            query = (
                select(
                    r.id,
                    r.status,
                    r.finished_at,
                    (r.queued - r.delivered - r.failed - r.superseded).label("pending"),
                )
                .where(r.finished_at < cutoff)
                .order_by(r.finished_at, r.id)
                .limit(batch)
            )
            if after is not None:
                query = query.where(tuple_(r.finished_at, r.id) > tuple_(*after))
            rows = conn.execute(query).all()
            if not rows:
                return
            if newest is None:  # only when something is old enough to look at
                newest = _newest_of_kind(conn)
            failing = _with_failures_since(conn, [row.id for row in rows], cutoff)
        doomed: list[int] = []
        for row in rows:
            facts = RunFacts(
                status=row.status,
                finished_at=row.finished_at,
                pending=int(row.pending),
                newest_of=newest.get(row.id),
                recent_failures=row.id in failing,
            )
            reason = keep_reason(facts, cutoff)
            if reason is None:
                doomed.append(row.id)
            else:
                report.kept[reason] += 1
        after = (rows[-1].finished_at, rows[-1].id)
        if doomed:
            report.runs += _write(engine, report, _delete_runs(doomed))
        if len(rows) < batch:
            return


def _delete_runs(ids: list[int]) -> Any:
    """DELETE of ``ids``, re-checking what may have changed since they were read."""
    r = models.sync_runs.c
    newer = models.sync_runs.alias("newer")
    return delete(models.sync_runs).where(
        r.id.in_(ids),
        r.status.in_(models.TERMINAL_STATUSES),
        # Counts: only ever fall, so a run judged done is done. Checked anyway:
        # its counts must add up for as long as it exists.
        r.delivered + r.failed + r.superseded >= r.queued,
        # Still not the newest of its audience (a run created and deleted since
        # the read, as retry-failed does with an empty retry, could have made it so).
        r.id
        < select(func.max(newer.c.id))
        .where(newer.c.audience_key == r.audience_key)
        .scalar_subquery(),
    )


def _prune_failures(engine: Engine, cutoff: dt.datetime, batch: int, report: PruneReport) -> None:
    f = models.delivery_failures.c
    while True:
        oldest = select(f.id).where(f.failed_at < cutoff).limit(batch).scalar_subquery()
        deleted = _write(engine, report, delete(models.delivery_failures).where(f.id.in_(oldest)))
        report.failures += deleted
        if deleted < batch:
            return


def _write(engine: Engine, report: PruneReport, statement: Any) -> int:
    """Run one DELETE in its own transaction, timing how long it holds the write lock."""
    started = time.perf_counter()
    with engine.begin() as conn:
        deleted = int(conn.execute(statement).rowcount)
    if deleted:
        report.batches += 1
        report.longest_write = max(report.longest_write, time.perf_counter() - started)
    return deleted


def _newest_of_kind(conn: Connection) -> dict[int, str]:
    """Run id -> the first kind of :data:`NEWEST_OF_KIND` it is the newest of, per audience."""
    r = models.sync_runs.c
    alerted = [s for s in STATE_OF_STATUS]
    columns = {
        "last run": func.max(r.id),
        "last alerted run": func.max(case((r.status.in_(alerted), r.id))),
        "last success": func.max(case((r.status == "succeeded", r.id))),
        "last finished plan": func.max(
            case(
                (r.finished_at.is_not(None) & r.mode.not_in(["retry", "forget"]), r.id),
            )
        ),
    }
    assert list(columns) == list(NEWEST_OF_KIND)
    found: dict[int, str] = {}
    for row in conn.execute(select(*columns.values()).group_by(r.audience_key)):
        for kind, run_id in zip(columns, row, strict=True):
            if run_id is not None:
                found.setdefault(int(run_id), kind)
    return found


def _with_failures_since(conn: Connection, ids: list[int], cutoff: dt.datetime) -> set[int]:
    """Which of ``ids`` have a delivery failure at or after ``cutoff`` (an index probe each)."""
    f = models.delivery_failures.c
    return set(
        conn.execute(
            select(f.run_id).distinct().where(f.run_id.in_(ids), f.failed_at >= cutoff)
        ).scalars()
    )
