"""Migrations against real databases: they build exactly the schema the models describe."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, inspect, text

from db import migrate
from db.base import Base
from db.engine import make_engine

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with nothing in it: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    server: Engine = request.getfixturevalue("postgres_server")
    schema = f"t_{uuid.uuid4().hex}"
    with server.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield server.url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
    finally:
        with server.begin() as connection:
            connection.execute(text("SET lock_timeout = '10s'"))
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrading_an_empty_database_to_head_builds_the_models_schema_without_drift(
    empty_database_url: str,
) -> None:
    migrate.upgrade(empty_database_url)

    assert _tables(empty_database_url) == {*Base.metadata.tables, "alembic_version"}
    migrate.check(empty_database_url)  # raises when autogenerate would find a difference


def test_downgrading_to_base_and_upgrading_again_round_trips(empty_database_url: str) -> None:
    migrate.upgrade(empty_database_url)

    command.downgrade(migrate.alembic_config(empty_database_url), "base")
    assert _tables(empty_database_url) == {"alembic_version"}
    migrate.upgrade(empty_database_url)

    assert _tables(empty_database_url) == {*Base.metadata.tables, "alembic_version"}
    migrate.check(empty_database_url)
