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
  reader looks up (:func:`keep_reason`): ``status``, ``history``, alerts,
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
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    Select,
    bindparam,
    case,
    delete,
    select,
    text,
    tuple_,
)
from sqlalchemy.exc import SQLAlchemyError

from audsync import models
from audsync.alerts import STATE_OF_STATUS
from audsync.clock import utcnow
from audsync.defaults import DEFAULT_PRUNE_BATCH
from audsync.errors import first_line
from audsync.text_tables import duration

log = logging.getLogger("audsync.prune")

ALERTED_STATUSES = tuple(STATE_OF_STATUS)
"""The statuses alerts compare: an audience's newest such run says its alert state."""

NOT_PLANS = ("retry", "forget", "repair")
"""Modes the last-run-duration gauge leaves out when it reads the newest finished run."""


class RunFacts(NamedTuple):
    """What the pruning decision needs to know about one run.

    The ``newer_*`` flags say whether its audience has a newer run of that kind;
    None where the question does not arise (the run is not of that kind).
    """

    status: str
    mode: str
    finished_at: dt.datetime | None
    pending: int
    """Changes still in the outbox for the run: queued - delivered - failed - superseded."""
    newer_run: bool | None = True
    newer_alerted: bool | None = None
    newer_success: bool | None = None
    newer_plan: bool | None = None
    recent_failures: bool = False
    """A delivery failure of this run is newer than the cut-off."""


def keep_reason(run: RunFacts, cutoff: dt.datetime) -> str | None:
    """Why ``run`` must stay, or None when it may be pruned.

    Per audience, the newest run of each kind another reader looks up stays:
    ``last run`` (status, history, the failing gauge), ``last alerted run``
    (alerts compare the newest succeeded/partial/failed/held run), ``last
    success`` (``audiences.last_success_at`` is recomputed from it), ``last
    finished plan`` (the last-run-duration gauge).
    """
    if run.status not in models.TERMINAL_STATUSES or run.finished_at is None:
        return "open"
    if run.finished_at >= cutoff:
        return "recent"
    if run.pending > 0:
        return "pending changes"
    if not run.newer_run:
        return "last run"
    if run.status in ALERTED_STATUSES and not run.newer_alerted:
        return "last alerted run"
    if run.status == "succeeded" and not run.newer_success:
        return "last success"
    if run.mode not in NOT_PLANS and not run.newer_plan:
        return "last finished plan"
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
        log.warning("history not pruned this time: %s", first_line(exc))
        return None
    log_prune(report, keep)
    return report


def _prune_runs(engine: Engine, cutoff: dt.datetime, batch: int, report: PruneReport) -> None:
    """Walk the runs finished before ``cutoff`` a window of ``batch`` at a time (by
    ix_sync_runs_finished: open runs, with no finished_at, are never read)."""
    r = models.sync_runs.c
    after: tuple[Any, int] | None = None
    newest_plan: dict[str, int] = {}
    while True:
        window = (
            select(r.id, r.finished_at, r.audience_key)
            .where(r.finished_at < cutoff)
            .order_by(r.finished_at, r.id)
            .limit(batch)
        )
        if after is not None:
            window = window.where(tuple_(r.finished_at, r.id) > tuple_(*after))
        with engine.connect() as conn:
            ids = conn.execute(window).all()
            for key in {key for _, _, key in ids} - newest_plan.keys():
                newest_plan[key] = _newest_succeeded_plan(conn, key)
        if not ids:
            return
        last = (ids[-1][1], ids[-1][0])
        window_ids = [i for i, _, _ in ids]
        # A run older than a succeeded plan of its audience is the newest of no kind
        # keep_reason protects: the bulk of a window goes in one DELETE.
        plain = [i for i, _, key in ids if i < newest_plan.get(key, 0)]
        if plain:
            report.runs += _write(engine, report, _delete_plain(plain), {"c": cutoff})
        # What the bulk delete left of the window (usually nothing): run by run.
        with engine.connect() as conn:
            rows = conn.execute(
                _candidates(cutoff).where(text(f"sync_runs.id IN ({_listed(window_ids)})"))
            ).all()
            flags = (
                {
                    row[0]: row[1:]
                    for row in conn.execute(_newer_of_each_kind([row[0] for row in rows])).all()
                }
                if rows
                else {}
            )
        doomed: list[int] = []
        for run_id, status, mode, finished_at, pending, recent_failures in rows:
            run_, alerted, success, plan = flags[run_id]
            facts = RunFacts(
                status, mode, finished_at, pending, run_, alerted, success, plan, recent_failures
            )
            reason = keep_reason(facts, cutoff)
            if reason is None:
                doomed.append(int(run_id))
            else:
                report.kept[reason] += 1
        if doomed:
            report.runs += _write(engine, report, _delete_runs(doomed))
        after = last
        if len(ids) < batch:
            return


def _listed(ids: list[int]) -> str:
    """Ids inline, for IN: they are ints from the database, and binding thousands of
    parameters costs more than the statement itself."""
    return ", ".join(str(int(i)) for i in ids)


