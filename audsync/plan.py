"""Planning: load a query's result as the snapshot and diff it against the ledger into the outbox.

Everything here is SQL run in the state DB inside the caller's transaction; no
HTTP. The decisions — which mode, whether the circuit breaker holds a run —
are pure functions at the top, tested with tables of cases. A plan's steps
(load, lock, find changes, breaker, queue) are :class:`_Planner`'s methods.

What each member costs (issue 15): a first plan writes it once, into the
outbox; a dry run of a first plan writes only its id, into a temp table; an
incremental plan reads it once from the previous snapshot and writes it only
when it moved (:func:`merge_snapshot`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Any, Literal

from sqlalchemy import (
    Connection,
    Engine,
    column,
    delete,
    func,
    select,
    table,
    text,
)

from audsync import models
from audsync.clock import utcnow
from audsync.config import Definition, SyncConfig
from audsync.manager import (
    credit_runs,
    drop_forgotten,
    park_spent,
    record_audience,
)
from audsync.models import (
    NOT_FORGOTTEN,
    PRIORITY_BACKFILL,
    PRIORITY_RETRY,
    PRIORITY_ROUTINE,
)
from audsync.plan_in_db import WORK_MEM, Target, load_in_database
from audsync.source import SnapshotRow, StreamStats, stream_snapshot
from audsync.values import JSON_FALSE, JSON_NULL, JSON_TRUE

Mode = Literal["initial", "incremental", "full"]

_DEFAULT_SETTINGS = SyncConfig()



def choose_mode(ledger_rows: int, full: bool) -> Mode:
    """``full`` when asked; ``initial`` when Gleap has never been told about this key."""
    if full:
        return "full"
    return "initial" if ledger_rows == 0 else "incremental"


def breaker_verdict(
    previous_members: int,
    members: int,
    exits: int,
    max_exit_ratio: float,
    force: bool,
) -> str | None:
    """Why a plan must be held instead of queued, or None to go ahead.

    A query that had members and now returns none, or a plan that would remove
    more than ``max_exit_ratio`` of the members Gleap has, is far more often a
    broken query than a real exodus: hold it before a single ``false`` is sent.
    """
    if force or previous_members == 0:
        return None
    if members == 0:
        return (
            f"the query returned no rows but {previous_members} users hold this key in Gleap;"
            " run `audsync sync KEY --force` if that is right"
        )
    if exits > max_exit_ratio * previous_members:
        return (
            f"{exits} of {previous_members} users would be removed"
            f" (over max_exit_ratio {max_exit_ratio:g});"
            " run `audsync sync KEY --force` if that is right"
        )
    return None


def absent_value(definition: Definition) -> str:
    """What Gleap is told when a user is no longer in the audience / has no trait value.

    The ``[contacts]`` query's own key is never sent, and a user who leaves it is
    told nothing: its "absent" value is the members' value, so no exit is ever queued.
    """
    if definition.kind == "contacts":
        return JSON_TRUE
    return JSON_FALSE if definition.kind == "audience" else JSON_NULL


def distinct(dialect: str) -> str:
    """SQL's null-safe "differs" operator on ``dialect``."""
    return "IS NOT" if dialect == "sqlite" else "IS DISTINCT FROM"


def contact_news(dialect: str, new: str, old: str) -> str:
    """SQL: the contact JSON object in column ``new`` holds a field whose value the
    acknowledged contact in column ``old`` (null = nothing acknowledged) does not.

    A field the query no longer returns is not news: Gleap keeps what it was told.
    A contact holding a NUL (``\\u0000``), new or acknowledged, is news whenever
    its text differs: jsonb and PostgreSQL's json functions refuse it, SQLite's cut
    the string there; the deliverer's own diff then sends only what really moved.
    """
    if dialect == "postgresql":
        # Both sides are canonical JSON (values.dumps), so a field's JSON text is
        # equal exactly when its value is.
        fields = (
            f"EXISTS (SELECT 1 FROM json_each({new}::json) n WHERE NOT EXISTS"
            f" (SELECT 1 FROM json_each(COALESCE({old}, '{{}}')::json) o"
            " WHERE o.key = n.key AND o.value::text = n.value::text))"
        )
        has_nul = "strpos({0}, '\\u0000') > 0 OR strpos(COALESCE({1}, ''), '\\u0000') > 0"
    else:
        # json_each gives each field's type and value (objects as JSON text).
        fields = (
            f"EXISTS (SELECT 1 FROM json_each({new}) n WHERE NOT EXISTS"
            f" (SELECT 1 FROM json_each(COALESCE({old}, '{{}}')) o"
            " WHERE o.key = n.key AND o.type = n.type AND o.value IS n.value))"
        )
        has_nul = "instr({0}, '\\u0000') > 0 OR instr(COALESCE({1}, ''), '\\u0000') > 0"
    # CASE, not OR: the NUL test must run first, on both databases.
    return f"(CASE WHEN {has_nul.format(new, old)} THEN TRUE ELSE {fields} END)"


@dataclass
class PlanResult:
    """What one plan found and queued."""

    key: str
    mode: Mode
    members: int = 0
    entered: int = 0
    exited: int = 0
    changed: int = 0
    contact: int = 0  # users whose contact fields alone changed (queued, key not sent)
    reasserted: int = 0
    queued: int = 0
    superseded: int = 0
    held: str | None = None
    stats: StreamStats = field(default_factory=StreamStats)
    kind_label: str = "audience"
    seconds: float = 0.0  # wall time of the plan, query included
    counted_only: bool = False  # a dry run's first plan: members counted, not queued


# -- named statements (issue 16 item 2 style; merged with manager.py's later) ------------

SUPERSEDED_BY_RUN = (
    "SELECT o.run_id, COUNT(*) FROM outbox o"
    " LEFT JOIN audsync_changes c ON c.user_id = o.user_id"
    " WHERE o.audience_key = :k AND o.state = 'pending'"
    " AND (c.user_id IS NULL OR c.value <> o.value OR :full"
    " OR c.contact {differs} o.contact OR c.contact_only <> o.contact_only)"
    " GROUP BY o.run_id"
)
"""Pending values this plan replaces or no longer needs, per run that queued them: each
run is credited ``superseded`` for them (``{differs}``: :func:`distinct`)."""

