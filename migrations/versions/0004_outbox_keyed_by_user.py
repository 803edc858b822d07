"""Outbox keyed by (user_id, audience_key), fewer indexes, and an ``attempted`` flag.

The backfill is drained in primary-key order; only routine changes (priority 0)
carry an index, a partial one, so they still overtake the backfill cheaply.

The deliverer looks changes up by user, so the primary key now leads with
user_id and serves those lookups; runs are finalized from their counters, so
the run_id index goes too. One index fewer per row makes a large initial plan
markedly cheaper on PostgreSQL. ``attempted`` marks rows whose call may have
reached Gleap: a newer plan may overwrite such a value but never withdraw it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_outbox_user", "outbox")
    op.drop_index("ix_outbox_run", "outbox")
    op.drop_index("ix_outbox_next", "outbox")
    # On SQLite the three big tables live in their primary-key B-tree
    # (WITHOUT ROWID): one tree to write per row instead of a table plus an index.
    without_rowid = {"sqlite_with_rowid": False}
    for table in ("snapshot", "ledger"):
        with op.batch_alter_table(table, recreate="always", table_kwargs=without_rowid):
            pass
    with op.batch_alter_table("outbox", recreate="always", table_kwargs=without_rowid) as batch:
        batch.create_primary_key("pk_outbox", ["user_id", "audience_key"])
        batch.add_column(
            sa.Column("attempted", sa.Boolean, nullable=False, server_default=sa.false())
        )
    # Only routine changes are indexed by priority: a million-row backfill is
    # walked in primary-key order instead of paying for a second index per row.
    op.create_index(
        "ix_outbox_routine",
        "outbox",
        ["user_id"],
        postgresql_where=sa.text("priority = 0 AND state = 'pending'"),
        sqlite_where=sa.text("priority = 0 AND state = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_routine", "outbox")
    op.create_index("ix_outbox_next", "outbox", ["state", "priority", "user_id"])
    with op.batch_alter_table("outbox", recreate="always") as batch:
        batch.drop_column("attempted")
        batch.create_primary_key("pk_outbox", ["audience_key", "user_id"])
    op.create_index("ix_outbox_user", "outbox", ["user_id"])
    op.create_index("ix_outbox_run", "outbox", ["run_id"])
