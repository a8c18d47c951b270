"""Authentication (Bearer keys), owner isolation, and the admin-only keys API."""

from __future__ import annotations

import io

import pytest
from sqlalchemy import select

from db import keys, registry
from db.models import ApiKey, Job


def assert_problem(response, status: int, code: str) -> None:
    assert response.status_code == status
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["detail"]


# --- 401 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
        {"Authorization": "Bearer kiln_not-a-key-anyone-was-given"},
    ],
    ids=["no-header", "empty-token", "other-scheme", "unknown-key"],
)
def test_a_request_without_a_valid_key_answers_401(client, create_job, headers):
    job = create_job()

    for path in ["/api/v1/jobs", f"/api/v1/jobs/{job.id}", "/api/v1/models", "/api/v1/datasets"]:
        assert_problem(client.get(path, headers=headers), 401, "unauthorized")


def test_submitting_without_a_key_answers_401_and_sends_nothing(client, sent):
    response = client.post("/api/v1/jobs", json={"kind": "echo"})

    assert_problem(response, 401, "unauthorized")
    assert sent == []


def test_a_revoked_key_answers_401(client, create_key, auth, sessions):
    key = create_key("alice")
    assert client.get("/api/v1/jobs", headers=auth(key)).status_code == 200
    with sessions() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == keys.digest(key)))
        keys.revoke(session, row.id)
        session.commit()

    assert_problem(client.get("/api/v1/jobs", headers=auth(key)), 401, "unauthorized")


def test_the_bearer_scheme_is_case_insensitive(client, create_key):
    key = create_key("alice")

    response = client.get("/api/v1/jobs", headers={"Authorization": f"bearer {key}"})

    assert response.status_code == 200


def test_a_used_key_records_when_it_was_last_used(client, create_key, auth, sessions):
    key = create_key("alice")

    client.get("/api/v1/jobs", headers=auth(key))

    with sessions() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == keys.digest(key)))
        assert row.last_used_at is not None


# --- owner isolation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("get", ""), ("post", "/cancel"), ("get", "/metrics"), ("get", "/events")],
    ids=["get", "cancel", "metrics", "events"],
)
def test_another_owners_job_answers_404(client, alice, create_job, sessions, method, suffix):
    job = create_job(owner="bob")

    response = getattr(client, method)(f"/api/v1/jobs/{job.id}{suffix}", headers=alice)

    assert_problem(response, 404, "not_found")
    with sessions() as session:
        assert session.get(Job, job.id).state == "queued"  # the cancel did nothing


def test_listing_hides_another_owners_jobs(client, alice, bob, create_job):
    create_job(owner="bob")

    assert client.get("/api/v1/jobs", headers=alice).get_json()["jobs"] == []
    assert len(client.get("/api/v1/jobs", headers=bob).get_json()["jobs"]) == 1


def test_another_owners_dataset_answers_404_and_is_not_listed(client, alice, bob):
    upload = {"file": (io.BytesIO(b"x,label\n1,0\n2,1\n"), "bob.csv")}
    created = client.post("/api/v1/datasets", data=upload, headers=bob)
    assert created.status_code == 201
    dataset_id = created.get_json()["id"]

    assert_problem(client.get(f"/api/v1/datasets/{dataset_id}", headers=alice), 404, "not_found")
    assert client.get("/api/v1/datasets", headers=alice).get_json()["datasets"] == []
    assert client.get(f"/api/v1/datasets/{dataset_id}", headers=bob).status_code == 200


def test_another_owners_model_answers_404_and_is_not_listed(client, alice, bob, sessions):
    with sessions() as session:
        registry.register_version(
            session,
            owner="bob",
            name="digits",
            source_job_id=None,
            arch="mlp",
            config={},
            metrics={},
            artifact_digest="0" * 64,
            artifact_size=1,
            dataset_digest=None,
        )
        session.commit()

    assert_problem(client.get("/api/v1/models/digits", headers=alice), 404, "not_found")
    assert_problem(client.get("/api/v1/models/digits/versions/1", headers=alice), 404, "not_found")
    assert client.get("/api/v1/models", headers=alice).get_json()["models"] == []
    assert client.get("/api/v1/models/digits", headers=bob).status_code == 200


