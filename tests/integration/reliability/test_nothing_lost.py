"""Nothing lost: Redis restarts (empty and from a stale snapshot), SIGKILLed and SIGTERMed
workers, and a job that crashes its worker every time, with real Redis and real workers."""

from __future__ import annotations

import signal
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from db import jobs
from db.base import utcnow
from db.models import Job
from kiln.broker import waiting_messages
from kiln.states import JobState
from tests.integration.reliability.conftest import job_row, submit, wait_until, worker_settings
from workers.scheduler import reconcile_once

pytestmark = pytest.mark.integration


def _age_messages(sessions, seconds: float = 60) -> None:
    """Pretend every message was sent `seconds` ago (instead of sleeping past the grace)."""
    with sessions() as session:
        session.execute(update(Job).values(sent_at=utcnow() - timedelta(seconds=seconds)))
        session.commit()


def _reconciled_to_an_end(celery, sessions, settings, job_id: str) -> Callable[[], bool]:
    """For wait_until: run a reconciler pass, then say whether the job has ended."""

    def finished() -> bool:
        reconcile_once(celery, sessions, settings)
        return _terminal(sessions, [job_id])

    return finished


def _terminal(sessions, ids: list[str]) -> bool:
    return all(JobState(job_row(sessions, i).state).is_terminal for i in ids)


def _claim_as_ghost(sessions, job_id: str) -> None:
    """A worker that then vanished: claimed, heartbeat long ago."""
    with sessions() as session:
        assert jobs.claim(session, job_id, 0, "ghost@nowhere", "cpu") == 1
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(heartbeat_at=utcnow() - timedelta(minutes=10))
        )
        session.commit()


def test_a_redis_restart_without_persistence_loses_no_job(
    tmp_path: Path, database_url, redis_server, worker_sessions, celery_for, start_worker
):
    server = redis_server("--save", "", "--appendonly", "no")
    settings = worker_settings(tmp_path, database_url, server.url)
    celery = celery_for(settings)
    queued = [submit(worker_sessions, celery, {"message": f"q{n}"}).id for n in range(5)]
    running = submit(worker_sessions, celery, {"message": "running"}).id
    _claim_as_ghost(worker_sessions, running)

    server.restart()
    assert waiting_messages(celery, "cpu") == set()  # everything Redis held is gone
    _age_messages(worker_sessions)
    report = reconcile_once(celery, worker_sessions, settings)

    assert report.resent == 5
    assert report.requeued == 1
    assert waiting_messages(celery, "cpu") == {(i, 0) for i in queued} | {(running, 1)}
    start_worker(settings)
    wait_until(lambda: _terminal(worker_sessions, [*queued, running]), 90, "jobs to finish")
    rows = [job_row(worker_sessions, i) for i in [*queued, running]]
    assert {r.state for r in rows} == {"succeeded"}
    assert [r.attempt for r in rows] == [1, 1, 1, 1, 1, 2]


def test_a_restart_from_a_stale_snapshot_resends_only_what_is_missing(
    tmp_path: Path, database_url, redis_server, worker_sessions, celery_for, start_worker
):
    # The snapshot is only written when asked (SAVE), so the restart loads a stale one.
    server = redis_server("--save", "", "--appendonly", "no", "--dbfilename", "x.rdb")
    settings = worker_settings(tmp_path, database_url, server.url)
    celery = celery_for(settings)
    old = [submit(worker_sessions, celery, {"message": f"old{n}"}).id for n in range(3)]
    server.client().save()
    new = [submit(worker_sessions, celery, {"message": f"new{n}"}).id for n in range(3)]
    # After the snapshot, one old job was claimed and its worker lost: it is queued again
    # at attempt 1, and the snapshot will bring back only its stale attempt-0 message.
    _claim_as_ghost(worker_sessions, old[0])
    assert reconcile_once(celery, worker_sessions, settings).requeued == 1

    server.restart()
    assert waiting_messages(celery, "cpu") == {(i, 0) for i in old}  # old back, new gone
    _age_messages(worker_sessions)
    report = reconcile_once(celery, worker_sessions, settings)

    # An empty-queue check would resend nothing here (the queue is not empty).
    assert report.resent == 4
    assert waiting_messages(celery, "cpu") == {(i, 0) for i in old} | {(old[0], 1)} | {
        (i, 0) for i in new
    }
    start_worker(settings)
    wait_until(lambda: _terminal(worker_sessions, old + new), 90, "jobs to finish")
    rows = {i: job_row(worker_sessions, i) for i in old + new}
    assert {r.state for r in rows.values()} == {"succeeded"}
    # The stale duplicate of old[0] was dropped by the claim: it ran once more, not twice.
    assert rows[old[0]].attempt == 2
    assert all(rows[i].attempt == 1 for i in old[1:] + new)