OVERWRITE_ATTEMPTED = (
    "UPDATE outbox SET"
    " value = COALESCE((SELECT s.value FROM snapshot s WHERE s.audience_key = :k"
    " AND s.user_id = outbox.user_id), :absent),"
    " contact = (SELECT s.contact FROM snapshot s WHERE s.audience_key = :k"
    " AND s.user_id = outbox.user_id),"
    " version = version + 1, run_id = :run, priority = 0, queued_at = :now,"
    " contact_only = FALSE"
    " WHERE audience_key = :k AND state = 'pending' AND attempted"
    " AND NOT EXISTS (SELECT 1 FROM audsync_changes c WHERE c.user_id = outbox.user_id)"
    " AND " + NOT_FORGOTTEN.format("outbox.user_id")
)
"""A pending value whose call may already have reached Gleap cannot be withdrawn (Gleap
may hold it): overwrite it with what Gleap should hold instead."""

WITHDRAW_UNNEEDED = (
    "DELETE FROM outbox WHERE audience_key = :k AND NOT EXISTS"
    " (SELECT 1 FROM audsync_changes c WHERE c.user_id = outbox.user_id)"
    # A forgotten user's value goes even if attempted: the contact is deleted.
    " AND NOT (state = 'pending' AND attempted AND "
    + NOT_FORGOTTEN.format("outbox.user_id")
    + ")"
)
"""Outbox rows of the key that are no longer a change (already credited above)."""

UPSERT_CHANGES = (
    "INSERT INTO outbox (audience_key, user_id, value, contact, contact_only, run_id,"
    " version, priority, state, attempts, queued_at)"
    " SELECT :k, c.user_id, c.value, c.contact, c.contact_only, :run, 1, :prio,"
    " 'pending', 0, :now"
    " FROM audsync_changes c WHERE "
    + NOT_FORGOTTEN.format("c.user_id")
    + " ON CONFLICT (user_id, audience_key) DO UPDATE SET"
    " value = excluded.value, contact = excluded.contact,"
    " contact_only = excluded.contact_only, run_id = excluded.run_id,"
    " version = outbox.version + 1, priority = excluded.priority, state = 'pending',"
    # Rejections in a row count whatever the value does: only an
    # acknowledgement, retry-failed or --full start them over, and a
    # parked change stays parked (its value waits with it).
    " attempts = CASE WHEN :full THEN 0 ELSE outbox.attempts END,"
    " queued_at = excluded.queued_at"
    " WHERE :full OR (outbox.state = 'pending' AND (outbox.value <> excluded.value"
    " OR outbox.priority = :retry"
    # The superseded count reads the same conditions.
    " OR outbox.contact {differs} excluded.contact"
    " OR outbox.contact_only <> excluded.contact_only))"
)
"""Queue this plan's changes under its run: new rows, or a new version of a row whose
value moved (``{differs}``: :func:`distinct`)."""

CHANGES_BY_KIND = "SELECT kind, COUNT(*) FROM audsync_changes GROUP BY kind"
"""The plan's changes per kind (entered, exited, changed, contact, reasserted)."""

DROP_SUPPRESSED_FROM_FIRST_PLAN = (
    "DELETE FROM outbox WHERE audience_key = :k AND run_id = :run"
    " AND user_id IN (SELECT user_id FROM suppressions)"
)
"""Forgotten users never come back through a query (audsync forget): a first plan's rows
were never pending for anyone else, so there is nothing to credit."""


CREATE_COUNTED = (
    "CREATE TEMP TABLE IF NOT EXISTS audsync_counted (audience_key TEXT NOT NULL,"
    " user_id TEXT NOT NULL, value TEXT, contact TEXT,"
    " PRIMARY KEY (audience_key, user_id))"
)
"""A dry run's first plans count their members here: the snapshot's key, in temp
storage (no journal to write for rows the dry run throws away); streamed, only the
ids are written (in-database planning writes the values too)."""

CLEAR_COUNTED = "DELETE FROM audsync_counted WHERE audience_key = :k"
"""A key counted again in the same connection starts from nothing."""

DROP_SUPPRESSED_FROM_COUNTED = (
    "DELETE FROM audsync_counted WHERE audience_key = :k"
    " AND user_id IN (SELECT user_id FROM suppressions)"
)
"""Forgotten users are no members (audsync forget), as in a real plan."""

COUNT_COUNTED = "SELECT COUNT(*) FROM audsync_counted WHERE audience_key = :k"
"""The members a dry run's first plan counted."""

_counted = table("audsync_counted", column("audience_key"), column("user_id"))


def decide_mode(conn: Connection, key: str, full: bool) -> Mode:
    """The mode of the next plan of ``key`` (:func:`choose_mode` over its ledger rows):
    decided once per plan, by the caller that records the run."""
    ledger_rows = conn.execute(
        select(func.count()).select_from(models.ledger).where(models.ledger.c.audience_key == key)
    ).scalar_one()
    return choose_mode(int(ledger_rows), full)


def plan_definition(
    conn: Connection,
    source: Engine,
    definition: Definition,
    *,
    run_id: int,
    settings: SyncConfig = _DEFAULT_SETTINGS,
    mode: Mode | None = None,
    full: bool = False,
    force: bool = False,
    stop: Callable[[], bool] | None = None,
    on_rows: Callable[[int], None] | None = None,
    keys: Mapping[str, str] | None = None,
    dry_run: bool = False,
) -> PlanResult:
    """Snapshot ``definition``'s query and queue its changes, inside ``conn``'s transaction.

    ``settings`` is the ``[sync]`` section (chunk size, breaker ratio, attempts,
    in-database planning). ``mode`` is the one the caller decided with
    :func:`decide_mode` (and recorded on the run); decided here when not given.

    When the circuit breaker holds the plan, nothing is queued and
    ``result.held`` says why: the caller must roll the transaction back.
    ``on_rows`` is told the rows read so far after every chunk of the query.
    ``keys`` (every audience and trait key -> its kind) keeps a column from
    being named like one of them (:func:`audsync.contact.map_columns`).

    A first plan writes each member once, straight into the outbox (no
    snapshot: the next plan writes it). With ``dry_run`` (the caller rolls back)
    a first plan loads only the snapshot and counts; ``result.counted_only``
    then says its members were not queued (``dry_run_calls`` adds them). An
    incremental plan merges the query into the previous snapshot, writing only
    what moved (:func:`merge_snapshot`).

    With ``[sync] in_database = auto`` the rows are loaded by one INSERT ...
    SELECT inside the state DB when the source is the same database
    (:mod:`audsync.plan_in_db`); otherwise they are streamed.
    """
    if mode is None:
        mode = decide_mode(conn, definition.key, full)
    planner = _Planner(conn, source, definition, settings, run_id, mode, stop, on_rows, keys)
    return planner.plan(force=force, dry_run=dry_run)


