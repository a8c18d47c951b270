"""DELETE /jobs/<id>, DELETE /models/<name>, and a submission's expires_after (SQLite and
PostgreSQL): who may delete what, what goes with it, and what lineage keeps."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from db import jobs
from db.models import JobEvent, Metric
from kiln.states import JobState
from tests.retentionkit import (
    count,
    dataset,
    finished_job,
    job_row,
    live_job,
    output_result,
    put,
    register,
    scratch,
    store_of,
)


def assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["code"] == code
    return body


# --- deleting jobs ----------------------------------------------------------------------------


@pytest.mark.parametrize("state", [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED])
def test_a_finished_job_goes_with_its_log_metrics_output_and_scratch(
    client, alice, sessions, settings, state
):
    output = put(settings, b"id,label\n1,yes\n")
    job = finished_job(sessions, result=output_result(output), state=state)
    folder = scratch(settings, job.id)

    response = client.delete(f"/api/v1/jobs/{job.id}", headers=alice)

    assert response.status_code == 204
    assert_problem(client.get(f"/api/v1/jobs/{job.id}", headers=alice), 404, "not_found")
    assert job_row(sessions, job.id) is None
    assert count(sessions, JobEvent, job.id) == 0
    assert count(sessions, Metric, job.id) == 0
    assert not store_of(settings).path(output.digest).exists()
    assert not folder.exists()


@pytest.mark.parametrize("running", [False, True], ids=["queued", "running"])
def test_a_queued_or_running_job_cannot_be_deleted(client, alice, sessions, running):
    job = live_job(sessions, {"message": "hi"}, kind="echo", running=running)

    refused = client.delete(f"/api/v1/jobs/{job.id}", headers=alice)

    body = assert_problem(refused, 409, "illegal_transition")
    assert "only a finished job can be deleted" in body["detail"]
    assert job_row(sessions, job.id) is not None


def test_another_users_job_is_not_found_and_stays(client, bob, sessions):
    job = finished_job(sessions, owner="alice")

    assert_problem(client.delete(f"/api/v1/jobs/{job.id}", headers=bob), 404, "not_found")
    assert job_row(sessions, job.id) is not None
    assert count(sessions, JobEvent, job.id) == 1


def test_an_admin_may_delete_anyones_finished_job(client, admin, sessions):
    job = finished_job(sessions, owner="alice")

    assert client.delete(f"/api/v1/jobs/{job.id}", headers=admin).status_code == 204
    assert job_row(sessions, job.id) is None


def test_an_output_file_another_row_shares_is_kept(client, alice, sessions, settings):
    shared = dataset(sessions, settings, b"a\n1\n2\n")  # the same bytes as the job's output
    first = finished_job(sessions, result=output_result(put(settings, b"a\n1\n2\n")))
    second = finished_job(sessions, result=output_result(put(settings, b"a\n1\n2\n")))

    assert client.delete(f"/api/v1/jobs/{first.id}", headers=alice).status_code == 204

    assert store_of(settings).path(shared.digest).exists()
    downloaded = client.get(f"/api/v1/jobs/{second.id}/output", headers=alice)
    assert downloaded.get_data() == b"a\n1\n2\n"
    downloaded.close()


def test_the_version_a_deleted_job_trained_stays_naming_it(client, alice, sessions, settings):
    job = finished_job(sessions, kind="train", spec={"model_name": "m"}, result={"version": 1})
    version = register(sessions, settings, "m", b"trained weights", source_job_id=job.id)

    assert client.delete(f"/api/v1/jobs/{job.id}", headers=alice).status_code == 204

    kept = client.get("/api/v1/models/m/versions/1", headers=alice).get_json()
    assert kept["source_job_id"] == job.id  # the record of where it came from
    assert store_of(settings).path(version.artifact_digest).exists()


def test_a_job_a_live_job_resumes_from_cannot_be_deleted(client, alice, sessions):
    source = finished_job(sessions, kind="train", state=JobState.CANCELLED)
    live_job(sessions, {"model_name": "m", "resume_from": source.id}, kind="train")

    body = assert_problem(client.delete(f"/api/v1/jobs/{source.id}", headers=alice), 409, "in_use")
    assert "resumes from" in body["detail"]
    assert job_row(sessions, source.id) is not None


# --- deleting models --------------------------------------------------------------------------


def test_a_model_goes_with_its_versions_and_the_files_only_it_used(
    client, alice, sessions, settings
):
    own = register(sessions, settings, "m", b"own weights")
    register(sessions, settings, "m", b"shared weights")
    other = register(sessions, settings, "other", b"shared weights")

    assert client.delete("/api/v1/models/m", headers=alice).status_code == 204

    assert_problem(client.get("/api/v1/models/m", headers=alice), 404, "not_found")
    assert not store_of(settings).path(own.artifact_digest).exists()
    assert store_of(settings).path(other.artifact_digest).exists()
    assert client.get("/api/v1/models/other/versions/1", headers=alice).status_code == 200


def test_a_model_with_an_alias_cannot_be_deleted(client, alice, sessions, settings):
    version = register(sessions, settings, "m", b"weights")
    client.put("/api/v1/models/m/aliases/production", json={"version": 1}, headers=alice)

    body = assert_problem(client.delete("/api/v1/models/m", headers=alice), 409, "in_use")

    assert "production" in body["detail"]
    assert store_of(settings).path(version.artifact_digest).exists()
    client.delete("/api/v1/models/m/aliases/production", headers=alice)
    assert client.delete("/api/v1/models/m", headers=alice).status_code == 204


@pytest.mark.parametrize(
    ("kind", "spec", "running"),
    [
        ("predict", {"model": "m", "version": "latest", "inputs": [[1, 2, 3]]}, False),
        ("batch_predict", {"model": "m", "version": 1, "dataset": "d"}, True),
        ("train", {"model_name": "tuned", "arch_params": {"arch": "hf", "base_model": "m"}}, False),
    ],
    ids=["queued-predict", "running-batch", "queued-finetune-base"],
)
def test_a_model_a_live_job_uses_cannot_be_deleted(
    client, alice, sessions, settings, kind, spec, running
):
    register(sessions, settings, "m", b"weights")
    job = live_job(sessions, spec, kind=kind, running=running)

    body = assert_problem(client.delete("/api/v1/models/m", headers=alice), 409, "in_use")

    assert job.id in body["detail"]
    assert client.get("/api/v1/models/m", headers=alice).status_code == 200


def test_another_users_job_naming_the_same_model_name_does_not_hold_it(
    client, alice, sessions, settings
):
    register(sessions, settings, "m", b"weights")
    live_job(sessions, {"model": "m", "inputs": [[1]]}, owner="bob")

    assert client.delete("/api/v1/models/m", headers=alice).status_code == 204


def test_another_users_model_is_not_found(client, alice, bob, sessions, settings):
    register(sessions, settings, "m", b"weights", owner="alice")

    assert_problem(client.delete("/api/v1/models/m", headers=bob), 404, "not_found")
    assert client.get("/api/v1/models/m", headers=alice).status_code == 200


# --- expires_after and expires_at -------------------------------------------------------------


def test_a_job_without_expires_after_keeps_its_files_the_retention_days(client, alice, sessions):
    job = client.post("/api/v1/jobs", json={"kind": "echo", "spec": {}}, headers=alice).get_json()

    assert job["expires_after"] == 30 * 86400
    assert job["expires_at"] is None
    assert job["expired"] is False
    with sessions() as session:
        jobs.fail(session, job["id"], None, "JobFailure", "stopped")
        session.commit()
    finished = client.get(f"/api/v1/jobs/{job['id']}", headers=alice).get_json()
    assert _at(finished["expires_at"]) - _at(finished["finished_at"]) == timedelta(days=30)


def test_expires_after_sets_when_a_finished_job_expires(client, alice, sessions):
    body = {"kind": "echo", "spec": {}, "expires_after": 3600}
    job = client.post("/api/v1/jobs", json=body, headers=alice).get_json()
    with sessions() as session:
        jobs.fail(session, job["id"], None, "JobFailure", "stopped")
        session.commit()

    finished = client.get(f"/api/v1/jobs/{job['id']}", headers=alice).get_json()

    assert finished["expires_after"] == 3600
    assert _at(finished["expires_at"]) - _at(finished["finished_at"]) == timedelta(hours=1)


def test_the_retention_days_setting_is_the_default(make_app, alice, sessions):
    client = make_app(retention_days=2).test_client()
    job = client.post("/api/v1/jobs", json={"kind": "echo", "spec": {}}, headers=alice).get_json()

    assert job["expires_after"] == 2 * 86400


@pytest.mark.parametrize("value", ["7d", "soon", -1, 0, 59, 3651 * 86400, 1.5, [60]])
def test_a_nonsense_expires_after_is_refused(client, alice, sent, value):
    body = {"kind": "echo", "spec": {}, "expires_after": value}

    refused = client.post("/api/v1/jobs", json=body, headers=alice)

    problem = assert_problem(refused, 422, "invalid_body")
    assert problem["errors"][0]["loc"][0] == "expires_after"
    assert sent == []


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.parametrize(
    ("spec", "held"),
    [
        ({"model": "m", "version": 1, "inputs": [[1]]}, True),
        ({"model": "m", "version": "latest", "inputs": [[1]]}, True),
        ({"model": "m", "version": "staging", "inputs": [[1]]}, True),
        ({"model": "m", "version": 2, "inputs": [[1]]}, False),
        ({"model": "other", "version": 1, "inputs": [[1]]}, False),
    ],
    ids=["pinned-to-it", "latest", "an-alias", "pinned-to-another", "another-model"],
)
def test_a_version_a_live_job_may_read_cannot_be_deleted(
    client, alice, sessions, settings, spec, held
):
    register(sessions, settings, "m", b"v1")
    register(sessions, settings, "m", b"v2")
    job = live_job(sessions, spec)

    response = client.delete("/api/v1/models/m/versions/1", headers=alice)

    if held:
        assert job.id in assert_problem(response, 409, "in_use")["detail"]
        assert client.get("/api/v1/models/m/versions/1", headers=alice).status_code == 200
    else:
        assert response.status_code == 204
