"""Initial schema: audiences, ledger, snapshot, outbox, sync_runs, delivery_failures, leases.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

KEY = sa.String(200)
USER = sa.String(400)


def upgrade() -> None:
    op.create_table(
        "audiences",
        sa.Column("key", KEY, primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("sql_hash", sa.String(64), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("last_planned_at", sa.DateTime),
        sa.Column("last_success_at", sa.DateTime),
        sa.Column("members", sa.Integer),
    )
    op.create_table(
        "ledger",
        sa.Column("audience_key", KEY, primary_key=True),
        sa.Column("user_id", USER, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("acked_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "snapshot",
        sa.Column("audience_key", KEY, primary_key=True),
        sa.Column("user_id", USER, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("contact", sa.Text),
    )
    op.create_table(
        "outbox",
        sa.Column("audience_key", KEY, primary_key=True),
        sa.Column("user_id", USER, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("contact", sa.Text),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_status", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.Column("queued_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_outbox_next", "outbox", ["state", "priority", "user_id"])
    op.create_index("ix_outbox_user", "outbox", ["user_id"])
    op.create_index("ix_outbox_run", "outbox", ["run_id"])
    op.create_table(
        "sync_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("audience_key", KEY, nullable=False),
        sa.Column("trigger", sa.String(20), nullable=False),
        sa.Column("mode", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("members", sa.Integer, nullable=False),
        sa.Column("entered", sa.Integer, nullable=False),
        sa.Column("exited", sa.Integer, nullable=False),
        sa.Column("changed", sa.Integer, nullable=False),
        sa.Column("queued", sa.Integer, nullable=False),
        sa.Column("delivered", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("superseded", sa.Integer, nullable=False),
        sa.Column("skipped_ids", sa.Integer, nullable=False),
        sa.Column("duplicate_ids", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
    )
    op.create_index("ix_sync_runs_audience", "sync_runs", ["audience_key", "id"])
    op.create_table(
        "delivery_failures",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("audience_key", KEY, nullable=False),
        sa.Column("user_id", USER, nullable=False),
        sa.Column("http_status", sa.Integer),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("failed_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_delivery_failures_user", "delivery_failures", ["user_id"])
    op.create_index("ix_delivery_failures_run", "delivery_failures", ["run_id"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("holder", sa.String(255)),
        sa.Column("token", sa.Integer, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("acquired_at", sa.DateTime),
    )


def downgrade() -> None:
    for table in (
        "leases",
        "delivery_failures",
        "sync_runs",
        "outbox",
        "snapshot",
        "ledger",
        "audiences",
    ):
        op.drop_table(table)