class _Planner:
    """One plan's named steps, sharing the plan's connection, settings and result."""

    def __init__(
        self,
        conn: Connection,
        source: Engine,
        definition: Definition,
        settings: SyncConfig,
        run_id: int,
        mode: Mode,
        stop: Callable[[], bool] | None,
        on_rows: Callable[[int], None] | None,
        keys: Mapping[str, str] | None,
    ) -> None:
        self.conn = conn
        self.source = source
        self.definition = definition
        self.key = definition.key
        self.settings = settings
        self.run_id = run_id
        self.mode: Mode = mode
        self.full = mode == "full"
        self.absent = absent_value(definition)
        self.stop = stop
        self.on_rows = on_rows
        self.keys = keys
        self.in_database = settings.in_database == "auto"
        self.result = PlanResult(key=self.key, mode=mode, kind_label=definition.kind)

    def plan(self, *, force: bool, dry_run: bool) -> PlanResult:
        """Load, diff, hold or queue: the steps of one plan."""
        if self.mode == "initial" and not _has_rows(self.conn, self.key):
            # First sync and nothing queued: every member is a change. (Looked at
            # again inside this transaction: the mode was decided before it, and an
            # acknowledgement landing in between makes the ledger the diff's base.)
            if dry_run:
                self.count_first_plan()
            else:
                self.queue_first_plan()
            return self.result
        merged = self.load_snapshot()
        self.lock_outbox()
        self.find_changes(candidates=merged is not None)
        self.result.held = self.breaker(merged, force)
        if self.result.held:
            return self.result
        self.queue_changes()
        return self.result

    def rows_into(self, target: LoadTarget) -> None:
        load_rows(
            self.conn,
            target,
            self.source,
            self.definition,
            self.settings.chunk_size,
            self.result.stats,
            self.stop,
            self.on_rows,
            self.keys,
            self.in_database,
        )

    def queue_first_plan(self) -> None:
        """A first plan with nothing queued: stream the members straight into the outbox.

        Each member is written once. The snapshot keeps no rows of this audience
        (an older one would be stale); the next plan loads it. Ids, values and
        contacts are exactly what the snapshot would hold: the same stream, the same
        duplicate rule (ON CONFLICT on the outbox key).
        """
        conn, key, result = self.conn, self.key, self.result
        conn.execute(delete(models.snapshot).where(models.snapshot.c.audience_key == key))
        self.rows_into(outbox_target(key, self.run_id, PRIORITY_BACKFILL, utcnow()))
        conn.execute(text(DROP_SUPPRESSED_FROM_FIRST_PLAN), {"k": key, "run": self.run_id})
        o = models.outbox.c
        result.members = int(
            conn.execute(
                select(func.count()).select_from(models.outbox).where(o.audience_key == key)
            ).scalar_one()
        )
        result.entered = result.queued = result.members
        if self.definition.kind == "contacts":
            # [contacts] has nothing to tell about a user without contact fields.
            empty = conn.execute(
                delete(models.outbox).where(
                    o.audience_key == key, o.run_id == self.run_id, o.contact.is_(None)
                )
            ).rowcount
            result.entered = result.queued = result.members - int(empty)
        record_audience(conn, self.definition, result.members)
        drop_forgotten(conn, key)

    def count_first_plan(self) -> None:
        """A dry run's first plan: load the members (to count distinct, storable,
        unforgotten ids exactly as a real plan would) and queue nothing.

        They go into ``audsync_counted``, a temp table shaped like the snapshot:
        the same load and duplicate rule, without the state DB's journal, and
        :func:`dry_run_calls` counts them from there.
        """
        conn, key = self.conn, self.key
        sqlite = conn.dialect.name == "sqlite"
        conn.exec_driver_sql(CREATE_COUNTED + (" WITHOUT ROWID" if sqlite else ""))
        conn.execute(text(CLEAR_COUNTED), {"k": key})
        self.rows_into(LoadTarget("audsync_counted", key, ids_only=True))
        conn.execute(text(DROP_SUPPRESSED_FROM_COUNTED), {"k": key})
        self.result.members = int(conn.execute(text(COUNT_COUNTED), {"k": key}).scalar_one())
        self.result.entered = self.result.queued = self.result.members
        self.result.counted_only = True

    def load_snapshot(self) -> Merged | None:
        """Bring the snapshot up to the query's result: merged (an incremental plan,
        which writes only what moved) or reloaded (in-database planning loads it
        whole, in one statement, and diffs all of it). The merge's counts, if merged."""
        conn, key, result = self.conn, self.key, self.result
        if self.mode == "incremental" and not self.in_database:
            merged = merge_snapshot(
                conn,
                self.source,
                self.definition,
                self.settings.chunk_size,
                result.stats,
                self.absent,
                self.stop,
                self.on_rows,
                self.keys,
            )
            result.members = merged.members - _drop_suppressed_from_snapshot(conn, key)
            return merged
        conn.execute(delete(models.snapshot).where(models.snapshot.c.audience_key == key))
        self.rows_into(LoadTarget("snapshot", key))
        _drop_suppressed_from_snapshot(conn, key)
        result.members = _snapshot_members(conn, key)
        return None

    def lock_outbox(self) -> None:
        """PostgreSQL: from the diff's reads to the commit, no acknowledgement (nor any
        other outbox write) may land in between: one that did would be counted both
        delivered (by the deliverer) and superseded (from this plan's reads), and a
        user acknowledged after the diff read the ledger would be queued again.
        Readers are not blocked; writers wait for this commit. On SQLite this
        transaction already holds the database's only write lock."""
        if self.conn.dialect.name == "postgresql":
            self.conn.exec_driver_sql("LOCK TABLE outbox IN SHARE ROW EXCLUSIVE MODE")

    def find_changes(self, *, candidates: bool) -> None:
        """Diff the snapshot against the ledger into ``audsync_changes``; count them."""
        _fill_changes(
            self.conn,
            self.key,
            self.absent,
            full=self.full,
            keyed=self.definition.kind != "contacts",
            candidates=candidates,
        )
        for kind, count in self.conn.execute(text(CHANGES_BY_KIND)):
            setattr(self.result, kind, int(count))

    def breaker(self, merged: Merged | None, force: bool) -> str | None:
        """Why the circuit breaker holds this plan, or None (:func:`breaker_verdict`).

        The base of its ratio: what Gleap holds, or — while a first sync is still
        being delivered — what the last plan found, whichever is larger; otherwise
        routine churn against a half-delivered backfill would look like an exodus.
        """
        conn, key = self.conn, self.key
        if merged is not None and conn.dialect.name == "sqlite":
            # Counted by the merge in this same write transaction: nothing moved since.
            held_by_gleap = merged.held
        else:
            held_by_gleap = conn.execute(
                select(func.count())
                .select_from(models.ledger)
                .where(models.ledger.c.audience_key == key, models.ledger.c.value != self.absent)
            ).scalar_one()
        last_plan = conn.execute(
            select(models.audiences.c.members).where(models.audiences.c.key == key)
        ).scalar()
        previous = max(int(held_by_gleap), int(last_plan or 0))
        # [contacts] never tells Gleap anyone left: there is nothing for a breaker to stop.
        if self.definition.kind == "contacts":
            return None
        return breaker_verdict(
            previous,
            self.result.members,
            self.result.exited,
            self.settings.max_exit_ratio,
            force,
        )

    def queue_changes(self) -> None:
        """Make the outbox match the changes: credit what is superseded, overwrite what
        may have reached Gleap, withdraw what is no longer a change, upsert the rest."""
        conn, key, result = self.conn, self.key, self.result
        params = {
            "k": key,
            "run": self.run_id,
            "full": self.full,
            "prio": PRIORITY_BACKFILL if self.mode == "initial" else PRIORITY_ROUTINE,
            "now": utcnow(),
            "max_attempts": self.settings.max_attempts,
            "retry": PRIORITY_RETRY,
        }
        differs = distinct(conn.dialect.name)
        # Read under the outbox lock, so these are exactly the rows the statements
        # below replace; credited to the runs that queued them, so every run's counts
        # still add up.
        superseded = conn.execute(
            text(SUPERSEDED_BY_RUN.format(differs=differs)), params
        ).all()
        credit_runs(conn, "superseded", {r: int(c) for r, c in superseded if r != self.run_id})
        _count_transitions(conn, result, params)
        overwritten = conn.execute(
            text(OVERWRITE_ATTEMPTED), {**params, "absent": self.absent}
        ).rowcount
        conn.execute(text(WITHDRAW_UNNEEDED), params)
        upserted = conn.execute(text(UPSERT_CHANGES.format(differs=differs)), params)
        park_spent(conn, key, self.settings.max_attempts)
        result.superseded = sum(int(c) for r, c in superseded if r != self.run_id)
        # inserted + updated + overwritten: what this run now owns
        result.queued = int(upserted.rowcount) + int(overwritten)
        record_audience(conn, self.definition, result.members)
        drop_forgotten(conn, key)


