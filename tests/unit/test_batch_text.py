"""batch_predict on hf versions, in-process: each task's output columns in input order, texts
scored sorted by token length, error-file rows, resuming after a killed chunk. The tiny
models are uploaded through the API; the job runs on the real runner, cache and transformers."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hfkit import SENTIMENT
from modelkit import add_dataset, never_resent

from db import jobs
from db.engine import session_scope
from db.models import Job
from kiln import datasets
from kiln.families import HfParams
from tests.hf_fixtures import database_url, directories, one_thread, runtime  # noqa: F401 (fixtures)
from workers.execute import execute_attempt
from workers.ml import hf
from workers.runners import batch_text

WORDS = ["alice", "went", "to", "paris", "and", "met", "bob", "in", "london", "the", "city"]


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the runner or in execute_attempt catches it."""


@pytest.fixture
def register(client, alice, directories):
    def push(task: str) -> None:
        files = [(io.BytesIO(p.read_bytes()), p.name) for p in sorted(directories[task].iterdir())]
        response = client.post(
            f"/api/v1/models/{task}/versions",
            data={"family": "hf", "task": task, "files": files},
            headers=alice,
        )
        assert response.status_code == 201, response.get_data(as_text=True)

    return push


def _texts(n: int) -> list[str]:
    """Texts of mixed length (1 to 23 words), in an order unrelated to their length."""
    return [
        " ".join(WORDS[(i + k) % len(WORDS)] for k in range((i * 7) % 23 + 1)) for i in range(n)
    ]


def _dataset(runtime, sessions, tmp_path, texts: list[str | None], fmt: str = "parquet") -> str:
    """A dataset with a number column first, then `id` and `text` (the first string column)."""
    table = pa.table(
        {
            "n": pa.array(range(len(texts)), pa.int64()),
            "id": pa.array([f"doc-{i}" for i in range(len(texts))]),
            "text": pa.array(texts, pa.string()),
        }
    )
    path = tmp_path / f"in.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    return add_dataset(sessions, runtime.store, path, fmt)


def _run(runtime, sessions, spec: dict) -> Job:
    with sessions() as session:
        job = jobs.create(session, kind="batch_predict", owner="alice", spec=spec, queue="cpu")
        session.commit()
        job_id = job.id
    execute_attempt(runtime, job_id, 0, "w1", never_resent)
    return _state(sessions, job_id)


def _state(sessions, job_id: str) -> Job:
    with sessions() as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def _read(runtime, described: dict) -> pa.Table:
    path = runtime.store.path(described["digest"])
    return pa.Table.from_batches(list(datasets.iter_batches(path, described["format"], 10_000)))


def _reference(directories, task: str, texts: list[str], **params) -> list[dict]:
    """Each text's result from predict's path, one text per call (no batching, no sorting)."""
    bundle = hf.load(directories[task], task, torch.device("cpu"))
    return [hf.run(bundle, [text], HfParams(**params))[0] for text in texts]


def test_embeddings_are_a_fixed_size_float32_column_in_input_order(
    register, runtime, sessions, tmp_path, directories, monkeypatch
):
    register("embedding")
    texts = _texts(45)
    dataset = _dataset(runtime, sessions, tmp_path, texts)
    want = _reference(directories, "embedding", texts, normalize=True)
    passes: list[list[int]] = []
    real_embed = hf._embed

    def recording_embed(bundle, batch, params):
        passes.append(hf.token_counts(bundle.tokenizer, batch))
        return real_embed(bundle, batch, params)

    monkeypatch.setattr(hf, "_embed", recording_embed)
    spec = {"model": "embedding", "dataset": dataset, "passthrough": ["id"], "chunk_rows": 20}
    spec |= {"text_column": "text", "batch_size": 8, "hf": {"normalize": True}}
    job = _run(runtime, sessions, spec)

    assert job.state == "succeeded", job.error_message
    assert job.result["text_column"] == "text"
    out = _read(runtime, job.result["output"])
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert out["id"].to_pylist() == [f"doc-{i}" for i in range(45)]
    got = torch.tensor(out["embedding"].to_pylist())
    assert torch.allclose(got, torch.tensor([w["embedding"] for w in want]), atol=1e-5)
    assert out["tokens"].to_pylist() == [w["tokens"] for w in want]
    # Chunks of 20, 20 and 5 rows; within each, passes of 8 in descending token length.
    assert [len(p) for p in passes] == [8, 8, 4, 8, 8, 4, 5]
    for chunk in (passes[0:3], passes[3:6], passes[6:]):
        flat = [n for p in chunk for n in p]
        assert flat == sorted(flat, reverse=True)
        assert flat[0] > flat[-1]
    assert job.result["tokens"] == sum(w["tokens"] for w in want)
    assert job.result["tokens_per_s"] > 0


