"""A train job survives its worker being SIGKILLed: after the reconciler re-queues it, a new
worker resumes from the last checkpoint and registers exactly one model version.

Real parts throughout: Celery worker subprocesses, Redis (KILN_TEST_REDIS_URL) and
PostgreSQL. The worker fixture is local to this module (no shared integration fixtures yet).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.models import Job, JobEvent, Metric, ModelVersion
from kiln.broker import make_celery, send_run
from kiln.settings import Settings
from workers.scheduler import reconcile_once

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]

ROOT = Path(__file__).resolve().parents[2]
#: Generous: worker start-up imports torch, and CI machines are small and shared.
DEADLINE_S = 300


@pytest.fixture
def worker_settings(tmp_path: Path, database_url: str, redis_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=database_url, redis_url=redis_url)


@pytest.fixture
def start_worker(
    worker_settings: Settings, tmp_path: Path
) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """start_worker(name) -> a real Celery worker process, leader of its own process group."""
    started: list[subprocess.Popen[bytes]] = []
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "KILN_DATABASE_URL": worker_settings.database_url,
        "KILN_REDIS_URL": worker_settings.redis_url,
        "KILN_DATA_DIR": str(worker_settings.data_dir),
        "CUDA_VISIBLE_DEVICES": "",
    }

    def start(name: str) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable, "-m", "celery", "-A", "workers.main", "worker",
            "--hostname", f"{name}@%h", "--queues", "cpu", "--concurrency", "1",
            "--prefetch-multiplier", "1", "--pool", "prefork", "--loglevel", "INFO",
            "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        log = (tmp_path / f"{name}.log").open("wb")
        process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _wait_for(what: str, check: Callable[[], bool], logs: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs.glob("*.log"))
            pytest.fail(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.2)


def test_sigkilled_worker_job_resumes_from_its_checkpoint_on_attempt_2(
    start_worker: Callable[[str], subprocess.Popen[bytes]],
    worker_settings: Settings,
    sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    spec = {
        "model_name": "digits",
        "dataset": "builtin:digits",
        "arch_params": {"hidden": [256, 128]},
        # Long enough (seconds, on a fast machine) that the kill lands mid-training: the
        # first metrics reach the database only after the 0.5 s flush interval.
        "epochs": 100,
        "batch_size": 16,
        "device": "cpu",
    }
    with sessions() as session:
        job = jobs.create(session, kind="train", owner="alice", spec=spec, queue="cpu")
        session.commit()
        job_id = job.id
    celery = make_celery(worker_settings)
    send_run(celery, job_id, 0, "cpu", 0)
    first = start_worker("first")

    def epochs_done() -> int:
        with sessions() as session:
            return session.scalar(
                select(func.count()).where(Metric.job_id == job_id, Metric.name == "val_loss")
            )

    _wait_for("two epochs on the first worker", lambda: epochs_done() >= 2, tmp_path)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    with sessions() as session:
        killed = session.get(Job, job_id)
        assert killed is not None
        assert (killed.state, killed.attempt) == ("running", 1)
        assert epochs_done() < spec["epochs"]  # killed mid-training, not after it

    start_worker("second")
    # The lost worker stops heartbeating; a short timeout lets the reconciler see it now.
    recovering = worker_settings.model_copy(update={"heartbeat_timeout_s": 1.0})

    def requeued() -> bool:
        report = reconcile_once(celery, sessions, recovering)
        return report.requeued == 1

    _wait_for("the reconciler to re-queue the job", requeued, tmp_path)

    def finished() -> bool:
        with sessions() as session:
            state = session.scalar(select(Job.state).where(Job.id == job_id))
            return state in ("succeeded", "failed", "cancelled")

    _wait_for("the second attempt to finish", finished, tmp_path)
    with sessions() as session:
        done = session.get(Job, job_id)
        assert done is not None
        assert (done.state, done.attempt) == ("succeeded", 2), done.error_message
        assert done.result is not None
        log = list(
            session.scalars(
                select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            )
        )
        versions = session.scalar(
            select(func.count())
            .select_from(ModelVersion)
            .where(ModelVersion.source_job_id == job_id)
        )
        steps = sorted(
            session.scalars(
                select(Metric.step).where(Metric.job_id == job_id, Metric.name == "val_loss")
            )
        )
    resumes = [m for m in log if m.startswith("resuming from checkpoint")]
    assert len(resumes) == 1, log
    resumed_at = int(re.search(r"epoch (\d+)", resumes[0]).group(1))  # type: ignore[union-attr]
    assert resumed_at > 1
    assert done.result["resumed_from_epoch"] == resumed_at
    # The first epoch reported after resuming is the checkpoint's, not epoch 1.
    after = log[log.index(resumes[0]) :]
    first_epoch_after = next(m for m in after if re.match(r"epoch \d+:", m))
    assert first_epoch_after.startswith(f"epoch {resumed_at}:")
    assert versions == 1
    assert steps == list(range(1, spec["epochs"] + 1))  # one series, no gap, no duplicate


def test_ddp_job_spawns_gloo_ranks_inside_a_real_worker(
    start_worker: Callable[[str], subprocess.Popen[bytes]],
    worker_settings: Settings,
    sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    # Celery's prefork pool runs jobs in a child process; spawning ranks from there must work.
    spec = {"model_name": "ddp", "epochs": 2, "gpus": 2, "device": "cpu"}
    with sessions() as session:
        job_id = jobs.create(session, kind="train", owner="alice", spec=spec, queue="cpu").id
        session.commit()
    send_run(make_celery(worker_settings), job_id, 0, "cpu", 0)
    start_worker("ddp")

    def finished() -> bool:
        with sessions() as session:
            state = session.scalar(select(Job.state).where(Job.id == job_id))
            return state in ("succeeded", "failed", "cancelled")

    _wait_for("the DDP job to finish", finished, tmp_path)
    with sessions() as session:
        done = session.get(Job, job_id)
        assert done is not None
        assert done.state == "succeeded", done.error_message
        log = list(session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)))
    assert "2 processes joined the gloo group" in log