def _drop_suppressed_from_snapshot(conn: Connection, key: str) -> int:
    if conn.dialect.name == "postgresql":
        # Fresh statistics, or the planner takes a million-row snapshot for an
        # empty table and anti-joins it row by row.
        conn.exec_driver_sql("ANALYZE snapshot")
        conn.exec_driver_sql("ANALYZE ledger")
    # Forgotten users never come back through a query (audsync forget).
    return int(conn.execute(text(DROP_SUPPRESSED), {"k": key}).rowcount)


def _snapshot_members(conn: Connection, key: str) -> int:
    return int(
        conn.execute(
            select(func.count())
            .select_from(models.snapshot)
            .where(models.snapshot.c.audience_key == key)
        ).scalar_one()
    )


def dry_run_calls(conn: Connection, counted_only: Iterable[str]) -> int:
    """The Identify calls a real sync would make after the plans of a dry run.

    Users with a pending change (as ``deliver.pending_user_count`` counts them),
    together with the members of the ``counted_only`` keys — first plans a dry
    run counted instead of queueing — each user once.
    """
    keys = sorted(set(counted_only))
    o = models.outbox.c
    s = _counted.c
    pending = select(o.user_id).where(o.state == "pending", o.priority != PRIORITY_RETRY)
    calls = conn.execute(
        select(func.count()).select_from(pending.distinct().subquery())
    ).scalar_one()
    if len(keys) == 1 and not calls:
        # Nobody pending (a first sync): every member is a call.
        calls = conn.execute(select(func.count()).where(s.audience_key == keys[0])).scalar_one()
    elif len(keys) == 1:
        # One audience counted (the usual first sync): its members without a
        # pending change, by index probes — a UNION would sort every member.
        waiting = (
            select(o.user_id)
            .where(o.user_id == s.user_id, o.state == "pending", o.priority != PRIORITY_RETRY)
            .exists()
        )
        calls += conn.execute(
            select(func.count()).where(s.audience_key == keys[0], ~waiting)
        ).scalar_one()
    elif keys:
        users = pending.union(select(s.user_id).where(s.audience_key.in_(keys)))
        calls = conn.execute(select(func.count()).select_from(users.subquery())).scalar_one()
    return int(calls)


def _count_transitions(conn: Connection, result: PlanResult, params: dict[str, Any]) -> None:
    """Set ``result``'s entered/exited/changed to the transitions this run queues.

    Each transition is counted once, by the run that queues it (docs/design.md,
    "Counting transitions"). The diff against the ledger also finds changes that
    are already in the outbox with the same value — queued by an earlier run
    that was interrupted or is still delivering, waiting for their next attempt,
    or parked after ``max_attempts`` rejections — and those are the earlier
    run's: counting them again would add them up twice in the history and the
    report. Read before the upsert below, which makes the outbox match.
    """
    for name in ("entered", "exited", "changed"):
        setattr(result, name, 0)
    rows = conn.execute(
        text(
            "SELECT c.kind, COUNT(*) FROM audsync_changes c LEFT JOIN outbox o"
            " ON o.audience_key = :k AND o.user_id = c.user_id"
            " WHERE c.kind <> 'reasserted'"
            # What the upsert below writes as a new value: no row yet, or a
            # different value in a row it may overwrite (a parked row keeps its
            # value except in a full resync).
            " AND (o.user_id IS NULL OR (o.value <> c.value AND (:full OR o.state = 'pending')))"
            " AND " + NOT_FORGOTTEN.format("c.user_id") + " GROUP BY c.kind"
        ),
        params,
    )
    for kind, count in rows:
        setattr(result, kind, int(count))


