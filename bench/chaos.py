"""Chaos: a mixed load while workers are SIGKILLed and Redis restarts; nothing may be lost.

    PYTHONPATH=. python bench/chaos.py [--jobs 500] [--kills 10] [--redis-restarts 2]

Starts its own Redis (no persistence, on --redis-port), a fresh PostgreSQL schema (or
--database-url), two real Celery workers, a real `kiln deliver` process and an in-process
reconciler, submits the jobs through the real Flask API, and meanwhile SIGKILLs a worker
(the whole worker, or only its pool process) at random moments, kill -9s Redis, and
SIGKILLs the delivery process now and then. Then it waits for quiet and prints: jobs lost,
jobs stuck, duplicate model versions, batch outputs with missing or duplicated rows, and
terminal jobs whose webhook never reached the test receiver with a valid signature. Every
one must be 0 (exit code 1 otherwise).

Every job names a webhook on a receiver in this process (tests/webhook_receiver.py), which
answers 500 to the first try of one message in ten, so retries happen too; signatures are
checked with the `standardwebhooks` package.

Batch jobs score an uploaded CSV of BATCH_ROWS rows in small chunks (so kills land
mid-job) and pass its `row_id` through; every succeeded batch output must hold each
row_id exactly once, in order.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import redis
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from db import keys, migrate
from db.engine import make_engine, make_sessionmaker
from db.models import Job, ModelVersion, WebhookMessage
from kiln import datasets, routing
from kiln.artifacts import open_store
from kiln.broker import make_celery
from kiln.settings import Settings
from kiln.states import TERMINAL_STATES
from tests.webhook_receiver import Received, Receiver
from web import create_app
from workers.launch import WorkerProcess
from workers.scheduler import reconcile_once

ROOT = Path(__file__).resolve().parents[1]
DIGITS_FEATURES = 64
BATCH_ROWS = 4000


def main() -> int:
    args = _arguments()
    logging.getLogger("workers.reconcile").setLevel(logging.ERROR)  # counted instead
    logging.getLogger("db.submission").setLevel(logging.CRITICAL)  # sends fail while Redis is down
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kiln-chaos-"))
    schema_url, drop_schema = _database(args.database_url)
    redis_server = _Redis(args.redis_port, work)
    settings = Settings(
        data_dir=work / "data",
        database_url=schema_url,
        redis_url=redis_server.url,
        heartbeat_timeout_s=3.0,
        resend_after_s=3.0,
        # Kills are aimed at random, so one job may be hit several times; it must survive.
        max_attempts=20,
        retry_backoff_s=0.5,
        retry_backoff_max_s=2.0,
        rate_limit="",
        max_queued_per_owner=100_000,
        chaos=True,
        webhook_allow_private=True,  # the receiver is on 127.0.0.1
        webhook_timeout_s=2.0,
        webhook_lease_s=3.0,
        webhook_retry_base_s=0.2,
        webhook_retry_max_s=1.0,
        webhook_poll_s=0.2,
    )
    started = time.monotonic()
    receiver = Receiver(_flaky_receiver)
    workers = [_Worker(f"chaos{n}", settings, work) for n in range(args.workers)]
    deliverer = _Deliverer(settings, work)
    stop_reconciler = threading.Event()
    reconciler = threading.Thread(target=_reconcile_loop, args=(settings, stop_reconciler))
    reconciler.start()
    try:
        app = create_app(settings)
        client = app.test_client()
        sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
        with sessions() as session:
            _, key = keys.create(session, owner="chaos")
            session.commit()
        headers = {"Authorization": f"Bearer {key}"}
        secret = client.get("/api/v1/webhooks/secret", headers=headers).get_json()["secret"]
        receiver.secrets = [secret]  # verified on arrival: the timestamp window is 5 min
        _seed_model(client, headers, sessions)
        dataset_id = _seed_dataset(client, headers, rng)
        plan = mix(rng, args.jobs, dataset_id)
        submitted: list[str] = []
        rejected: list[int] = []
        submitter = threading.Thread(
            target=_submit_all,
            args=(client, headers, plan, submitted, rejected, args.rate, receiver.url),
        )
        submitter.start()
        events = _chaos(rng, workers, redis_server, args, submitter, sessions, deliverer)
        submitter.join()
        quiet = _wait_for_quiet(sessions, submitted, args.quiet_timeout)
        drained = _wait_for_outbox(sessions, submitted, args.quiet_timeout)
        report = verify(sessions, settings, submitted, rejected)
        report |= verify_webhooks(sessions, submitted, receiver.snapshot())
    finally:
        stop_reconciler.set()
        reconciler.join()
        for worker in workers:
            worker.stop()
        deliverer.stop()
        receiver.close()
        redis_server.stop()
        drop_schema()
    elapsed = time.monotonic() - started
    print(f"chaos: {len(plan)} jobs {dict(collections.Counter(k for k, _ in plan))}")
    print(f"chaos: events {events}; quiet after {quiet:.1f} s; webhooks drained after "
          f"{drained:.1f} s more; total {elapsed:.1f} s")  # fmt: skip
    print(f"chaos: reconciler {dict(RECONCILED)}")
    for name, value in report.items():
        print(f"  {name:<34} {value}")
    bad = [name for name in MUST_BE_ZERO if report[name]]
    print("chaos: PASS" if not bad else f"chaos: FAIL ({', '.join(bad)})")
    return 1 if bad else 0


def mix(rng: random.Random, total: int, dataset_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The load: mostly short echo jobs, some predictions, a few training and batch runs."""
    batch = {"model": "chaos-base", "dataset": dataset_id, "chunk_rows": 250,
             "passthrough": ["row_id"], "output_format": "csv"}  # fmt: skip
    factories: list[tuple[float, str, Callable[[int], dict[str, Any]]]] = [
        (0.83, "echo", lambda n: {"message": f"e{n}", "sleep_s": rng.choice([0, 0.1, 0.5, 1])}),
        (0.10, "predict", lambda n: {"model": "chaos-base", "inputs": [_row(rng)] * 4}),
        (
            0.04,
            "train",
            lambda n: {"model_name": f"chaos-{n}", "epochs": 2, "arch_params": {"hidden": [16]}},
        ),
        (0.03, "batch_predict", lambda n: batch),
    ]
    weights = [w for w, _, _ in factories]
    plan = []
    for n in range(total):
        _, kind, factory = rng.choices(factories, weights)[0]
        plan.append((kind, factory(n)))
    return plan


