"""A queued job's position on its queue and its estimated start (db.queue_estimate)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import update

from db import queue_estimate
from db.base import utcnow
from db.models import Job

NOW = utcnow()


def _finished(create_job, sessions, kind: str, seconds: float, worker: str, queue="cpu") -> None:
    """A job of `kind` that succeeded on `queue` after running `seconds`, a minute ago."""
    job = create_job(kind=kind, state="succeeded", queue=queue)
    end = NOW - timedelta(minutes=1)
    with sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(started_at=end - timedelta(seconds=seconds), finished_at=end, worker=worker)
        )
        session.commit()


def _queued(create_job, kind="echo", priority=0, seconds_ago=0, queue="cpu") -> Job:
    return create_job(
        kind=kind, priority=priority, queue=queue, created_at=NOW - timedelta(seconds=seconds_ago)
    )


def _estimate(
    sessions, job: Job, slots: Callable[[str], int | None] | None = None
) -> queue_estimate.QueueEstimate | None:
    with sessions() as session:
        return queue_estimate.estimate(session, session.get(Job, job.id), slots, now=NOW)


def _history(create_job, sessions, queue="cpu") -> None:
    """echo takes 10/20/30 s (median 20) on worker w1; train 100 s on w2."""
    for seconds in (10, 20, 30):
        _finished(create_job, sessions, "echo", seconds, "w1", queue)
    _finished(create_job, sessions, "train", 100, "w2", queue)


def test_position_counts_higher_priority_then_older_jobs_of_the_same_queue(create_job, sessions):
    _queued(create_job, "echo", seconds_ago=40)  # older, same priority: ahead
    _queued(create_job, "train", seconds_ago=30)  # older, same priority: ahead
    _queued(create_job, "echo", priority=5, seconds_ago=1)  # newer but more urgent: ahead
    target = _queued(create_job, "echo", seconds_ago=20)
    _queued(create_job, "echo", seconds_ago=10)  # newer: behind
    _queued(create_job, "echo", seconds_ago=50, queue="gpu")  # another queue
    _history(create_job, sessions)

    standing = _estimate(sessions, target)

    assert standing is not None
    assert standing.position == 4
    # Ahead: 2 echo (median 20 s) + 1 train (100 s) = 140 s over 2 workers seen (w1, w2).
    assert standing.estimated_start_at == NOW + timedelta(seconds=70)


def test_a_running_job_adds_what_is_left_of_its_median(create_job, sessions):
    _history(create_job, sessions)
    running = create_job(kind="echo", state="running")
    with sessions() as session:  # started 5 s ago on w1: about 15 s of its 20 s are left
        session.execute(
            update(Job)
            .where(Job.id == running.id)
            .values(started_at=NOW - timedelta(seconds=5), worker="w1")
        )
        session.commit()
    target = _queued(create_job, "echo")

    standing = _estimate(sessions, target)

    assert standing == queue_estimate.QueueEstimate(1, NOW + timedelta(seconds=15))


def test_a_running_job_that_reports_progress_adds_what_its_own_pace_leaves(create_job, sessions):
    _history(create_job, sessions)  # train's median: 100 s
    running = create_job(kind="train", state="running")
    with sessions() as session:  # 1/8 done in 20 s: 140 s left, not the median's 80
        session.execute(
            update(Job)
            .where(Job.id == running.id)
            .values(started_at=NOW - timedelta(seconds=20), worker="w2", progress=0.125)
        )
        session.commit()
    target = _queued(create_job, "train")

    standing = _estimate(sessions, target)

    # 140 s on the one worker seen running train jobs (w2).
    assert standing == queue_estimate.QueueEstimate(1, NOW + timedelta(seconds=140))


def test_first_in_an_idle_queue_starts_now(create_job, sessions):
    assert _estimate(sessions, _queued(create_job)) == queue_estimate.QueueEstimate(1, NOW)


def test_without_recorded_durations_the_start_is_unknown(create_job, sessions):
    _queued(create_job, seconds_ago=10)
    target = _queued(create_job)
    _finished(create_job, sessions, "echo", 10, "w1", queue="gpu")  # another queue's

    assert _estimate(sessions, target) == queue_estimate.QueueEstimate(2, None)


def test_a_kind_without_durations_borrows_the_queues_median(create_job, sessions):
    _finished(create_job, sessions, "echo", 40, "w1")
    _queued(create_job, "export", seconds_ago=10)
    target = _queued(create_job, "echo")

    assert _estimate(sessions, target) == queue_estimate.QueueEstimate(
        2, NOW + timedelta(seconds=40)
    )


def test_only_a_queued_job_has_a_standing(create_job, sessions):
    for state in ("running", "succeeded", "failed", "cancelled"):
        assert _estimate(sessions, create_job(state=state)) is None


def test_the_job_api_shows_the_standing_only_while_queued_and_read_alone(
    client, alice, create_job, sessions
):
    _history(create_job, sessions, queue="interactive.cpu")  # where echo jobs are sent
    ahead = client.post("/api/v1/jobs", json={"kind": "echo"}, headers=alice).get_json()
    target = client.post("/api/v1/jobs", json={"kind": "echo"}, headers=alice).get_json()

    read = client.get(f"/api/v1/jobs/{target['id']}", headers=alice).get_json()
    assert read["queue_position"] == 2
    assert read["estimated_start_at"] is not None
    listed = client.get("/api/v1/jobs", headers=alice).get_json()["jobs"]
    assert {j["queue_position"] for j in listed} == {None}
    client.post(f"/api/v1/jobs/{ahead['id']}/cancel", headers=alice)
    assert (
        client.get(f"/api/v1/jobs/{target['id']}", headers=alice).get_json()["queue_position"] == 1
    )
    client.post(f"/api/v1/jobs/{target['id']}/cancel", headers=alice)
    cancelled = client.get(f"/api/v1/jobs/{target['id']}", headers=alice).get_json()
    assert (cancelled["queue_position"], cancelled["estimated_start_at"]) == (None, None)


def test_the_live_workers_job_slots_count_where_redis_tells_them(create_job, sessions):
    _queued(create_job, "echo", seconds_ago=40)
    _queued(create_job, "train", seconds_ago=30)
    target = _queued(create_job, "echo", seconds_ago=20)
    _history(create_job, sessions)  # seen: w1 and w2
    live = {"cpu": 4, "gpu": 1}

    standing = _estimate(sessions, target, live.get)
    unknown = _estimate(sessions, target, lambda queue: None)  # Redis did not answer

    # Ahead: 1 echo (20 s) + 1 train (100 s) = 120 s over the 4 live slots, not the 2 seen.
    assert standing == queue_estimate.QueueEstimate(3, NOW + timedelta(seconds=30))
    assert unknown == queue_estimate.QueueEstimate(3, NOW + timedelta(seconds=60))


def test_with_no_live_worker_on_its_queue_the_start_is_unknown(create_job, sessions):
    _history(create_job, sessions)
    target = _queued(create_job, "echo")

    def gpu_only(queue: str) -> int:
        return {"gpu": 1}.get(queue, 0)

    assert _estimate(sessions, target, gpu_only) == queue_estimate.QueueEstimate(1, None)