def _has_rows(conn: Connection, key: str) -> bool:
    """Whether ``key`` has anything queued or acknowledged."""
    for found in (models.outbox, models.ledger):
        c = found.c
        if conn.execute(select(c.user_id).where(c.audience_key == key).limit(1)).first():
            return True
    return False


@dataclass(frozen=True)
class LoadTarget:
    """Where streamed rows are written: the snapshot, or — for a first plan — the outbox.

    Every row carries ``(audience_key, user_id, value, contact)``; ``extra`` names
    further columns that hold the same value on every row, given as SQL literals
    (ints and fixed text only) so the load binds nothing per row but the row.
    """

    table: Literal["snapshot", "outbox", "audsync_counted"]
    key: str
    extra: tuple[tuple[str, str], ...] = ()
    ids_only: bool = False  # a dry run's count needs only the ids

    def columns(self) -> str:
        extra = (c for c, _ in self.extra)
        row = ["user_id"] if self.ids_only else ["user_id", "value", "contact"]
        return ", ".join(["audience_key", *row, *extra])

    def bound(self, rows: list[SnapshotRow]) -> Sequence[tuple[str | None, ...]]:
        """What :meth:`insert` binds for ``rows``."""
        # zip of one column: the 1-tuples built in C, not a Python loop per row.
        return list(zip(map(itemgetter(0), rows))) if self.ids_only else rows

    def insert(self, placeholder: str) -> str:
        """INSERT of one (user_id, value, contact) row, skipping ids already loaded."""
        values = ", ".join(
            [
                sql_literal(self.key),
                *[placeholder] * (1 if self.ids_only else 3),
                *(v for _, v in self.extra),
            ]
        )
        return (
            f"INSERT INTO {self.table} ({self.columns()}) VALUES ({values})"
            " ON CONFLICT DO NOTHING"
        )


def sql_literal(value: str) -> str:
    """``value`` as a SQL string literal (keys and fixed words, never user data)."""
    return "'" + value.replace("'", "''") + "'"


def outbox_target(key: str, run_id: int, priority: int, now: dt.datetime) -> LoadTarget:
    """A first plan's members, queued as they stream in (version 1, pending, no attempts)."""
    return LoadTarget(
        "outbox",
        key,
        (
            ("run_id", str(int(run_id))),
            ("version", "1"),
            ("priority", str(int(priority))),
            ("state", "'pending'"),
            ("attempts", "0"),
            # The text SQLAlchemy stores for a DateTime on SQLite; PostgreSQL parses it.
            ("queued_at", sql_literal(now.strftime("%Y-%m-%d %H:%M:%S.%f"))),
        ),
    )


def load_rows(
    conn: Connection,
    target: LoadTarget,
    source: Engine,
    definition: Definition,
    chunk_size: int,
    stats: StreamStats,
    stop: Callable[[], bool] | None = None,
    on_rows: Callable[[int], None] | None = None,
    keys: Mapping[str, str] | None = None,
    in_database: bool = False,
) -> None:
    """Load the query's rows into ``target``: inside the database when the source is
    the state DB (and ``in_database``), else streamed — COPY on PostgreSQL,
    executemany elsewhere."""
    if in_database and load_in_database(
        conn, source, definition, Target(target.table, target.key, target.extra), stats,
        stop=stop, on_rows=on_rows, keys=keys,
    ):
        return
    rows = stream_snapshot(source, definition, chunk_size, stats, stop, keys)
    chunks = _reported(rows, stats, on_rows)
    if conn.dialect.name == "postgresql":
        _copy_rows(conn, target, chunks, stats, chunk_size)
    else:
        statement = target.insert("?")
        for chunk in chunks:
            _insert_rows(conn, statement, target.bound(chunk), stats)


def _reported(
    chunks: Iterator[list[SnapshotRow]],
    stats: StreamStats,
    on_rows: Callable[[int], None] | None,
) -> Iterator[list[SnapshotRow]]:
    for chunk in chunks:
        yield chunk
        if on_rows is not None:
            on_rows(stats.rows)


def _copy_rows(
    conn: Connection,
    target: LoadTarget,
    chunks: Iterable[list[SnapshotRow]],
    stats: StreamStats,
    chunk_size: int,
) -> None:
    """COPY the rows into ``target``; ids that do not rise go in by INSERT ... ON CONFLICT.

    COPY has no ON CONFLICT, so one repeated id would abort the whole load. The
    source sorts by the id's text and repeats next to each other are already
    collapsed, so normalised ids normally rise strictly and cannot repeat. An id
    that does not rise (``42.0`` sorted as text after ``42-1`` but stored as
    ``42``; an engine that collates differently) is held back as a straggler: every
    later rising id is larger than all rows before it, so only stragglers can
    collide, and they are inserted with ON CONFLICT DO NOTHING (counted as
    duplicates) once the COPY ends. Once a chunk leaves ``chunk_size`` or more held
    (fewer than two chunks' worth), the COPY is ended, they are inserted, and a
    new COPY goes on with the rest.
    """
    cursor: Any = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    key = target.key
    # The constant columns go in as text; PostgreSQL parses each to its column's type.
    constants = tuple(_unquoted(v) for _, v in target.extra)
    statement = f"COPY {target.table} ({target.columns()}) FROM STDIN"
    straggler_insert = target.insert("%s")
    width = 1 if target.ids_only else 3
    pending = iter(chunks)
    highest = ""  # below every id: empty ids never reach the snapshot
    more = True
    while more:
        more = False
        stragglers: list[SnapshotRow] = []
        with cursor.copy(statement) as copy:
            write = copy.write_row
            for chunk in pending:
                for row in chunk:
                    user_id = row[0]
                    if user_id > highest:
                        highest = user_id
                        write((key, *row[:width], *constants))
                    else:
                        stragglers.append(row)
                if len(stragglers) >= chunk_size:
                    more = True  # the next COPY resumes with the next chunk
                    break
        if stragglers:
            _insert_rows(conn, straggler_insert, target.bound(stragglers), stats)


