"""predict on hf versions, end to end: upload through the API, submit through the API, run
the job on a worker in this process (the real runner, model cache and transformers)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from hfkit import NER_LABELS, SENTIMENT
from modelkit import never_resent

from db import jobs as job_rows
from db.models import Job
from kiln.errors import JobFailure
from kiln.families import HfParams
from tests.hf_fixtures import database_url, directories, one_thread, runtime  # noqa: F401 (fixtures)
from workers import model_cache
from workers.execute import execute_attempt
from workers.ml import hf

TEXTS = ["alice went to paris and met bob", "a bad day", "carol works in berlin at night"]


@pytest.fixture
def register(client, alice, directories):
    """register(task, name) uploads the tiny model for `task` through the API."""

    def push(task: str, name: str | None = None) -> dict:
        directory = directories[task]
        files = [(io.BytesIO(p.read_bytes()), p.name) for p in sorted(directory.iterdir())]
        response = client.post(
            f"/api/v1/models/{name or task}/versions",
            data={"family": "hf", "task": task, "files": files},
            headers=alice,
        )
        assert response.status_code == 201, response.get_data(as_text=True)
        return response.get_json()

    return push


@pytest.fixture
def predict(client, alice, runtime, sessions):
    """predict(spec) submits through the API, runs the job, returns the finished Job."""

    def run(spec: dict) -> Job:
        response = client.post(
            "/api/v1/jobs", json={"kind": "predict", "spec": spec}, headers=alice
        )
        assert response.status_code == 202, response.get_data(as_text=True)
        job_id = response.get_json()["id"]
        execute_attempt(runtime, job_id, 0, "w1", never_resent)
        with sessions() as session:
            job = session.get(Job, job_id)
            session.expunge(job)
            return job

    return run


def _reference_embeddings(directory: Path, texts: list[str]) -> torch.Tensor:
    """Mean pooling written out plainly, one text at a time (no padding at all)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModel.from_pretrained(directory, local_files_only=True).eval()
    rows = []
    with torch.inference_mode():
        for text in texts:
            encoded = tokenizer(text, return_tensors="pt")
            rows.append(model(**encoded).last_hidden_state[0].mean(dim=0))
    return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def test_embedding_end_to_end_matches_plain_mean_pooling(register, predict, directories):
    register("embedding")
    job = predict({"model": "embedding", "inputs": TEXTS, "hf": {"normalize": True}})

    assert job.state == "succeeded", job.error_message
    result = job.result
    assert (result["task"], result["version"], len(result["predictions"])) == ("embedding", 1, 3)
    first = result["predictions"][0]
    assert set(first) == {"embedding", "tokens", "truncated"}
    assert len(first["embedding"]) == 32
    assert first["truncated"] is False
    assert first["tokens"] == 9  # [CLS], seven words, [SEP]
    got = torch.tensor([p["embedding"] for p in result["predictions"]])
    # Padded batches (sorted by length) give each text what it gets alone.
    torch.testing.assert_close(
        got, _reference_embeddings(directories["embedding"], TEXTS), atol=1e-5, rtol=1e-4
    )


def test_text_rows_may_be_objects_with_one_text(register, predict):
    register("embedding")
    job = predict({"model": "embedding", "inputs": [{"review": "a bad day"}, {"text": "it"}]})
    assert job.state == "succeeded", job.error_message
    assert [p["tokens"] for p in job.result["predictions"]] == [5, 3]


def test_text_classification_gives_a_label_and_scores(register, predict):
    register("text-classification", "sentiment")
    job = predict({"model": "sentiment", "inputs": TEXTS})

    assert job.state == "succeeded", job.error_message
    for prediction in job.result["predictions"]:
        assert set(prediction["scores"]) == set(SENTIMENT.values())
        assert sum(prediction["scores"].values()) == pytest.approx(1.0)
        assert prediction["label"] == max(prediction["scores"], key=prediction["scores"].get)
        assert prediction["score"] == prediction["scores"][prediction["label"]]