def test_the_text_column_is_the_one_named_or_the_first_string_column(
    register, runtime, sessions, tmp_path
):
    register("embedding")
    dataset = _dataset(runtime, sessions, tmp_path, _texts(4))

    default = _run(runtime, sessions, {"model": "embedding", "dataset": dataset})
    named = _run(
        runtime, sessions, {"model": "embedding", "dataset": dataset, "text_column": "text"}
    )
    numbers = _run(
        runtime, sessions, {"model": "embedding", "dataset": dataset, "text_column": "n"}
    )

    assert default.result["text_column"] == "id"  # `n` holds numbers; `id` is the first text
    assert named.result["text_column"] == "text"
    assert numbers.state == "failed"
    assert "text_column 'n' holds int64, not text" in numbers.error_message


def test_classification_writes_label_and_score_and_probabilities(
    register, runtime, sessions, tmp_path, directories
):
    register("text-classification")
    texts = _texts(30)
    dataset = _dataset(runtime, sessions, tmp_path, texts, "jsonl")
    spec = {"model": "text-classification", "dataset": dataset, "text_column": "text"}
    job = _run(runtime, sessions, spec | {"probabilities": True, "chunk_rows": 13})

    assert job.state == "succeeded", job.error_message
    out = _read(runtime, job.result["output"])
    want = _reference(directories, "text-classification", texts)
    assert out["label"].to_pylist() == [w["label"] for w in want]
    assert out["score"].to_pylist() == pytest.approx([w["score"] for w in want], abs=1e-5)
    for label in SENTIMENT.values():
        got = out[f"probability_{label}"].to_pylist()
        assert got == pytest.approx([w["scores"][label] for w in want], abs=1e-5)


def test_token_classification_writes_entities_as_json(
    register, runtime, sessions, tmp_path, directories
):
    register("token-classification")
    texts = _texts(12)
    dataset = _dataset(runtime, sessions, tmp_path, texts)
    spec = {"model": "token-classification", "dataset": dataset, "text_column": "text"}
    job = _run(runtime, sessions, spec | {"chunk_rows": 5, "batch_size": 3})

    assert job.state == "succeeded", job.error_message
    out = _read(runtime, job.result["output"])
    assert out.schema.field("entities").type == pa.string()
    got = [json.loads(e) for e in out["entities"].to_pylist()]
    want = [w["entities"] for w in _reference(directories, "token-classification", texts)]
    assert len(got) == len(want)
    for mine, theirs in zip(got, want, strict=True):
        assert [(e["entity"], e["start"], e["end"], e["text"]) for e in mine] == [
            (e["entity"], e["start"], e["end"], e["text"]) for e in theirs
        ]


def test_generation_writes_text_and_token_counts(
    register, runtime, sessions, tmp_path, directories
):
    register("text-generation")
    texts = _texts(10)
    dataset = _dataset(runtime, sessions, tmp_path, texts)
    spec = {"model": "text-generation", "dataset": dataset, "text_column": "text"}
    job = _run(runtime, sessions, spec | {"hf": {"max_new_tokens": 4}, "output_format": "csv"})

    assert job.state == "succeeded", job.error_message
    out = _read(runtime, job.result["output"])
    want = _reference(directories, "text-generation", texts, max_new_tokens=4)
    # Greedy: the same continuations as one prompt at a time (left padding changes nothing).
    assert [t or "" for t in out["generated_text"].to_pylist()] == [w["text"] for w in want]
    assert out["generated_tokens"].to_pylist() == [w["generated_tokens"] for w in want]
    assert out["prompt_tokens"].to_pylist() == [w["tokens"] for w in want]
    assert out["finish_reason"].to_pylist() == [w["finish_reason"] for w in want]
    assert job.result["generated_tokens_per_s"] > 0


def test_texts_past_the_context_and_missing_texts_go_to_the_error_file(
    register, runtime, sessions, tmp_path
):
    register("embedding")
    long = " ".join(["city"] * 100)  # 102 tokens; the model takes 64
    texts: list[str | None] = ["alice went", long, None, "bob met carol", long]
    dataset = _dataset(runtime, sessions, tmp_path, texts)
    spec = {"model": "embedding", "dataset": dataset, "text_column": "text", "passthrough": ["id"]}

    strict = _run(runtime, sessions, spec | {"max_error_fraction": 0.6})
    cut = _run(
        runtime, sessions, spec | {"max_error_fraction": 0.2, "hf": {"truncation": "truncate"}}
    )
    refused = _run(runtime, sessions, spec)

    assert strict.state == "succeeded", strict.error_message
    assert (strict.result["scored"], strict.result["errors"]) == (2, 3)
    out = _read(runtime, strict.result["output"])
    assert [v is None for v in out["embedding"].to_pylist()] == [False, True, True, False, True]
    errors = _read(runtime, strict.result["error_file"]).to_pylist()
    assert [(e["row"], e["id"]) for e in errors] == [(1, "doc-1"), (2, "doc-2"), (4, "doc-4")]
    assert "102 tokens; the model takes 64" in errors[0]["reason"]
    assert errors[1]["reason"] == "the text is missing"

    assert cut.state == "succeeded", cut.error_message
    assert _read(runtime, cut.result["output"])["truncated"].to_pylist() == [
        False,
        True,
        None,
        False,
        True,
    ]
    assert refused.state == "failed"
    assert "could not be scored" in refused.error_message