def _unquoted(literal: str) -> str:
    return literal[1:-1].replace("''", "'") if literal.startswith("'") else literal


def _insert_rows(
    conn: Connection,
    statement: str,
    rows: Sequence[tuple[str | None, ...]],
    stats: StreamStats,
) -> int:
    """Insert rows; an id already there is a duplicate: counted, first row kept.
    Returns how many were inserted."""
    cursor = conn.exec_driver_sql(statement, rows)
    if cursor.rowcount >= 0:
        stats.duplicate_ids += len(rows) - cursor.rowcount
        return int(cursor.rowcount)
    return len(rows)


def _fill_changes(
    conn: Connection,
    key: str,
    absent: str,
    *,
    full: bool,
    keyed: bool = True,
    candidates: bool = False,
) -> None:
    """Materialise this plan's changes as ``audsync_changes`` (a temp table).

    kind: entered (new member / new trait holder), changed (trait value moved),
    exited (left: ``absent`` is sent), reasserted (full resync of an unchanged value),
    contact (only contact fields differ from the contact ledger: ``contact_only``).
    ``keyed`` is false for ``[contacts]``: no exits, and no row without contact fields.
    With ``candidates`` only the users in ``audsync_candidates`` are looked at
    (:func:`merge_snapshot`: no other user can be a change).
    """
    # PostgreSQL keeps a temp table per connection: empty it at every commit.
    on_commit = "" if conn.dialect.name == "sqlite" else " ON COMMIT DELETE ROWS"
    conn.exec_driver_sql(
        "CREATE TEMP TABLE IF NOT EXISTS audsync_changes"
        " (user_id TEXT PRIMARY KEY, value TEXT NOT NULL, contact TEXT, kind TEXT NOT NULL,"
        " contact_only BOOLEAN NOT NULL DEFAULT FALSE)" + on_commit
    )
    conn.exec_driver_sql("DELETE FROM audsync_changes")
    params = {"k": key, "absent": absent, "full": full, "keyed": keyed}
    if candidates and conn.dialect.name == "postgresql":
        # The candidates are few: probe the snapshot and ledger by key (cached pages)
        # rather than hash all of both, which the default costs would choose.
        conn.exec_driver_sql("SET LOCAL random_page_cost = 1.1")
    try:
        _insert_changes(conn, params, candidates, keyed)
    finally:
        if candidates and conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL random_page_cost TO DEFAULT")


def _insert_changes(
    conn: Connection, params: dict[str, Any], candidates: bool, keyed: bool
) -> None:
    conn.execute(
        text(
            "INSERT INTO audsync_changes (user_id, value, contact, kind, contact_only)"
            " SELECT s.user_id, s.value, s.contact,"
            " CASE WHEN l.value IS NULL THEN 'entered'"
            " WHEN l.value = s.value THEN CASE WHEN :full THEN 'reasserted' ELSE 'contact' END"
            " WHEN l.value = :absent THEN 'entered' ELSE 'changed' END,"
            " NOT :full AND l.value IS NOT NULL AND l.value = s.value"
            # CROSS JOIN: SQLite walks the few candidates, not the whole snapshot.
            + (
                " FROM audsync_candidates k CROSS JOIN snapshot s"
                if candidates
                else " FROM snapshot s"
            )
            + " LEFT JOIN ledger l"
            " ON l.audience_key = s.audience_key AND l.user_id = s.user_id"
            " WHERE "
            + ("s.user_id = k.user_id AND " if candidates else "")
            + "s.audience_key = :k AND (:full OR l.value IS NULL OR l.value <> s.value"
            # The value Gleap holds is right, but a contact field moved: diffed like
            # a trait, against what Gleap acknowledged (ledger.contact), in the same
            # pass. Text equality first: the field-wise look runs only where it differs.
            " OR (s.contact IS NOT NULL AND (l.contact IS NULL OR l.contact <> s.contact)"
            " AND " + contact_news(conn.dialect.name, "s.contact", "l.contact") + "))"
            " AND (:keyed OR s.contact IS NOT NULL)"
            " AND " + NOT_FORGOTTEN.format("s.user_id")
        ),
        params,
    )
    if not keyed:
        return
    conn.execute(
        text(
            "INSERT INTO audsync_changes (user_id, value, contact, kind)"
            " SELECT l.user_id, :absent, NULL,"
            " CASE WHEN l.value = :absent THEN 'reasserted' ELSE 'exited' END"
            + (" FROM audsync_candidates k CROSS JOIN ledger l" if candidates else " FROM ledger l")
            + " WHERE "
            + ("l.user_id = k.user_id AND " if candidates else "")
            + "l.audience_key = :k AND (:full OR l.value <> :absent)"
            " AND NOT EXISTS (SELECT 1 FROM snapshot s"
            " WHERE s.audience_key = l.audience_key AND s.user_id = l.user_id)"
            # The exited side comes from the ledger, which keeps a forgotten
            # user's rows until the forget wipes them: never tell Gleap `false`.
            " AND " + NOT_FORGOTTEN.format("l.user_id")
        ),
        params,
    )


# -- the incremental load: write only what moved -------------------------------------

CREATE_CANDIDATES = (
    "CREATE TEMP TABLE IF NOT EXISTS audsync_candidates (user_id TEXT PRIMARY KEY)"
)
"""The users an incremental plan's diff looks at: every other user's query row equals
its ledger row, so it cannot be a change (a temp table, emptied at every commit on
PostgreSQL like ``audsync_changes``)."""

CANDIDATES_FROM_OUTBOX = (
    "INSERT INTO audsync_candidates (user_id) SELECT user_id FROM outbox"
    " WHERE audience_key = :k ON CONFLICT DO NOTHING"
)
"""PostgreSQL: the merge reads the ledger before the outbox is locked, and only an
acknowledgement of an outbox row can move a ledger row meanwhile (forget only
deletes, and a suppressed user is never a change): those users are looked at too."""

