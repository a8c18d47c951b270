"""shards: parent_id, shard_index, row_start, row_stop, shard_count, awaiting_shards on jobs

Revision ID: 7a2c4e6f8b10
Revises: be6a8c0d2f54
Create Date: 2026-12-03 15:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "7a2c4e6f8b10"
down_revision = "be6a8c0d2f54"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parent_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("shard_index", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("row_start", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("row_stop", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("shard_count", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("awaiting_shards", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.create_foreign_key(
            "fk_jobs_parent_id_jobs", "jobs", ["parent_id"], ["id"], ondelete="CASCADE"
        )
        batch_op.create_index("ix_jobs_parent_id", ["parent_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_parent_id")
        batch_op.drop_constraint("fk_jobs_parent_id_jobs", type_="foreignkey")
        batch_op.drop_column("awaiting_shards")
        batch_op.drop_column("shard_count")
        batch_op.drop_column("row_stop")
        batch_op.drop_column("row_start")
        batch_op.drop_column("shard_index")
        batch_op.drop_column("parent_id")
