"""The state database's tables.

``sync_runs`` and ``delivery_failures`` are a public contract: users query them
with SQL (README documents every column). ``ledger``, ``outbox`` and
``snapshot`` are readable too, but their shape may change between releases.

Values (``ledger.value``, ``outbox.value``, ``snapshot.value``) are canonical
JSON text (``true``, ``false``, ``450.5``, ``"gold"``, ``null``), so "did it
change?" is plain text equality in SQL on every database.
All timestamps are UTC.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    false,
    text,
)

from audsync.defaults import MAX_USER_ID_LENGTH

metadata = MetaData()

KEY = String(200)
USER = String(MAX_USER_ID_LENGTH)

audiences = Table(
    "audiences",
    metadata,
    Column("key", KEY, primary_key=True),
    Column("kind", String(20), nullable=False),  # audience | trait
    Column("name", Text, nullable=False),
    Column("sql_hash", String(64), nullable=False),
    Column("active", Boolean, nullable=False, default=True),
    Column("created_at", DateTime, nullable=False),
    Column("last_planned_at", DateTime),
    Column("last_success_at", DateTime),
    Column("members", Integer),
    Column("alert_state", String(20)),  # ok | failing | held: what the webhook last said
)

ledger = Table(
    "ledger",
    metadata,
    Column("audience_key", KEY, primary_key=True),
    Column("user_id", USER, primary_key=True),
    Column("value", Text, nullable=False),
    Column("acked_at", DateTime, nullable=False),
    # The contact ledger: the contact fields (JSON object) Gleap acknowledged in
    # calls carrying this key's changes, merged over time; a plan diffs the
    # query's contact columns against it (docs/design.md, "The contact ledger").
    Column("contact", Text),
    sqlite_with_rowid=False,
)

snapshot = Table(
    "snapshot",
    metadata,
    Column("audience_key", KEY, primary_key=True),
    Column("user_id", USER, primary_key=True),
    Column("value", Text, nullable=False),
    Column("contact", Text),
    sqlite_with_rowid=False,
)

outbox = Table(
    "outbox",
    metadata,
    Column("audience_key", KEY, nullable=False),
    Column("user_id", USER, nullable=False),
    Column("value", Text, nullable=False),
    Column("contact", Text),
    Column("run_id", Integer, nullable=False),
    # Bumped whenever a newer plan replaces the value: an acknowledgement only
    # removes the row if the version it sent is still the current one.
    Column("version", Integer, nullable=False, default=1),
    # 0 = change to an audience already synced, 1 = initial backfill: keeps
    # routine changes from starving behind a long first sync.
    # 2 = rejected with attempts left: waits (run_id 0) for its audience's next plan.
    Column("priority", Integer, nullable=False, default=0),
    Column("state", String(10), nullable=False, default="pending"),  # pending | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_status", Integer),
    Column("last_error", Text),
    Column("queued_at", DateTime, nullable=False),
    # Set before a call carrying this row goes out: the value may have reached
    # Gleap, so a newer plan must overwrite it, never just withdraw it.
    Column("attempted", Boolean, nullable=False, server_default=false()),
    # Only contact fields changed: Gleap already holds the value, so the key is
    # not sent and only the fields that differ from ledger.contact are.
    Column("contact_only", Boolean, nullable=False, server_default=false()),
    # Led by user_id: the deliverer fetches every pending change of a user.
    PrimaryKeyConstraint("user_id", "audience_key", name="pk_outbox"),
    Index(
        "ix_outbox_routine",
        "user_id",
        postgresql_where=text("priority = 0 AND state = 'pending'"),
        sqlite_where=text("priority = 0 AND state = 'pending'"),
    ),
    sqlite_with_rowid=False,
)

sync_runs = Table(
    "sync_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("audience_key", KEY, nullable=False),
    Column("trigger", String(20), nullable=False),  # startup | schedule | manual
    Column("mode", String(20), nullable=False),  # initial | incremental | full | dry_run
    # planning | delivering | succeeded | partial | failed | held | interrupted
    Column("status", String(20), nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
    Column("members", Integer, nullable=False, default=0),
    Column("entered", Integer, nullable=False, default=0),
    Column("exited", Integer, nullable=False, default=0),
    Column("changed", Integer, nullable=False, default=0),
    Column("queued", Integer, nullable=False, default=0),
    Column("delivered", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("superseded", Integer, nullable=False, default=0),
    Column("skipped_ids", Integer, nullable=False, default=0),
    Column("duplicate_ids", Integer, nullable=False, default=0),
    # Rows whose user_id cannot be stored (control characters, too long), and why.
    Column("invalid_ids", Integer, nullable=False, server_default=text("0"), default=0),
    Column("invalid_reasons", Text),
    Column("error", Text),
    Column("host", String(255)),
    Column("pid", Integer),
    Index("ix_sync_runs_audience", "audience_key", "id"),
    # Pruning walks the runs that finished before the cut-off in this order.
    Index("ix_sync_runs_finished", "finished_at", "id"),
)

delivery_failures = Table(
    "delivery_failures",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, nullable=False),
    Column("audience_key", KEY, nullable=False),
    Column("user_id", USER, nullable=False),
    Column("http_status", Integer),
    Column("reason", Text, nullable=False),
    Column("failed_at", DateTime, nullable=False),
    Index("ix_delivery_failures_user", "user_id"),
    Index("ix_delivery_failures_run", "run_id"),
    Index("ix_delivery_failures_failed_at", "failed_at"),  # pruning finds old ones
)

leases = Table(
    "leases",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("holder", String(255)),
    # Fencing token: grows by one on every acquisition, so a holder whose lease
    # expired cannot write once a newer holder exists.
    Column("token", Integer, nullable=False, default=0),
    Column("expires_at", Float, nullable=False, default=0.0),  # unix seconds
    Column("host", String(255)),
    Column("pid", Integer),
    Column("acquired_at", DateTime),
)


daemons = Table(
    "daemons",
    metadata,
    Column("holder", String(255), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("beat_at", DateTime, nullable=False),
    Column("next_run_at", DateTime),
    Column("state", String(20), nullable=False),  # running | stopping | stopped
)


event_outbox = Table(
    "event_outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("audience_key", KEY, nullable=False),
    Column("user_id", USER, nullable=False),
    Column("name", String(200), nullable=False),  # Audience Entered | Audience Exited | ...
    Column("data", Text, nullable=False),  # JSON object
    Column("occurred_at", DateTime, nullable=False),
    Column("run_id", Integer, nullable=False),
    Index("ix_event_outbox_user", "user_id"),
)

suppressions = Table(
    "suppressions",
    metadata,
    Column("user_id", USER, primary_key=True),
    Column("suppressed_at", DateTime, nullable=False),
    Column("deleted_in_gleap_at", DateTime),
    Column("last_error", Text),
    # Set by the deliverer once no call about this user is in flight and none
    # will be sent; NULL while a forget waits for that (see audsync/forget.py).
    Column("calls_stopped_at", DateTime),
)

TERMINAL_STATUSES = ("succeeded", "partial", "failed", "held", "interrupted")
OPEN_STATUSES = ("planning", "delivering")

# The outbox's priorities (invariant 6): routine changes drain before a backfill.
PRIORITY_ROUTINE = 0
PRIORITY_BACKFILL = 1
PRIORITY_RETRY = 2
"""A change Gleap rejected with attempts left: not sent again until the next plan of its
audience (or retry-failed) takes it over, so one run makes at most one attempt."""

NO_RUN = 0
"""The run_id of a rejected pending change between runs: the run that sent it already
counted it as failed, so no run holds it as pending until a plan takes it over."""

NOT_FORGOTTEN = "NOT EXISTS (SELECT 1 FROM suppressions x WHERE x.user_id = {})"
"""SQL: the user in column ``{}`` is not suppressed by ``audsync forget``. Every
statement that writes the outbox re-checks it: on PostgreSQL (READ COMMITTED)
each statement sees the suppressions committed before it started."""