DROP_SUPPRESSED = (
    "DELETE FROM snapshot WHERE audience_key = :k"
    " AND user_id IN (SELECT user_id FROM suppressions)"
)
"""SQLite: a write before the merge's first read, so the plan holds the database's
write lock throughout and the ledger it reads is the ledger it diffs (a deferred
transaction that read first could not write after another writer committed)."""


_PREVIOUS = (
    "SELECT s.user_id, s.value, s.contact,"
    # 1: the ledger agrees with this row; 2: the ledger holds a value (not the absent one).
    " (CASE WHEN l.value = s.value AND (s.contact IS NULL OR l.contact = s.contact)"
    " THEN 1 ELSE 0 END) + (CASE WHEN l.value <> {p} THEN 2 ELSE 0 END)"
    " FROM snapshot s"
    " LEFT JOIN ledger l ON l.audience_key = s.audience_key AND l.user_id = s.user_id"
)
AGREES = 1
HOLDS = 2

PREVIOUS_PAGE_SQLITE = (
    _PREVIOUS.format(p="?")
    + " WHERE s.audience_key = ? AND s.user_id > ? ORDER BY s.user_id LIMIT ?"
)
"""SQLite: a page of the previous snapshot beside the ledger, in key order."""

PREVIOUS_SNAPSHOT_PG = (
    _PREVIOUS.format(p="%s") + ' WHERE s.audience_key = %s ORDER BY s.user_id COLLATE "C"'
)
"""PostgreSQL: the previous snapshot beside the ledger, in byte order."""

COUNT_HELD = "SELECT COUNT(*) FROM ledger WHERE audience_key = :k AND value <> :absent"
"""The ledger rows that hold a value: more than the merge saw beside the previous
snapshot means some are not beside it (and the breaker's base either way)."""

CANDIDATES_BEYOND_SNAPSHOT = (
    "INSERT INTO audsync_candidates (user_id) SELECT l.user_id FROM ledger l"
    " WHERE l.audience_key = :k AND l.value <> :absent AND NOT EXISTS (SELECT 1 FROM snapshot s"
    " WHERE s.audience_key = l.audience_key AND s.user_id = l.user_id)"
    " ON CONFLICT DO NOTHING"
)
"""Exits the merge could not see: ledger rows with a value that the snapshot lacks."""


@dataclass
class Merged:
    """What :func:`merge_snapshot` found: members written and ledger rows holding a value."""

    members: int = 0
    held: int = 0


def merge_snapshot(
    conn: Connection,
    source: Engine,
    definition: Definition,
    chunk_size: int,
    stats: StreamStats,
    absent: str,
    stop: Callable[[], bool] | None = None,
    on_rows: Callable[[int], None] | None = None,
    keys: Mapping[str, str] | None = None,
) -> Merged:
    """An incremental plan's load: bring the snapshot up to date writing only what moved.

    The query's rows (in the text order of their ids) are merged with the previous
    snapshot, read in the same order with a word from each user's ledger row: a row
    the snapshot holds unchanged is not written, a new one is inserted, a moved one
    updated, a gone one deleted. Every user whose query row may differ from its
    ledger row — new, moved, unchanged but not what Gleap acknowledged, gone while
    the ledger holds a value — goes into ``audsync_candidates``, and the diff
    (:func:`_fill_changes`) looks only at those. The snapshot is exactly what
    :meth:`_Planner.load_snapshot` reloads: the same stream, the same duplicate rule.
    """
    key = definition.key
    postgres = conn.dialect.name == "postgresql"
    conn.exec_driver_sql(CREATE_CANDIDATES + (" ON COMMIT DELETE ROWS" if postgres else ""))
    conn.exec_driver_sql("DELETE FROM audsync_candidates")
    params = {"k": key, "absent": absent}
    conn.execute(text(CANDIDATES_FROM_OUTBOX if postgres else DROP_SUPPRESSED), params)
    writer = _MergeWriter(conn, key, chunk_size, stats)
    pages = _previous_pages(conn, key, absent, chunk_size)
    rows = stream_snapshot(source, definition, chunk_size, stats, stop, keys)
    try:
        kept, held = _merge(chain.from_iterable(pages), _reported(rows, stats, on_rows), writer)
    finally:
        pages.close()  # its cursor, before the caller ends the transaction
    # Ledger rows with a value and no row in the previous snapshot (its exits still
    # being delivered, or no snapshot yet after a first plan): found by the count,
    # looked up only when there are some.
    holding = int(conn.execute(text(COUNT_HELD), params).scalar_one())
    if holding != held:
        conn.execute(text(CANDIDATES_BEYOND_SNAPSHOT), params)
    if postgres:
        conn.exec_driver_sql("ANALYZE audsync_candidates")  # or the diff scans the snapshot
    return Merged(members=kept + writer.inserted, held=holding)


def _merge(
    previous: Iterator[tuple[str, str, str | None, int]],
    chunks: Iterable[list[SnapshotRow]],
    writer: _MergeWriter,
) -> tuple[int, int]:
    """The merge of :func:`merge_snapshot`: (previous rows kept, ledger rows beside the
    previous snapshot that hold a value)."""
    old = next(previous, None)
    kept = held = 0
    highest = ""  # below every id: empty ids never reach the snapshot
    for chunk in chunks:
        for row in chunk:
            user_id = row[0]
            if user_id <= highest:
                # Not rising (42.0 after 42-1): loaded like _copy_rows's stragglers,
                # after the deletes, ON CONFLICT counting a repeat.
                writer.straggler(row)
                continue
            highest = user_id
            while old is not None and old[0] < user_id:
                writer.gone(old[0])
                if old[3] & HOLDS:
                    held += 1
                    writer.candidate(old[0])  # left: an exit
                old = next(previous, None)
            if old is not None and old[0] == user_id:
                kept += 1
                if old[3] & HOLDS:
                    held += 1
                if old[1] != row[1] or old[2] != row[2]:
                    writer.moved(row)
                    writer.candidate(user_id)
                elif not old[3] & AGREES:
                    writer.candidate(user_id)
                old = next(previous, None)
            else:
                writer.new(row)
                writer.candidate(user_id)
        writer.flush()
    while old is not None:
        writer.gone(old[0])
        if old[3] & HOLDS:
            held += 1
            writer.candidate(old[0])
        old = next(previous, None)
    writer.flush()
    return kept, held


