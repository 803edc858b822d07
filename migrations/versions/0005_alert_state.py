"""Remember each audience's last alerted state, so alerts fire once per change.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audiences") as batch:
        batch.add_column(sa.Column("alert_state", sa.String(20)))


def downgrade() -> None:
    with op.batch_alter_table("audiences") as batch:
        batch.drop_column("alert_state")
