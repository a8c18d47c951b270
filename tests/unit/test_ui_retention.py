"""The UI's job and model deletes (confirmed, CSRF-protected, refused as the API refuses)
and a job page's expiry line."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.base import utcnow
from db.models import Job, Model
from kiln.artifacts import ArtifactStore
from kiln.settings import Settings
from tests.retentionkit import finished_job, live_job, register
from workers.sweeper import sweep

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


def _token(client: FlaskClient, path: str) -> str:
    found = _TOKEN.search(client.get(path).text)
    assert found, f"no CSRF token on {path}"
    return found.group(1)


@pytest.fixture
def as_alice(client: FlaskClient, create_key: Callable[..., str]) -> FlaskClient:
    token = _token(client, "/signin")
    client.post("/signin", data={"api_key": create_key("alice"), "csrf_token": token})
    return client


def test_a_finished_job_is_deleted_after_a_confirmation(
    as_alice: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    job = finished_job(sessions)
    page = as_alice.get(f"/jobs/{job.id}").text
    assert f"/jobs/{job.id}/delete" in page
    assert "Expires" in page

    confirm = as_alice.get(f"/jobs/{job.id}/delete")
    assert confirm.status_code == 200
    assert f"Delete job {job.id[:8]}?" in confirm.text
    forged = as_alice.post(f"/jobs/{job.id}/delete", data={"csrf_token": "forged"})
    assert forged.status_code == 403
    token = _TOKEN.search(confirm.text).group(1)  # type: ignore[union-attr]
    deleted = as_alice.post(f"/jobs/{job.id}/delete", data={"csrf_token": token})

    assert deleted.status_code == 302
    assert f"Deleted job {job.id[:8]}." in as_alice.get("/jobs").text
    with sessions() as session:
        assert session.get(Job, job.id) is None


def test_a_running_job_offers_no_delete_and_is_refused(
    as_alice: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    job = live_job(sessions, {"message": "hi"}, kind="echo", running=True)
    assert f"/jobs/{job.id}/delete" not in as_alice.get(f"/jobs/{job.id}").text
    token = _token(as_alice, f"/jobs/{job.id}/delete")

    refused = as_alice.post(f"/jobs/{job.id}/delete", data={"csrf_token": token})

    assert refused.status_code == 409
    assert "only a finished job can be deleted" in refused.text
    with sessions() as session:
        assert session.get(Job, job.id) is not None


def test_an_expired_job_page_says_so_and_offers_no_download(
    as_alice: FlaskClient, sessions: sessionmaker[Session], settings: Settings
) -> None:
    store = ArtifactStore(settings.artifacts_dir)
    stored = store.put_bytes(b"a\n1\n")
    result = {"output": {"digest": stored.digest, "size": stored.size, "format": "csv"}}
    job = finished_job(sessions, result=result, expires_after_s=60)
    assert "Download output" in as_alice.get(f"/jobs/{job.id}").text

    sweep(sessions, settings, store, now=utcnow() + timedelta(seconds=61))
    page = as_alice.get(f"/jobs/{job.id}").text

    assert "Expired" in page
    assert "Download output" not in page


def test_a_model_is_deleted_unless_an_alias_or_a_queued_job_holds_it(
    as_alice: FlaskClient, sessions: sessionmaker[Session], settings: Settings
) -> None:
    version = register(sessions, settings, "digits", b"weights")
    waiting = live_job(sessions, {"model": "digits", "inputs": [[1, 2, 3]]})
    assert f"/models/{version.model_id}/delete" in as_alice.get("/models").text
    token = _token(as_alice, f"/models/{version.model_id}/delete")

    refused = as_alice.post(f"/models/{version.model_id}/delete", data={"csrf_token": token})
    assert refused.status_code == 409
    assert waiting.id in refused.text
    with sessions() as session:
        jobs.request_cancel(session, session.get_one(Job, waiting.id))  # no longer waiting
        session.commit()
    deleted = as_alice.post(f"/models/{version.model_id}/delete", data={"csrf_token": token})

    assert deleted.status_code == 302
    assert "Deleted model digits." in as_alice.get("/models").text
    with sessions() as session:
        assert session.get(Model, version.model_id) is None
