"""Real parts for the ops tests: a PostgreSQL schema, a Redis database, the web app served
over HTTP, and worker launchers as subprocesses (the way `kiln worker` runs in production)."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest
import redis
from ops_support import ROOT, LiveServer, Worker
from sqlalchemy import Engine
from werkzeug.serving import make_server

from kiln.settings import Settings
from tests.conftest import postgres_schema
from web import create_app

REDIS_URL = os.environ.get("KILN_TEST_REDIS_URL", "redis://127.0.0.1:6379")


@pytest.fixture(scope="module")
def pg_url(postgres_server: Engine) -> Iterator[str]:
    """A fresh PostgreSQL schema migrated to head, shared by a test module."""
    with postgres_schema(postgres_server) as url:
        yield url


@pytest.fixture(scope="module")
def broker_url() -> Iterator[str]:
    """An emptied Redis database for this module's Celery messages (KILN_TEST_REDIS_URL)."""
    url = urlsplit(REDIS_URL)._replace(path="/9").geturl()  # its own database number
    connection = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        connection.flushdb()
    except redis.RedisError as exc:
        pytest.skip(f"Redis unreachable at {REDIS_URL} (KILN_TEST_REDIS_URL): {exc}")
    yield url
    connection.flushdb()
    connection.close()


@pytest.fixture(scope="module")
def serve() -> Iterator[Callable[[Settings], LiveServer]]:
    """Factory: serve(settings) -> a LiveServer, stopped after the module."""
    started: list[LiveServer] = []

    def start(settings: Settings) -> LiveServer:
        app = create_app(settings)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        live = LiveServer(f"http://127.0.0.1:{server.server_port}", settings, app, server)
        started.append(live)
        return live

    yield start
    for live in started:
        live.server.shutdown()
        live.app.extensions["kiln.engine"].dispose()


@pytest.fixture(scope="module")
def start_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Worker]]:
    """Factory: start_worker(argv, env) -> a running Worker, stopped after the module."""
    started: list[Worker] = []

    def start(argv: list[str], env: dict[str, str]) -> Worker:
        log_path = tmp_path_factory.mktemp("worker") / "output.log"
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        worker = Worker(process, log_path, env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
