"""Submit-time reference checks (web.submit_checks): a job the registry already shows to be
doomed is refused with 422 invalid_spec naming the field, and nothing is queued."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from db.models import Job


@pytest.fixture
def register(version_row):
    return version_row


@pytest.fixture
def dataset(dataset_row):
    return dataset_row


def _submit(client, headers, kind: str, spec: dict):
    return client.post("/api/v1/jobs", json={"kind": kind, "spec": spec}, headers=headers)


def _jobs(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def _refused(response, loc: list[str]) -> str:
    """The 422 body's message for `loc`; fails unless the request was refused so."""
    assert response.status_code == 422, response.get_json()
    body = response.get_json()
    assert body["code"] == "invalid_spec"
    found = [e["msg"] for e in body["errors"] if e["loc"] == loc]
    assert found, body["errors"]
    return found[0]


def test_a_predict_of_a_model_that_does_not_exist_is_refused(client, alice, sessions, sent):
    response = _submit(client, alice, "predict", {"model": "nope", "inputs": [[1, 2]]})

    assert "no model 'nope'" in _refused(response, ["spec", "model"])
    assert _jobs(sessions) == 0
    assert sent == []


def test_a_predict_of_another_owners_model_is_refused(client, alice, bob, register, sessions):
    register("bobs", owner="bob")

    refused = _submit(client, alice, "predict", {"model": "bobs", "inputs": [[1, 2]]})
    accepted = _submit(client, bob, "predict", {"model": "bobs", "inputs": [[1, 2]]})

    assert "no model 'bobs'" in _refused(refused, ["spec", "model"])
    assert accepted.status_code == 202
    assert _jobs(sessions) == 1


@pytest.mark.parametrize("ref", [2, "production"])
def test_a_version_ref_that_does_not_resolve_is_refused(client, alice, register, ref):
    register("m")
    response = _submit(client, alice, "export", {"model": "m", "version": ref})

    assert "has no version" in _refused(response, ["spec", "version"])


def test_a_version_that_exists_is_accepted_by_number_alias_and_latest(client, alice, register):
    register("m")
    for ref in (1, "latest"):
        response = _submit(client, alice, "export", {"model": "m", "version": ref})
        assert response.status_code == 202, response.get_json()


def test_a_batch_predict_of_embeddings_into_csv_is_refused_naming_the_formats(
    client, alice, register, dataset, sessions
):
    register("emb", family="hf", task="embedding")
    data = dataset()
    spec = {"model": "emb", "dataset": data, "output_format": "csv"}

    message = _refused(_submit(client, alice, "batch_predict", spec), ["spec", "output_format"])
    parquet = _submit(client, alice, "batch_predict", {**spec, "output_format": "parquet"})

    assert "csv cannot hold" in message
    assert "parquet or jsonl" in message
    assert parquet.status_code == 202
    assert _jobs(sessions) == 1


def test_a_classifier_batch_predict_may_write_csv(client, alice, register, dataset):
    register("cls", family="hf", task="text-classification")
    spec = {"model": "cls", "dataset": dataset(), "output_format": "csv"}

    assert _submit(client, alice, "batch_predict", spec).status_code == 202


def test_a_batch_predict_of_an_unknown_or_foreign_dataset_is_refused(
    client, alice, register, dataset
):
    register("m")
    foreign = dataset(owner="bob")

    for data in ("nosuchdataset", foreign):
        response = _submit(client, alice, "batch_predict", {"model": "m", "dataset": data})
        assert f"no dataset {data!r}" in _refused(response, ["spec", "dataset"])


def test_options_the_versions_family_does_not_take_are_refused(client, alice, register, dataset):
    register("zoo")
    register("emb", family="hf", task="embedding")
    data = dataset()

    text_on_zoo = _submit(client, alice, "predict", {"model": "zoo", "inputs": ["a text"]})
    hf_on_zoo = _submit(
        client, alice, "predict", {"model": "zoo", "inputs": [[1, 2]], "hf": {"normalize": True}}
    )
    generation_on_embedding = _submit(
        client, alice, "predict", {"model": "emb", "inputs": ["t"], "hf": {"max_new_tokens": 3}}
    )
    features_on_hf = _submit(
        client, alice, "batch_predict", {"model": "emb", "dataset": data, "features": ["n"]}
    )
    text_column_on_zoo = _submit(
        client, alice, "batch_predict", {"model": "zoo", "dataset": data, "text_column": "text"}
    )

    assert "plain strings are for hf models" in _refused(text_on_zoo, ["spec", "inputs"])
    assert "hf parameters are for hf models" in _refused(hf_on_zoo, ["spec", "hf"])
    assert "not a parameter of embedding" in _refused(
        generation_on_embedding, ["spec", "hf", "max_new_tokens"]
    )
    assert "features are for zoo models" in _refused(features_on_hf, ["spec", "features"])
    assert "text_column is for hf models" in _refused(text_column_on_zoo, ["spec", "text_column"])


def test_train_checks_its_dataset_resume_job_and_fine_tune_base(
    client, alice, register, dataset, create_job
):
    register("zoo")
    unknown_data = _submit(client, alice, "train", {"model_name": "n", "dataset": "nosuch"})
    unknown_job = _submit(client, alice, "train", {"model_name": "n", "resume_from": "nosuchjob"})
    bobs_job = create_job(owner="bob")
    foreign_job = _submit(client, alice, "train", {"model_name": "n", "resume_from": bobs_job.id})
    hf_from_zoo = _submit(
        client,
        alice,
        "train",
        {
            "model_name": "n",
            "dataset": dataset(),
            "arch": "hf",
            "arch_params": {"base_model": "zoo"},
        },
    )
    builtin = _submit(client, alice, "train", {"model_name": "n", "dataset": "builtin:iris"})

    assert "no dataset 'nosuch'" in _refused(unknown_data, ["spec", "dataset"])
    assert "no job 'nosuchjob'" in _refused(unknown_job, ["spec", "resume_from"])
    assert "no job" in _refused(foreign_job, ["spec", "resume_from"])
    assert "fine-tuning starts from an hf" in _refused(
        hf_from_zoo, ["spec", "arch_params", "base_model"]
    )
    assert builtin.status_code == 202


def test_every_problem_is_named_at_once(client, alice):
    spec = {"model": "nope", "dataset": "nosuch"}
    body = _submit(client, alice, "batch_predict", spec).get_json()

    assert [e["loc"] for e in body["errors"]] == [["spec", "model"], ["spec", "dataset"]]
