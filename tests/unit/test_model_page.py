"""The models page shows each version's family and task (and an hf version's tokenizer and
context length, stored at upload), registers a model directory through a CSRF-protected
form, and the job page shows tokens/s where a job reports it."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from db.models import Job
from tests.hfkit import bert_directory
from tests.unit.test_hf_upload import files_of, push
from tests.unit.test_ui import _sign_in, _token
from workers.runners.hf_predict import token_rate

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return bert_directory(tmp_path_factory.mktemp("bert") / "tiny-bert", "embedding")


@pytest.fixture
def as_alice(client: FlaskClient, create_key: Callable[..., str]) -> FlaskClient:
    _sign_in(client, create_key("alice"))
    return client


def _form(client: FlaskClient, files: dict[str, bytes], name: str = "enc") -> dict:
    return {
        "csrf_token": _token(client, "/models"),
        "name": name,
        "family": "hf",
        "task": "embedding",
        "files": [(io.BytesIO(content), filename) for filename, content in files.items()],
    }


def test_an_hf_versions_family_task_tokenizer_and_context_are_shown(
    as_alice: FlaskClient, alice: dict[str, str], tiny_bert: Path
) -> None:
    version = push(as_alice, alice, files_of(tiny_bert)).get_json()
    config = version["config"]
    page = as_alice.get("/models").text
    assert "hf · embedding" in page
    assert f"tokenizer {config['tokenizer']['class']}" in page
    assert f"context {config['context_length']}" in page


def test_the_directory_form_registers_a_version(
    as_alice: FlaskClient, alice: dict[str, str], tiny_bert: Path
) -> None:
    response = as_alice.post("/models/upload", data=_form(as_alice, files_of(tiny_bert)))
    assert response.status_code == 302
    version = as_alice.get("/api/v1/models/enc/versions/1", headers=alice).get_json()
    assert (version["family"], version["task"]) == ("hf", "embedding")
    assert "Registered enc v1 (hf, embedding)." in as_alice.get("/models").text


def test_the_directory_form_needs_the_token_and_shows_refusals(
    as_alice: FlaskClient, alice: dict[str, str], tiny_bert: Path
) -> None:
    forged = {**_form(as_alice, files_of(tiny_bert)), "csrf_token": "forged"}
    assert as_alice.post("/models/upload", data=forged).status_code == 403
    pickled = files_of(tiny_bert, pytorch_model__bin=b"\x80\x04junk")
    refused = as_alice.post("/models/upload", data=_form(as_alice, pickled))
    assert refused.status_code == 415
    assert "pytorch_model.bin" in refused.text
    assert 'value="enc"' in refused.text  # the name is kept for another try
    assert as_alice.get("/api/v1/models/enc", headers=alice).status_code == 404


def test_the_job_page_shows_tokens_per_second(
    as_alice: FlaskClient, create_job: Callable[..., Job], sessions: sessionmaker[Session]
) -> None:
    job = create_job(owner="alice", kind="predict", spec={"model": "m", "inputs": ["hi"]})
    rate = token_rate([{"tokens": 30}, {"tokens": 10, "generated_tokens": 8}], elapsed=2.0)
    assert rate == {"tokens": 40, "generated_tokens": 8, "tokens_per_s": 24.0}
    with sessions() as session:
        session.get(Job, job.id).result = {"model": "m", "version": 1, **rate}  # type: ignore[union-attr]
        session.commit()
    page = as_alice.get(f"/jobs/{job.id}").text
    assert "24.0 tokens/s" in page or "24 tokens/s" in page
    assert "40 input, 8 generated tokens" in page
