"""Model families: the migration makes every existing version `zoo` with nothing lost; the
hf tasks' parameters are validated without torch."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from pydantic import ValidationError
from sqlalchemy import create_engine, text

from db.migrate import check, upgrade
from kiln.families import HfParams

BEFORE = "dc670624a11a"  # the schema before families


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


def test_existing_versions_become_zoo_with_nothing_lost(empty_database):
    upgrade(empty_database, BEFORE)
    engine = create_engine(empty_database)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO models (id, owner, name, created_at, aliases, last_number) "
                    "VALUES ('m1', 'alice', 'digits', '2026-01-01 00:00:00+00', '{}', 1)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO model_versions (id, model_id, number, arch, config, metrics, "
                    "artifact_digest, artifact_size, created_at, lineage, exports) VALUES "
                    "('v1', 'm1', 1, 'mlp', '{\"feature_names\": [\"a\"]}', '{}', 'd', 7, "
                    "'2026-01-01 00:00:00+00', '{\"origin\": \"train\"}', '{}')"
                )
            )
        upgrade(empty_database)
        check(empty_database)  # the ORM models and the migrations agree
        with engine.connect() as connection:
            row = connection.execute(
                text(
                    "SELECT family, task, arch, config, artifact_digest, artifact_size, lineage "
                    "FROM model_versions"
                )
            ).one()
    finally:
        engine.dispose()
    assert row[:3] == ("zoo", None, "mlp")
    assert "feature_names" in str(row[3])
    assert "origin" in str(row[6])
    assert row[4:6] == ("d", 7)


def test_generation_parameters_are_refused_for_other_tasks():
    params = HfParams.model_validate({"normalize": True, "max_new_tokens": 5})
    assert params.unused_for("embedding") == ["max_new_tokens"]
    assert params.unused_for("text-generation") == ["normalize"]
    assert HfParams(truncation="truncate").unused_for("text-classification") == []


@pytest.mark.parametrize(
    "bad",
    [{"truncation": "drop"}, {"top_p": 0}, {"stop": [""]}, {"temperature": -1}, {"x": 1}],
)
def test_bad_task_parameters_are_refused(bad):
    with pytest.raises(ValidationError):
        HfParams.model_validate(bad)
