"""Helpers for the ops integration tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import BaseWSGIServer

from db import keys
from db.engine import make_engine, make_sessionmaker, session_scope
from kiln.settings import Settings

ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `check` until it returns something truthy; fail the test naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")


def make_key(database_url: str, owner: str, role: str = "user") -> str:
    engine = make_engine(database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            _, plaintext = keys.create(session, owner=owner, role=role)
    finally:
        engine.dispose()
    return plaintext


@dataclass
class LiveServer:
    """The real app on a real socket (werkzeug, threaded), sending to the real broker."""

    url: str
    settings: Settings
    app: Any
    server: BaseWSGIServer

    def has_route(self, method: str, suffix: str) -> bool:
        return any(
            rule.rule.endswith(suffix) and method in (rule.methods or ())
            for rule in self.app.url_map.iter_rules()
        )


@dataclass
class Worker:
    """A worker process group (launcher or Celery worker) with its output in a file."""

    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(repr=False)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a worker host gets: nothing but the settings' URLs and its own dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "PROMETHEUS_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        KILN_DATA_DIR=str(settings.data_dir),
        KILN_DATABASE_URL=settings.database_url,
        KILN_REDIS_URL=settings.redis_url,
        KILN_HEARTBEAT_TIMEOUT_S="20",
        KILN_LOG_FORMAT="json",
    )
    env.update(extra)
    return env


def launcher_argv() -> list[str]:
    """`kiln worker`: the launcher, as the Procfile runs it."""
    return [sys.executable, "-m", "kiln.cli", "worker"]
