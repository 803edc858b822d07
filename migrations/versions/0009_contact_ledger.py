"""The contact ledger: what Gleap acknowledged of each user's contact fields, per key.

``ledger.contact`` holds the contact fields (JSON object) Gleap acknowledged in
calls carrying this audience's, trait's or ``[contacts]``'s changes; a plan
diffs the query's contact columns against it like a trait's value.
``outbox.contact_only`` marks a change that carries only contact fields: the
membership or trait value is what Gleap already holds, so the key is not sent.

Existing ledger rows start from the contact the last plan saw with the same value
(``snapshot.contact``): the contact that rode along when that value was sent. An
upgrade then sends only contact fields that move from here on, not every member's
contact at once; ``sync --full`` re-asserts everything, contacts included. (An
audience whose only plan so far was its first has no snapshot: its members'
contacts are sent once, with the next plan.)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ledger") as batch:
        batch.add_column(sa.Column("contact", sa.Text(), nullable=True))
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(
            sa.Column("contact_only", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.execute(
        "UPDATE ledger SET contact = (SELECT s.contact FROM snapshot s"
        " WHERE s.audience_key = ledger.audience_key AND s.user_id = ledger.user_id"
        " AND s.value = ledger.value)"
    )


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("contact_only")
    with op.batch_alter_table("ledger") as batch:
        batch.drop_column("contact")
