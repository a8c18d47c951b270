"""GET /api/v1/workers: admin only; the live list itself is tested against real workers in
tests/integration/ops/test_ops_clients.py."""

from __future__ import annotations

from datetime import datetime, timedelta

from flask.testing import FlaskClient

from kiln.presence import Presence
from kiln.schemas import WorkerList


def test_workers_needs_an_admin_key(client: FlaskClient, alice, admin) -> None:
    assert client.get("/api/v1/workers").status_code == 401
    refused = client.get("/api/v1/workers", headers=alice)
    assert refused.status_code == 403
    assert refused.json["code"] == "forbidden"
    answered = client.get("/api/v1/workers", headers=admin)
    assert answered.status_code == 200
    assert WorkerList.model_validate(answered.json).workers == []  # no broker in this app


def test_workers_is_in_the_openapi_document(client: FlaskClient) -> None:
    document = client.get("/api/v1/openapi.json").json
    operation = document["paths"]["/api/v1/workers"]["get"]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/WorkerList"
    }


def test_workers_answers_503_fast_when_redis_is_down(make_app, admin) -> None:
    app = make_app(sender=None, redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    try:
        response = app.test_client().get("/api/v1/workers", headers=admin)
    finally:
        app.extensions["kiln.celery"].close()
    assert response.status_code == 503
    assert response.json["code"] == "broker_unavailable"


def test_a_worker_shows_only_the_job_its_current_process_claimed(
    client: FlaskClient, admin, create_job, monkeypatch
) -> None:
    job = create_job(state="running")  # claimed by worker-1 (tests/conftest.py)
    claimed = job.started_at
    assert claimed is not None

    def live(started_at: datetime) -> list[Presence]:
        fields = {"host": "vm", "pid": 7, "lane": "bulk", "devices": ["cpu"], "queues": ["cpu"]}
        return [
            Presence(
                name="worker-1",
                concurrency=1,
                started_at=started_at,
                heartbeat_at=started_at,
                **fields,
            )
        ]

    def current_job(started_at: datetime) -> str | None:
        monkeypatch.setattr("web.live_workers.read", lambda: live(started_at))
        [worker] = WorkerList.model_validate(
            client.get("/api/v1/workers", headers=admin).json
        ).workers
        return worker.job.id if worker.job is not None else None

    assert current_job(claimed - timedelta(seconds=5)) == job.id
    # The worker was restarted under its name after the claim: its new process is idle.
    assert current_job(claimed + timedelta(seconds=5)) is None
