"""Indexes that let history pruning find old runs and failures without a scan.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_sync_runs_finished", "sync_runs", ["finished_at", "id"])
    op.create_index("ix_delivery_failures_failed_at", "delivery_failures", ["failed_at"])


def downgrade() -> None:
    op.drop_index("ix_delivery_failures_failed_at", table_name="delivery_failures")
    op.drop_index("ix_sync_runs_finished", table_name="sync_runs")