def test_a_sigkilled_worker_loses_no_job(
    tmp_path: Path, database_url, redis_server, worker_sessions, celery_for, start_worker
):
    server = redis_server("--save", "", "--appendonly", "no")
    settings = worker_settings(tmp_path, database_url, server.url)
    celery = celery_for(settings)
    job_id = submit(worker_sessions, celery, {"message": "slow", "sleep_s": 4}).id
    first = start_worker(settings)
    wait_until(lambda: job_row(worker_sessions, job_id).state == "running", 60, "the claim")

    first.signal(signal.SIGKILL)  # the whole worker: main process and pool
    first.wait()
    # Redis still holds the unacked message, due again only after the visibility timeout;
    # the reconciler gets the job going long before that.
    wait_until(lambda: reconcile_once(celery, worker_sessions, settings).requeued, 30, "a requeue")
    start_worker(settings)
    wait_until(lambda: _terminal(worker_sessions, [job_id]), 90, "the job to finish")
    row = job_row(worker_sessions, job_id)
    assert (row.state, row.attempt) == ("succeeded", 2)


def test_sigterm_requeues_the_running_job_without_spending_an_attempt(
    tmp_path: Path, database_url, redis_server, worker_sessions, celery_for, start_worker
):
    server = redis_server("--save", "", "--appendonly", "no")
    settings = worker_settings(tmp_path, database_url, server.url, max_attempts=1)
    celery = celery_for(settings)
    job_id = submit(worker_sessions, celery, {"message": "long", "sleep_s": 120}).id
    worker = start_worker(settings)
    wait_until(lambda: job_row(worker_sessions, job_id).state == "running", 60, "the claim")

    worker.signal(signal.SIGTERM)
    assert worker.wait(60) == 0  # a warm shutdown: it did not wait out the 120 s job

    row = job_row(worker_sessions, job_id)
    assert (row.state, row.attempt, row.shutdown_attempts) == ("queued", 1, 1)
    assert row.charged_attempts == 0
    assert (job_id, 1) in waiting_messages(celery, "cpu")
    with worker_sessions() as session:  # make the next attempt short
        session.execute(update(Job).where(Job.id == job_id).values(spec={"message": "long"}))
        session.commit()
    start_worker(settings)
    wait_until(lambda: _terminal(worker_sessions, [job_id]), 90, "the job to finish")
    # max_attempts is 1, yet the job ran a second attempt: the shutdown was refunded.
    row = job_row(worker_sessions, job_id)
    assert (row.state, row.attempt) == ("succeeded", 2)


def test_a_job_that_crashes_its_worker_fails_after_max_attempts(
    tmp_path: Path, database_url, redis_server, worker_sessions, celery_for, start_worker
):
    server = redis_server("--save", "", "--appendonly", "no")
    settings = worker_settings(tmp_path, database_url, server.url, max_attempts=3)
    celery = celery_for(settings)
    job_id = submit(worker_sessions, celery, {"message": "boom", "crash": True}).id
    start_worker(settings)

    finished = _reconciled_to_an_end(celery, worker_sessions, settings, job_id)
    wait_until(finished, 120, "the crashing job to fail")
    row = job_row(worker_sessions, job_id)
    assert (row.state, row.error_type, row.attempt) == ("failed", "WorkerLost", 3)
    assert "lost 3 times" in row.error_message


def test_a_job_past_its_time_limit_fails_with_the_reason(
    tmp_path: Path, database_url, redis_server, worker_sessions, celery_for, start_worker
):
    server = redis_server("--save", "", "--appendonly", "no")
    settings = worker_settings(tmp_path, database_url, server.url, job_time_limit_s=1.0)
    celery = celery_for(settings)
    job_id = submit(worker_sessions, celery, {"message": "slow", "sleep_s": 60}).id
    start_worker(settings)

    wait_until(lambda: _terminal(worker_sessions, [job_id]), 90, "the job to time out")
    row = job_row(worker_sessions, job_id)
    assert (row.state, row.error_type, row.attempt) == ("failed", "TimeLimitExceeded", 1)
    assert row.error_message == "exceeded its time limit of 1 s"


def test_a_job_that_ignores_its_soft_limit_is_killed_by_the_hard_one_and_failed(
    tmp_path: Path, database_url, redis_server, worker_sessions, celery_for, start_worker
):
    server = redis_server("--save", "", "--appendonly", "no")
    settings = worker_settings(
        tmp_path, database_url, server.url, job_time_limit_s=1.0, time_limit_grace_s=1.0
    )
    celery = celery_for(settings)
    hung = submit(worker_sessions, celery, {"message": "stuck", "hang_s": 120}).id
    start_worker(settings)

    # Celery kills the pool process at 2 s; its heartbeats stop, and the reconciler fails it.
    finished = _reconciled_to_an_end(celery, worker_sessions, settings, hung)
    wait_until(finished, 90, "the hung job to be killed and failed")
    row = job_row(worker_sessions, hung)
    assert (row.state, row.error_type, row.attempt) == ("failed", "TimeLimitExceeded", 1)
    assert row.error_message == "exceeded its time limit of 1 s"
    # The worker itself survived (a fresh pool process) and runs the next job.
    after = submit(worker_sessions, celery, {"message": "next"}).id
    wait_until(lambda: _terminal(worker_sessions, [after]), 60, "the next job")
    assert job_row(worker_sessions, after).state == "succeeded"
