"""Queue overhead: what a Kiln job costs beyond a plain Celery task, on the same Redis.

Kiln side: N sequential `echo` jobs (no work at all) through the real API and one real Kiln
CPU worker process. For each job it records
  - the POST /api/v1/jobs answer time (client clock),
  - submit -> running: started_at - created_at as the API reports them (server clocks),
  - submit -> finished: finished_at - created_at (server clocks),
  - the round trip: from just before the POST until a GET /api/v1/jobs/<id>, polled every
    --poll-ms, first shows `succeeded` (client clock).
Raw side: a minimal Celery app (JSON, one no-op task, Redis result backend) in its own
worker process with the same pool flags, timing task.delay().get() N times.

Run: python bench/queue_overhead.py [--jobs 200] [--api inprocess|http]
Needs a Redis at KILN_REDIS_URL (default redis://127.0.0.1:6379/14); that database is
FLUSHED at start. The Kiln database is a temporary SQLite file unless KILN_DATABASE_URL is set.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
TERMINAL = {"succeeded", "failed", "cancelled"}
#: Time allowed for the first job (the worker imports torch before it takes work).
STARTUP_TIMEOUT_S = 180.0
JOB_TIMEOUT_S = 30.0


# --- arguments -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Kiln's per-job queue overhead against raw Celery on the same Redis.",
        epilog="The Redis database named by --redis-url is flushed at start.",
    )
    parser.add_argument("--jobs", type=int, default=200, help="timed jobs per side (200)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed jobs first (5)")
    parser.add_argument(
        "--poll-ms", type=float, default=2.0, help="GET interval while waiting (2 ms)"
    )
    parser.add_argument(
        "--api",
        choices=["inprocess", "http"],
        default="inprocess",
        help="inprocess: Flask test client in this process (default); "
        "http: `kiln web` (gunicorn) subprocess driven with requests",
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("KILN_REDIS_URL") or DEFAULT_REDIS_URL
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("KILN_DATABASE_URL", ""),
        help="Kiln's database (default: a SQLite file in a temporary directory)",
    )
    parser.add_argument(
        "--skip-raw", action="store_true", help="measure Kiln only (no raw Celery side)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.jobs < 2 or args.warmup < 1 or args.poll_ms < 0:
        parser.error("need --jobs >= 2, --warmup >= 1 and --poll-ms >= 0")
    return args


# --- processes -----------------------------------------------------------------------------


@contextlib.contextmanager
def process_group(
    name: str, argv: list[str], env: Mapping[str, str], log_dir: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run argv in its own session (so its pool children share its process group); on exit
    SIGTERM the group, and SIGKILL it if it has not stopped within 15 s."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, env=dict(env), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            yield process
        except Exception:
            print(f"--- last lines of {log_path} ---", file=sys.stderr)
            print(_tail(log_path), file=sys.stderr)
            raise
        finally:
            _stop_group(process)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):  # stragglers, or a parent that hung
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def celery_worker_argv(app: str, queue: str, hostname: str) -> list[str]:
    """The pool flags Kiln's launcher gives a CPU worker, used for both sides."""
    return [
        sys.executable, "-m", "celery", "-A", app, "worker",
        "--pool", "prefork", "--concurrency", "1", "--prefetch-multiplier", "1",
        "--queues", queue, "--hostname", f"{hostname}@%h",
        "--without-mingle", "--without-gossip", "--loglevel", "WARNING",
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- measurements --------------------------------------------------------------------------


@dataclass
class Series:
    label: str
    values_ms: list[float] = field(default_factory=list)

    def add_s(self, seconds: float) -> None:
        self.values_ms.append(seconds * 1000)

    def p(self, percent: int) -> float:
        return percentile(self.values_ms, percent)


def percentile(values: list[float], percent: int) -> float:
    """Linear-interpolation percentile (numpy's default), of at least two values."""
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


@dataclass
class KilnRun:
    post: Series = field(default_factory=lambda: Series("Kiln POST /api/v1/jobs answered"))
    to_running: Series = field(
        default_factory=lambda: Series("Kiln submit -> running (started_at - created_at)")
    )
    to_finished: Series = field(
        default_factory=lambda: Series("Kiln submit -> finished (finished_at - created_at)")
    )
    round_trip: Series = field(
        default_factory=lambda: Series("Kiln round trip (POST -> GET shows succeeded)")
    )
    polls: list[int] = field(default_factory=list)


# --- the Kiln side -------------------------------------------------------------------------


Call = Callable[[str, str, dict[str, Any] | None], tuple[int, dict[str, Any]]]


def inprocess_api(settings: Any, key: str) -> Call:
    from web import create_app

    client = create_app(settings).test_client()
    headers = {"Authorization": f"Bearer {key}"}

    def call(method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        response = client.open(path, method=method, json=body, headers=headers)
        return response.status_code, response.get_json()

    return call


def http_api(base_url: str, key: str) -> Call:
    import requests

    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {key}"

    def call(method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        response = http.request(method, base_url + path, json=body, timeout=10)
        return response.status_code, response.json()

    return call


def wait_http_ready(base_url: str, server: subprocess.Popen[bytes]) -> None:
    import requests

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"`kiln web` exited with code {server.returncode}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(base_url + "/healthz", timeout=1).ok:
                return
        time.sleep(0.1)
    raise RuntimeError("`kiln web` did not answer /healthz within 60 s")


def one_job(call: Call, poll_s: float, timeout_s: float, run: KilnRun | None) -> None:
    """Submit one echo job and poll it to the end; record it in `run` unless warming up."""
    started = time.perf_counter()
    status, job = call("POST", "/api/v1/jobs", {"kind": "echo", "spec": {}})
    answered = time.perf_counter()
    if status != 202:
        raise RuntimeError(f"POST /api/v1/jobs answered {status}: {job}")
    path, polls = f"/api/v1/jobs/{job['id']}", 0
    while job["state"] not in TERMINAL:
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError(f"job {job['id']} still {job['state']} after {timeout_s:.0f} s")
        if poll_s:
            time.sleep(poll_s)
        status, job = call("GET", path, None)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {job}")
        polls += 1
    done = time.perf_counter()
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job['id']} ended {job['state']}: {job.get('error')}")
    if run is not None:
        created = datetime.fromisoformat(job["created_at"])
        run.post.add_s(answered - started)
        run.to_running.add_s((datetime.fromisoformat(job["started_at"]) - created).total_seconds())
        run.to_finished.add_s(
            (datetime.fromisoformat(job["finished_at"]) - created).total_seconds()
        )
        run.round_trip.add_s(done - started)
        run.polls.append(polls)


def prepare_database(database_url: str) -> str:
    """Migrate to head and create a user key for the benchmark; returns the key."""
    from db import keys
    from db.engine import make_engine, make_sessionmaker, session_scope
    from db.migrate import upgrade

    upgrade(database_url)
    engine = make_engine(database_url)
    with session_scope(make_sessionmaker(engine)) as session:
        _, plaintext = keys.create(session, owner="bench", role="user")
    engine.dispose()
    return plaintext


@contextlib.contextmanager
def kiln_api(
    args: argparse.Namespace, settings: Any, key: str, env: dict[str, str]
) -> Iterator[Call]:
    """The API as the benchmark drives it: in this process, or a `kiln web` subprocess."""
    if args.api == "inprocess":
        yield inprocess_api(settings, key)
        return
    port = free_port()
    web_env = {**env, "KILN_HOST": "127.0.0.1", "KILN_PORT": str(port)}
    argv = [sys.executable, "-m", "kiln.cli", "web"]
    with process_group("kiln-web", argv, web_env, settings.data_dir) as server:
        base_url = f"http://127.0.0.1:{port}"
        wait_http_ready(base_url, server)
        yield http_api(base_url, key)


def bench_kiln(args: argparse.Namespace, work_dir: Path) -> KilnRun:
    from kiln.settings import Settings

    data_dir = work_dir / "data"
    data_dir.mkdir()
    database_url = args.database_url or f"sqlite:///{data_dir / 'kiln.db'}"
    # No per-key rate limit: polling every few ms is the benchmark's client, not abuse.
    settings = Settings(
        data_dir=data_dir, database_url=database_url, redis_url=args.redis_url, rate_limit=""
    )
    key = prepare_database(settings.resolved_database_url)
    env = {
        **os.environ,
        "KILN_RATE_LIMIT": "",
        "KILN_DATABASE_URL": settings.resolved_database_url,
        "KILN_REDIS_URL": args.redis_url,
        "KILN_DATA_DIR": str(data_dir),
        "CUDA_VISIBLE_DEVICES": "",  # a CPU worker, as the launcher starts one
    }
    run, poll_s = KilnRun(), args.poll_ms / 1000
    argv = celery_worker_argv("workers.main", "interactive.cpu,cpu", "bench-cpu")  # both lanes
    with (
        process_group("kiln-worker", argv, env, work_dir),
        kiln_api(args, settings, key, env) as call,
    ):
        one_job(call, poll_s, STARTUP_TIMEOUT_S, None)
        for _ in range(args.warmup - 1):
            one_job(call, poll_s, JOB_TIMEOUT_S, None)
        for _ in range(args.jobs):
            one_job(call, poll_s, JOB_TIMEOUT_S, run)
    return run


# --- the raw Celery side -------------------------------------------------------------------


def bench_raw_celery(args: argparse.Namespace, work_dir: Path) -> Series:
    sys.path.insert(0, str(BENCH_DIR))
    import raw_celery

    env = {
        **os.environ,
        "KILN_BENCH_REDIS_URL": args.redis_url,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")])),
    }
    series = Series("raw Celery round trip (delay().get())")
    app = raw_celery.make_app(args.redis_url)
    noop = app.tasks["bench.noop"]
    argv = celery_worker_argv("raw_celery", raw_celery.QUEUE, "bench-raw")
    with process_group("raw-celery-worker", argv, env, work_dir):
        noop.delay().get(timeout=STARTUP_TIMEOUT_S)
        for _ in range(args.warmup - 1):
            noop.delay().get(timeout=JOB_TIMEOUT_S)
        for _ in range(args.jobs):
            started = time.perf_counter()
            noop.delay().get(timeout=JOB_TIMEOUT_S)
            series.add_s(time.perf_counter() - started)
    app.close()
    return series


# --- report --------------------------------------------------------------------------------


def report(args: argparse.Namespace, kiln: KilnRun, raw: Series | None, elapsed: float) -> None:
    api = (
        "in-process Flask test client (web.create_app(settings).test_client())"
        if args.api == "inprocess"
        else "`kiln web` subprocess (gunicorn, 2 workers x 4 threads) driven with requests"
    )
    database = args.database_url.split("@")[-1] if args.database_url else "SQLite (temp file)"
    print(f"Kiln queue overhead: {args.jobs} sequential jobs per side, {args.warmup} warm-up")
    print(f"  API: {api}")
    print(f"  Redis: {args.redis_url}   database: {database}   poll every {args.poll_ms:g} ms")
    print("  workers: 1 prefork process each, concurrency 1, prefetch 1")
    print(
        f"  machine: {os.cpu_count()} CPUs, {platform.machine()}, {platform.system()}, "
        f"Python {platform.python_version()}"
    )
    print()
    rows = [kiln.post, kiln.to_running, kiln.to_finished, kiln.round_trip]
    rows += [raw] if raw is not None else []
    width = max(len(s.label) for s in rows)
    print(f"  {'measurement':<{width}}  {'p50 ms':>8}  {'p99 ms':>8}")
    for series in rows:
        print(f"  {series.label:<{width}}  {series.p(50):8.2f}  {series.p(99):8.2f}")
    print(f"  (GETs per Kiln job while polling: median {statistics.median(kiln.polls):g})")
    if raw is not None:
        print()
        print("Ratios Kiln / raw Celery round trip:")
        for series in (kiln.round_trip, kiln.to_running):
            ratios = (series.p(50) / raw.p(50), series.p(99) / raw.p(99))
            print(f"  {series.label:<{width}}  p50 {ratios[0]:5.1f}x   p99 {ratios[1]:5.1f}x")
    print(f"\nTotal time {elapsed:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the worker process groups.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    began = time.monotonic()
    redis.Redis.from_url(args.redis_url).flushdb()
    work = tempfile.mkdtemp(prefix="kiln-bench-")
    print(f"working in {work} (Redis {args.redis_url} flushed)", file=sys.stderr)
    work_dir = Path(work)
    try:
        kiln = bench_kiln(args, work_dir)
        raw = None if args.skip_raw else bench_raw_celery(args, work_dir)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work_dir, ignore_errors=True)
    report(args, kiln, raw, time.monotonic() - began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
