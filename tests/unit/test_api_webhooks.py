"""The webhook API: webhook_url and webhook_events on POST /jobs and schedules (with the
SSRF guard answering 422), GET /jobs/<id>/deliveries, the secret and its rotation, and
the job page's deliveries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from db import jobs, webhooks
from db.models import Job
from tests.unit.test_ui import _sign_in
from workers.scheduler import fire_due

PUBLIC_IP_URL = "http://93.184.216.34/hook"  # an address literal: no DNS in tests


def _submit(client, headers, **webhook):
    body = {"kind": "echo", "spec": {"message": "hi"}, **webhook}
    return client.post("/api/v1/jobs", json=body, headers=headers)


def test_a_job_names_its_webhook_and_gets_the_terminal_events_by_default(client, alice):
    response = _submit(client, alice, webhook_url=PUBLIC_IP_URL)
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["webhook_url"] == PUBLIC_IP_URL
    assert body["webhook_events"] == ["succeeded", "failed", "cancelled"]
    chosen = _submit(client, alice, webhook_url=PUBLIC_IP_URL, webhook_events=["progress"])
    assert chosen.get_json()["webhook_events"] == ["progress"]
    plain = _submit(client, alice).get_json()
    assert (plain["webhook_url"], plain["webhook_events"]) == (None, None)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://10.0.0.5/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:192.168.0.1]/",
    ],
)
def test_private_and_loopback_destinations_are_refused_with_422(client, alice, sent, url):
    response = _submit(client, alice, webhook_url=url)
    assert response.status_code == 422
    problem = response.get_json()
    assert problem["code"] == "webhook_url_refused"
    assert problem["errors"][0]["loc"] == ["webhook_url"]
    assert sent == []  # nothing was queued


@pytest.mark.parametrize(
    "webhook",
    [
        {"webhook_url": "ftp://93.184.216.34/hook"},
        {"webhook_url": "file:///etc/passwd"},
        {"webhook_url": "http://user:pw@93.184.216.34/"},
        {"webhook_url": "http://93.184.216.34/" + "x" * 3000},
        {"webhook_url": PUBLIC_IP_URL, "webhook_events": ["finished"]},
        {"webhook_url": PUBLIC_IP_URL, "webhook_events": []},
        {"webhook_url": PUBLIC_IP_URL, "webhook_events": ["failed", "failed"]},
        {"webhook_events": ["failed"]},
    ],
)
def test_malformed_webhooks_are_invalid_bodies(client, alice, webhook):
    response = _submit(client, alice, **webhook)
    assert response.status_code == 422
    assert response.get_json()["code"] == "invalid_body"


def test_the_operator_may_allow_private_receivers(make_app, alice):
    allowed = make_app(webhook_allowed_cidrs="10.0.0.0/8").test_client()
    assert _submit(allowed, alice, webhook_url="http://10.1.2.3/hook").status_code == 202
    assert _submit(allowed, alice, webhook_url="http://127.0.0.1/hook").status_code == 422
    everything = make_app(webhook_allow_private=True).test_client()
    assert _submit(everything, alice, webhook_url="http://127.0.0.1:9/").status_code == 202


def test_deliveries_list_each_message_and_attempt(client, alice, bob, sessions):
    job_id = _submit(client, alice, webhook_url=PUBLIC_IP_URL).get_json()["id"]
    assert client.get(f"/api/v1/jobs/{job_id}/deliveries", headers=alice).get_json() == {
        "job_id": job_id,
        "messages": [],
    }
    with sessions() as session:
        jobs.fail(session, job_id, None, "JobFailure", "bad")
        session.commit()
        (claimed,) = webhooks.claim(session, lease=timedelta(seconds=60), limit=5)
        at = datetime.now(UTC)
        webhooks.not_delivered(
            session, claimed, at, status=500, latency_ms=12.5, error="HTTP 500", retry_at=at
        )
        session.commit()
    listed = client.get(f"/api/v1/jobs/{job_id}/deliveries", headers=alice).get_json()
    (message,) = listed["messages"]
    assert message["id"] == claimed.id
    assert (message["event"], message["state"], message["attempts"]) == ("failed", "pending", 1)
    assert message["url"] == PUBLIC_IP_URL
    assert message["next_attempt_at"] is not None
    (attempt,) = message["deliveries"]
    assert attempt["number"] == 1
    assert attempt["outcome"] == "failed"
    assert (attempt["status_code"], attempt["latency_ms"], attempt["error"]) == (
        500,
        12.5,
        "HTTP 500",
    )
    assert client.get(f"/api/v1/jobs/{job_id}/deliveries", headers=bob).status_code == 404


def test_the_secret_is_stable_until_rotated_and_each_owner_has_their_own(client, alice, bob):
    first = client.get("/api/v1/webhooks/secret", headers=alice).get_json()
    assert first["secret"].startswith("whsec_")
    assert first["previous_secret"] is None
    assert client.get("/api/v1/webhooks/secret", headers=alice).get_json() == first
    assert (
        client.get("/api/v1/webhooks/secret", headers=bob).get_json()["secret"] != (first["secret"])
    )
    rotated = client.post("/api/v1/webhooks/secret/rotate", headers=alice).get_json()
    assert rotated["secret"] not in (first["secret"], None)
    assert rotated["previous_secret"] == first["secret"]
    assert datetime.fromisoformat(rotated["previous_valid_until"]) > datetime.now(UTC)
    assert client.get("/api/v1/webhooks/secret", headers=alice).get_json() == rotated


def test_a_schedule_template_carries_its_webhook_to_its_jobs(client, alice, sessions):
    body = {
        "name": "nightly",
        "cron": "30 2 * * *",
        "kind": "echo",
        "spec": {"message": "x"},
        "webhook_url": PUBLIC_IP_URL,
        "webhook_events": ["succeeded"],
    }
    created = client.post("/api/v1/schedules", json=body, headers=alice)
    assert created.status_code == 201, created.get_json()
    assert created.get_json()["webhook_events"] == ["succeeded"]
    refused = client.post(
        "/api/v1/schedules", json=body | {"webhook_url": "http://10.0.0.1/"}, headers=alice
    )
    assert refused.status_code == 422
    assert refused.get_json()["code"] == "webhook_url_refused"
    later = datetime.now(UTC) + timedelta(days=2)
    (job,) = fire_due(sessions, lambda job, countdown=0.0: None, max_queued=10, now=later)
    with sessions() as session:
        fired = session.get_one(Job, job.id)
    assert (fired.webhook_url, fired.webhook_events) == (PUBLIC_IP_URL, ["succeeded"])


def test_the_job_page_shows_the_deliveries(client, create_key, sessions):
    key = create_key("alice")
    job_id = _submit(client, {"Authorization": f"Bearer {key}"}, webhook_url=PUBLIC_IP_URL)
    job_id = job_id.get_json()["id"]
    _sign_in(client, key)
    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert "Webhook deliveries" in page
    assert "No events yet." in page
    with sessions() as session:
        jobs.fail(session, job_id, None, "JobFailure", "bad")
        session.commit()
        (claimed,) = webhooks.claim(session, lease=timedelta(seconds=60), limit=5)
        webhooks.delivered(session, claimed, 204, 3.0, datetime.now(UTC))
        session.commit()
    page = client.get(f"/jobs/{job_id}/webhooks").get_data(as_text=True)
    assert claimed.id in page
    assert "delivered" in page
    assert "204" in page
    assert "3 ms" in page
    assert "hx-trigger" not in page  # terminal, nothing pending: the polling stops
    plain = _submit(client, {"Authorization": f"Bearer {key}"}).get_json()["id"]
    assert "Webhook deliveries" not in client.get(f"/jobs/{plain}").get_data(as_text=True)
