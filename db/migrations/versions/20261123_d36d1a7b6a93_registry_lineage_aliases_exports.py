"""registry: version lineage and exports, never-reused version numbers

Revision ID: d36d1a7b6a93
Revises: 29dde4a557d2
Create Date: 2026-11-23 11:17:23.828702
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "d36d1a7b6a93"
down_revision = "29dde4a557d2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE ADD COLUMN with constant defaults, not batch mode: on SQLite batch mode
    # would copy and drop `models`, and with foreign keys on, dropping it cascades to (deletes)
    # every model version.
    op.add_column(
        "model_versions", sa.Column("lineage", sa.JSON(), server_default="{}", nullable=False)
    )
    op.add_column(
        "model_versions", sa.Column("exports", sa.JSON(), server_default="{}", nullable=False)
    )
    op.create_index(op.f("ix_model_versions_dataset_digest"), "model_versions", ["dataset_digest"])
    op.add_column(
        "models", sa.Column("last_number", sa.Integer(), server_default="0", nullable=False)
    )
    # Existing models continue numbering after their highest version.
    op.execute(
        "UPDATE models SET last_number = COALESCE("
        "(SELECT MAX(number) FROM model_versions WHERE model_versions.model_id = models.id), 0)"
    )


def downgrade() -> None:
    # ALTER TABLE DROP COLUMN (SQLite 3.35+), again without copying tables.
    op.drop_column("models", "last_number")
    op.drop_index(op.f("ix_model_versions_dataset_digest"), table_name="model_versions")
    op.drop_column("model_versions", "exports")
    op.drop_column("model_versions", "lineage")