def test_a_killed_attempt_resumes_at_the_last_committed_chunk(
    register, runtime, sessions, tmp_path, directories, monkeypatch
):
    register("text-classification")
    texts = _texts(50)
    dataset = _dataset(runtime, sessions, tmp_path, texts)
    spec = {"model": "text-classification", "dataset": dataset, "text_column": "text"}
    with sessions() as session:
        job = jobs.create(
            session,
            kind="batch_predict",
            owner="alice",
            spec=spec | {"chunk_rows": 10},
            queue="cpu",
        )
        session.commit()
        job_id = job.id
    scored: list[int] = []
    real_score = batch_text.TextScorer.score

    def score_then_die(self, batch, after_batch=None):
        scored.append(batch.num_rows)
        if len(scored) == 3:
            raise Killed
        return real_score(self, batch, after_batch)

    monkeypatch.setattr(batch_text.TextScorer, "score", score_then_die)
    with pytest.raises(Killed):
        execute_attempt(runtime, job_id, 0, "w1", never_resent)
    with session_scope(sessions) as session:
        assert jobs.requeue(session, job_id, 1, "worker lost")

    execute_attempt(runtime, job_id, 1, "w2", never_resent)

    job = _state(sessions, job_id)
    assert job.state == "succeeded", job.error_message
    assert len(scored) == 3 + 3  # two chunks were committed; the new attempt scored three
    out = _read(runtime, job.result["output"])
    assert out.num_rows == 50
    want = _reference(directories, "text-classification", texts)
    assert out["label"].to_pylist() == [w["label"] for w in want]


def test_zoo_options_and_csv_embeddings_are_refused(register, runtime, sessions, tmp_path):
    register("embedding")
    dataset = _dataset(runtime, sessions, tmp_path, _texts(3))

    csv = _run(
        runtime, sessions, {"model": "embedding", "dataset": dataset, "output_format": "csv"}
    )
    features = _run(
        runtime, sessions, {"model": "embedding", "dataset": dataset, "features": ["n"]}
    )
    generation = _run(
        runtime, sessions, {"model": "embedding", "dataset": dataset, "hf": {"max_new_tokens": 3}}
    )

    assert "CSV cannot hold" in csv.error_message
    assert "features are for zoo models" in features.error_message
    assert "max_new_tokens: not a parameter of embedding models" in generation.error_message


def test_a_cancel_request_stops_a_generation_chunk_at_its_next_pass(
    register, runtime, sessions, tmp_path, monkeypatch
):
    register("text-generation")
    dataset = _dataset(runtime, sessions, tmp_path, _texts(40))
    spec = {"model": "text-generation", "dataset": dataset, "text_column": "text"}
    with sessions() as session:
        job = jobs.create(session, kind="batch_predict", owner="alice", spec=spec, queue="cpu")
        session.commit()
        job_id = job.id
    monkeypatch.setattr("workers.context._THROTTLE_S", 0.0)
    passes: list[int] = []
    real_generate = hf._generate

    def generate_and_ask_to_cancel(bundle, texts, params):
        passes.append(len(texts))
        with sessions() as session:
            jobs.request_cancel(session, session.get(Job, job_id))
            session.commit()
        return real_generate(bundle, texts, params)

    monkeypatch.setattr(hf, "_generate", generate_and_ask_to_cancel)

    execute_attempt(runtime, job_id, 0, "w1", never_resent)

    assert _state(sessions, job_id).state == "cancelled"
    assert passes == [8]  # one pass of the 40-row chunk's five
    assert not (runtime.settings.data_dir / "work" / job_id / "batch").exists()


def test_a_chunk_without_any_text_is_all_error_rows(register, runtime, sessions, tmp_path):
    register("embedding")
    dataset = _dataset(runtime, sessions, tmp_path, ["alice went", None, None, None], "jsonl")
    spec = {"model": "embedding", "dataset": dataset, "text_column": "text", "chunk_rows": 2}

    job = _run(runtime, sessions, spec | {"max_error_fraction": 1.0})  # Parquet: one schema

    assert job.state == "succeeded", job.error_message
    assert (job.result["scored"], job.result["errors"]) == (1, 3)
    out = _read(runtime, job.result["output"])
    assert [e is None for e in out["embedding"].to_pylist()] == [False, True, True, True]
