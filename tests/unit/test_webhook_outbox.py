"""The webhook outbox on SQLite and PostgreSQL: messages written by the state change's own
transaction, progress coalescing, secrets and rotation, leases, and the delivery round
(workers/deliver.py) against a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db import jobs, webhooks
from db.base import utcnow
from db.models import Job, WebhookDelivery, WebhookMessage
from kiln.settings import Settings
from kiln.webhooks import Webhook
from tests.webhook_receiver import Receiver
from workers import deliver

ALL = ("running", "progress", "succeeded", "failed", "cancelled")


def _job(session: Session, url: str | None = "http://127.0.0.1:9/hook", events=ALL) -> str:
    webhook = Webhook(url, tuple(events)) if url else None
    job = jobs.create(session, kind="echo", owner="alice", spec={}, queue="cpu", webhook=webhook)
    session.commit()
    return job.id


def _messages(sessions: sessionmaker[Session], job_id: str) -> list[WebhookMessage]:
    with sessions() as session:
        return list(
            session.scalars(
                select(WebhookMessage)
                .where(WebhookMessage.job_id == job_id)
                .order_by(WebhookMessage.created_at)
            )
        )


def test_each_state_change_writes_its_event_in_the_same_transaction(sessions) -> None:
    with sessions() as session:
        job_id = _job(session)
        attempt = jobs.claim(session, job_id, 0, "w1", "cpu")
        assert attempt == 1
        session.commit()
        assert jobs.succeed(session, job_id, attempt, {"echo": "hi"})
        session.commit()
    messages = _messages(sessions, job_id)
    assert [m.event for m in messages] == ["running", "succeeded"]
    ended = json.loads(messages[1].body)
    assert ended["type"] == "job.succeeded"
    assert ended["data"]["id"] == job_id
    assert ended["data"]["state"] == "succeeded"
    assert ended["data"]["attempt"] == 1
    assert ended["data"]["finished_at"] is not None
    assert "result" not in ended["data"]  # thin: the receiver reads the job for it
    assert {m.state for m in messages} == {"pending"}
    assert len({m.id for m in messages}) == 2
    assert all(m.id.startswith("msg_") and m.owner == "alice" for m in messages)


def test_a_rolled_back_change_leaves_no_message(sessions) -> None:
    with sessions() as session:
        job_id = _job(session)
        assert jobs.fail(session, job_id, None, "JobFailure", "bad spec")
        session.rollback()
    assert _messages(sessions, job_id) == []
    with sessions() as session:
        assert session.get_one(Job, job_id).state == "queued"


def test_a_lost_compare_and_set_writes_no_message(sessions) -> None:
    with sessions() as session:
        job_id = _job(session)
        assert jobs.claim(session, job_id, 5, "w1", "cpu") is None  # a stale message
        assert not jobs.succeed(session, job_id, 1, {})  # not running
        session.commit()
    assert _messages(sessions, job_id) == []


def test_only_the_events_asked_for_are_written(sessions) -> None:
    with sessions() as session:
        default = _job(session, events=("succeeded", "failed", "cancelled"))
        nothing = _job(session, url=None)
        for job_id in (default, nothing):
            jobs.claim(session, job_id, 0, "w1", "cpu")
            jobs.fail(session, job_id, 1, "RuntimeError", "it broke")
        queued = _job(session, events=("cancelled",))
        jobs.request_cancel(session, session.get_one(Job, queued))
        session.commit()
    assert [m.event for m in _messages(sessions, default)] == ["failed"]
    error = json.loads(_messages(sessions, default)[0].body)["data"]["error"]
    assert error == {"type": "RuntimeError", "message": "it broke"}
    assert _messages(sessions, nothing) == []
    assert [m.event for m in _messages(sessions, queued)] == ["cancelled"]


def test_a_requeue_announces_nothing_and_the_next_claim_runs_again(sessions) -> None:
    with sessions() as session:
        job_id = _job(session)
        jobs.claim(session, job_id, 0, "w1", "cpu")
        assert jobs.requeue(session, job_id, 1, "worker lost")
        jobs.claim(session, job_id, 1, "w2", "cpu")
        session.commit()
    running = [json.loads(m.body)["data"]["attempt"] for m in _messages(sessions, job_id)]
    assert running == [1, 2]


def test_progress_events_are_coalesced(sessions) -> None:
    with sessions() as session:
        job_id = _job(session, events=("progress",))
        jobs.claim(session, job_id, 0, "w1", "cpu")
        session.commit()
        for step in range(10):  # ten reports in a burst: the first is sent
            assert jobs.report(session, job_id, 1, 0.01 + step / 1000, "working") is not None
        session.commit()
    (first,) = _messages(sessions, job_id)
    assert json.loads(first.body)["data"]["progress"] == 0.01
    with sessions() as session:
        row = session.execute(
            update(Job).where(Job.id == job_id).values(progress=0.5).returning(*webhooks.RETURNED)
        ).one()
        later = first.created_at + timedelta(seconds=webhooks.PROGRESS_EVERY_S)
        assert webhooks.on_progress(session, row, first.created_at + timedelta(seconds=1)) is False
        assert webhooks.on_progress(session, row, later) is True
        session.commit()
    assert [json.loads(m.body)["data"]["progress"] for m in _messages(sessions, job_id)] == [
        0.01,
        0.5,
    ]


def test_no_progress_event_goes_out_at_zero_percent(sessions) -> None:
    with sessions() as session:
        job_id = _job(session, events=("progress",))
        jobs.claim(session, job_id, 0, "w1", "cpu")
        session.commit()
        for progress in (0.0, 0.004, 0.0099):  # still 0 whole percent: nothing is sent
            assert jobs.report(session, job_id, 1, progress, "starting") is not None
        session.commit()
    assert _messages(sessions, job_id) == []
    with sessions() as session:
        assert jobs.report(session, job_id, 1, 0.02, "working") is not None
        session.commit()
    assert [json.loads(m.body)["data"]["progress"] for m in _messages(sessions, job_id)] == [0.02]


def test_progress_is_due_only_after_the_interval_and_a_whole_percent() -> None:
    now = utcnow()
    long_ago = now - timedelta(seconds=webhooks.PROGRESS_EVERY_S)
    assert webhooks.progress_due(long_ago, 0.10, now, 0.11)
    assert not webhooks.progress_due(long_ago, 0.10, now, 0.105)  # same whole percent
    assert not webhooks.progress_due(now - timedelta(seconds=1), 0.10, now, 0.9)
    assert webhooks.progress_due(long_ago, 0.9, now, 0.1)  # a new attempt starts over


def test_the_secret_is_made_once_and_a_rotation_signs_with_both(sessions) -> None:
    with sessions() as session:
        first = webhooks.secret_of(session, "alice").secret
        session.commit()
        assert webhooks.secret_of(session, "alice").secret == first
        assert webhooks.signing_secrets(session, "alice") == [first]
        rotated = webhooks.rotate(session, "alice", timedelta(hours=1))
        session.commit()
        assert rotated.secret != first
        assert webhooks.signing_secrets(session, "alice") == [rotated.secret, first]
        later = utcnow() + timedelta(hours=2)
        assert webhooks.signing_secrets(session, "alice", later) == [rotated.secret]
        assert webhooks.secret_of(session, "bob").secret not in (first, rotated.secret)


def test_two_claims_never_hold_one_message(sessions) -> None:
    with sessions() as session:
        job_id = _job(session)
        jobs.fail(session, job_id, None, "JobFailure", "bad")
        session.commit()
    with sessions() as first, sessions() as second:
        taken = webhooks.claim(first, lease=timedelta(seconds=60), limit=10)
        first.commit()
        assert webhooks.claim(second, lease=timedelta(seconds=60), limit=10) == []
    assert [m.attempt for m in taken] == [1]


def test_an_expired_lease_is_taken_again_and_the_lost_attempt_recorded(sessions) -> None:
    with sessions() as session:
        job_id = _job(session)
        jobs.fail(session, job_id, None, "JobFailure", "bad")
        session.commit()
        (held,) = webhooks.claim(session, lease=timedelta(seconds=60), limit=10)
        session.commit()
        # The process holding it died; its lease runs out.
        session.execute(update(WebhookMessage).values(lease_until=utcnow() - timedelta(seconds=1)))
        session.commit()
        (again,) = webhooks.claim(session, lease=timedelta(seconds=60), limit=10)
        session.commit()
        assert (again.id, again.attempt) == (held.id, 2)
        lost = session.scalars(select(WebhookDelivery)).one()
        assert (lost.number, lost.status_code, lost.error) == (1, None, webhooks.LOST_ATTEMPT)
        # The dead claim's late word cannot reschedule what the new claim holds.
        webhooks.not_delivered(
            session, held, utcnow(), status=500, latency_ms=1.0, error="x", retry_at=None
        )
        session.commit()
        assert session.get_one(WebhookMessage, held.id).state == "pending"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


def _deliver_settings(settings: Settings, **overrides: object) -> Settings:
    return settings.model_copy(
        update={
            "webhook_allow_private": True,
            "webhook_retry_base_s": 0.01,
            "webhook_retry_max_s": 0.02,
            **overrides,
        }
    )


def _round(sessions: sessionmaker[Session], settings: Settings, until: int) -> None:
    """Run delivery rounds until `until` messages were attempted in total (bounded)."""
    done = 0
    for _ in range(500):
        done += deliver.deliver_due(sessions, settings)
        if done >= until:
            return
    pytest.fail(f"only {done} of {until} attempts were due")


def test_a_delivery_round_sends_a_signed_message_once(sessions, settings, receiver) -> None:
    with sessions() as session:
        job_id = _job(session, url=receiver.url)
        jobs.fail(session, job_id, None, "JobFailure", "bad")
        secret = webhooks.secret_of(session, "alice").secret
        session.commit()
    _round(sessions, _deliver_settings(settings), 1)
    (request,) = receiver.snapshot()
    (message,) = _messages(sessions, job_id)
    assert request.webhook_id == message.id
    assert request.verified([secret])["data"]["state"] == "failed"
    assert message.state == "delivered"
    assert message.delivered_at is not None
    assert deliver.deliver_due(sessions, _deliver_settings(settings)) == 0  # nothing left


def test_a_receiver_answering_500_then_200_gets_it_on_the_second_attempt(
    sessions, settings, receiver
) -> None:
    receiver.script = lambda request, earlier: 500 if earlier == 0 else 200
    with sessions() as session:
        job_id = _job(session, url=receiver.url)
        jobs.fail(session, job_id, None, "JobFailure", "bad")
        session.commit()
    _round(sessions, _deliver_settings(settings), 2)
    first, second = receiver.snapshot()
    assert first.webhook_id == second.webhook_id
    assert first.body == second.body
    with sessions() as session:
        ((message, attempts),) = webhooks.messages_of(session, job_id)
    assert message.state == "delivered"
    assert message.attempts == 2
    assert [(a.number, a.status_code, a.error) for a in attempts] == [
        (1, 500, "HTTP 500"),
        (2, 200, None),
    ]
    assert all(a.latency_ms is not None for a in attempts)


def test_a_message_is_given_up_after_its_max_age(sessions, settings, receiver) -> None:
    receiver.script = lambda request, earlier: 503
    with sessions() as session:
        job_id = _job(session, url=receiver.url)
        jobs.fail(session, job_id, None, "JobFailure", "bad")
        session.commit()
    given_up = _deliver_settings(settings, webhook_max_age_s=0.001)
    _round(sessions, given_up, 1)
    (message,) = _messages(sessions, job_id)
    assert message.state == "failed"
    assert deliver.deliver_due(sessions, given_up) == 0


def test_a_url_refused_at_delivery_time_is_recorded_and_retried(
    sessions, settings, receiver
) -> None:
    with sessions() as session:
        job_id = _job(session, url=receiver.url)
        jobs.fail(session, job_id, None, "JobFailure", "bad")
        session.commit()
    strict = _deliver_settings(settings, webhook_allow_private=False)
    _round(sessions, strict, 1)
    assert receiver.snapshot() == []
    with sessions() as session:
        ((message, attempts),) = webhooks.messages_of(session, job_id)
    assert message.state == "pending"
    assert "loopback" in (attempts[0].error or "")


def test_deleting_a_job_deletes_its_messages(sessions) -> None:
    with sessions() as session:
        job_id = _job(session)
        jobs.fail(session, job_id, None, "JobFailure", "bad")
        session.commit()
        session.delete(session.get_one(Job, job_id))
        session.commit()
        assert session.scalars(select(WebhookMessage)).all() == []


def test_a_hanging_receiver_does_not_hold_up_another_jobs_message(sessions, settings) -> None:
    """The fast job's message is claimed, sent and recorded while the slow receiver still
    holds the first message's request open (before its timeout)."""
    from concurrent.futures import ThreadPoolExecutor

    config = _deliver_settings(settings, webhook_concurrency=4, webhook_timeout_s=60)
    with Receiver() as slow, Receiver() as fast, ThreadPoolExecutor(4) as pool:
        slow.hold.clear()  # answers wait until the test lets them go
        try:
            with sessions() as session:
                hanging = _job(session, url=slow.url)
                jobs.fail(session, hanging, None, "JobFailure", "bad")
                session.commit()
            dispatcher = deliver.Dispatcher(sessions, config, pool)
            assert dispatcher.fill() == 1
            assert slow.wait_for(lambda got: len(got) == 1, timeout=30)

            with sessions() as session:  # another job's message, due after the first claim
                quick = _job(session, url=fast.url)
                jobs.fail(session, quick, None, "JobFailure", "bad")
                session.commit()
            assert dispatcher.fill() == 1  # claimed at once: a slot was free
            assert fast.wait_for(lambda got: len(got) == 1, timeout=30)
            for _ in range(600):  # bounded: the attempt is recorded just after the answer
                if _messages(sessions, quick)[0].state == "delivered":
                    break
                time.sleep(0.05)
            assert _messages(sessions, quick)[0].state == "delivered"
            # ... while the slow receiver's request is still open and nothing is recorded.
            (still,) = _messages(sessions, hanging)
            assert still.state != "delivered"
            with sessions() as session:
                recorded = session.scalars(
                    select(WebhookDelivery).where(WebhookDelivery.message_id == still.id)
                ).all()
            assert recorded == []
        finally:
            slow.hold.set()
        assert dispatcher.wait_idle(timeout=60)
    assert _messages(sessions, hanging)[0].state == "delivered"
