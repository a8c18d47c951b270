"""Integration fixtures: a Redis database of the test's own, real Celery worker processes,
and the app wired to both, on the fresh database (SQLite file or PostgreSQL schema) that
tests/conftest.py's `database_url` gives each test.

Nothing here is eager or mocked: jobs travel web → Redis → worker process → database.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from celery import Celery
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

from kiln import routing
from kiln.broker import make_celery
from kiln.settings import Settings
from kiln.states import TERMINAL_STATES
from tests.redis_claim import claimed_database
from web import create_app
from workers import scheduler
from workers.launch import WorkerProcess
from workers.reconcile import Report

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Short, so that a killed worker's job looks lost after seconds, not minutes.
HEARTBEAT_TIMEOUT_S = 4.0
#: Bounds for waits on a loaded 2-core machine: generous, and each fails with a message.
WORKER_READY_S = 90.0
JOB_TIMEOUT_S = 90.0

T = TypeVar("T")


def wait_until(
    check: Callable[[], T | None],
    what: str | Callable[[], str],
    timeout: float = JOB_TIMEOUT_S,
    every: float = 0.1,
) -> T:
    """Poll `check` until it returns something truthy, and return that; fail the test,
    saying what it waited for (`what`, or what it returns then), once `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            waited_for = what if isinstance(what, str) else what()
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {waited_for}")
        time.sleep(every)


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., Any]:
    """wait_until(check, what, timeout=..., every=...): the bounded polling helper."""
    return wait_until


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database no other test run uses meanwhile, emptied before and after."""
    with claimed_database() as url:
        yield url


@pytest.fixture
def live_settings(tmp_path: Path, database_url: str, redis_url: str) -> Settings:
    """Settings shared by the test, its app and its workers: real database, real Redis."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        redis_url=redis_url,
        heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
        max_attempts=3,
    )


class Worker:
    """One `celery worker` process (and its pool child), as the launcher starts it."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = WORKER_READY_S) -> None:
        ready = re.compile(rf"^.*\b{re.escape(self.name)}@\S+ ready\.", re.MULTILINE)
        deadline = time.monotonic() + timeout
        while not ready.search(self.log()):
            if self.process.poll() is not None:
                pytest.fail(
                    f"worker {self.name} exited ({self.process.returncode}):\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"worker {self.name} not ready after {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.1)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the worker and its pool child at once: an OOM kill, a lost machine."""
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def clean_env(**kiln: str) -> dict[str, str]:
    """This process's environment without any KILN_* variable, plus `kiln` as KILN_<NAME>."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update({f"KILN_{name.upper()}": value for name, value in kiln.items()})
    return env


@pytest.fixture
def start_worker(live_settings: Settings, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Factory: start_worker(lane=None, **settings) -> a ready CPU worker (w1, w2, ...) on
    the test's settings (and `settings` as KILN_<NAME>), serving both CPU lanes, or only
    `lane`'s queue as the launcher plans it.

    The command line is the launcher's own (workers.launch), so concurrency 1 and prefetch 1
    are what production runs. Each worker gets a session (process group) of its own.
    """
    workers: list[Worker] = []
    numbers = itertools.count(1)
    env = clean_env(
        data_dir=str(live_settings.data_dir),
        database_url=live_settings.resolved_database_url,
        redis_url=live_settings.redis_url,
        heartbeat_timeout_s=str(live_settings.heartbeat_timeout_s),
    )

    def start(lane: routing.Lane | None = None, **kiln: str) -> Worker:
        spec = WorkerProcess(
            name=f"w{next(numbers)}",
            queues=routing.lane_queues(lane, None) if lane else routing.CPU_QUEUES_BOTH_LANES,
            env={"CUDA_VISIBLE_DEVICES": ""},  # CPU only, as the launcher's CPU workers
        )
        log_path = tmp_path / f"{spec.name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                spec.argv(),
                cwd=REPO_ROOT,
                env={**env, **{f"KILN_{k.upper()}": v for k, v in kiln.items()}, **spec.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(spec.name, process, log_path)
        workers.append(worker)
        worker.wait_ready()
        return worker

    yield start
    # The test is over: no need to wait for a warm shutdown (seconds on a loaded machine).
    for worker in workers:
        worker.kill()


@pytest.fixture
def worker(start_worker: Callable[[], Worker]) -> Worker:
    """One ready worker serving both CPU lanes' queues."""
    return start_worker()


@pytest.fixture
def celery_app(live_settings: Settings) -> Iterator[Celery]:
    """A Celery app on the test's Redis, for sending messages and reading queue lengths."""
    app = make_celery(live_settings)
    yield app
    app.close()


@pytest.fixture
def reconcile_once(
    live_settings: Settings, sessions: sessionmaker[Session], celery_app: Celery
) -> Callable[[], Report]:
    """One reconciler pass exactly as the scheduler runs it (real sends, real broker reads)."""

    return lambda: scheduler.reconcile_once(celery_app, sessions, live_settings)


class Api:
    """The JSON API through Flask's test client, as one user; jobs really go to Redis."""

    def __init__(self, client: FlaskClient, key: str) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {key}"}

    def get(self, path: str) -> Any:
        return self._ok(self.client.get(f"/api/v1{path}", headers=self.headers), 200)

    def submit(self, kind: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {"kind": kind, "spec": spec or {}}
        return self._ok(self.client.post("/api/v1/jobs", json=body, headers=self.headers), 202)

    def cancel(self, job_id: str) -> dict[str, Any]:
        response = self.client.post(f"/api/v1/jobs/{job_id}/cancel", headers=self.headers)
        return self._ok(response, 202)

    def upload(self, filename: str, content: bytes) -> dict[str, Any]:
        response = self.client.post(
            "/api/v1/datasets",
            data={"file": (io.BytesIO(content), filename)},
            headers=self.headers,
            content_type="multipart/form-data",
        )
        return self._ok(response, 201)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/jobs/{job_id}")  # type: ignore[no-any-return]

    def wait_for(self, job_id: str, state: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
        """Poll the job until it is in `state`; fail at once if it finishes otherwise."""
        last: dict[str, Any] = {}

        def reached() -> dict[str, Any] | None:
            last.update(self.job(job_id))
            if last["state"] != state and last["state"] in TERMINAL_STATES:
                pytest.fail(f"job {job_id} ended {last['state']} while waiting for {state}: {last}")
            return dict(last) if last["state"] == state else None

        return wait_until(reached, lambda: f"job {job_id} to be {state}; last: {last}", timeout)

    @staticmethod
    def _ok(response: TestResponse, status: int) -> Any:
        assert response.status_code == status, response.get_data(as_text=True)
        return response.get_json()


@pytest.fixture
def api(live_settings: Settings, create_key: Callable[..., str]) -> Iterator[Api]:
    """The app on the test's settings, sending jobs with real Celery, as user alice."""
    app = create_app(live_settings)
    app.config["TESTING"] = True
    yield Api(app.test_client(), create_key("alice"))
    app.extensions["kiln.stream_hub"].stop()
    app.extensions["kiln.engine"].dispose()
    app.extensions["kiln.celery"].close()
