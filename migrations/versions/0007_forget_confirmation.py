"""A forget waits for the deliverer: it records when no call about a user can go out any more.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("suppressions") as batch:
        batch.add_column(sa.Column("calls_stopped_at", sa.DateTime))


def downgrade() -> None:
    with op.batch_alter_table("suppressions") as batch:
        batch.drop_column("calls_stopped_at")
