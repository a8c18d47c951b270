"""Hugging Face models with a real worker process: a tiny GPT-2 directory is uploaded as a
.tar.gz through the API and a Celery worker (offline, its own process) generates from it."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hfkit import bert_directory, gpt2_directory

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_an_uploaded_directory_generates_the_same_text_on_a_real_worker(api, worker, tmp_path):
    directory = gpt2_directory(tmp_path / "tiny-gpt2")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(directory, arcname="tiny-gpt2")
    archive.seek(0)
    response = api.client.post(
        "/api/v1/models/gen/versions",
        data={"family": "hf", "task": "text-generation", "files": [(archive, "gen.tar.gz")]},
        headers=api.headers,
    )
    assert response.status_code == 201, response.get_data(as_text=True)

    spec = {"model": "gen", "inputs": ["alice went to", "the queue"], "hf": {"max_new_tokens": 5}}
    first = api.wait_for(api.submit("predict", spec)["id"], "succeeded")
    second = api.wait_for(api.submit("predict", spec)["id"], "succeeded")

    assert first["result"]["task"] == "text-generation"
    assert first["result"]["predictions"] == second["result"]["predictions"]
    assert all(p["generated_tokens"] <= 5 for p in first["result"]["predictions"])
    assert first["worker"] == second["worker"]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_text_dataset_is_batch_scored_by_an_hf_classifier_on_a_real_worker(api, worker, tmp_path):
    directory = bert_directory(tmp_path / "tiny-bert", "text-classification")
    files = [(io.BytesIO(p.read_bytes()), p.name) for p in sorted(directory.iterdir())]
    response = api.client.post(
        "/api/v1/models/sentiment/versions",
        data={"family": "hf", "task": "text-classification", "files": files},
        headers=api.headers,
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    texts = ["alice went to paris", None, "the queue was good and the model was great"] * 10
    table = pa.table({"id": pa.array(range(30)), "review": pa.array(texts, pa.string())})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    dataset = api.upload("reviews.parquet", buffer.getvalue())

    spec = {"model": "sentiment", "dataset": dataset["id"], "passthrough": ["id"]}
    spec |= {"chunk_rows": 8, "max_error_fraction": 0.5}
    job = api.wait_for(api.submit("batch_predict", spec)["id"], "succeeded")

    result = job["result"]
    assert (result["rows"], result["scored"], result["errors"]) == (30, 20, 10)
    assert result["text_column"] == "review"
    assert result["tokens_per_s"] > 0
    with api.client.get(f"/api/v1/jobs/{job['id']}/output", headers=api.headers) as download:
        assert download.status_code == 200
        out = pq.read_table(io.BytesIO(download.data))
    assert out["id"].to_pylist() == list(range(30))
    labels = out["label"].to_pylist()
    assert [label is None for label in labels] == [text is None for text in texts]
    assert set(labels) - {None} <= {"negative", "positive"}
    assert labels[0] == labels[3]  # the same text, the same label
