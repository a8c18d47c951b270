"""The registry's migration keeps existing versions and continues their numbering."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from db.migrate import alembic_config, check, upgrade

BEFORE = "29dde4a557d2"  # the initial schema, before the registry's revision


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path) -> Iterator[str]:
    """The URL of an empty database (a SQLite file, or a fresh PostgreSQL schema)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    schema = f"t_{uuid.uuid4().hex}"
    with server.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = server.url.update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with server.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


def test_upgrading_keeps_versions_and_numbering_continues_after_the_highest(empty_database):
    upgrade(empty_database, BEFORE)
    engine = create_engine(empty_database)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO models (id, owner, name, created_at, aliases) "
                    "VALUES ('m1', 'alice', 'digits', '2026-01-01 00:00:00+00', '{}')"
                )
            )
            for number in (1, 2, 5):
                connection.execute(
                    text(
                        "INSERT INTO model_versions (id, model_id, number, arch, config, "
                        "metrics, artifact_digest, artifact_size, created_at) VALUES (:id, "
                        "'m1', :number, 'mlp', '{}', '{}', 'a', 1, '2026-01-01 00:00:00+00')"
                    ),
                    {"id": f"v{number}", "number": number},
                )

        upgrade(empty_database)
        check(empty_database)  # the models and the migrations agree
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT last_number FROM models")) == 5
            assert connection.scalar(text("SELECT COUNT(*) FROM model_versions")) == 3

        command.downgrade(alembic_config(empty_database), BEFORE)
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT COUNT(*) FROM model_versions")) == 3
    finally:
        engine.dispose()
