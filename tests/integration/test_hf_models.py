"""Hugging Face models with a real worker process: a tiny GPT-2 directory is uploaded as a
.tar.gz through the API and a Celery worker (offline, its own process) generates from it."""

from __future__ import annotations

import io
import tarfile

import pytest
from hfkit import gpt2_directory

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
