"""Recovery: the database is the record, so jobs survive dead workers and lost messages."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.base import utcnow
from db.models import Job
from kiln import routing
from kiln.broker import queue_length, waiting_messages
from kiln.settings import Settings
from tests.integration.conftest import REPO_ROOT, clean_env
from tests.retentionkit import finished_job
from workers.reconcile import Report, reconcile

pytestmark = pytest.mark.integration
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def test_job_of_a_killed_worker_is_requeued_by_the_reconciler_and_finishes_on_another(
    api: Any,
    start_worker: Callable[[], Any],
    reconcile_once: Callable[[], Report],
    wait_until: Callable[..., Any],
) -> None:
    first = start_worker()
    job = api.submit("echo", {"message": "survivor", "sleep_s": 6})
    running = api.wait_for(job["id"], "running")
    assert (running["attempt"], running["worker"].split("@")[0]) == (1, first.name)

    first.kill()  # SIGKILL to its process group: no ack, no last words, no more heartbeats

    # The heartbeat goes stale after the timeout; sweep until the reconciler notices.
    reports: list[Report] = []

    def sweep() -> int:
        reports.append(reconcile_once())
        return reports[-1].requeued

    wait_until(sweep, lambda: f"the reconciler to re-queue the job; reports: {reports}", every=0.5)
    assert sum(r.requeued for r in reports) == 1
    assert sum(r.failed + r.cancelled for r in reports) == 0
    requeued = api.job(job["id"])
    assert (requeued["state"], requeued["attempt"], requeued["worker"]) == ("queued", 1, None)

    second = start_worker()
    done = api.wait_for(job["id"], "succeeded")

    assert (done["attempt"], done["worker"].split("@")[0]) == (2, second.name)
    assert done["result"] == {"message": "survivor"}
    events = api.get(f"/jobs/{job['id']}/events")["events"]
    assert any("stopped heartbeating (attempt 1)" in e["message"] for e in events), events


def test_a_worker_whose_pool_process_dies_requeues_its_job_at_once_and_runs_it_again(
    api: Any, start_worker: Callable[[], Any]
) -> None:
    worker = start_worker()
    job = api.submit("echo", {"message": "again", "sleep_s": 6})
    running = api.wait_for(job["id"], "running")
    [pool] = psutil.Process(worker.process.pid).children()
    pool.kill()  # the process running the job is OOM-killed, say; the worker lives on

    # No reconciler sweeps in this test: the worker's new pool process finds the job it was
    # running still recorded as running, and re-queues it.
    done = api.wait_for(job["id"], "succeeded")
    assert (done["attempt"], done["worker"]) == (2, running["worker"])
    assert done["result"] == {"message": "again"}
    events = [e["message"] for e in api.get(f"/jobs/{job['id']}/events")["events"]]
    lost = f"worker {running['worker']} lost the process running it (attempt 1)"
    assert lost in events, events


def test_a_job_that_loses_its_worker_max_attempts_times_fails_with_worker_lost(
    sessions: sessionmaker[Session], database_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        redis_url="memory://",
        heartbeat_timeout_s=4,
        max_attempts=3,
    )
    with sessions.begin() as session:
        job_id = jobs.create(session, kind="echo", owner="alice", spec={}, queue="cpu").id
    sent: list[tuple[str, int]] = []
    reports = []
    for queued_attempt in range(settings.max_attempts):
        with sessions.begin() as session:
            assert jobs.claim(session, job_id, queued_attempt, f"w{queued_attempt}", "cpu")
            # Its worker dies: the last heartbeat is older than the timeout.
            stale = utcnow() - timedelta(seconds=settings.heartbeat_timeout_s + 60)
            session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=stale))
        reports.append(
            reconcile(
                sessions, settings, lambda j, _=0.0: sent.append((j.id, j.attempt)), lambda _: set()
            )
        )

    assert [(r.requeued, r.failed) for r in reports] == [(1, 0), (1, 0), (0, 1)]
    assert sent == [(job_id, 1), (job_id, 2)]
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.state, job.attempt, job.error_type) == ("failed", 3, "WorkerLost")
        assert "lost 3 times" in (job.error_message or "")
        assert job.finished_at is not None


@SQLITE_ONLY
def test_a_queued_job_whose_message_was_lost_is_resent_and_runs(
    api: Any,
    worker: Any,
    celery_app: Celery,
    create_job: Callable[..., Job],
    reconcile_once: Callable[[], Report],
    live_settings: Settings,
) -> None:
    # Committed but never sent (the broker was down, say), and older than the grace period.
    grace = timedelta(seconds=live_settings.resend_after_s)
    orphan = create_job(
        spec={"message": "found again"}, created_at=utcnow() - grace - timedelta(minutes=1)
    )
    young = create_job(spec={"message": "may still be in flight"})
    assert queue_length(celery_app, routing.CPU_QUEUE) == 0

    report = reconcile_once()

    assert report == Report(resent=1)
    done = api.wait_for(orphan.id, "succeeded")
    assert (done["attempt"], done["result"]) == (1, {"message": "found again"})
    assert api.job(young.id)["state"] == "queued"


#: Starts the scheduler process as `kiln scheduler` does, without its logging set-up.
SCHEDULER = "from kiln.settings import Settings; from workers.scheduler import run_forever; "
SCHEDULER += "run_forever(Settings())"


def test_a_freshly_started_scheduler_resends_a_message_lost_before_its_start_at_once(
    celery_app: Celery,
    create_job: Callable[..., Job],
    sessions: sessionmaker[Session],
    live_settings: Settings,
    tmp_path: Path,
    wait_until: Callable[..., Any],
) -> None:
    # The whole stack was SIGKILLed: the job's message had been sent (sent_at recorded)
    # but Redis lost it. It was sent ten minutes ago, well inside the grace given below.
    lost = create_job(spec={"message": "sent before the crash"})
    with sessions.begin() as session:
        assert jobs.mark_sent(session, lost.id, 0, utcnow() - timedelta(minutes=10))
    assert waiting_messages(celery_app, routing.CPU_QUEUE) == set()
    # An hour's grace and a 15-minute sweep interval: only the start-up sweep can resend it
    # while this test waits.
    env = clean_env(
        data_dir=str(live_settings.data_dir),
        database_url=live_settings.resolved_database_url,
        redis_url=live_settings.redis_url,
        resend_after_s="3600",
        heartbeat_timeout_s="3600",
    )
    with (tmp_path / "scheduler.log").open("wb") as log:
        scheduler = subprocess.Popen(
            [sys.executable, "-c", SCHEDULER],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: (lost.id, 0) in waiting_messages(celery_app, routing.CPU_QUEUE),
            lambda: (
                "the start-up sweep to resend the job; scheduler log:\n"
                + (tmp_path / "scheduler.log").read_text(errors="replace")
            ),
            every=0.2,
        )
    finally:
        scheduler.send_signal(signal.SIGTERM)
        scheduler.wait(timeout=60)

    with sessions() as session:
        row = session.get(Job, lost.id)
        assert row is not None
        assert (row.state, row.attempt) == ("queued", 0)
        assert row.sent_at is not None
        assert row.sent_at > utcnow() - timedelta(minutes=1)  # the resend is recorded


def test_a_freshly_started_scheduler_sweeps_at_its_first_tick_not_an_interval_later(
    sessions: sessionmaker[Session],
    live_settings: Settings,
    tmp_path: Path,
    wait_until: Callable[..., Any],
) -> None:
    # A job already past its expiry; the sweep interval is an hour, so only a sweep soon
    # after start-up can expire it while this test waits.
    expired = finished_job(sessions, expires_after_s=3600)
    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == expired.id)
            .values(expires_at=utcnow() - timedelta(minutes=1))
        )
    env = clean_env(
        data_dir=str(live_settings.data_dir),
        database_url=live_settings.resolved_database_url,
        redis_url=live_settings.redis_url,
        sweep_interval_s="3600",
    )

    def is_expired() -> bool:
        with sessions() as session:
            row = session.get(Job, expired.id)
            return row is not None and row.expired

    with (tmp_path / "scheduler.log").open("wb") as log:
        scheduler = subprocess.Popen(
            [sys.executable, "-c", SCHEDULER],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            is_expired,
            lambda: (
                "the first tick's retention sweep to expire the job; scheduler log:\n"
                + (tmp_path / "scheduler.log").read_text(errors="replace")
            ),
            every=0.2,
        )
    finally:
        scheduler.send_signal(signal.SIGTERM)
        scheduler.wait(timeout=60)
    assert is_expired()
