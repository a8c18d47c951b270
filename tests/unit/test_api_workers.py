"""GET /api/v1/workers: admin only; the live list itself is tested against real workers in
tests/integration/ops/test_ops_clients.py."""

from __future__ import annotations

from flask.testing import FlaskClient

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
