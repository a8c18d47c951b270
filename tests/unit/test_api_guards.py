"""Nobody where they don't belong: Idempotency-Key, queue quota, rate limits, owner isolation
on every API route, uploads, security headers, no secrets in logs, no string-built SQL."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db import jobs, keys, registry
from db.models import Job

ROOT = Path(__file__).resolve().parents[2]
ECHO = {"kind": "echo", "spec": {"message": "hi"}}


def assert_problem(response, status: int, code: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["code"] == code


def _job_count(sessions) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Job)))


# --- Idempotency-Key ----------------------------------------------------------------------


def test_the_same_key_and_body_return_the_same_job_once(client, alice, sent, sessions):
    headers = {**alice, "Idempotency-Key": "order-42"}

    first = client.post("/api/v1/jobs", json=ECHO, headers=headers)
    # The same body with keys in another order is the same request.
    again = client.post("/api/v1/jobs", json=dict(reversed(ECHO.items())), headers=headers)

    assert first.status_code == 202
    assert again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert _job_count(sessions) == 1
    assert len(sent) == 1


def test_the_same_key_with_another_body_answers_422(client, alice, sessions):
    headers = {**alice, "Idempotency-Key": "order-42"}
    client.post("/api/v1/jobs", json=ECHO, headers=headers)

    other = {"kind": "echo", "spec": {"message": "something else"}}
    response = client.post("/api/v1/jobs", json=other, headers=headers)

    assert_problem(response, 422, "idempotency_key_reused")
    assert _job_count(sessions) == 1


def test_a_retry_while_the_first_request_is_in_flight_answers_409(make_app, alice, sessions):
    def broker_down(job: Job, countdown: float = 0.0) -> None:
        raise ConnectionError("broker unreachable")

    client = make_app(sender=broker_down).test_client()
    headers = {**alice, "Idempotency-Key": "order-42"}
    assert client.post("/api/v1/jobs", json=ECHO, headers=headers).status_code == 202

    # The first job is committed but its message is not sent yet (the reconciler will).
    response = client.post("/api/v1/jobs", json=ECHO, headers=headers)

    assert_problem(response, 409, "request_in_flight")
    assert _job_count(sessions) == 1


def test_keys_are_per_owner(client, alice, bob, sessions):
    for headers in (alice, bob):
        response = client.post(
            "/api/v1/jobs", json=ECHO, headers={**headers, "Idempotency-Key": "k"}
        )
        assert response.status_code == 202

    assert _job_count(sessions) == 2


def test_an_overlong_idempotency_key_answers_400(client, alice):
    response = client.post(
        "/api/v1/jobs", json=ECHO, headers={**alice, "Idempotency-Key": "k" * 256}
    )

    assert_problem(response, 400, "invalid_request")


# --- quota and rate limits ------------------------------------------------------------------


def test_the_queue_quota_answers_429_with_retry_after(make_app, alice, bob, sessions):
    client = make_app(max_queued_per_owner=2).test_client()
    for _ in range(2):
        assert client.post("/api/v1/jobs", json=ECHO, headers=alice).status_code == 202

    response = client.post("/api/v1/jobs", json=ECHO, headers=alice)

    assert_problem(response, 429, "queue_quota_exceeded")
    assert int(response.headers["Retry-After"]) > 0
    assert client.post("/api/v1/jobs", json=ECHO, headers=bob).status_code == 202  # per owner
    assert _job_count(sessions) == 3


def test_the_rate_limit_is_per_key_and_answers_429_with_retry_after(make_app, alice, bob):
    client = make_app(rate_limit="3/minute").test_client()
    for _ in range(3):
        assert client.get("/api/v1/jobs", headers=alice).status_code == 200

    response = client.get("/api/v1/jobs", headers=alice)

    assert_problem(response, 429, "rate_limited")
    assert 0 < int(response.headers["Retry-After"]) <= 60
    assert client.get("/api/v1/jobs", headers=bob).status_code == 200
    assert client.get("/healthz").status_code == 200  # health checks are never limited


def test_rate_limit_storage_follows_the_redis_url():
    from kiln.settings import Settings
    from web.limits import storage_uri

    assert storage_uri(Settings(redis_url="redis://h:6379/0")) == "redis://h:6379/0"
    assert storage_uri(Settings(redis_url="memory://")) == "memory://"
    embedded = Settings(redis_url="redis+socket:///var/kiln/redis.sock")
    assert storage_uri(embedded) == "redis+unix:///var/kiln/redis.sock"


# --- owner isolation on every route -----------------------------------------------------------


@pytest.fixture
def bobs_objects(client, bob, create_job, sessions) -> dict[str, str]:
    """One object of bob's for each path parameter an API route can take."""
    upload = {"file": (io.BytesIO(b"x,label\n1,0\n2,1\n"), "bob.csv")}
    dataset = client.post("/api/v1/datasets", data=upload, headers=bob).get_json()["id"]
    with sessions() as session:
        registry.register_version(
            session,
            owner="bob",
            name="bobs-model",
            source_job_id=None,
            arch="mlp",
            config={},
            metrics={},
            artifact_digest="0" * 64,
            artifact_size=1,
            dataset_digest=None,
        )
        session.commit()
    nightly = {"name": "nightly", "cron": "0 2 * * *", "kind": "echo", "spec": {}}
    schedule = client.post("/api/v1/schedules", json=nightly, headers=bob).get_json()["id"]
    return {
        "job_id": create_job(owner="bob").id,
        "schedule_id": schedule,
        "dataset_id": dataset,
        "name": "bobs-model",
        "version": "1",
        "alias": "production",
        "key_id": "some-key",
    }