def test_token_classification_gives_entities_with_character_spans(register, predict):
    register("token-classification", "ner")
    job = predict({"model": "ner", "inputs": TEXTS})

    assert job.state == "succeeded", job.error_message
    kinds = {label.split("-")[-1] for label in NER_LABELS.values()} - {"O"}
    for text, prediction in zip(TEXTS, job.result["predictions"], strict=True):
        for entity in prediction["entities"]:
            assert entity["entity"] in kinds
            assert text[entity["start"] : entity["end"]] == entity["text"]
            assert 0 < entity["score"] <= 1
    assert any(p["entities"] for p in job.result["predictions"])  # random weights tag some


def test_entities_are_grouped_from_b_and_i_tags():
    text = "alice smith went to new york"
    tokens = [
        ("B-PER", 0, 5, 0.9),
        ("I-PER", 6, 11, 0.7),
        ("O", 12, 16, 0.99),
        ("O", 17, 19, 0.99),
        ("B-LOC", 20, 23, 0.8),
        ("I-LOC", 24, 28, 0.6),
    ]
    assert hf.group_entities(text, tokens) == [
        {
            "entity": "PER",
            "start": 0,
            "end": 11,
            "text": "alice smith",
            "score": pytest.approx(0.8),
        },
        {"entity": "LOC", "start": 20, "end": 28, "text": "new york", "score": pytest.approx(0.7)},
    ]
    # An I- after another kind starts a new entity; B- after B- splits.
    split = hf.group_entities(
        "a b c", [("I-PER", 0, 1, 1.0), ("B-PER", 2, 3, 1.0), ("I-LOC", 4, 5, 1.0)]
    )
    assert [(e["entity"], e["text"]) for e in split] == [("PER", "a"), ("PER", "b"), ("LOC", "c")]


def test_greedy_generation_gives_the_same_text_every_run(register, predict):
    register("text-generation", "gen")
    spec = {"model": "gen", "inputs": ["alice went to", "the model"], "hf": {"max_new_tokens": 6}}

    first, second = predict(spec), predict(spec)

    assert first.state == second.state == "succeeded", first.error_message
    assert first.result["predictions"] == second.result["predictions"]
    prediction = first.result["predictions"][0]
    assert set(prediction) == {"text", "generated_tokens", "finish_reason", "tokens", "truncated"}
    assert prediction["generated_tokens"] <= 6
    assert prediction["finish_reason"] in {"length", "eos"}


