"""The one send path (db.submission.commit_and_send) and the reconciler's start-up sweep."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from db import submission
from db.base import utcnow
from db.models import Job
from kiln.broker import QueuedAttempt
from kiln.errors import QueueQuotaExceeded
from kiln.specs import parse_spec
from workers.reconcile import reconcile, resend_grace


def _queued(session, owner="alice"):
    return submission.queue_job(
        session,
        owner=owner,
        kind="echo",
        spec=parse_spec("echo", {"message": "hi"}),
        priority=0,
        max_queued=10,
    )


def test_the_row_is_committed_before_the_send_and_sent_at_records_the_due_time(sessions):
    seen: list[tuple[str | None, float]] = []

    def send(job: QueuedAttempt, countdown: float = 0.0) -> None:
        with sessions() as other:  # a separate connection sees only committed rows
            seen.append((other.scalar(select(Job.state).where(Job.id == job.id)), countdown))

    with sessions() as session:
        job = _queued(session)
        assert submission.commit_and_send(session, send, job, delay_s=600.0) is True

    assert seen == [("queued", 600.0)]
    with sessions() as session:
        sent_at = session.get(Job, job.id).sent_at
    # Sent for delivery in ten minutes: the reconciler's clock starts at the delivery time.
    assert sent_at > utcnow() + timedelta(minutes=9)


def test_a_failed_send_leaves_the_job_committed_and_unsent_for_the_reconciler(sessions):
    def broker_down(job: QueuedAttempt, countdown: float = 0.0) -> None:
        raise ConnectionError("broker unreachable")

    with sessions() as session:
        job = _queued(session)
        assert submission.commit_and_send(session, broker_down, job) is False

    with sessions() as session:
        row = session.get(Job, job.id)
    assert (row.state, row.sent_at) == ("queued", None)


def test_the_queue_quota_counts_only_the_owners_queued_jobs(sessions):
    with sessions() as session:
        for _ in range(2):
            _queued(session)
        _queued(session, owner="bob")
        session.commit()

        with pytest.raises(QueueQuotaExceeded, match="you have 2 jobs waiting"):
            submission.check_queue_quota(session, "alice", 2)
        submission.check_queue_quota(session, "bob", 2)  # bob has one: room for more


# --- the reconciler's start-up sweep -------------------------------------------------------


def _sent_ago(sessions, job_id: str, seconds: float) -> None:
    with sessions() as session:
        sent_at = utcnow() - timedelta(seconds=seconds)
        session.execute(update(Job).where(Job.id == job_id).values(sent_at=sent_at))
        session.commit()


def _sweep(sessions, settings, started_at=None) -> list[tuple[str, int]]:
    resent: list[tuple[str, int]] = []

    def send(job: QueuedAttempt, countdown: float = 0.0) -> None:
        resent.append((job.id, job.attempt))

    reconcile(sessions, settings, send, lambda _queue: set(), started_at)
    return resent


def test_a_fresh_scheduler_resends_a_message_sent_before_it_started_at_once(
    create_job, sessions, settings
):
    job = create_job()
    _sent_ago(sessions, job.id, 5)  # well inside the 30 s grace

    assert _sweep(sessions, settings) == []  # a running scheduler still waits
    assert _sweep(sessions, settings, started_at=utcnow()) == [(job.id, 0)]


def test_a_message_sent_after_the_scheduler_started_keeps_its_grace(create_job, sessions, settings):
    started_at = utcnow() - timedelta(seconds=10)
    job = create_job()
    _sent_ago(sessions, job.id, 2)  # sent 8 s after the start: its own 30 s still run

    assert _sweep(sessions, settings, started_at=started_at) == []


def test_the_start_up_rule_never_lengthens_the_grace(settings):
    now = utcnow()
    configured = timedelta(seconds=settings.resend_after_s)

    assert resend_grace(settings, None, now) == configured
    assert resend_grace(settings, now - timedelta(hours=1), now) == configured
    assert resend_grace(settings, now - timedelta(seconds=3), now) == timedelta(seconds=3)
    assert resend_grace(settings, now + timedelta(seconds=1), now) == timedelta(0)