MUST_BE_ZERO = (
    "jobs lost",
    "jobs stuck",
    "jobs failed",
    "duplicate model versions",
    "train jobs without a version",
    "batch outputs missing/dup rows",
    "terminal jobs without a signed webhook",
)


def verify(
    sessions: Any, settings: Settings, submitted: list[str], rejected: list[int]
) -> dict[str, Any]:
    with sessions() as session:
        rows = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(submitted)))}
        per_job = session.execute(
            select(ModelVersion.source_job_id, func.count())
            .where(ModelVersion.source_job_id.is_not(None))
            .group_by(ModelVersion.source_job_id)
        ).all()
    versions = dict(per_job)
    states = collections.Counter(j.state for j in rows.values())
    failed = [j for j in rows.values() if j.state == "failed"]
    trained = [j for j in rows.values() if j.kind == "train" and j.state == "succeeded"]
    scored = [j for j in rows.values() if j.kind == "batch_predict" and j.state == "succeeded"]
    store = open_store(settings)
    return {
        "submitted (202)": len(submitted),
        "submissions refused (non-202)": len(rejected),
        "states": dict(states),
        "attempts > 1": sum(1 for j in rows.values() if j.attempt > 1),
        "jobs lost": len(set(submitted) - rows.keys()) + len(rejected),
        "jobs stuck": sum(1 for j in rows.values() if j.state not in TERMINAL_STATES),
        "jobs failed": len(failed),
        "failure reasons": dict(collections.Counter(f"{j.error_type}" for j in failed)),
        "duplicate model versions": sum(1 for n in versions.values() if n > 1),
        "train jobs without a version": sum(1 for j in trained if j.id not in versions),
        "batch outputs checked": len(scored),
        "batch outputs missing/dup rows": sum(1 for j in scored if not _whole(store, j)),
    }


