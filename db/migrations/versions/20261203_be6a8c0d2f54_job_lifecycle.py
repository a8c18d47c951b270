"""job lifecycle: job_tags, deadline_s and deadline_at on jobs, queue-estimate index,
tags and deadline_s on schedules

Revision ID: be6a8c0d2f54
Revises: 8b3d5f7a9c21
Create Date: 2026-12-03 15:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import db.base

revision = "be6a8c0d2f54"
down_revision = "8b3d5f7a9c21"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deadline_s", sa.Float(), nullable=True))
        batch_op.add_column(
            sa.Column("deadline_at", db.base.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.create_index("ix_jobs_state_deadline", ["state", "deadline_at"], unique=False)
        batch_op.create_index(
            "ix_jobs_queue_kind_state_finished",
            ["queue", "kind", "state", "finished_at"],
            unique=False,
        )
    with op.batch_alter_table("schedules", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tags", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("deadline_s", sa.Float(), nullable=True))
    op.create_table(
        "job_tags",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_tags_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "key", name=op.f("pk_job_tags")),
    )
    with op.batch_alter_table("job_tags", schema=None) as batch_op:
        batch_op.create_index("ix_job_tags_key_value", ["key", "value"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job_tags", schema=None) as batch_op:
        batch_op.drop_index("ix_job_tags_key_value")
    op.drop_table("job_tags")
    with op.batch_alter_table("schedules", schema=None) as batch_op:
        batch_op.drop_column("deadline_s")
        batch_op.drop_column("tags")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_queue_kind_state_finished")
        batch_op.drop_index("ix_jobs_state_deadline")
        batch_op.drop_column("deadline_at")
        batch_op.drop_column("deadline_s")
