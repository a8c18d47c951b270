"""A dataset built to crash pyarrow (SIGSEGV), uploaded to Kiln served by gunicorn: the file
is refused with 422, and the gunicorn worker that read it lives on and serves the next
request (before the fix it died, taking the client's request with it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

#: 100 KB; pyarrow's JSON reader recurses once per level and crashes past ~20,000.
_BOMB = b'{"a": 1}\n{"x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served(
    tmp_path: Path,
    database_url: str,
    redis_url: str,
    create_key: Callable[..., str],
    wait_until: Callable[..., Any],
) -> Iterator[tuple[str, dict[str, str], psutil.Process]]:
    """`gunicorn web.wsgi:app` with one worker: its URL, a key's headers, the master."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(
        KILN_DATABASE_URL=database_url, KILN_REDIS_URL=redis_url, KILN_DATA_DIR=str(tmp_path)
    )
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("wb") as log:
        master = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "web.wsgi:app", "--bind", f"127.0.0.1:{port}",
             "--workers", "1", "--threads", "2", "--control-socket", str(tmp_path / "ctl")],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        # The port accepts before the worker has booted; a master that exits fails at once.
        wait_until(
            lambda: master.poll() is not None or _healthy(url),
            lambda: f"gunicorn to serve:\n{log_path.read_text()}",
        )
        assert master.poll() is None, log_path.read_text()
        yield url, {"Authorization": f"Bearer {create_key('alice')}"}, psutil.Process(master.pid)
    finally:
        master.terminate()
        master.wait(timeout=60)


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def test_a_jsonl_bomb_is_refused_and_the_gunicorn_worker_survives(served):
    url, headers, master = served
    [worker] = master.children()

    response = requests.post(
        f"{url}/api/v1/datasets",
        files={"file": ("bomb.jsonl", _BOMB)},
        headers=headers,
        timeout=120,
    )

    assert response.status_code == 422, response.text
    assert response.json()["code"] == "unsupported_dataset"
    assert "deeper than 32 levels" in response.json()["detail"]
    assert [w.pid for w in master.children()] == [worker.pid]
    assert requests.get(f"{url}/api/v1/datasets", headers=headers, timeout=30).json() == {
        "datasets": []
    }
