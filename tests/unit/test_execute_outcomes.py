"""How an attempt ends and what it costs: transient retries with back-off, bad input failing
at once, the soft time limit, graceful shutdown, and the reconciler's verdicts."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from db import jobs
from db.base import utcnow
from db.models import Job
from kiln.artifacts import ArtifactStore
from kiln.errors import JobFailure
from kiln.settings import Settings
from workers import execute
from workers.context import SHUTDOWN, RetryableOOM, TransientError
from workers.reconcile import reconcile
from workers.runtime import Runtime

Sent = list[tuple[str, int, float]]


@pytest.fixture
def runtime(settings: Settings, sessions) -> Runtime:
    return Runtime(
        settings=settings.model_copy(update={"retry_backoff_s": 2.0, "max_attempts": 3}),
        sessions=sessions,
        store=ArtifactStore(settings.artifacts_dir),
    )


@pytest.fixture
def sent_messages() -> Sent:
    return []


@pytest.fixture
def run(runtime: Runtime, sent_messages: Sent, monkeypatch):
    """run(job, runner) -> the job row after one attempt with `runner` as the echo runner."""

    def send(job: Job, countdown: float) -> None:
        sent_messages.append((job.id, job.attempt, countdown))

    def attempt(job: Job, runner: Any, **settings: Any) -> Job:
        monkeypatch.setitem(execute.RUNNERS, "echo", runner)
        with runtime.sessions() as session:
            queued_attempt = session.get(Job, job.id).attempt
        this = replace(runtime, settings=runtime.settings.model_copy(update=settings))
        execute.execute_attempt(this, job.id, queued_attempt, "w1", send)
        with runtime.sessions() as session:
            return session.get(Job, job.id)

    return attempt


def _raiser(exc: BaseException):
    def runner(spec: Any, ctx: Any) -> dict:
        raise exc

    return runner


@pytest.mark.parametrize(
    "exc",
    [
        TransientError("object store briefly unreachable"),
        redis.ConnectionError("Connection refused"),
        OperationalError("SELECT 1", {}, Exception("server closed the connection")),
    ],
)
def test_a_transient_error_requeues_with_backoff(create_job, run, sent_messages, exc):
    job = create_job()

    row = run(job, _raiser(exc))

    assert (row.state, row.attempt) == ("queued", 1)
    assert row.message.startswith("re-queued: transient error, retrying in 2 s")
    assert sent_messages == [(job.id, 1, 2.0)]
    assert row.sent_at > utcnow()  # the message is due after the back-off


def test_backoff_doubles_and_the_job_fails_once_attempts_are_spent(create_job, run, sent_messages):
    job = create_job()
    flaky = _raiser(TransientError("flaky"))

    states = [run(job, flaky).state for _ in range(3)]

    assert states == ["queued", "queued", "failed"]
    assert [countdown for *_, countdown in sent_messages] == [2.0, 4.0]
    row = run(job, flaky)  # a stray message after the failure changes nothing
    assert row.state == "failed"
    assert row.error_message == "gave up after 3 attempts: TransientError: flaky"


def test_a_retryable_oom_tells_the_next_attempt_to_shrink(create_job, run):
    job = create_job()
    seen: list[int] = []

    def runner(spec: Any, ctx: Any) -> dict:
        seen.append(ctx.oom_retries)
        if ctx.oom_retries == 0:
            raise RetryableOOM("CUDA out of memory at batch 512")
        return {"batch": 512 >> ctx.oom_retries}

    run(job, runner)
    row = run(job, runner)

    assert seen == [0, 1]
    assert (row.state, row.result) == ("succeeded", {"batch": 256})


@pytest.mark.parametrize(
    "exc", [JobFailure("column 'label' is missing"), ValueError("a bug, not a hiccup")]
)
def test_bad_input_and_bugs_fail_at_once_without_retry(create_job, run, sent_messages, exc):
    row = run(create_job(), _raiser(exc))

    assert (row.state, row.attempt) == ("failed", 1)
    assert sent_messages == []


def test_the_soft_time_limit_fails_the_job_with_a_clear_reason(create_job, run):
    job = create_job(spec={"message": "slow", "sleep_s": 30})

    row = run(job, execute.RUNNERS["echo"], job_time_limit_s=0.2)

    assert (row.state, row.error_type) == ("failed", "TimeLimitExceeded")
    assert row.error_message == "exceeded its time limit of 0.2 s"


def test_a_worker_shutdown_requeues_and_refunds_the_attempt(create_job, run, sent_messages):
    job = create_job(spec={"message": "long", "sleep_s": 30})

    def runner(spec: Any, ctx: Any) -> dict:
        SHUTDOWN.set()  # what the SIGTERM handler does
        assert ctx.should_stop()
        ctx.raise_if_cancelled()
        return {}

    try:
        row = run(job, runner)
    finally:
        SHUTDOWN.clear()

    assert (row.state, row.attempt, row.shutdown_attempts, row.charged_attempts) == (
        "queued",
        1,
        1,
        0,
    )
    assert sent_messages == [(job.id, 1, 0.0)]


def _stall(sessions, job_id: str, started_ago_s: float = 600) -> None:
    with sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                heartbeat_at=utcnow() - timedelta(minutes=10),
                started_at=utcnow() - timedelta(seconds=started_ago_s),
            )
        )
        session.commit()


def _reconcile(sessions, settings: Settings, present=frozenset()) -> tuple[Any, list]:
    resent: list[tuple[str, int]] = []
    report = reconcile(
        sessions,
        settings,
        lambda job, _=0.0: resent.append((job.id, job.attempt)),
        lambda q: present,
    )
    return report, resent


def test_the_reconciler_fails_a_job_killed_by_the_hard_time_limit(create_job, sessions, settings):
    job = create_job(state="running")
    _stall(sessions, job.id, started_ago_s=120)

    report, resent = _reconcile(sessions, settings.model_copy(update={"job_time_limit_s": 60}))

    assert (report.timed_out, resent) == (1, [])
    with sessions() as session:
        row = session.get(Job, job.id)
    assert (row.state, row.error_message) == ("failed", "exceeded its time limit of 60 s")


def test_graceful_shutdowns_do_not_count_against_max_attempts(create_job, sessions, settings):
    job = create_job(state="running")
    with sessions() as session:  # two earlier attempts ended by SIGTERM
        session.execute(update(Job).where(Job.id == job.id).values(attempt=3, shutdown_attempts=2))
        session.commit()
    _stall(sessions, job.id)

    report, resent = _reconcile(sessions, settings.model_copy(update={"max_attempts": 2}))

    assert report.requeued == 1
    assert resent == [(job.id, 3)]


def test_the_reconciler_resends_per_job_not_per_queue(create_job, sessions, settings):
    live, lost, stale = create_job(), create_job(), create_job()
    with sessions() as session:
        session.execute(update(Job).values(sent_at=utcnow() - timedelta(minutes=5)))
        # `stale` is queued for attempt 1 but only its attempt-0 message survived.
        session.execute(update(Job).where(Job.id == stale.id).values(attempt=1))
        session.commit()

    report, resent = _reconcile(sessions, settings, {(live.id, 0), (stale.id, 0)})

    assert sorted(resent) == sorted([(lost.id, 0), (stale.id, 1)])
    assert report.resent == 2
    with sessions() as session:  # a resent job's clock restarts: the next sweep waits
        assert session.get(Job, lost.id).sent_at > utcnow() - timedelta(seconds=5)
    assert _reconcile(sessions, settings, {(live.id, 0)})[1] == []


def test_a_fresh_job_gets_a_grace_period_before_a_resend(create_job, sessions, settings):
    create_job()  # sent_at None, just created: the web's send may still be in flight

    assert _reconcile(sessions, settings)[1] == []


def test_a_job_never_sent_is_resent_after_the_grace_period(create_job, sessions, settings):
    job = create_job(created_at=utcnow() - timedelta(minutes=5))
    with sessions() as session:
        assert jobs.mark_sent(session, job.id, 0) is True
        session.execute(update(Job).where(Job.id == job.id).values(sent_at=None))
        session.commit()

    assert _reconcile(sessions, settings)[1] == [(job.id, 0)]
