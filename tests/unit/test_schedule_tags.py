"""A schedule's template may carry tags and a deadline: every job it fires carries them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from db.models import Job, Schedule
from workers.scheduler import fire_due

NOON = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _create(client, headers, **extra):
    body = {"name": "nightly", "cron": "30 2 * * *", "kind": "echo", **extra}
    return client.post("/api/v1/schedules", json=body, headers=headers)


def test_a_fired_job_carries_the_schedules_tags_and_deadline(client, alice, sessions):
    created = _create(client, alice, tags={"team": "nlp"}, deadline_s=7200)
    assert created.status_code == 201, created.get_json()
    body = created.get_json()
    assert (body["tags"], body["deadline_s"]) == ({"team": "nlp"}, 7200)
    with sessions() as session:
        schedule = session.get(Schedule, body["id"])
        schedule.next_run_at = NOON - timedelta(minutes=1)
        session.commit()

    fired = fire_due(sessions, lambda job, countdown=0.0: None, max_queued=100, now=NOON)

    assert len(fired) == 1
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.tags == {"team": "nlp"}
        assert job.deadline_s == 7200
        assert job.deadline_at == job.created_at + timedelta(seconds=7200)
    listed = client.get("/api/v1/jobs?tag=team:nlp", headers=alice).get_json()["jobs"]
    assert [j["id"] for j in listed] == [job.id]


def test_a_schedule_without_tags_shows_an_empty_mapping(client, alice):
    body = _create(client, alice).get_json()
    assert (body["tags"], body["deadline_s"]) == ({}, None)
    assert client.get(f"/api/v1/schedules/{body['id']}", headers=alice).get_json()["tags"] == {}


@pytest.mark.parametrize("extra", [{"tags": {"bad key": "x"}}, {"deadline_s": 0}])
def test_bad_template_tags_or_deadline_are_422(client, alice, extra):
    response = _create(client, alice, **extra)
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["loc"][0] == next(iter(extra))


def test_a_fired_job_keeps_its_outputs_for_the_schedules_expires_after(client, alice, sessions):
    created = _create(client, alice, expires_after=86400)
    assert created.status_code == 201, created.get_json()
    body = created.get_json()
    assert body["expires_after"] == 86400
    plain = _create(client, alice).get_json()
    assert plain["expires_after"] is None
    with sessions() as session:
        for schedule_id in (body["id"], plain["id"]):
            session.get_one(Schedule, schedule_id).next_run_at = NOON - timedelta(minutes=1)
        session.commit()

    fired = fire_due(
        sessions, lambda job, countdown=0.0: None, max_queued=100, now=NOON, expires_after_s=600
    )

    assert len(fired) == 2
    with sessions() as session:
        kept = {j.expires_after_s for j in session.scalars(select(Job))}
    assert kept == {86400, 600}  # the schedule's own, and the default for the plain one


@pytest.mark.parametrize("value", [59, True, 3650 * 86400 + 1])
def test_a_bad_schedule_expires_after_is_422(client, alice, value):
    response = _create(client, alice, expires_after=value)
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["errors"][0]["loc"] == ["expires_after"]