MERGE_SQLITE = {
    "gone": "DELETE FROM snapshot WHERE audience_key = ? AND user_id = ?",
    "moved": "UPDATE snapshot SET value = ?, contact = ? WHERE audience_key = ? AND user_id = ?",
    "candidates": "INSERT INTO audsync_candidates (user_id) VALUES (?) ON CONFLICT DO NOTHING",
}
"""SQLite: the merge's writes, one row each (executemany; no round trips in-process)."""

MERGE_PG = {
    "gone": "DELETE FROM snapshot WHERE audience_key = %s AND user_id = ANY(%s::text[])",
    "moved": (
        "UPDATE snapshot SET value = u.value, contact = u.contact"
        " FROM unnest(%s::text[], %s::text[], %s::text[]) AS u (user_id, value, contact)"
        " WHERE snapshot.audience_key = %s AND snapshot.user_id = u.user_id"
    ),
    "new": (
        "INSERT INTO snapshot (audience_key, user_id, value, contact)"
        " SELECT %s, u.user_id, u.value, u.contact"
        " FROM unnest(%s::text[], %s::text[], %s::text[]) AS u (user_id, value, contact)"
        " ON CONFLICT DO NOTHING"
    ),
    "candidates": (
        "INSERT INTO audsync_candidates (user_id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING"
    ),
}
"""PostgreSQL: the merge's writes, one statement per batch (arrays), not one round trip
per row."""


class _MergeWriter:
    """The merge's writes, batched: deletes, updates and inserts of the snapshot, and
    candidates. Stragglers (ids that do not rise) are written last in each flush,
    after the deletes, so one that replaces a deleted row finds its place free."""

    def __init__(self, conn: Connection, key: str, chunk_size: int, stats: StreamStats) -> None:
        self.conn = conn
        self.key = key
        self.limit = chunk_size
        self.stats = stats
        self.postgres = conn.dialect.name == "postgresql"
        self.insert = LoadTarget("snapshot", key).insert("%s" if self.postgres else "?")
        self.gone_ids: list[str] = []
        self.moved_rows: list[SnapshotRow] = []
        self.new_rows: list[SnapshotRow] = []
        self.stragglers: list[SnapshotRow] = []
        self.candidates: list[str] = []
        self.inserted = 0  # rows added to the snapshot

    def gone(self, user_id: str) -> None:
        self.gone_ids.append(user_id)
        self._full()

    def moved(self, row: SnapshotRow) -> None:
        self.moved_rows.append(row)
        self._full()

    def new(self, row: SnapshotRow) -> None:
        self.new_rows.append(row)
        self._full()

    def straggler(self, row: SnapshotRow) -> None:
        self.stragglers.append(row)
        self.candidate(row[0])

    def candidate(self, user_id: str) -> None:
        self.candidates.append(user_id)
        self._full()

    def _full(self) -> None:
        # A whole query that left (or a first sync's worth of newcomers) between two
        # rows of the stream must not pile up in memory.
        if len(self.gone_ids) + len(self.moved_rows) + len(self.new_rows) >= self.limit or (
            len(self.candidates) >= self.limit
        ):
            self.flush()

    def flush(self) -> None:
        """Write what is batched: deletes, updates, inserts, candidates, then stragglers."""
        if self.postgres:
            self._flush_postgres()
        else:
            run = self.conn.exec_driver_sql
            key = self.key
            if self.gone_ids:
                run(MERGE_SQLITE["gone"], [(key, u) for u in self.gone_ids])
            if self.moved_rows:
                run(MERGE_SQLITE["moved"], [(v, c, key, u) for u, v, c in self.moved_rows])
            if self.new_rows:
                self.inserted += _insert_rows(self.conn, self.insert, self.new_rows, self.stats)
            if self.candidates:
                run(MERGE_SQLITE["candidates"], [(u,) for u in self.candidates])
        if self.stragglers:
            # Every snapshot row below the stream's highest id has been matched or
            # deleted by now (this flush's deletes ran above).
            self.inserted += _insert_rows(self.conn, self.insert, self.stragglers, self.stats)
        self.gone_ids, self.moved_rows, self.new_rows = [], [], []
        self.stragglers, self.candidates = [], []

    def _flush_postgres(self) -> None:
        run = self.conn.exec_driver_sql
        key = self.key
        if self.gone_ids:
            run(MERGE_PG["gone"], (key, self.gone_ids))
        if self.moved_rows:
            run(MERGE_PG["moved"], (*_columns_of(self.moved_rows), key))
        if self.new_rows:
            added = run(MERGE_PG["new"], (key, *_columns_of(self.new_rows))).rowcount
            self.inserted += int(added)
            self.stats.duplicate_ids += len(self.new_rows) - int(added)
        if self.candidates:
            run(MERGE_PG["candidates"], (self.candidates,))


def _columns_of(rows: list[SnapshotRow]) -> tuple[list[str], list[str], list[str | None]]:
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def _previous_pages(
    conn: Connection, key: str, absent: str, chunk_size: int
) -> Generator[list[tuple[str, str, str | None, int]], None, None]:
    """The previous snapshot of ``key`` as (user_id, value, contact, AGREES | HOLDS), in
    pages, in the stream's order (code points: Python's string order, and UTF-8's
    byte order).

    SQLite: pages by key (its primary key is in byte order), each page its own
    statement, so the merge may write between pages. PostgreSQL: one server-side
    cursor in the ``C`` collation; it sees the tables as they were when opened.
    """
    postgres = conn.dialect.name == "postgresql"
    cursor: Any = conn.connection.driver_connection.cursor(  # type: ignore[union-attr]
        **({"name": "audsync_previous"} if postgres else {})
    )
    try:
        if postgres:
            cursor.itersize = chunk_size
            # Its one sort (a few million ids) stays in memory instead of spilling.
            conn.execute(text("SELECT set_config('work_mem', :mem, true)"), {"mem": WORK_MEM})
            cursor.execute(PREVIOUS_SNAPSHOT_PG, (absent, key))
            while page := cursor.fetchmany(chunk_size):
                yield page
            return
        after = ""
        while page := cursor.execute(
            PREVIOUS_PAGE_SQLITE, (absent, key, after, chunk_size)
        ).fetchall():
            yield page
            after = page[-1][0]
    finally:
        cursor.close()
