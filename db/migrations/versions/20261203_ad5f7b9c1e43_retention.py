"""retention: expires_after_s, expires_at and expired_at on jobs

Revision ID: ad5f7b9c1e43
Revises: 5e1a7c3b9d20
Create Date: 2026-12-03 15:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import db.base

revision = "ad5f7b9c1e43"
down_revision = "5e1a7c3b9d20"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_after_s", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("expires_at", db.base.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("expired_at", db.base.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.create_index("ix_jobs_expired_expires", ["expired_at", "expires_at"])


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_expired_expires")
        batch_op.drop_column("expired_at")
        batch_op.drop_column("expires_at")
        batch_op.drop_column("expires_after_s")
