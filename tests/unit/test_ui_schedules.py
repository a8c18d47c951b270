"""The schedules page: the job form with a name and cron line, the list, pause/resume/delete."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import schedules
from db.models import Job, Schedule
from kiln.specs import EchoSpec
from tests.unit.test_ui import _field_block, _sign_in, _token
from web.ui.filters import when


@pytest.fixture
def as_alice(client: FlaskClient, create_key: Callable[..., str]) -> FlaskClient:
    _sign_in(client, create_key("alice"))
    return client


def _form(client: FlaskClient, **fields: str) -> dict[str, str]:
    base = {"name": "nightly", "cron": "0 2 * * *", "message": "hi", "priority": "3"}
    return {"csrf_token": _token(client, "/schedules"), **base, **fields}


def _create(sessions: sessionmaker[Session], owner: str = "alice", name: str = "nightly") -> str:
    with sessions() as session:
        row = schedules.create(
            session, owner=owner, name=name, cron="0 2 * * *", kind="echo",
            spec={"message": "hi"}, priority=0, enabled=True,
        )  # fmt: skip
        session.commit()
        return row.id


def _rows(sessions: sessionmaker[Session]) -> list[Schedule]:
    with sessions() as session:
        return list(session.scalars(select(Schedule)))


def test_the_page_offers_a_schedule_form_per_kind(as_alice: FlaskClient) -> None:
    page = as_alice.get("/schedules").text
    assert "No schedules yet" in page
    assert 'href="/schedules/new/train"' in page
    assert '<a href="/schedules" class="active">Schedules</a>' in page  # in the nav
    form = as_alice.get("/schedules/new/echo").text
    assert 'action="/schedules/new/echo"' in form
    assert 'id="f-cron"' in form
    assert 'id="f-message"' in form  # the kind's own fields, from the same form generator
    assert as_alice.get("/schedules/new/nope").status_code == 404


def test_a_valid_form_creates_the_schedule_and_lists_its_next_runs(
    as_alice: FlaskClient, sessions: sessionmaker[Session], sent: list
) -> None:
    response = as_alice.post("/schedules/new/echo", data=_form(as_alice))
    assert response.status_code == 302
    [row] = _rows(sessions)
    assert response.headers["Location"] == f"/schedules#schedule-{row.id}"
    assert (row.owner, row.name, row.cron, row.kind) == ("alice", "nightly", "0 2 * * *", "echo")
    assert row.spec == EchoSpec(message="hi").model_dump(mode="json")
    assert (row.priority, row.enabled) == (3, True)
    assert sent == []  # a schedule submits nothing until it fires

    page = as_alice.get("/schedules").text
    assert "Schedule nightly created" in page
    assert "0 2 * * *" in page
    assert "active" in page
    runs = [row.next_run_at, *schedules.upcoming(row.cron, row.next_run_at, 2)]
    assert all(when(at) in page for at in runs)
    assert row.next_run_at > datetime.now(UTC)


def test_schedule_this_starts_from_a_jobs_spec(
    as_alice: FlaskClient, create_job: Callable[..., Job]
) -> None:
    job = create_job(owner="alice", spec={"message": "again please"}, priority=5)
    assert f'href="/schedules/new/echo?from={job.id}"' in as_alice.get(f"/jobs/{job.id}").text
    page = as_alice.get(f"/schedules/new/echo?from={job.id}").text
    assert 'value="again please"' in _field_block(page, "message")
    assert 'value="5"' in _field_block(page, "priority")
    bobs = create_job(owner="bob")
    assert as_alice.get(f"/schedules/new/echo?from={bobs.id}").status_code == 404


def test_a_bad_cron_line_is_explained_beside_it_with_every_value_kept(
    as_alice: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    response = as_alice.post("/schedules/new/echo", data=_form(as_alice, cron="every night"))
    assert response.status_code == 422
    page = response.text
    assert "The schedule was not created" in page
    assert "not a five-field cron expression" in _field_block(page, "cron")
    assert 'value="every night"' in _field_block(page, "cron")
    assert 'value="nightly"' in _field_block(page, "name")
    assert 'value="hi"' in _field_block(page, "message")
    assert 'value="3"' in _field_block(page, "priority")
    assert _rows(sessions) == []


def test_spec_and_name_errors_sit_beside_their_fields(
    as_alice: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    data = _form(as_alice, name="", sleep_s="-1", priority="12")
    response = as_alice.post("/schedules/new/echo", data=data)
    assert response.status_code == 422
    page = response.text
    assert "greater than or equal to 0" in _field_block(page, "sleep_s")
    assert 'value="-1"' in _field_block(page, "sleep_s")
    assert "give the schedule a name" in _field_block(page, "name")
    assert "0 to 9" in _field_block(page, "priority")
    assert 'class="error"' not in _field_block(page, "cron")
    assert _rows(sessions) == []


def test_pause_and_resume(as_alice: FlaskClient, sessions: sessionmaker[Session]) -> None:
    schedule_id = _create(sessions)
    token = _token(as_alice, "/schedules")
    paused = as_alice.post(f"/schedules/{schedule_id}/pause", data={"csrf_token": token})
    assert paused.status_code == 302
    [row] = _rows(sessions)
    assert not row.enabled
    page = as_alice.get("/schedules").text
    assert "Paused nightly." in page
    assert "paused" in page
    assert ">Resume</button>" in page
    assert when(row.next_run_at) not in page  # a paused schedule has no next runs

    resumed = as_alice.post(f"/schedules/{schedule_id}/resume", data={"csrf_token": token})
    assert resumed.status_code == 302
    [row] = _rows(sessions)
    assert row.enabled
    assert row.next_run_at > datetime.now(UTC)
    page = as_alice.get("/schedules").text
    assert "Resumed nightly" in page
    assert when(row.next_run_at) in page
    assert ">Pause</button>" in page


def test_delete_asks_first(as_alice: FlaskClient, sessions: sessionmaker[Session]) -> None:
    schedule_id = _create(sessions)
    assert f'href="/schedules/{schedule_id}/delete"' in as_alice.get("/schedules").text
    asked = as_alice.get(f"/schedules/{schedule_id}/delete")
    assert "Delete schedule nightly?" in asked.text
    assert len(_rows(sessions)) == 1  # asking deletes nothing
    token = _token(as_alice, f"/schedules/{schedule_id}/delete")
    response = as_alice.post(f"/schedules/{schedule_id}/delete", data={"csrf_token": token})
    assert response.status_code == 302
    assert _rows(sessions) == []
    assert "Deleted schedule nightly." in as_alice.get("/schedules").text


def test_another_users_schedule_is_not_found(
    as_alice: FlaskClient, sessions: sessionmaker[Session], create_key: Callable[..., str]
) -> None:
    bobs = _create(sessions, owner="bob", name="bobs-nightly")
    assert "bobs-nightly" not in as_alice.get("/schedules").text
    token = _token(as_alice, "/schedules")
    for action in ("pause", "resume", "delete"):
        response = as_alice.post(f"/schedules/{bobs}/{action}", data={"csrf_token": token})
        assert response.status_code == 404, action
    [row] = _rows(sessions)
    assert row.enabled

    admin = as_alice.application.test_client()
    _sign_in(admin, create_key("root", role="admin"))  # an admin sees everyone's
    assert "bobs-nightly" in admin.get("/schedules").text


@pytest.mark.parametrize("action", ["new/echo", "x/pause", "x/resume", "x/delete"])
def test_schedule_posts_need_the_sessions_token(as_alice: FlaskClient, action: str) -> None:
    assert as_alice.post(f"/schedules/{action}", data={"name": "n"}).status_code == 403
    assert as_alice.post(f"/schedules/{action}", data={"csrf_token": "forged"}).status_code == 403
