"""Integration fixtures: Redis servers the test starts and restarts itself, real Celery
worker processes, and a PostgreSQL schema per test (the database workers share)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.engine import make_engine, make_sessionmaker
from db.models import Job
from kiln import routing
from kiln.broker import make_celery, send_run
from kiln.settings import Settings
from tests.conftest import postgres_schema
from workers.launch import WorkerProcess

ROOT = Path(__file__).resolve().parents[3]


def _spare_redis_port() -> int:
    """First port for Redis servers the tests start and kill themselves: the one after
    KILN_TEST_REDIS_URL's (each parallel checkout owns a small block), else 6396."""
    if "KILN_TEST_SPARE_REDIS_PORT" in os.environ:
        return int(os.environ["KILN_TEST_SPARE_REDIS_PORT"])
    shared = os.environ.get("KILN_TEST_REDIS_URL")
    port = urlsplit(shared).port if shared else None
    return port + 1 if port else 6396


SPARE_REDIS_PORT = _spare_redis_port()


def wait_until(condition: Callable[[], Any], timeout_s: float = 60.0, what: str = "") -> Any:
    """Poll `condition` until it returns something truthy; fail the test past the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what or condition}")


class RedisServer:
    """A redis-server this test owns: start, stop, restart (same arguments), save."""

    def __init__(self, port: int, extra: list[str], workdir: Path) -> None:
        self.port, self.extra, self.workdir = port, extra, workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", *self.extra]
        self.process = subprocess.Popen(
            argv, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.port)
        wait_until(lambda: _pings(client), 10, f"redis on port {self.port}")
        client.close()

    def stop(self) -> None:
        """Stop at once, writing nothing (SIGKILL: what a crash or OOM kill does)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Factory: redis_server(*extra args) -> a started RedisServer on the spare port."""
    servers: list[RedisServer] = []

    def start(*extra: str) -> RedisServer:
        server = RedisServer(SPARE_REDIS_PORT + len(servers), list(extra), tmp_path)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def database_url(postgres_server: Engine) -> Iterator[str]:
    """Integration tests share one database between the test and its worker processes:
    PostgreSQL only, as in production (overrides the root conftest's sqlite/postgresql)."""
    with postgres_schema(postgres_server) as url:
        yield url


def worker_settings(tmp_path: Path, database_url: str, redis_url: str, **extra: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        redis_url=redis_url,
        heartbeat_timeout_s=extra.pop("heartbeat_timeout_s", 2.0),
        resend_after_s=extra.pop("resend_after_s", 1.0),
        chaos=True,
        **extra,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The KILN_* environment that reproduces `settings` in a worker process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"KILN_{name.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
    return env


class Worker:
    """A real `celery worker` (prefork, concurrency 1) in its own process group."""

    def __init__(self, name: str, settings: Settings, log_path: Path) -> None:
        argv = WorkerProcess(name=name, queues=routing.CPU_QUEUES_BOTH_LANES, env={}).argv()
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**settings_env(settings), "CUDA_VISIBLE_DEVICES": ""},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def signal(self, sig: int) -> None:
        """Signal the whole process group (main process and pool), as the Supervisor does."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def wait(self, timeout_s: float = 60) -> int:
        return self.process.wait(timeout_s)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.signal(signal.SIGKILL)
            self.process.wait(10)
        self.log.close()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Factory: start_worker(settings) -> a running Worker; all are killed at teardown."""
    started: list[Worker] = []

    def start(settings: Settings, name: str | None = None) -> Worker:
        worker = Worker(
            name or f"w{len(started)}", settings, tmp_path / f"worker{len(started)}.log"
        )
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def celery_for() -> Iterator[Callable[[Settings], Celery]]:
    apps: list[Celery] = []

    def make(settings: Settings) -> Celery:
        app = make_celery(settings)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def worker_sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def submit(
    sessions: sessionmaker[Session], celery: Celery | None, spec: dict[str, Any], **kw: Any
) -> Job:
    """What POST /jobs does: insert the queued row, commit, send, record the send."""
    with sessions() as session:
        job = jobs.create(
            session, kind=kw.get("kind", "echo"), owner="alice", spec=spec, queue="cpu"
        )
        session.commit()
        if celery is not None:
            send_run(celery, job.id, job.attempt, job.queue, job.priority)
            jobs.mark_sent(session, job.id, job.attempt)
            session.commit()
        return job


def job_row(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job
