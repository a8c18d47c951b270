"""GET /jobs/<id>/output and /errors, and dataset uploads in every format."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import update

from db.models import Job
from kiln.artifacts import ArtifactStore


def _finish_with(sessions, job_id: str, result: dict) -> None:
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(result=result))
        session.commit()


def test_output_answers_404_no_output_while_the_job_has_none(client, alice, create_job):
    job = create_job(kind="batch_predict", state="running")

    for route in ("output", "errors"):
        response = client.get(f"/api/v1/jobs/{job.id}/{route}", headers=alice)
        assert response.status_code == 404
        assert response.get_json()["code"] == "no_output"


def test_output_streams_the_result_file_to_its_owner_only(
    client, alice, bob, create_job, sessions, settings
):
    job = create_job(kind="batch_predict", state="succeeded")
    content = b"id,prediction\n1,a\n2,b\n"
    stored = ArtifactStore(settings.artifacts_dir).put_bytes(content)
    described = {"digest": stored.digest, "size": stored.size, "format": "csv", "rows": 2}
    _finish_with(sessions, job.id, {"output": described, "error_file": None})

    with client.get(f"/api/v1/jobs/{job.id}/output", headers=alice) as mine:
        assert mine.status_code == 200
        assert mine.data == content
        assert mine.mimetype == "text/csv"
        assert f"{job.id}-output.csv" in mine.headers["Content-Disposition"]
    theirs = client.get(f"/api/v1/jobs/{job.id}/output", headers=bob)
    errors = client.get(f"/api/v1/jobs/{job.id}/errors", headers=alice)

    assert theirs.status_code == 404
    assert theirs.get_json()["code"] == "not_found"
    assert errors.get_json()["code"] == "no_output"


def _upload(client, headers, content: bytes, filename: str):
    return client.post(
        "/api/v1/datasets", data={"file": (io.BytesIO(content), filename)}, headers=headers
    )


def test_parquet_jsonl_and_npz_uploads_record_rows_schema_size_and_digest(client, alice):
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": [1, 2, 3], "v": [0.5, 1.5, 2.5]}), buffer)
    npz = io.BytesIO()
    np.savez(npz, x=np.zeros((4, 2), dtype=np.float32), y=np.arange(4))
    files = {
        "a.parquet": buffer.getvalue(),
        "b.jsonl": b'{"id": 1, "v": 0.5}\n{"id": 2, "v": 1.5}\n',
        "c.npz": npz.getvalue(),
    }

    bodies = {name: _upload(client, alice, data, name).get_json() for name, data in files.items()}

    assert bodies["a.parquet"]["format"] == "parquet"
    assert bodies["a.parquet"]["rows"] == 3
    assert bodies["b.jsonl"]["columns"] == [
        {"name": "id", "dtype": "int64"},
        {"name": "v", "dtype": "double"},
    ]
    assert bodies["c.npz"]["rows"] == 4
    assert [c["name"] for c in bodies["c.npz"]["columns"]] == ["x_0", "x_1", "y"]
    for name, data in files.items():
        assert bodies[name]["size_bytes"] == len(data)
        assert bodies[name]["digest"] == hashlib.sha256(data).hexdigest()


def test_a_csv_named_parquet_is_refused_and_an_equal_valid_upload_survives(client, alice, settings):
    content = b"a,b\n1,2\n"
    first = _upload(client, alice, content, "good.csv").get_json()

    refused = _upload(client, alice, content, "bad.parquet")

    assert refused.status_code == 422
    assert refused.get_json()["code"] == "unsupported_dataset"
    # The refused upload had the same bytes as a dataset: that dataset's file must stay.
    assert ArtifactStore(settings.artifacts_dir).path(first["digest"]).exists()
