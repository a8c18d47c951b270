"""preemption: preemptible, preemptions and preempt_for on jobs

Revision ID: 5e1a7c3b9d20
Revises: 5f1e0c2a9b7d
Create Date: 2026-12-03 12:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "5e1a7c3b9d20"
down_revision = "5f1e0c2a9b7d"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("preemptible", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
        batch_op.add_column(
            sa.Column("preemptions", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("preempt_for", sa.String(length=32), nullable=True))
        batch_op.create_unique_constraint("uq_jobs_preempt_for", ["preempt_for"])


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("uq_jobs_preempt_for", type_="unique")
        batch_op.drop_column("preempt_for")
        batch_op.drop_column("preemptions")
        batch_op.drop_column("preemptible")
