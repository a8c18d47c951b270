"""A real Kiln (gunicorn web, a Celery worker subprocess, Redis, SQLite) and a real Chromium."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from db import keys, migrate
from db.engine import make_engine, make_sessionmaker
from tests.redis_claim import claimed_database

CHROMIUM = os.environ.get("KILN_TEST_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
#: Flags for Debian's Chromium in a container with no network and no GPU.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@dataclass(frozen=True)
class Server:
    url: str
    key: str
    data_dir: Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # A session of its own, so teardown can stop the process and every child it started.
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _wait_until_up(url: str, processes: list[subprocess.Popen[bytes]], logs: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            break
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs.glob("*.log"))
    raise RuntimeError(f"Kiln did not come up at {url}\n{tails}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Kiln as `kiln web` and `kiln worker` run it, on a fresh SQLite file and a Redis
    database of the module's own (skipped without Redis)."""
    with claimed_database() as redis_url:
        yield from _serve(tmp_path_factory.mktemp("kiln-e2e"), redis_url)


def _serve(tmp: Path, redis_url: str) -> Iterator[Server]:
    database_url = f"sqlite:///{tmp / 'kiln.db'}"
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    with make_sessionmaker(engine)() as session:
        _, key = keys.create(session, owner="alice")
        session.commit()
    engine.dispose()
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "KILN_DATA_DIR": str(tmp / "data"),
        "KILN_DATABASE_URL": database_url,
        "KILN_REDIS_URL": redis_url,
        "KILN_PORT": str(port),
        "KILN_GPUS": "none",
        "KILN_CPU_WORKERS": "1",
    }
    env.pop("KILN_SECRET_KEY", None)  # the web generates and keeps one in the data dir
    cli = [sys.executable, "-m", "kiln.cli"]
    processes = [
        _start([*cli, "web"], env, tmp / "web.log"),
        _start([*cli, "worker"], env, tmp / "worker.log"),
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, processes, tmp)
        yield Server(url=url, key=key, data_dir=tmp / "data")
    finally:
        for process in processes:
            _stop(process)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (never a downloaded browser)."""
    if not (Path(CHROMIUM).exists() and shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (see .ci/run)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    opened = context.new_page()
    opened.set_default_timeout(30_000)
    yield opened
    context.close()
