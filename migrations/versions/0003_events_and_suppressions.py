"""Track events waiting for Gleap, and the suppression list of forgotten users.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "event_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("audience_key", sa.String(200), nullable=False),
        sa.Column("user_id", sa.String(400), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("occurred_at", sa.DateTime, nullable=False),
        sa.Column("run_id", sa.Integer, nullable=False),
    )
    op.create_index("ix_event_outbox_user", "event_outbox", ["user_id"])
    op.create_table(
        "suppressions",
        sa.Column("user_id", sa.String(400), primary_key=True),
        sa.Column("suppressed_at", sa.DateTime, nullable=False),
        sa.Column("deleted_in_gleap_at", sa.DateTime),
        sa.Column("last_error", sa.Text),
    )


def downgrade() -> None:
    op.drop_table("suppressions")
    op.drop_index("ix_event_outbox_user", "event_outbox")
    op.drop_table("event_outbox")
