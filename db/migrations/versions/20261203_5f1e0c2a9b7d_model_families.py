"""registry: model families (zoo, hf, plugin) and the task of an hf version

Revision ID: 5f1e0c2a9b7d
Revises: dc670624a11a
Create Date: 2026-12-03 12:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "5f1e0c2a9b7d"
down_revision = "dc670624a11a"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # ADD COLUMN with a constant server default, not batch mode (which on SQLite copies and
    # drops the table): every existing version becomes `zoo`, nothing else changes.
    op.add_column(
        "model_versions",
        sa.Column("family", sa.String(16), server_default="zoo", nullable=False),
    )
    op.add_column("model_versions", sa.Column("task", sa.String(32), nullable=True))


def downgrade() -> None:
    op.drop_column("model_versions", "task")
    op.drop_column("model_versions", "family")
