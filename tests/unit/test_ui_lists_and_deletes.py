"""The UI's jobs list a page at a time, dataset uploads in every API format, and deleting
datasets and model versions (confirmed, CSRF-protected, refused as the API refuses)."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from db import jobs, registry
from db.models import Dataset, Job, Model, ModelVersion
from kiln.artifacts import ArtifactStore
from web.ui import jobs as ui_jobs

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
_OLDER = re.compile(r'href="([^"]+)" rel="next">Older jobs')


def _token(client: FlaskClient, path: str) -> str:
    found = _TOKEN.search(client.get(path).text)
    assert found, f"no CSRF token on {path}"
    return found.group(1)


@pytest.fixture
def as_alice(client: FlaskClient, create_key: Callable[..., str]) -> FlaskClient:
    token = _token(client, "/signin")
    client.post("/signin", data={"api_key": create_key("alice"), "csrf_token": token})
    return client


def _upload(client: FlaskClient, content: bytes, filename: str) -> str:
    data = {"csrf_token": _token(client, "/datasets"), "file": (io.BytesIO(content), filename)}
    response = client.post("/datasets", data=data)
    assert response.status_code == 302, response.text
    return response.headers["Location"]


def _version(sessions: sessionmaker[Session], digest: str | None = None) -> str:
    with sessions() as session:
        version = registry.register_version(
            session, owner="alice", name="digits", source_job_id=None, arch="mlp", config={},
            metrics={}, artifact_digest="0" * 64, artifact_size=1, dataset_digest=digest,
        )  # fmt: skip
        session.commit()
        return version.model_id


# --- the jobs list --------------------------------------------------------------------------


def test_the_jobs_list_pages_back_through_older_jobs(
    as_alice: FlaskClient, create_job: Callable[..., Job], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ui_jobs, "_LIST_LIMIT", 2)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    made = [create_job(kind="echo", created_at=start + timedelta(minutes=i)) for i in range(3)]
    newest_first = [job.id[:8] for job in reversed(made)]

    first = as_alice.get("/jobs?kind=echo").text
    assert [i in first for i in newest_first] == [True, True, False]
    older = _OLDER.search(first)
    assert older is not None
    link = older.group(1).replace("&amp;", "&")
    assert "kind=echo" in link  # the filters stay on the next page

    second = as_alice.get(link).text
    assert [i in second for i in newest_first] == [False, False, True]
    assert _OLDER.search(second) is None  # the last page
    assert "Newest jobs" in second
    # The live poll refreshes the page it is on, not the first one.
    cursor = link.split("cursor=")[1]
    assert f"cursor={cursor}" in second.split('hx-get="')[1].split('"')[0]
    assert newest_first[2] in as_alice.get(link.replace("/jobs?", "/jobs/table?")).text


def test_a_cursor_the_list_did_not_give_is_refused(as_alice: FlaskClient) -> None:
    response = as_alice.get("/jobs?cursor=bm90LWEtY3Vyc29y")
    assert response.status_code == 400
    assert "cursor is not one this API returned" in response.text


# --- uploads --------------------------------------------------------------------------------


def _parquet() -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0], "label": ["a", "b", "a"]}), sink)
    return sink.getvalue()


def _npz() -> bytes:
    sink = io.BytesIO()
    np.savez(sink, x=np.arange(4, dtype=np.float32), label=np.array([0, 1, 0, 1]))
    return sink.getvalue()


@pytest.mark.parametrize(
    ("filename", "content", "rows"),
    [
        ("t.parquet", _parquet(), 3),
        ("t.jsonl", b'{"x": 1, "label": "a"}\n{"x": 2, "label": "b"}\n', 2),
        ("t.npz", _npz(), 4),
        ("t.csv", b"x,label\n1,a\n", 1),
    ],
)
def test_the_upload_form_takes_every_format_the_api_takes(
    as_alice: FlaskClient, sessions: sessionmaker[Session], filename: str, content: bytes, rows: int
) -> None:
    page = as_alice.get("/datasets").text
    assert 'accept=".csv,.parquet,.jsonl,.npz"' in page

    _upload(as_alice, content, filename)

    said = "1 row" if rows == 1 else f"{rows} rows"
    assert f"Uploaded {filename}: {said}." in as_alice.get("/datasets").text
    with sessions() as session:
        stored = session.query(Dataset).one()
        assert (stored.format, stored.rows) == (filename.split(".")[1], rows)


# --- deletes --------------------------------------------------------------------------------


def test_an_upload_without_a_file_asks_for_one(as_alice: FlaskClient) -> None:
    response = as_alice.post("/datasets", data={"csrf_token": _token(as_alice, "/datasets")})
    assert response.status_code == 422
    assert "Choose a file to upload." in response.text


def test_a_dataset_is_deleted_after_a_confirmation(
    as_alice: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    _upload(as_alice, b"x,label\n1,a\n", "gone.csv")
    with sessions() as session:
        dataset_id = session.query(Dataset).one().id
    assert f"/datasets/{dataset_id}/delete" in as_alice.get("/datasets").text

    confirm = as_alice.get(f"/datasets/{dataset_id}/delete")
    assert confirm.status_code == 200
    assert "Delete dataset gone.csv?" in confirm.text
    with sessions() as session:
        assert session.get(Dataset, dataset_id) is not None  # asking deleted nothing

    forged = as_alice.post(f"/datasets/{dataset_id}/delete", data={"csrf_token": "forged"})
    assert forged.status_code == 403
    token = _TOKEN.search(confirm.text).group(1)  # type: ignore[union-attr]
    deleted = as_alice.post(f"/datasets/{dataset_id}/delete", data={"csrf_token": token})
    assert deleted.status_code == 302
    assert "Deleted dataset gone.csv." in as_alice.get("/datasets").text
    with sessions() as session:
        assert session.get(Dataset, dataset_id) is None


def test_a_dataset_a_version_was_trained_on_is_kept_with_the_apis_reason(
    as_alice: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    _upload(as_alice, b"x,label\n1,a\n", "pinned.csv")
    with sessions() as session:
        dataset = session.query(Dataset).one()
    _version(sessions, digest=dataset.digest)
    token = _token(as_alice, f"/datasets/{dataset.id}/delete")

    refused = as_alice.post(f"/datasets/{dataset.id}/delete", data={"csrf_token": token})

    assert refused.status_code == 409
    assert "model versions were trained on this dataset (digits v1)" in refused.text
    with sessions() as session:
        assert session.get(Dataset, dataset.id) is not None


def test_a_version_is_deleted_unless_an_alias_points_at_it(
    as_alice: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    model_id = _version(sessions)
    _version(sessions)
    with sessions() as session:
        model = session.get_one(Model, model_id)
        registry.set_alias(session, model, "production", 1)
        session.commit()
    assert f"/models/{model_id}/versions/2/delete" in as_alice.get("/models").text
    token = _token(as_alice, f"/models/{model_id}/versions/1/delete")

    refused = as_alice.post(f"/models/{model_id}/versions/1/delete", data={"csrf_token": token})
    assert refused.status_code == 409
    assert "aliased as production; move or delete the alias first" in refused.text

    deleted = as_alice.post(f"/models/{model_id}/versions/2/delete", data={"csrf_token": token})
    assert deleted.status_code == 302
    assert "Deleted digits v2." in as_alice.get("/models").text
    with sessions() as session:
        numbers = session.query(ModelVersion.number).filter_by(model_id=model_id).all()
        assert [n for (n,) in numbers] == [1]
    missing = as_alice.get(f"/models/{model_id}/versions/2/delete")
    assert missing.status_code == 404


def test_deleting_needs_the_sessions_token(
    as_alice: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    model_id = _version(sessions)
    response = as_alice.post(f"/models/{model_id}/versions/1/delete", data={})
    assert response.status_code == 403
    with sessions() as session:
        assert session.query(ModelVersion).count() == 1


def test_an_alias_is_removed_from_the_models_page_with_the_sessions_token(
    as_alice: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    model_id = _version(sessions)
    with sessions() as session:
        registry.set_alias(session, session.get_one(Model, model_id), "production", 1)
        session.commit()
    page = as_alice.get("/models").text
    action = f"/models/{model_id}/aliases/production/delete"
    assert f'action="{action}"' in page

    assert as_alice.post(action, data={"csrf_token": "forged"}).status_code == 403
    with sessions() as session:
        assert session.get_one(Model, model_id).aliases == {"production": 1}

    removed = as_alice.post(action, data={"csrf_token": _token(as_alice, "/models")})
    assert removed.status_code == 302
    assert "digits: removed the alias production." in as_alice.get("/models").text
    with sessions() as session:
        assert session.get_one(Model, model_id).aliases == {}
    again = as_alice.post(action, data={"csrf_token": _token(as_alice, "/models")})
    assert again.status_code == 404


def test_the_models_page_links_only_source_jobs_that_still_exist(
    as_alice: FlaskClient, sessions: sessionmaker[Session], create_job: Callable[..., Job]
) -> None:
    kept, deleted = create_job(kind="train"), create_job(kind="train")
    with sessions() as session:
        for job in (kept, deleted):
            registry.register_version(
                session, owner="alice", name="digits", source_job_id=job.id, arch="mlp",
                config={}, metrics={}, artifact_digest="0" * 64, artifact_size=1,
                dataset_digest=None,
            )  # fmt: skip
        session.delete(session.get_one(Job, deleted.id))
        session.commit()

    page = as_alice.get("/models").text

    assert f'href="/jobs/{kept.id}"' in page
    assert f'href="/jobs/{deleted.id}"' not in page
    assert f'title="job {deleted.id} was deleted">{deleted.id[:8]}<' in page


# --- a version's files ----------------------------------------------------------------------


def test_a_versions_weights_and_export_are_downloaded_from_the_ui(
    as_alice: FlaskClient, sessions: sessionmaker[Session], settings
) -> None:
    store = ArtifactStore(settings.artifacts_dir)
    weights, export = store.put_bytes(b"safetensors bytes"), store.put_bytes(b"PK torchscript")
    with sessions() as session:
        version = registry.register_version(
            session, owner="alice", name="digits", source_job_id=None, arch="mlp", config={},
            metrics={}, artifact_digest=weights.digest, artifact_size=weights.size,
            dataset_digest=None,
        )  # fmt: skip
        session.flush()
        base = f"/models/{version.model_id}/versions/1/download"
        assert as_alice.get(f"{base}/torchscript").status_code == 404  # no export yet
        registry.record_export(session, version.id, "torchscript", export.digest, export.size)
        job = jobs.create(
            session, kind="export", owner="alice", spec={"model": "digits"}, queue="cpu"
        )
        session.commit()
        assert jobs.claim(session, job.id, 0, worker="w", device="cpu") == 1
        result = {"model": "digits", "version": 1, "format": "torchscript",
                  "digest": export.digest, "size": export.size}  # fmt: skip
        assert jobs.succeed(session, job.id, 1, result)
        session.commit()

    page = as_alice.get("/models").text
    assert f'href="{base}/weights"' in page
    assert f'href="{base}/torchscript"' in page
    with as_alice.get(f"{base}/weights") as sent:
        assert (sent.status_code, sent.data) == (200, b"safetensors bytes")
        assert "digits-v1.safetensors" in sent.headers["Content-Disposition"]
    with as_alice.get(f"{base}/torchscript") as sent:
        assert sent.data == b"PK torchscript"
    assert as_alice.get(f"{base}/onnx").status_code == 404
    # The export job's page links the file it made.
    assert f'id="download-export" href="{base}/torchscript"' in as_alice.get(f"/jobs/{job.id}").text