def test_sampling_with_a_seed_repeats_and_stop_strings_cut_the_text(register, predict):
    register("text-generation", "gen")
    sampled = {"max_new_tokens": 12, "temperature": 1.5, "top_p": 0.95, "seed": 7}
    spec = {"model": "gen", "inputs": ["alice went to"], "hf": sampled}

    first, second = predict(spec), predict(spec)
    assert first.result["predictions"] == second.result["predictions"]

    text = first.result["predictions"][0]["text"]
    stop = text[len(text) // 2 :][:2] if len(text) > 2 else text
    cut = predict({**spec, "hf": {**sampled, "stop": [stop]}}).result["predictions"][0]
    assert cut["text"] == text[: text.find(stop)]
    assert cut["finish_reason"] == "stop"


def test_an_input_past_the_context_fails_or_is_truncated_as_asked(register, predict):
    register("embedding")
    long_text = " ".join(["alice"] * 100)  # 102 tokens; the tiny model takes 64

    failed = predict({"model": "embedding", "inputs": ["a day", long_text]})
    assert failed.state == "failed"
    assert "input 1 is 102 tokens; the model takes 64" in failed.error_message

    job = predict(
        {"model": "embedding", "inputs": ["a day", long_text], "hf": {"truncation": "truncate"}}
    )
    assert job.state == "succeeded", job.error_message
    assert [(p["tokens"], p["truncated"]) for p in job.result["predictions"]] == [
        (4, False),
        (64, True),
    ]


@pytest.fixture
def refused_then_run(client, alice, runtime, sessions):
    """refused_then_run(spec) -> (the API's 422 body, the Job run without the API's checks):
    submit refuses what the version cannot take (web.submit_checks), and the runner still
    fails it, for a version that changed between submit and run."""

    def run(spec: dict) -> tuple[dict, Job]:
        response = client.post(
            "/api/v1/jobs", json={"kind": "predict", "spec": spec}, headers=alice
        )
        assert response.status_code == 422, response.get_data(as_text=True)
        with sessions() as session:
            queued = job_rows.create(session, kind="predict", owner="alice", spec=spec, queue="cpu")
            session.commit()
            job_id = queued.id
        execute_attempt(runtime, job_id, 0, "w1", never_resent)
        with sessions() as session:
            job = session.get(Job, job_id)
            session.expunge(job)
            return response.get_json(), job

    return run


def test_parameters_of_another_task_fail_the_job(register, refused_then_run):
    register("embedding")
    spec = {"model": "embedding", "inputs": ["a day"], "hf": {"max_new_tokens": 3}}
    refused, job = refused_then_run(spec)
    assert refused["errors"][0]["loc"] == ["spec", "hf", "max_new_tokens"]
    assert job.state == "failed"
    assert "max_new_tokens: not a parameter of embedding models" in job.error_message


def test_a_zoo_version_refuses_plain_strings(refused_then_run, runtime, sessions, tmp_path):
    from modelkit import register_model

    register_model(sessions, runtime.store, tmp_path)
    refused, job = refused_then_run({"model": "m", "inputs": ["some text"]})
    assert refused["errors"][0]["loc"] == ["spec", "inputs"]
    assert job.state == "failed"
    assert "zoo model" in job.error_message


def test_the_second_job_on_a_version_uses_the_loaded_model(register, predict, runtime):
    register("embedding")
    predict({"model": "embedding", "inputs": ["a day"]})
    predict({"model": "embedding", "inputs": ["a night"]})
    stats = model_cache.shared(
        runtime.settings.model_cache_models, runtime.settings.model_cache_bytes
    ).stats
    assert (stats.misses, stats.hits) == (1, 1)
    assert (runtime.settings.data_dir / "hf-models").is_dir()


def test_generation_without_room_for_a_prompt_is_refused(directories):
    bundle = hf.load(directories["text-generation"], "text-generation", torch.device("cpu"))
    with pytest.raises(JobFailure, match="leaves no room"):
        hf.run(bundle, ["hi"], HfParams(max_new_tokens=64))


def test_loading_and_running_never_open_a_connection(directories, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for task in ("text-classification", "text-generation"):
        bundle = hf.load(directories[task], task, torch.device("cpu"))
        assert len(hf.run(bundle, ["alice went to paris"], HfParams())) == 1


def test_each_batch_reports_progress_and_results_keep_input_order(directories):
    bundle = hf.load(directories["embedding"], "embedding", torch.device("cpu"))
    texts = [" ".join(["day"] * (i % 7 + 1)) for i in range(40)]
    seen: list[tuple[int, int]] = []

    results = hf.run(bundle, texts, HfParams(), lambda done, total: seen.append((done, total)))

    assert seen == [(32, 40), (40, 40)]
    assert [r["tokens"] for r in results] == [i % 7 + 3 for i in range(40)]  # [CLS] … [SEP]


def test_queued_jobs_on_an_hf_version_are_scored_in_the_leaders_passes(
    register, runtime, sessions, directories
):
    register("text-classification")

    def submit(spec: dict) -> str:
        with sessions() as session:
            job = job_rows.create(session, kind="predict", owner="alice", spec=spec, queue="cpu")
            session.commit()
            return job.id

    model = "text-classification"
    leader = submit({"model": model, "inputs": TEXTS[:1]})
    follower = submit({"model": model, "inputs": TEXTS[1:]})
    too_long = submit({"model": model, "inputs": [" ".join(["city"] * 100)]})
    other_params = submit({"model": model, "inputs": TEXTS, "hf": {"truncation": "truncate"}})

    execute_attempt(runtime, leader, 0, "w1", never_resent)

    with sessions() as session:
        done = {job_id: session.get(Job, job_id) for job_id in (leader, follower, too_long)}
        assert done[leader].result["batch_jobs"] == 3
        assert done[follower].state == "succeeded"
        assert done[follower].result["batched_with"] == leader
        assert done[too_long].state == "failed"
        assert "input 0 is 102 tokens; the model takes 64" in done[too_long].error_message
        assert session.get(Job, other_params).state == "queued"  # other parameters: not taken
        batched = [*done[leader].result["predictions"], *done[follower].result["predictions"]]
    bundle = hf.load(directories[model], model, torch.device("cpu"))
    alone = hf.run(bundle, TEXTS, HfParams())
    assert [p["label"] for p in batched] == [p["label"] for p in alone]
    assert [p["score"] for p in batched] == pytest.approx([p["score"] for p in alone], abs=1e-5)