#: Routes a user may not call at all (admin only): 403, not 404.
ADMIN_ONLY = {"api.create_key", "api.list_keys", "api.revoke_key"}
#: Routes that create in the caller's own namespace: a model name is per owner, so alice
#: uploading to "bobs-model" makes a model of her own and never touches bob's.
OWN_NAMESPACE = {"api.upload_version"}


def test_every_api_route_with_an_object_hides_another_owners_object(
    app, client, alice, bobs_objects
):
    checked = 0
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/") or not rule.arguments:
            continue
        if rule.endpoint in OWN_NAMESPACE:
            continue
        missing = rule.arguments - bobs_objects.keys()
        assert not missing, f"{rule.rule}: add an object of bob's for {missing} to bobs_objects"
        url = rule.rule
        for name in rule.arguments:
            url = re.sub(rf"<(?:\w+:)?{name}>", bobs_objects[name], url)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            response = client.open(url, method=method, headers=alice, json={})
            expected = 403 if rule.endpoint in ADMIN_ONLY else 404
            assert response.status_code == expected, f"{method} {url}"
            checked += 1
    assert checked >= 8


# --- uploads --------------------------------------------------------------------------------


def test_an_upload_past_the_limit_answers_413_and_keeps_nothing(make_app, alice, settings):
    client = make_app(max_upload_bytes=1024).test_client()
    big = b"x,label\n" + b"1,0\n" * 1000

    response = client.post(
        "/api/v1/datasets", data={"file": (io.BytesIO(big), "big.csv")}, headers=alice
    )

    assert_problem(response, 413, "payload_too_large")
    stored = [p for p in settings.data_dir.rglob("*") if p.is_file()]
    assert not any(p.stat().st_size >= 1024 for p in stored)


def test_an_uploaded_file_name_never_reaches_the_file_system(client, alice, settings):
    name = "../../../../tmp/kiln-escape.csv"

    response = client.post(
        "/api/v1/datasets",
        data={"file": (io.BytesIO(b"x,label\n1,0\n"), name)},
        headers=alice,
    )

    assert response.status_code == 201
    assert not Path("/tmp/kiln-escape.csv").exists()
    files = [p for p in settings.data_dir.rglob("*") if p.is_file() and "artifacts" in p.parts]
    assert files
    assert all("escape" not in str(p) and ".." not in p.parts for p in files)
    digest = response.get_json()["digest"]
    assert any(p.name.startswith(digest) or digest in str(p) for p in files)


