"""Per-job deadline_s: recorded at submission, a running job past it is cancelled by its
worker, a queued one by the worker that receives it or by the scheduler's sweep."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from modelkit import never_resent
from sqlalchemy import update

from db import jobs
from db.base import utcnow
from db.models import Job
from kiln.artifacts import ArtifactStore
from workers.execute import execute_attempt
from workers.reconcile import reconcile
from workers.runtime import Runtime


@pytest.fixture
def runtime(settings, sessions) -> Runtime:
    return Runtime(
        settings=settings, sessions=sessions, store=ArtifactStore(settings.artifacts_dir)
    )


def _job(sessions, spec: dict, deadline_s: float | None) -> str:
    with sessions() as session:
        job = jobs.create(
            session, kind="echo", owner="alice", spec=spec, queue="cpu", deadline_s=deadline_s
        )
        session.commit()
        return job.id


def _row(sessions, job_id: str) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def _pass_deadline(sessions, job_id: str) -> None:
    """Move the job's deadline into the past (instead of sleeping until it passes)."""
    with sessions() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(deadline_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()


# --- the API --------------------------------------------------------------------------------


def test_deadline_s_is_recorded_with_when_it_passes(client, alice):
    response = client.post("/api/v1/jobs", json={"kind": "echo", "deadline_s": 600}, headers=alice)

    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert job["deadline_s"] == 600
    passes = datetime.fromisoformat(job["deadline_at"]) - datetime.fromisoformat(job["created_at"])
    assert passes == timedelta(seconds=600)


def test_no_deadline_by_default(client, alice):
    job = client.post("/api/v1/jobs", json={"kind": "echo"}, headers=alice).get_json()
    assert (job["deadline_s"], job["deadline_at"]) == (None, None)


@pytest.mark.parametrize("bad", [0, -5, 30 * 24 * 3600 + 1, "soon"])
def test_a_deadline_that_is_not_a_bounded_positive_number_is_422(client, alice, sent, bad):
    response = client.post("/api/v1/jobs", json={"kind": "echo", "deadline_s": bad}, headers=alice)

    assert response.status_code == 422
    assert response.get_json()["errors"][0]["loc"] == ["deadline_s"]
    assert sent == []


# --- the worker -----------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_running_job_past_its_deadline_is_cancelled_with_the_reason(runtime, sessions):
    job_id = _job(sessions, {"message": "slow", "sleep_s": 600}, deadline_s=0.5)

    execute_attempt(runtime, job_id, 0, "w1", never_resent)

    row = _row(sessions, job_id)
    assert row.state == "cancelled"
    assert row.error == {"type": "DeadlineExceeded", "message": "deadline of 0.5 s passed"}
    assert row.message == "cancelled: deadline of 0.5 s passed"
    assert row.attempt == 1
    with sessions() as session:
        lines = [e.message for e in jobs.events(session, job_id)]
    assert "cancelled: deadline of 0.5 s passed" in lines


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_job_whose_deadline_passed_in_the_queue_is_cancelled_not_run(runtime, sessions):
    job_id = _job(sessions, {"message": "late"}, deadline_s=60)
    _pass_deadline(sessions, job_id)

    execute_attempt(runtime, job_id, 0, "w1", never_resent)

    row = _row(sessions, job_id)
    assert (row.state, row.attempt, row.started_at, row.result) == ("cancelled", 0, None, None)
    assert row.error_message == "deadline of 60 s passed"
    assert row.cancel_requested  # its message can never claim it


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_deadline_not_reached_lets_the_job_finish(runtime, sessions):
    job_id = _job(sessions, {"message": "quick"}, deadline_s=3600)

    execute_attempt(runtime, job_id, 0, "w1", never_resent)

    row = _row(sessions, job_id)
    assert (row.state, row.result, row.error) == ("succeeded", {"message": "quick"}, None)


# --- the scheduler's sweep ------------------------------------------------------------------


def _reconcile(sessions, settings):
    resent: list[str] = []
    report = reconcile(
        sessions, settings, lambda job, _=0.0: resent.append(job.id), lambda q: set()
    )
    return report, resent


def test_the_sweep_cancels_queued_jobs_past_their_deadline_only(sessions, settings):
    late = _job(sessions, {}, deadline_s=30)
    _pass_deadline(sessions, late)
    on_time = _job(sessions, {}, deadline_s=3600)
    without = _job(sessions, {}, deadline_s=None)

    report, _ = _reconcile(sessions, settings)

    assert report.expired == 1
    assert _row(sessions, late).state == "cancelled"
    assert _row(sessions, late).error_message == "deadline of 30 s passed"
    assert _row(sessions, on_time).state == "queued"
    assert _row(sessions, without).state == "queued"


def test_a_stalled_running_job_past_its_deadline_is_cancelled_not_requeued(sessions, settings):
    job_id = _job(sessions, {}, deadline_s=30)
    with sessions() as session:
        assert jobs.claim(session, job_id, 0, "w1", "cpu") == 1
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                heartbeat_at=utcnow() - timedelta(minutes=10),
                deadline_at=utcnow() - timedelta(seconds=1),
            )
        )
        session.commit()

    report, resent = _reconcile(sessions, settings)

    assert (report.expired, report.requeued, resent) == (1, 0, [])
    row = _row(sessions, job_id)
    assert (row.state, row.error_type) == ("cancelled", "DeadlineExceeded")