def verify_webhooks(
    sessions: Any, submitted: list[str], received: list[Received]
) -> dict[str, Any]:
    """Every terminal job's terminal event reached the receiver at least once, with a
    signature the reference library accepts; duplicates (at least once) are counted."""
    with sessions() as session:
        ended = dict(
            session.execute(
                select(Job.id, Job.state).where(
                    Job.id.in_(submitted), Job.state.in_(list(TERMINAL_STATES))
                )
            ).all()
        )
        outbox = collections.Counter(
            state
            for (state,) in session.execute(
                select(WebhookMessage.state).where(WebhookMessage.job_id.in_(submitted))
            )
        )
    arrived: set[tuple[str, str]] = set()
    bad_signatures = 0
    for request in received:
        body = request.verified_on_arrival
        if body is None:
            bad_signatures += 1
            continue
        arrived.add((body["data"]["id"], body["type"]))
    ids = collections.Counter(r.webhook_id for r in received)
    return {
        "webhook messages by state": dict(outbox),
        "webhook requests received": len(received),
        "webhook requests with a bad signature": bad_signatures,
        "webhook messages received twice or more": sum(1 for n in ids.values() if n > 1),
        "terminal jobs without a signed webhook": sum(
            1 for job_id, state in ended.items() if (job_id, f"job.{state}") not in arrived
        ),
    }


def _flaky_receiver(request: Received, earlier: int) -> int:
    """500 to the first try of one message in ten (decided by its id), 200 otherwise."""
    return 500 if earlier == 0 and int(request.webhook_id[-2:], 16) % 10 == 0 else 200


def _whole(store: Any, job: Job) -> bool:
    """Whether the batch job's output holds every input row_id exactly once, in order."""
    output = (job.result or {})["output"]
    path = store.path(output["digest"])
    ids = [
        row_id
        for batch in datasets.iter_batches(path, output["format"], 10_000)
        for row_id in batch.column("row_id").to_pylist()
    ]
    return ids == list(range(BATCH_ROWS))


def _row(rng: random.Random) -> list[float]:
    return [float(rng.randint(0, 16)) for _ in range(DIGITS_FEATURES)]


def _seed_model(client: Any, headers: dict[str, str], sessions: Any) -> None:
    """Train the model the predictions use, before any chaos."""
    spec = {"model_name": "chaos-base", "epochs": 2, "arch_params": {"hidden": [16]}}
    job = client.post("/api/v1/jobs", json={"kind": "train", "spec": spec}, headers=headers)
    job_id = job.get_json()["id"]
    _wait_for_quiet(sessions, [job_id], 180)


def _seed_dataset(client: Any, headers: dict[str, str], rng: random.Random) -> str:
    """Upload the CSV the batch jobs score: row_id plus the digits model's 64 features."""
    header = ",".join(["row_id", *(f"pixel_{i}" for i in range(DIGITS_FEATURES))])
    lines = [header, *(",".join(map(str, [n, *_row(rng)])) for n in range(BATCH_ROWS))]
    body = io.BytesIO("\n".join(lines).encode())
    response = client.post("/api/v1/datasets", data={"file": (body, "chaos.csv")}, headers=headers)
    assert response.status_code == 201, response.get_json()
    return str(response.get_json()["id"])


def _submit_all(
    client: Any,
    headers: dict[str, str],
    plan: list[tuple[str, dict[str, Any]]],
    submitted: list[str],
    rejected: list[int],
    rate: float,
    webhook_url: str,
) -> None:
    for kind, spec in plan:
        response = client.post(
            "/api/v1/jobs",
            json={"kind": kind, "spec": spec, "webhook_url": webhook_url},
            headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
        )
        if response.status_code == 202:
            submitted.append(response.get_json()["id"])
        else:
            rejected.append(response.status_code)
        time.sleep(1 / rate)


def _chaos(
    rng: random.Random,
    workers: list[_Worker],
    server: _Redis,
    args: argparse.Namespace,
    submitter: threading.Thread,
    sessions: Any,
    deliverer: _Deliverer,
) -> dict[str, int]:
    """Kill workers at random moments (and restart Redis twice, and the delivery process
    now and then) until the quotas are met."""
    events = collections.Counter[str]()
    redis_at = sorted(rng.sample(range(1, args.kills), min(args.redis_restarts, args.kills - 1)))
    kills = 0
    while kills < args.kills:
        time.sleep(rng.uniform(1.0, 4.0))
        worker = _busy_worker(rng, workers, sessions)
        if rng.random() < 0.5:
            worker.kill_all()
            events["worker SIGKILL (whole worker)"] += 1
        elif worker.kill_pool():
            events["worker SIGKILL (pool process)"] += 1
        else:
            continue  # that worker is still starting: no pool process to kill yet
        kills += 1
        if rng.random() < 0.3:
            deliverer.kill_and_restart()
            events["deliverer SIGKILL"] += 1
        if kills in redis_at:
            server.restart()
            events["redis kill -9 + restart"] += 1
    return dict(events)


