"""Shared fixtures: a migrated database per test (SQLite and PostgreSQL), the app, keys and jobs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from db import jobs, keys, migrate, registry
from db.base import utcnow
from db.engine import make_engine, make_sessionmaker
from db.models import Dataset, Job
from kiln.settings import Settings
from kiln.states import JobState
from web import create_app

POSTGRES_URL = os.environ.get(
    "KILN_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

#: What the app under test has sent to the broker: (job id, attempt, queue) per send.
Sent = list[tuple[str, int, str]]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Engine]:
    """An engine on the test PostgreSQL server (for schema admin), or skip when unreachable."""
    engine = create_engine(POSTGRES_URL, poolclass=NullPool, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        engine.dispose()
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        where = make_url(POSTGRES_URL)  # str() of a URL masks its password
        pytest.skip(f"PostgreSQL unreachable at {where} (KILN_TEST_DATABASE_URL): {reason}")
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh database migrated to head: a SQLite file, or a PostgreSQL schema."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'kiln.db'}"
        migrate.upgrade(url)
        yield url
        return
    server: Engine = request.getfixturevalue("postgres_server")
    with postgres_schema(server) as url:
        yield url


@contextmanager
def postgres_schema(server: Engine) -> Iterator[str]:
    """A fresh schema on the test server, migrated to head; dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex}"
    with server.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = (
        make_url(POSTGRES_URL)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )
    try:
        migrate.upgrade(url)
        yield url
    finally:
        with server.begin() as connection:
            # A connection leaked by a test would hold locks; fail loudly instead of hanging.
            connection.execute(text("SET lock_timeout = '10s'"))
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Settings on the test database, a private data directory and an in-memory broker."""
    return Settings(data_dir=tmp_path / "data", database_url=database_url, redis_url="memory://")


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    """A sessionmaker on the test database, independent of the app's own engine."""
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def sent() -> Sent:
    """The jobs the `app` fixture's sender was given, in order."""
    return []


@pytest.fixture
def make_app(settings: Settings, sent: Sent) -> Iterator[Callable[..., Flask]]:
    """Factory: make_app(sender=..., **settings overrides); the default sender records to `sent`."""
    apps: list[Flask] = []

    def record(job: Job, countdown: float = 0.0) -> None:
        sent.append((job.id, job.attempt, job.queue))

    def make(sender: Any = record, **overrides: Any) -> Flask:
        app_settings = settings.model_copy(update=overrides) if overrides else settings
        app = create_app(app_settings, sender=sender)
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["kiln.stream_hub"].stop()  # its reads end before the engine goes
        app.extensions["kiln.engine"].dispose()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    """The app under test, sending jobs to `sent` instead of Celery."""
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of `app`."""
    return app.test_client()


@pytest.fixture
def create_key(sessions: sessionmaker[Session]) -> Callable[..., str]:
    """Factory: create_key(owner="alice", role="user") -> a live API key, in clear."""

    def create(owner: str = "alice", role: str = "user") -> str:
        with sessions() as session:
            _, plaintext = keys.create(session, owner=owner, role=role)
            session.commit()
        return plaintext

    return create


@pytest.fixture
def auth() -> Callable[[str], dict[str, str]]:
    """auth(key) -> the request headers that present `key`."""

    def headers(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    return headers


@pytest.fixture
def alice(create_key: Callable[..., str], auth: Callable[[str], dict[str, str]]) -> dict[str, str]:
    """Headers of a user key owned by alice."""
    return auth(create_key("alice"))


@pytest.fixture
def bob(create_key: Callable[..., str], auth: Callable[[str], dict[str, str]]) -> dict[str, str]:
    """Headers of a user key owned by bob."""
    return auth(create_key("bob"))


@pytest.fixture
def admin(create_key: Callable[..., str], auth: Callable[[str], dict[str, str]]) -> dict[str, str]:
    """Headers of an admin key (owner "root")."""
    return auth(create_key("root", role="admin"))


@pytest.fixture
def create_job(sessions: sessionmaker[Session]) -> Callable[..., Job]:
    """Factory: create_job(owner=, kind=, spec=, state=, created_at=) -> a committed Job.

    The job is inserted queued through db.jobs.create and moved to `state` through the same
    db.jobs transitions the workers use (running means claimed once, attempt 1).
    """

    def create(
        owner: str = "alice",
        kind: str = "echo",
        spec: dict[str, Any] | None = None,
        state: str = JobState.QUEUED,
        queue: str = "cpu",
        priority: int = 0,
        created_at: datetime | None = None,
    ) -> Job:
        with sessions() as session:
            job = jobs.create(
                session,
                kind=kind,
                owner=owner,
                spec=spec if spec is not None else {"message": "hello"},
                queue=queue,
                priority=priority,
            )
            if created_at is not None:
                job.created_at = created_at
            session.commit()
            _move(session, job.id, JobState(state))
            session.commit()
            session.refresh(job)  # the transitions are UPDATEs that bypass the identity map
            return job

    return create


def _move(session: Session, job_id: str, state: JobState) -> None:
    """Drive a queued job to `state` with db.jobs; each step must win."""
    if state is JobState.QUEUED:
        return
    if state is JobState.CANCELLED:
        jobs.request_cancel(session, session.get(Job, job_id))  # type: ignore[arg-type]
        return
    if state is JobState.FAILED:
        assert jobs.fail(session, job_id, None, "RuntimeError", "it broke")
        return
    attempt = jobs.claim(session, job_id, 0, worker="worker-1", device="cpu")
    assert attempt == 1
    if state is JobState.SUCCEEDED:
        assert jobs.succeed(session, job_id, attempt, {"echo": "hello"})


@pytest.fixture
def version_row(sessions):
    """version_row(name, owner=..., family=..., task=...) -> the number of a registered
    version, rows only (no weights file): for what reads the registry, not the weights."""

    def register_one(name: str, owner: str = "alice", family: str = "zoo", task=None) -> int:
        with sessions() as session:
            version = registry.register_version(
                session,
                owner=owner,
                name=name,
                source_job_id=None,
                arch="hf" if family == "hf" else "mlp",
                config={"feature_names": ["a", "b"]},
                metrics={},
                artifact_digest="0" * 64,
                artifact_size=1,
                dataset_digest=None,
                family=family,
                task=task,
            )
            session.commit()
            return version.number

    return register_one


@pytest.fixture
def dataset_row(sessions):
    """dataset_row(owner=...) -> the id of a recorded text dataset (a row, no file)."""

    def add(owner: str = "alice") -> str:
        with sessions() as session:
            row = Dataset(
                owner=owner,
                name="texts.csv",
                format="csv",
                rows=3,
                columns=[{"name": "text", "dtype": "string"}],
                size_bytes=10,
                digest="1" * 64,
                created_at=utcnow(),
            )
            session.add(row)
            session.commit()
            return row.id

    return add