# --- headers, logs, SQL ---------------------------------------------------------------------


def test_api_responses_carry_security_headers(client, alice):
    for response in (
        client.get("/api/v1/jobs", headers=alice),
        client.get("/api/v1/jobs/nope", headers=alice),
        client.get("/api/v1/jobs"),
    ):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert client.get("/healthz").headers["X-Content-Type-Options"] == "nosniff"


def test_no_key_appears_in_the_logs_of_a_request_cycle(
    make_app, create_key, auth, caplog, sessions
):
    admin_key = "kiln_admin-secret-that-must-not-leak"
    with sessions() as session:  # what `kiln run` does with KILN_ADMIN_KEY
        keys.ensure_admin(session, admin_key)
        session.commit()
    client = make_app().test_client()
    user_key = create_key("alice")
    caplog.set_level(logging.DEBUG)

    def broker_down(job: Job, countdown: float = 0.0) -> None:  # a logged failure path, too
        raise ConnectionError("broker unreachable")

    failing = make_app(sender=broker_down).test_client()
    failing.post("/api/v1/jobs", json=ECHO, headers=auth(user_key))
    client.post("/api/v1/jobs", json=ECHO, headers=auth(user_key))
    client.get("/api/v1/jobs", headers=auth(user_key))
    client.get("/api/v1/keys", headers=auth(user_key))  # 403
    client.get("/api/v1/jobs", headers=auth(user_key + "x"))  # 401
    created = client.post("/api/v1/keys", json={"owner": "carol"}, headers=auth(admin_key))

    new_key = created.get_json()["key"]
    assert caplog.records  # the cycle did log something
    for secret in (admin_key, user_key, new_key):
        assert secret not in caplog.text


_STRING_SQL = re.compile(
    r"""(text|execute|exec_driver_sql)\(\s*(f["']|["'][^"']*["']\s*(%|\.format\())"""
)


def test_sql_is_never_built_from_strings_in_db_and_web():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("db", "web")
        for path in (ROOT / folder).rglob("*.py")
        if "migrations" not in path.parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _STRING_SQL.search(line)
    ]
    assert offenders == []
    assert _STRING_SQL.search('session.execute(text(f"SELECT {x}"))')  # the check can fire


def test_a_concurrent_duplicate_hitting_the_unique_constraint_answers_409(
    client, alice, sessions, monkeypatch
):
    headers = {**alice, "Idempotency-Key": "order-42"}
    with sessions() as session:  # the other request's row: committed, not yet sent
        jobs.create(
            session,
            kind="echo",
            owner="alice",
            spec={"message": "hi"},
            queue="cpu",
            idempotency_key="order-42",
            idempotency_fingerprint=hashlib.sha256(
                json.dumps(ECHO, sort_keys=True, separators=(",", ":")).encode()
            ).hexdigest(),
        )
        session.commit()
    real, lookups = jobs.find_idempotent, []

    def racing_lookup(*args):
        lookups.append(args)  # the first lookup ran before the other request committed
        return None if len(lookups) == 1 else real(*args)

    monkeypatch.setattr(jobs, "find_idempotent", racing_lookup)

    response = client.post("/api/v1/jobs", json=ECHO, headers=headers)

    assert_problem(response, 409, "request_in_flight")
    assert len(lookups) == 2  # the INSERT hit the unique constraint, then looked again
    assert _job_count(sessions) == 1


def test_worker_limits_come_from_settings(settings):
    from kiln.broker import make_celery

    limited = settings.model_copy(
        update={
            "job_time_limit_s": 100.0,
            "time_limit_grace_s": 20.0,
            "worker_max_tasks_per_child": 50,
            "worker_max_memory_per_child_kb": 4_000_000,
        }
    )
    conf = make_celery(limited).conf

    assert conf.task_time_limit == 120.0
    assert conf.worker_max_tasks_per_child == 50
    assert conf.worker_max_memory_per_child == 4_000_000
    assert make_celery(settings).conf.task_time_limit is None