def _delete_plain(ids: list[int]) -> Any:
    """DELETE, of ``ids`` (runs with a newer succeeded plan of their audience), those
    :func:`keep_reason` lets go: finished, nothing pending, no recent failure."""
    terminal = ", ".join(f"'{s}'" for s in models.TERMINAL_STATUSES)
    return text(
        f"DELETE FROM sync_runs WHERE id IN ({_listed(ids)}) AND status IN ({terminal})"
        " AND delivered + failed + superseded >= queued"
        " AND NOT EXISTS (SELECT 1 FROM delivery_failures f WHERE f.run_id = sync_runs.id"
        " AND f.failed_at >= :c)"
    ).bindparams(bindparam("c", type_=DateTime()))


def _newest_succeeded_plan(conn: Connection, key: str) -> int:
    """The id of ``key``'s newest succeeded plan (0 when none): a backward walk of
    ix_sync_runs_audience that stops at the first match, usually the newest run."""
    r = models.sync_runs.c
    found = conn.execute(
        select(r.id)
        .where(r.audience_key == key, r.status == "succeeded", r.mode.not_in(NOT_PLANS))
        .order_by(r.audience_key.desc(), r.id.desc())
        .limit(1)
    ).scalar()
    return int(found or 0)


_NEWER = models.sync_runs.alias("newer")


def _newer_exists(*conditions: Any) -> Any:
    """Whether a newer run of the same audience meets ``conditions`` (NULL when none does):
    compared with the newest such run, found by a backward walk of ix_sync_runs_audience
    that stops at the first match, never a join of every run with every newer one."""
    r, n = models.sync_runs.c, _NEWER.c
    newest = (
        select(n.id)
        .where(n.audience_key == r.audience_key, *conditions)
        .order_by(n.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    return r.id < newest


def _candidates(cutoff: dt.datetime) -> Select[Any]:
    """Runs finished before ``cutoff`` with the facts of :class:`RunFacts` but the
    ``newer_*`` flags (:func:`_newer_of_each_kind`)."""
    r, f = models.sync_runs.c, models.delivery_failures.c
    return select(
        r.id,
        r.status,
        r.mode,
        r.finished_at,
        (r.queued - r.delivered - r.failed - r.superseded).label("pending"),
        select(f.id).where(f.run_id == r.id, f.failed_at >= cutoff).exists(),
    ).where(r.finished_at < cutoff)


def _newer_of_each_kind(ids: list[int]) -> Select[Any]:
    """For ``ids``: whether a newer run, alerted run, success and finished plan exist.

    Each is only asked of a run of that kind (else NULL): a long streak without
    a newer run of the kind is then walked once, by the one run that is its newest.
    """
    r, n = models.sync_runs.c, _NEWER.c
    return select(
        r.id,
        _newer_exists(),
        case((r.status.in_(ALERTED_STATUSES), _newer_exists(n.status.in_(ALERTED_STATUSES)))),
        case((r.status == "succeeded", _newer_exists(n.status == "succeeded"))),
        case(
            (
                r.mode.not_in(NOT_PLANS),
                _newer_exists(n.finished_at.is_not(None), n.mode.not_in(NOT_PLANS)),
            )
        ),
    ).where(r.id.in_(ids))


def _delete_runs(ids: list[int]) -> Any:
    """DELETE of ``ids``, re-checking what may have changed since they were read."""
    listed = _listed(ids)
    terminal = ", ".join(f"'{s}'" for s in models.TERMINAL_STATUSES)
    return text(
        f"DELETE FROM sync_runs WHERE id IN ({listed}) AND status IN ({terminal})"
        # Counts only ever fall, so a run judged done is done; checked anyway:
        # its counts must add up for as long as it exists.
        " AND delivered + failed + superseded >= queued"
        # Still not the newest of its audience (a run created and deleted since
        # the read, as retry-failed does with an empty retry, could make it so).
        " AND id < (SELECT MAX(newer.id) FROM sync_runs newer"
        " WHERE newer.audience_key = sync_runs.audience_key)"
    )


def _prune_failures(engine: Engine, cutoff: dt.datetime, batch: int, report: PruneReport) -> None:
    f = models.delivery_failures.c
    while True:
        oldest = select(f.id).where(f.failed_at < cutoff).limit(batch).scalar_subquery()
        deleted = _write(engine, report, delete(models.delivery_failures).where(f.id.in_(oldest)))
        report.failures += deleted
        if deleted < batch:
            return


def _write(
    engine: Engine, report: PruneReport, statement: Any, params: dict[str, Any] | None = None
) -> int:
    """Run one DELETE in its own transaction, timing how long it holds the write lock."""
    started = time.perf_counter()
    with engine.begin() as conn:
        deleted = int(conn.execute(statement, params or {}).rowcount)
    if deleted:
        report.batches += 1
        report.longest_write = max(report.longest_write, time.perf_counter() - started)
    return deleted