def test_an_admin_sees_every_owners_jobs(client, admin, create_job):
    mine = create_job(owner="alice")
    theirs = create_job(owner="bob")

    listed = {j["id"] for j in client.get("/api/v1/jobs", headers=admin).get_json()["jobs"]}

    assert listed == {mine.id, theirs.id}
    assert client.get(f"/api/v1/jobs/{theirs.id}", headers=admin).status_code == 200


def test_an_admin_may_cancel_another_owners_job(client, admin, create_job):
    job = create_job(owner="bob")

    response = client.post(f"/api/v1/jobs/{job.id}/cancel", headers=admin)

    assert response.status_code == 202
    assert response.get_json()["state"] == "cancelled"


def test_a_submitted_job_belongs_to_the_keys_owner(client, bob):
    response = client.post("/api/v1/jobs", json={"kind": "echo"}, headers=bob)

    assert response.get_json()["owner"] == "bob"


# --- keys API -------------------------------------------------------------------------------


def test_an_admin_creates_a_key_shown_once_and_stored_hashed(client, admin, auth, sessions):
    response = client.post("/api/v1/keys", json={"owner": "carol"}, headers=admin)

    assert response.status_code == 201
    body = response.get_json()
    key = body["key"]
    assert key.startswith("kiln_")
    assert body["owner"] == "carol"
    assert body["role"] == "user"
    assert body["revoked_at"] is None
    assert key.startswith(body["prefix"])
    with sessions() as session:
        row = session.get(ApiKey, body["id"])
        assert row.key_hash != key
        assert row.key_hash == keys.digest(key)
        assert key not in {row.prefix, row.key_hash}
    # The key works, and it is carol's.
    job = client.post("/api/v1/jobs", json={"kind": "echo"}, headers=auth(key))
    assert job.get_json()["owner"] == "carol"


def test_an_admin_creates_an_admin_key(client, admin, auth):
    body = client.post(
        "/api/v1/keys", json={"owner": "ops", "role": "admin"}, headers=admin
    ).get_json()

    assert body["role"] == "admin"
    assert client.get("/api/v1/keys", headers=auth(body["key"])).status_code == 200


@pytest.mark.parametrize(
    "payload",
    [{"owner": ""}, {"owner": "carol", "role": "root"}, {"owner": "carol", "extra": 1}, {}],
    ids=["empty-owner", "unknown-role", "extra-field", "no-owner"],
)
def test_creating_a_key_with_a_bad_body_answers_422(client, admin, payload):
    response = client.post("/api/v1/keys", json=payload, headers=admin)

    assert_problem(response, 422, "invalid_body")


def test_listing_keys_shows_every_key_without_the_secret(client, admin, create_key):
    alice_key = create_key("alice")

    response = client.get("/api/v1/keys", headers=admin)

    assert response.status_code == 200
    listed = response.get_json()["keys"]
    assert sorted(k["owner"] for k in listed) == ["alice", "root"]
    assert all("key" not in k and "key_hash" not in k for k in listed)
    assert alice_key not in response.get_data(as_text=True)


def test_a_key_revoked_by_an_admin_answers_401(client, admin):
    created = client.post("/api/v1/keys", json={"owner": "carol"}, headers=admin).get_json()
    carol = {"Authorization": f"Bearer {created['key']}"}
    assert client.get("/api/v1/jobs", headers=carol).status_code == 200

    response = client.delete(f"/api/v1/keys/{created['id']}", headers=admin)

    assert response.status_code == 200
    assert response.get_json()["revoked_at"] is not None
    assert_problem(client.get("/api/v1/jobs", headers=carol), 401, "unauthorized")


def test_revoking_an_unknown_key_answers_404(client, admin):
    assert_problem(client.delete("/api/v1/keys/nope", headers=admin), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [
        ("get", "/api/v1/keys", None),
        ("post", "/api/v1/keys", {"owner": "alice", "role": "admin"}),
        ("delete", "/api/v1/keys/anything", None),
    ],
    ids=["list", "create", "revoke"],
)
def test_a_user_gets_403_on_the_keys_api(client, alice, sessions, method, path, payload):
    response = getattr(client, method)(path, json=payload, headers=alice)

    assert_problem(response, 403, "forbidden")
    with sessions() as session:
        assert [k.role for k in keys.list_keys(session)] == ["user"]
