"""Indexes that let history pruning find old runs and failures without a scan.

Revision ID: 0006_prune
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0006_prune"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_sync_runs_finished", "sync_runs", ["finished_at", "id"])
    op.create_index("ix_delivery_failures_failed_at", "delivery_failures", ["failed_at"])


def downgrade() -> None:
    op.drop_index("ix_delivery_failures_failed_at", table_name="delivery_failures")
    op.drop_index("ix_sync_runs_finished", table_name="sync_runs")
