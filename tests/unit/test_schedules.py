"""Cron schedules: the pure tick, firing against the database, and the /schedules API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from db import jobs, keys, schedules
from db.models import Job, Schedule
from kiln.broker import QueuedAttempt
from workers.scheduler import fire_due, tick

NOON = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
#: A quota no test reaches unless it means to.
ROOMY = 100


def _recorder(sent: list[Job]):
    """A sender (kiln.broker.Sender) that records the jobs it was given."""

    def send(job: QueuedAttempt, countdown: float = 0.0) -> None:
        sent.append(job)

    return send


def _discard(job: QueuedAttempt, countdown: float = 0.0) -> None:
    pass


@dataclass
class Row:
    id: str
    cron: str
    enabled: bool
    next_run_at: datetime


def test_a_schedule_that_missed_many_slots_fires_once_and_skips_to_the_next_slot():
    hourly = Row("s1", "0 * * * *", True, NOON - timedelta(hours=5))
    now = NOON + timedelta(minutes=7)

    firings = tick([hourly], now)

    assert len(firings) == 1
    assert firings[0].was_due == NOON - timedelta(hours=5)
    assert firings[0].next_run_at == NOON + timedelta(hours=1)


def test_paused_and_not_yet_due_schedules_do_not_fire():
    paused = Row("p", "* * * * *", False, NOON - timedelta(minutes=1))
    later = Row("l", "* * * * *", True, NOON + timedelta(seconds=1))
    exactly_now = Row("n", "*/5 * * * *", True, NOON)

    firings = tick([paused, later, exactly_now], NOON)

    assert [f.schedule_id for f in firings] == ["n"]
    assert firings[0].next_run_at == NOON + timedelta(minutes=5)


def _schedule(sessions, cron="0 * * * *", **fields) -> Schedule:
    """A schedule of alice's, who holds a live API key."""
    with sessions() as session:
        keys.create(session, owner="alice")
        schedule = schedules.create(
            session,
            owner="alice",
            name="nightly",
            cron=cron,
            kind="echo",
            spec={"message": "hi"},
            priority=3,
            enabled=True,
        )
        for name, value in fields.items():
            setattr(schedule, name, value)
        session.commit()
        return schedule


def test_a_missed_window_fires_exactly_once_in_the_database(sessions):
    created = _schedule(sessions, next_run_at=NOON - timedelta(hours=3))
    now = NOON + timedelta(minutes=1)
    sent: list[Job] = []

    first = fire_due(sessions, _recorder(sent), max_queued=ROOMY, now=now)
    again = fire_due(sessions, _recorder(sent), max_queued=ROOMY, now=now)

    assert len(first) == 1
    assert again == []
    assert [j.id for j in sent] == [first[0].id]
    with sessions() as session:
        job = session.get(Job, first[0].id)
        schedule = session.get(Schedule, created.id)
        all_jobs = session.scalars(select(Job)).all()
    assert len(all_jobs) == 1
    assert (job.kind, job.owner, job.state, job.priority) == ("echo", "alice", "queued", 3)
    assert job.spec["message"] == "hi"
    assert schedule.next_run_at == NOON + timedelta(hours=1)
    assert schedule.last_job_id == job.id


def test_nothing_fires_for_an_owner_whose_keys_are_all_revoked(sessions):
    _schedule(sessions, next_run_at=NOON)
    with sessions() as session:
        for key in keys.list_keys(session):
            keys.revoke(session, key.id)
        session.commit()

    assert fire_due(sessions, _discard, max_queued=ROOMY, now=NOON + timedelta(minutes=1)) == []
    with sessions() as session:
        assert session.scalars(select(Job)).all() == []


def test_a_second_scheduler_with_a_stale_read_cannot_fire_the_same_slot(sessions):
    created = _schedule(sessions, next_run_at=NOON)
    with sessions() as session:
        stale = session.get(Schedule, created.id)
    fire_due(sessions, _discard, max_queued=ROOMY, now=NOON)

    with sessions() as session:
        lost = schedules.fire(session, stale, NOON, NOON + timedelta(hours=1), max_queued=ROOMY)
        session.commit()

    assert lost is None


def test_a_fired_job_is_sent_after_its_commit_and_its_send_is_recorded(sessions):
    _schedule(sessions, next_run_at=NOON)
    seen: list[str | None] = []

    def send(job: QueuedAttempt, countdown: float = 0.0) -> None:
        # A separate connection sees the row only if the firing committed it before the send.
        with sessions() as session:
            seen.append(session.scalar(select(Job.state).where(Job.id == job.id)))

    [job] = fire_due(sessions, send, max_queued=ROOMY, now=NOON + timedelta(minutes=1))

    assert seen == ["queued"]
    with sessions() as session:
        assert session.get(Job, job.id).sent_at is not None  # the reconciler will not resend


