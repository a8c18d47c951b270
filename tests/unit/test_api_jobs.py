"""The jobs API: submit, list, read, cancel, metrics and events."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from db import jobs
from db.models import Job

JOB_FIELDS = {
    "id",
    "kind",
    "state",
    "progress",
    "message",
    "attempt",
    "created_at",
    "started_at",
    "finished_at",
    "worker",
    "device",
    "result",
    "error",
}
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- submit ---------------------------------------------------------------------------------


def test_submit_answers_202_with_location_and_the_queued_job(client, alice, sent):
    response = client.post(
        "/api/v1/jobs", json={"kind": "echo", "spec": {"message": "hi"}}, headers=alice
    )

    assert response.status_code == 202
    body = response.get_json()
    assert JOB_FIELDS.issubset(body)
    assert response.headers["Location"] == f"/api/v1/jobs/{body['id']}"
    assert body["kind"] == "echo"
    assert body["state"] == "queued"
    assert body["owner"] == "alice"
    assert body["progress"] == 0.0
    assert body["message"] == "queued"
    assert body["attempt"] == 0
    assert body["cancel_requested"] is False
    assert body["created_at"] is not None
    assert body["started_at"] is None
    assert body["finished_at"] is None
    assert body["worker"] is None
    assert body["device"] is None
    assert body["result"] is None
    assert body["error"] is None


def test_submit_stores_the_spec_with_its_defaults_filled_in(client, alice):
    response = client.post(
        "/api/v1/jobs", json={"kind": "echo", "spec": {"message": "hi"}}, headers=alice
    )

    assert response.get_json()["spec"] == {
        "device": "auto",
        "message": "hi",
        "sleep_s": 0.0,
        "fail_with": None,
        "crash": False,
        "hang_s": 0.0,
    }


def test_submit_sends_the_job_once(client, alice, sent):
    response = client.post("/api/v1/jobs", json={"kind": "echo"}, headers=alice)

    assert sent == [(response.get_json()["id"], 0, "interactive.cpu")]


@pytest.mark.parametrize(
    ("device", "queue"),
    [("auto", "interactive.cpu"), ("cpu", "interactive.cpu"), ("gpu", "interactive.gpu")],
)
def test_submit_routes_the_job_to_the_queue_of_its_device(client, alice, sent, device, queue):
    response = client.post(
        "/api/v1/jobs", json={"kind": "echo", "spec": {"device": device}}, headers=alice
    )

    assert response.get_json()["queue"] == queue
    assert [q for _, _, q in sent] == [queue]


def test_submit_sends_only_after_the_job_row_is_committed(make_app, sessions, alice):
    # The sender looks through a separate connection: it sees the row only if it is committed.
    seen: list[str | None] = []

    def sender(job, countdown=0.0):
        with sessions() as session:
            seen.append(session.scalar(select(Job.state).where(Job.id == job.id)))

    client = make_app(sender=sender).test_client()
    response = client.post("/api/v1/jobs", json={"kind": "echo"}, headers=alice)

    assert response.status_code == 202
    assert seen == ["queued"]


def test_submit_keeps_the_job_queued_when_the_broker_send_fails(make_app, sessions, alice):
    def broken_sender(job, countdown=0.0):
        raise ConnectionError("broker down")

    client = make_app(sender=broken_sender).test_client()
    response = client.post("/api/v1/jobs", json={"kind": "echo"}, headers=alice)

    assert response.status_code == 202
    with sessions() as session:
        job = session.get(Job, response.get_json()["id"])
        assert job is not None
        assert job.state == "queued"


def test_submit_with_an_invalid_spec_answers_422_naming_the_field(client, alice, sent):
    response = client.post(
        "/api/v1/jobs",
        json={"kind": "train", "spec": {"model_name": "m", "epochs": 0}},
        headers=alice,
    )

    assert response.status_code == 422
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    assert problem["code"] == "invalid_spec"
    assert problem["status"] == 422
    assert [e["loc"] for e in problem["errors"]] == [["spec", "epochs"]]
    assert sent == []


def test_submit_with_an_unknown_spec_field_answers_422(client, alice):
    response = client.post(
        "/api/v1/jobs", json={"kind": "echo", "spec": {"mesage": "typo"}}, headers=alice
    )

    assert response.status_code == 422
    assert response.get_json()["errors"][0]["loc"] == ["spec", "mesage"]


def test_submit_of_an_unknown_kind_answers_422_and_stores_nothing(client, alice, sessions, sent):
    response = client.post("/api/v1/jobs", json={"kind": "bake", "spec": {}}, headers=alice)

    assert response.status_code == 422
    problem = response.get_json()
    assert problem["code"] == "invalid_spec"
    assert problem["errors"][0]["loc"] == ["kind"]
    assert sent == []
    with sessions() as session:
        assert session.scalars(select(Job)).all() == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data": "not json", "content_type": "application/json"},
        {"data": "kind=echo", "content_type": "application/x-www-form-urlencoded"},
        {"json": ["echo"]},
    ],
    ids=["malformed-json", "form-body", "json-array"],
)
def test_submit_without_a_json_object_body_answers_400(client, alice, sent, kwargs):
    response = client.post("/api/v1/jobs", headers=alice, **kwargs)

    assert response.status_code == 400
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["code"] == "invalid_request"
    assert sent == []


def test_submit_with_an_out_of_range_priority_answers_422_invalid_body(client, alice):
    response = client.post("/api/v1/jobs", json={"kind": "echo", "priority": 10}, headers=alice)

    assert response.status_code == 422
    problem = response.get_json()
    assert problem["code"] == "invalid_body"
    assert problem["errors"][0]["loc"] == ["priority"]


# --- list -----------------------------------------------------------------------------------


def test_list_shows_the_callers_jobs_newest_first(client, alice, create_job):
    created = [create_job(created_at=at(i)).id for i in range(4)]
    create_job(owner="bob", created_at=at(10))

    response = client.get("/api/v1/jobs", headers=alice)

    assert response.status_code == 200
    body = response.get_json()
    assert [j["id"] for j in body["jobs"]] == created[::-1]
    assert body["next_cursor"] is None


def test_list_filters_by_state(client, alice, create_job):
    create_job(state="queued")
    running = create_job(state="running")
    create_job(state="succeeded")

    response = client.get("/api/v1/jobs?state=running", headers=alice)

    assert [j["id"] for j in response.get_json()["jobs"]] == [running.id]


def test_list_filters_by_kind(client, alice, create_job):
    create_job(kind="echo")
    train = create_job(kind="train", spec={"model_name": "m"})

    response = client.get("/api/v1/jobs?kind=train", headers=alice)

    assert [j["id"] for j in response.get_json()["jobs"]] == [train.id]


def test_list_with_an_unknown_state_answers_400(client, alice):
    response = client.get("/api/v1/jobs?state=baking", headers=alice)

    assert response.status_code == 400
    assert response.get_json()["code"] == "invalid_request"


@pytest.mark.parametrize("limit", ["0", "201", "ten"])
def test_list_with_a_bad_limit_answers_400(client, alice, limit):
    response = client.get(f"/api/v1/jobs?limit={limit}", headers=alice)

    assert response.status_code == 400
    assert response.get_json()["code"] == "invalid_request"


def test_list_pages_through_every_job_once_in_order(client, alice, create_job):
    # Several jobs share a created_at, so the pages must break ties by id without gaps.
    seconds = [0, 1, 1, 1, 2, 3, 3]
    made = [create_job(created_at=at(s)) for s in seconds]
    expected = [j.id for j in sorted(made, key=lambda j: (j.created_at, j.id), reverse=True)]

    pages, cursor = [], None
    while True:
        url = "/api/v1/jobs?limit=3" + (f"&cursor={cursor}" if cursor else "")
        response = client.get(url, headers=alice)
        assert response.status_code == 200
        body = response.get_json()
        pages.append([j["id"] for j in body["jobs"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break

    assert [len(page) for page in pages] == [3, 3, 1]
    assert [job_id for page in pages for job_id in page] == expected


def test_list_pagination_keeps_the_state_filter(client, alice, create_job):
    queued = [create_job(created_at=at(i)).id for i in range(3)]
    create_job(state="running", created_at=at(1))

    first = client.get("/api/v1/jobs?state=queued&limit=2", headers=alice).get_json()
    cursor = first["next_cursor"]
    second = client.get(f"/api/v1/jobs?state=queued&limit=2&cursor={cursor}", headers=alice)

    ids = [j["id"] for j in first["jobs"]] + [j["id"] for j in second.get_json()["jobs"]]
    assert ids == queued[::-1]


@pytest.mark.parametrize(
    "cursor",
    [
        "not-a-cursor!",
        base64.urlsafe_b64encode(b"no separator").decode(),
        base64.urlsafe_b64encode(b"yesterday|abc").decode(),
        base64.urlsafe_b64encode(b"2026-01-01T00:00:00|abc").decode(),  # no UTC offset
    ],
    ids=["garbage", "no-separator", "bad-date", "naive-date"],
)
def test_list_with_a_cursor_it_did_not_issue_answers_400(client, alice, create_job, cursor):
    create_job()

    response = client.get(f"/api/v1/jobs?cursor={cursor}", headers=alice)

    assert response.status_code == 400
    assert response.get_json()["code"] == "invalid_request"


# --- read -----------------------------------------------------------------------------------


def test_get_returns_the_job(client, alice, create_job):
    job = create_job(state="running")

    response = client.get(f"/api/v1/jobs/{job.id}", headers=alice)

    assert response.status_code == 200
    body = response.get_json()
    assert body["id"] == job.id
    assert body["state"] == "running"
    assert body["attempt"] == 1
    assert body["worker"] == "worker-1"
    assert body["device"] == "cpu"
    assert body["started_at"] is not None


def test_get_shows_a_failed_jobs_error(client, alice, create_job):
    job = create_job(state="failed")

    body = client.get(f"/api/v1/jobs/{job.id}", headers=alice).get_json()

    assert body["state"] == "failed"
    assert body["error"] == {"type": "RuntimeError", "message": "it broke"}
    assert body["finished_at"] is not None


def test_get_shows_a_succeeded_jobs_result(client, alice, create_job):
    job = create_job(state="succeeded")

    body = client.get(f"/api/v1/jobs/{job.id}", headers=alice).get_json()

    assert body["state"] == "succeeded"
    assert body["result"] == {"echo": "hello"}
    assert body["progress"] == 1.0


def test_get_of_an_unknown_job_answers_404(client, alice):
    response = client.get("/api/v1/jobs/0123456789abcdef0123456789abcdef", headers=alice)

    assert response.status_code == 404
    assert response.get_json()["code"] == "not_found"


# --- cancel ---------------------------------------------------------------------------------


def test_cancel_of_a_queued_job_cancels_it_at_once(client, alice, create_job, sessions):
    job = create_job()

    response = client.post(f"/api/v1/jobs/{job.id}/cancel", headers=alice)

    assert response.status_code == 202
    body = response.get_json()
    assert body["state"] == "cancelled"
    assert body["finished_at"] is not None
    with sessions() as session:
        assert session.get(Job, job.id).state == "cancelled"


def test_cancel_of_a_running_job_asks_it_to_stop(client, alice, create_job, sessions):
    job = create_job(state="running")

    response = client.post(f"/api/v1/jobs/{job.id}/cancel", headers=alice)

    assert response.status_code == 202
    body = response.get_json()
    assert body["state"] == "running"
    assert body["cancel_requested"] is True
    assert body["finished_at"] is None
    with sessions() as session:
        assert jobs.is_cancel_requested(session, job.id)


@pytest.mark.parametrize("state", ["succeeded", "failed", "cancelled"])
def test_cancel_of_a_finished_job_answers_409(client, alice, create_job, state):
    job = create_job(state=state)

    response = client.post(f"/api/v1/jobs/{job.id}/cancel", headers=alice)

    assert response.status_code == 409
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["code"] == "illegal_transition"


# --- metrics and events ---------------------------------------------------------------------


def test_metrics_returns_each_series_by_name_in_step_order(client, alice, create_job, sessions):
    job = create_job(state="running")
    with sessions() as session:
        points = [
            ("val_acc", 2, 0.9),
            ("train_loss", 2, 0.5),
            ("val_acc", 1, 0.8),
            ("train_loss", 1, 0.7),
            ("train_loss", 3, 0.4),
        ]
        jobs.record_metrics(session, job.id, points)
        session.commit()

    response = client.get(f"/api/v1/jobs/{job.id}/metrics", headers=alice)

    assert response.status_code == 200
    body = response.get_json()
    assert body["job_id"] == job.id
    series = {
        name: [(p["step"], p["value"]) for p in points] for name, points in body["series"].items()
    }
    assert series == {
        "train_loss": [(1, 0.7), (2, 0.5), (3, 0.4)],
        "val_acc": [(1, 0.8), (2, 0.9)],
    }


def test_a_metric_step_reported_again_keeps_its_latest_value(client, alice, create_job, sessions):
    # As a resumed attempt re-reports the epochs its lost attempt had already written.
    job = create_job(state="running")
    for points in (
        [("val_acc", 1, 0.5), ("val_acc", 2, 0.6)],
        [("val_acc", 2, 0.7), ("val_acc", 2, 0.75), ("val_acc", 3, 0.8)],
    ):
        with sessions() as session:
            jobs.record_metrics(session, job.id, points)
            session.commit()

    body = client.get(f"/api/v1/jobs/{job.id}/metrics", headers=alice).get_json()

    assert [(p["step"], p["value"]) for p in body["series"]["val_acc"]] == [
        (1, 0.5),
        (2, 0.75),
        (3, 0.8),
    ]


def test_metrics_of_a_job_without_metrics_is_empty(client, alice, create_job):
    job = create_job()

    body = client.get(f"/api/v1/jobs/{job.id}/metrics", headers=alice).get_json()

    assert body == {"job_id": job.id, "series": {}}


def test_events_returns_log_lines_in_order_and_after_a_given_id(
    client, alice, create_job, sessions
):
    job, other = create_job(), create_job()
    with sessions() as session:
        for line in ["one", "two", "three"]:
            jobs.log(session, job.id, line)
        jobs.log(session, other.id, "another job's line")
        session.commit()

    everything = client.get(f"/api/v1/jobs/{job.id}/events", headers=alice).get_json()["events"]
    assert [e["message"] for e in everything] == ["one", "two", "three"]
    assert all(e["level"] == "info" for e in everything)

    after_first = client.get(
        f"/api/v1/jobs/{job.id}/events?after={everything[0]['id']}", headers=alice
    ).get_json()["events"]
    assert [e["message"] for e in after_first] == ["two", "three"]

    after_last = client.get(
        f"/api/v1/jobs/{job.id}/events?after={everything[-1]['id']}", headers=alice
    ).get_json()["events"]
    assert after_last == []


def test_events_with_a_negative_after_answers_400(client, alice, create_job):
    job = create_job()

    response = client.get(f"/api/v1/jobs/{job.id}/events?after=-1", headers=alice)

    assert response.status_code == 400
    assert response.get_json()["code"] == "invalid_request"
