"""schedules: expires_after_s, the retention each job a schedule submits gets

Revision ID: f1a2b3c4d5e6
Revises: 7a2c4e6f8b10
Create Date: 2026-12-03 16:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "f1a2b3c4d5e6"
down_revision = "7a2c4e6f8b10"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("schedules", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_after_s", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("schedules", schema=None) as batch_op:
        batch_op.drop_column("expires_after_s")
