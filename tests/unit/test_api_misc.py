"""Health probes, the OpenAPI document, error format, dataset uploads and the model registry."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from db import registry
from kiln.specs import KINDS

try:
    from openapi_spec_validator import validate as validate_openapi
except ImportError:  # a dev extra; without it, check the document's outline only
    validate_openapi = None


def assert_problem(response, status: int, code: str) -> None:
    assert response.status_code == status
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["status"] == status
    assert body["code"] == code


def stored_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


# --- health ---------------------------------------------------------------------------------


def test_healthz_answers_ok_without_a_key(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_is_ready_with_the_database_and_an_in_memory_celery_broker(make_app):
    # No sender given: the app builds its real Celery sender on the memory:// broker.
    app = make_app(sender=None)
    assert "kiln.celery" in app.extensions

    response = app.test_client().get("/readyz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "checks": {"database": True, "broker": True}}


def test_readyz_answers_503_when_the_database_is_unreachable(make_app, tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "kiln.db"
    client = make_app(database_url=f"sqlite:///{missing}").test_client()

    response = client.get("/readyz")

    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] is False


# --- OpenAPI and the error format -----------------------------------------------------------


def test_openapi_document_is_public_and_valid(client):
    response = client.get("/api/v1/openapi.json")

    assert response.status_code == 200
    document = response.get_json()
    assert document["openapi"].startswith("3.1")
    if validate_openapi is not None:
        validate_openapi(document)  # raises on an invalid OpenAPI 3.1 document
    else:
        assert {"info", "paths", "components"} <= document.keys()
        for operations in document["paths"].values():
            assert all("responses" in op for op in operations.values())


def test_openapi_document_describes_submissions_and_every_spec(client):
    document = client.get("/api/v1/openapi.json").get_json()

    schemas = document["components"]["schemas"]
    assert {"JobSubmission", "TrainSpec", "PredictSpec", "EchoSpec", "JobOut", "Problem"} <= set(
        schemas
    )
    assert schemas["JobSubmission"]["properties"]["kind"]["enum"] == sorted(KINDS)
    assert {"echo", "predict", "train", "optimize", "export", "batch_predict"} <= set(KINDS)
    assert "model_name" in schemas["TrainSpec"]["required"]
    assert "post" in document["paths"]["/api/v1/jobs"]


def test_an_unknown_api_path_answers_404_problem_json(client, alice):
    assert_problem(client.get("/api/v1/nothing-here", headers=alice), 404, "not_found")


def test_a_wrong_method_answers_405_problem_json_with_allow(client, alice, create_job):
    job = create_job()

    response = client.get(f"/api/v1/jobs/{job.id}/cancel", headers=alice)

    assert_problem(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


# --- datasets -------------------------------------------------------------------------------


def upload(client, headers, content: bytes, filename: str = "data.csv", **form):
    return client.post(
        "/api/v1/datasets",
        data={"file": (io.BytesIO(content), filename), **form},
        headers=headers,
    )


def test_uploading_a_csv_answers_201_with_its_rows_and_columns(client, alice, settings):
    content = b"x,y,label\n0.5,1,a\n1.5,2,b\n2.5,3,a\n"

    response = upload(client, alice, content)

    assert response.status_code == 201
    body = response.get_json()
    assert response.headers["Location"] == f"/api/v1/datasets/{body['id']}"
    assert body["name"] == "data.csv"
    assert body["owner"] == "alice"
    assert body["format"] == "csv"
    assert body["rows"] == 3
    assert body["columns"] == [
        {"name": "x", "dtype": "double"},
        {"name": "y", "dtype": "int64"},
        {"name": "label", "dtype": "string"},
    ]
    assert body["size_bytes"] == len(content)
    assert body["digest"] == hashlib.sha256(content).hexdigest()
    assert stored_files(settings.artifacts_dir) == [
        settings.artifacts_dir / body["digest"][:2] / body["digest"]
    ]


def test_an_uploaded_dataset_can_be_read_back_and_listed(client, alice):
    created = upload(client, alice, b"a,b\n1,2\n", name="tiny").get_json()

    read = client.get(f"/api/v1/datasets/{created['id']}", headers=alice)
    listed = client.get("/api/v1/datasets", headers=alice).get_json()["datasets"]

    assert read.status_code == 200
    assert read.get_json() == created
    assert created["name"] == "tiny"
    assert [d["id"] for d in listed] == [created["id"]]


@pytest.mark.parametrize(
    "content",
    [
        b"a,b\n1,2,3\n",
        b"\xff\xfe\x00\x01\x89PNG\r\n\x1a\n" * 16,
        b"",
        b"a,b\n",
    ],
    ids=["ragged-rows", "binary-garbage", "empty", "header-only"],
)
def test_an_unparseable_file_answers_422_and_keeps_nothing(
    client, alice, settings, sessions, content
):
    response = upload(client, alice, content)

    assert_problem(response, 422, "unsupported_dataset")
    assert stored_files(settings.artifacts_dir) == []
    assert client.get("/api/v1/datasets", headers=alice).get_json()["datasets"] == []


def test_a_file_of_an_unsupported_type_answers_422(client, alice, settings):
    response = upload(client, alice, b"MZ\x90\x00", filename="setup.exe")

    assert_problem(response, 422, "unsupported_dataset")
    assert stored_files(settings.artifacts_dir) == []


def test_an_upload_without_the_file_field_answers_400(client, alice):
    response = client.post(
        "/api/v1/datasets",
        data={"other": (io.BytesIO(b"a,b\n1,2\n"), "data.csv")},
        headers=alice,
    )

    assert_problem(response, 400, "invalid_request")


def test_a_file_over_the_upload_limit_answers_413_and_keeps_nothing(make_app, alice, settings):
    client = make_app(max_upload_bytes=64).test_client()
    content = b"a,b\n" + b"1,2\n" * 100

    response = upload(client, alice, content)

    assert_problem(response, 413, "payload_too_large")
    assert stored_files(settings.artifacts_dir) == []


def test_a_file_at_the_upload_limit_is_accepted(make_app, alice):
    content = b"a,b\n" + b"1,2\n" * 15
    client = make_app(max_upload_bytes=len(content)).test_client()

    response = upload(client, alice, content)

    assert response.status_code == 201
    assert response.get_json()["rows"] == 15


# --- models ---------------------------------------------------------------------------------


@pytest.fixture
def register(sessions):
    """register(name, owner="alice") -> the number of the version it filed."""

    def register_one(name: str, owner: str = "alice", accuracy: float = 0.9) -> int:
        with sessions() as session:
            version = registry.register_version(
                session,
                owner=owner,
                name=name,
                source_job_id=None,
                arch="mlp",
                config={"hidden": [8]},
                metrics={"val_accuracy": accuracy},
                artifact_digest="a" * 64,
                artifact_size=1234,
                dataset_digest=None,
            )
            session.commit()
            return version.number

    return register_one


def test_models_lists_the_callers_models_by_name_with_their_versions(client, alice, register):
    register("zeta")
    register("alpha")
    register("alpha", accuracy=0.95)

    response = client.get("/api/v1/models", headers=alice)

    assert response.status_code == 200
    models = response.get_json()["models"]
    assert [m["name"] for m in models] == ["alpha", "zeta"]
    assert [v["number"] for v in models[0]["versions"]] == [1, 2]


def test_a_model_shows_its_versions_in_order(client, alice, register):
    assert [register("digits", accuracy=a) for a in (0.8, 0.9)] == [1, 2]

    body = client.get("/api/v1/models/digits", headers=alice).get_json()

    assert body["name"] == "digits"
    assert body["owner"] == "alice"
    assert body["aliases"] == {}
    assert [(v["number"], v["metrics"]) for v in body["versions"]] == [
        (1, {"val_accuracy": 0.8}),
        (2, {"val_accuracy": 0.9}),
    ]


def test_a_version_is_found_by_number_and_latest(client, alice, register):
    register("digits", accuracy=0.8)
    register("digits", accuracy=0.9)

    first = client.get("/api/v1/models/digits/versions/1", headers=alice)
    latest = client.get("/api/v1/models/digits/versions/latest", headers=alice)

    assert first.status_code == 200
    assert first.get_json()["number"] == 1
    assert first.get_json()["metrics"] == {"val_accuracy": 0.8}
    assert first.get_json()["artifact_digest"] == "a" * 64
    assert first.get_json()["config"] == {"hidden": [8]}
    assert latest.get_json()["number"] == 2


def test_a_version_is_found_by_alias(client, alice, register, sessions):
    register("digits")
    register("digits")
    with sessions() as session:
        model = registry.get_model(session, "alice", "digits")
        model.aliases = {"production": 1}
        session.commit()

    response = client.get("/api/v1/models/digits/versions/production", headers=alice)

    assert response.get_json()["number"] == 1


@pytest.mark.parametrize(
    "version", ["3", "0", "staging", "%C2%B2", "99999999999999999999"], ids=str
)
def test_an_unknown_version_answers_404(client, alice, register, version):
    register("digits")
    register("digits")

    response = client.get(f"/api/v1/models/digits/versions/{version}", headers=alice)

    assert_problem(response, 404, "not_found")


def test_an_unknown_model_answers_404(client, alice):
    assert_problem(client.get("/api/v1/models/nope", headers=alice), 404, "not_found")
    assert_problem(
        client.get("/api/v1/models/nope/versions/latest", headers=alice), 404, "not_found"
    )
