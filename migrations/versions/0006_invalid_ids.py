"""Count the rows skipped because their user id cannot be stored, with the reasons.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        batch.add_column(
            sa.Column("invalid_ids", sa.Integer, nullable=False, server_default=sa.text("0"))
        )
        batch.add_column(sa.Column("invalid_reasons", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        batch.drop_column("invalid_reasons")
        batch.drop_column("invalid_ids")