def test_a_broker_refusing_one_send_neither_loses_the_job_nor_stops_other_schedules(sessions):
    _schedule(sessions, next_run_at=NOON)
    _schedule(sessions, next_run_at=NOON)

    def broker_down(job: QueuedAttempt, countdown: float = 0.0) -> None:
        raise ConnectionError("broker unreachable")

    created = fire_due(sessions, broker_down, max_queued=ROOMY, now=NOON + timedelta(minutes=1))

    assert len(created) == 2  # both committed; unsent, so the reconciler sends them
    with sessions() as session:
        rows = session.scalars(select(Job)).all()
    assert [(j.state, j.sent_at) for j in rows] == [("queued", None), ("queued", None)]


def test_an_owner_at_the_queue_quota_gets_no_scheduled_job_and_the_slot_is_skipped(
    sessions, create_job, caplog
):
    created = _schedule(sessions, next_run_at=NOON)
    create_job(owner="alice")
    create_job(owner="alice")  # alice has 2 queued jobs: at a quota of 2
    sent: list[Job] = []

    with caplog.at_level("WARNING", logger="workers.scheduler"):
        fired = fire_due(sessions, _recorder(sent), max_queued=2, now=NOON + timedelta(minutes=1))

    assert (fired, sent) == ([], [])
    with sessions() as session:
        assert jobs.count_queued(session, "alice") == 2
        schedule = session.get(Schedule, created.id)
    # The slot is passed over (not retried every tick), and the last run still names the
    # last slot that made a job (none yet).
    assert schedule.next_run_at == NOON + timedelta(hours=1)
    assert (schedule.last_run_at, schedule.last_job_id) == (None, None)
    [record] = [r for r in caplog.records if "event=skipped" in r.getMessage()]
    assert "reason=queue_quota_exceeded" in record.getMessage()
    assert "max_queued_per_owner=2" in record.getMessage()
    assert f"schedule={created.id}" in record.getMessage()

    # Below the quota again, the next slot fires as usual.
    later = fire_due(sessions, _recorder(sent), max_queued=3, now=NOON + timedelta(hours=1))
    assert len(later) == 1
    assert [j.id for j in sent] == [later[0].id]


def test_a_quota_skip_by_a_stale_scheduler_does_not_move_a_slot_another_one_fired(sessions):
    created = _schedule(sessions, next_run_at=NOON)
    with sessions() as session:
        stale = session.get(Schedule, created.id)
    fire_due(sessions, _discard, max_queued=ROOMY, now=NOON)

    with sessions() as session:
        moved = schedules.skip(session, stale, NOON, NOON + timedelta(hours=5))
        session.commit()
        schedule = session.get(Schedule, created.id)

    assert moved is False
    assert schedule.next_run_at == NOON + timedelta(hours=1)


# --- API ------------------------------------------------------------------------------------


def _create(client, headers, **overrides):
    body = {"name": "nightly", "cron": "30 2 * * *", "kind": "echo", "spec": {"message": "x"}}
    return client.post("/api/v1/schedules", json=body | overrides, headers=headers)


def test_creating_a_schedule_shows_its_next_run_times(client, alice):
    response = _create(client, alice)

    assert response.status_code == 201
    body = response.get_json()
    assert response.headers["Location"] == f"/api/v1/schedules/{body['id']}"
    times = [datetime.fromisoformat(t) for t in body["upcoming"]]
    assert len(times) == 3
    assert all((t.hour, t.minute) == (2, 30) for t in times)
    assert times[1] - times[0] == timedelta(days=1)
    assert datetime.fromisoformat(body["next_run_at"]) == times[0]
    assert body["spec"]["sleep_s"] == 0.0  # stored as validated, defaults filled in


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"cron": "61 * * * *"}, "invalid_spec"),
        ({"cron": "* * * *"}, "invalid_spec"),
        ({"kind": "nope"}, "invalid_spec"),
        ({"spec": {"sleep_s": -1}}, "invalid_spec"),
        ({"priority": 11}, "invalid_body"),
    ],
)
def test_a_bad_schedule_answers_422(client, alice, overrides, code):
    response = _create(client, alice, **overrides)

    assert response.status_code == 422
    assert response.get_json()["code"] == code


def test_schedules_are_owner_isolated(client, alice, bob, admin):
    mine = _create(client, alice).get_json()

    assert client.get("/api/v1/schedules", headers=bob).get_json()["schedules"] == []
    assert client.get(f"/api/v1/schedules/{mine['id']}", headers=bob).status_code == 404
    assert client.delete(f"/api/v1/schedules/{mine['id']}", headers=bob).status_code == 404
    listed = client.get("/api/v1/schedules", headers=admin).get_json()["schedules"]
    assert [s["id"] for s in listed] == [mine["id"]]


def test_pause_resume_and_delete(client, alice):
    created = _create(client, alice).get_json()
    url = f"/api/v1/schedules/{created['id']}"

    paused = client.post(f"{url}/pause", headers=alice).get_json()
    resumed = client.post(f"{url}/resume", headers=alice).get_json()
    deleted = client.delete(url, headers=alice)

    assert (paused["enabled"], paused["next_run_at"], paused["upcoming"]) == (False, None, [])
    assert resumed["enabled"] is True
    assert len(resumed["upcoming"]) == 3
    assert deleted.status_code == 204
    assert client.get(url, headers=alice).status_code == 404
