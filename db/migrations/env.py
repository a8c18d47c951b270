"""Alembic environment: the URL comes from Settings (or the caller), the schema from db.models."""

from __future__ import annotations

from alembic import context

import db.models  # noqa: F401  (registers every table on Base.metadata)
from db.base import Base
from db.engine import make_engine
from kiln.settings import Settings

config = context.config
url = config.attributes.get("url") or Settings().resolved_database_url


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url)
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # Batch mode rebuilds a table by copy-and-drop; with foreign keys on, dropping
            # the old table would cascade and delete every child row (model versions, job
            # events). SQLite ignores this pragma inside a transaction, so set it first.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        # render_as_batch: SQLite can only ALTER tables by copying them; batch mode does that.
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=True,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