def _busy_worker(rng: random.Random, workers: list[_Worker], sessions: Any) -> _Worker:
    """A worker that is running a job right now, when there is one: that is the kill that
    tests recovery (killing an idle worker only tests restarts)."""
    with sessions() as session:
        running = set(session.scalars(select(Job.worker).where(Job.state == "running")))
    busy = [w for w in workers if any(str(h).startswith(f"{w.name}@") for h in running)]
    return rng.choice(busy or workers)


def _wait_for_outbox(sessions: Any, ids: list[str], timeout_s: float) -> float:
    """Wait until no message of these jobs is pending (delivered, or given up)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        with sessions() as session:
            pending = session.scalar(
                select(func.count())
                .select_from(WebhookMessage)
                .where(WebhookMessage.job_id.in_(ids), WebhookMessage.state == "pending")
            )
        if not pending:
            break
        time.sleep(0.5)
    return time.monotonic() - started


def _wait_for_quiet(sessions: Any, ids: list[str], timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        with sessions() as session:
            open_jobs = session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.id.in_(ids), Job.state.not_in(list(TERMINAL_STATES)))
            )
        if not open_jobs:
            break
        time.sleep(0.5)
    return time.monotonic() - started


#: What the reconciler did over the whole run, summed over its sweeps.
RECONCILED: collections.Counter[str] = collections.Counter()


def _reconcile_loop(settings: Settings, stop: threading.Event) -> None:
    celery = make_celery(settings)
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    while not stop.wait(1.0):
        try:
            report = reconcile_once(celery, sessions, settings)
        except Exception:  # Redis is down right now: the next sweep tries again
            RECONCILED["sweeps failed (broker down)"] += 1
            continue
        RECONCILED.update({k: v for k, v in dataclasses.asdict(report).items() if v})


class _Redis:
    def __init__(self, port: int, work: Path) -> None:
        self.port, self.work = port, work
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(argv, cwd=self.work, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis did not start")

    def restart(self) -> None:
        self.stop()
        time.sleep(1.0)  # clients see it down for a moment
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


class _Worker:
    """A real worker in its own process group, restarted at once after each kill."""

    def __init__(self, name: str, settings: Settings, work: Path) -> None:
        self.name, self.settings = name, settings
        self.log = (work / f"{name}.log").open("ab")
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
        for field, value in self.settings.model_dump().items():
            if value is not None:
                env[f"KILN_{field.upper()}"] = str(value)
        argv = WorkerProcess(name=self.name, queues=routing.CPU_QUEUES_BOTH_LANES, env={}).argv()
        return subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def kill_all(self) -> None:
        """SIGKILL the main process and its pool together, then start a fresh worker."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = self._start()

    def kill_pool(self) -> int:
        """SIGKILL only the pool process (billiard starts another); 0 if none exists yet."""
        children = psutil.Process(self.process.pid).children()
        for child in children:
            child.kill()
        return 1 if children else 0

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


class _Deliverer:
    """A real `kiln deliver` process in its own process group."""

    def __init__(self, settings: Settings, work: Path) -> None:
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for field, value in settings.model_dump().items():
            if value is not None:
                self.env[f"KILN_{field.upper()}"] = str(value)
        self.log = (work / "deliver.log").open("ab")
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "kiln.cli", "deliver"], cwd=ROOT, env=self.env,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def kill_and_restart(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = self._start()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


def _database(url: str | None) -> tuple[str, Callable[[], None]]:
    """The database to use: --database-url as given, or a fresh PostgreSQL schema."""
    if url:
        migrate.upgrade(url)
        return url, lambda: None
    base = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    schema = f"chaos_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    schema_url = (
        make_url(base)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )
    migrate.upgrade(schema_url)

    def drop() -> None:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    return schema_url, drop


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--redis-restarts", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=25.0, help="submissions per second")
    parser.add_argument("--redis-port", type=int, default=6399)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quiet-timeout", type=float, default=420.0)
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
