"""batch_predict in-process: one output row per input row, an error file, resuming, failing."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from modelkit import (
    FEATURES,
    Recorder,
    add_dataset,
    expected_labels,
    feature_table,
    never_resent,
    register_model,
)
from sqlalchemy import select

from db import jobs
from db.engine import session_scope
from db.models import Job, JobEvent
from kiln import datasets, parquet_concat
from kiln.artifacts import ArtifactStore
from kiln.errors import UnsupportedDataset
from kiln.specs import BatchPredictSpec
from workers.execute import execute_attempt
from workers.runners import batch
from workers.runtime import Runtime


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the runner or in execute_attempt catches it."""


@pytest.fixture
def runtime(settings, sessions):
    return Runtime(
        settings=settings, sessions=sessions, store=ArtifactStore(settings.artifacts_dir)
    )


def _job(sessions, spec: dict) -> str:
    with sessions() as session:
        job = jobs.create(session, kind="batch_predict", owner="alice", spec=spec, queue="cpu")
        session.commit()
        return job.id


def _csv_dataset(runtime, sessions, tmp_path, table: pa.Table) -> str:
    """Upload `table` as a CSV dataset; its id."""
    pacsv.write_csv(table, tmp_path / "in.csv")
    return add_dataset(sessions, runtime.store, tmp_path / "in.csv", "csv")


def _state(sessions, job_id: str) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def _read(runtime, described: dict) -> pa.Table:
    path = runtime.store.path(described["digest"])
    if described["format"] == "arrow":
        return pa.Table.from_batches(list(datasets.read_arrow(path)))
    return pa.Table.from_batches(list(datasets.iter_batches(path, described["format"], 10_000)))


@pytest.mark.parametrize("output_format", ["parquet", "csv", "jsonl", "arrow"])
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_every_input_row_gets_one_output_row_and_bad_rows_an_error_line(
    runtime, sessions, tmp_path, output_format
):
    model, _ = register_model(sessions, runtime.store, tmp_path)
    table = feature_table(50)
    f1 = table["f1"].to_numpy().copy()
    f1[7] = np.nan
    table = table.set_column(2, "f1", pa.array(f1))
    table = table.set_column(3, "f2", pa.array([None if i == 30 else 1.0 for i in range(50)]))
    pq.write_table(table, tmp_path / "in.parquet")
    dataset = add_dataset(sessions, runtime.store, tmp_path / "in.parquet", "parquet")
    spec = {"model": "m", "dataset": dataset, "passthrough": ["id"], "chunk_rows": 16}
    spec |= {"batch_size": 5, "output_format": output_format, "max_error_fraction": 0.1}
    job_id = _job(sessions, spec)

    execute_attempt(runtime, job_id, 0, "w1", never_resent)

    job = _state(sessions, job_id)
    assert job.state == "succeeded", job.error_message
    assert (job.result["rows"], job.result["errors"], job.result["scored"]) == (50, 2, 48)
    out = _read(runtime, job.result["output"])
    assert out.num_rows == 50
    assert out["id"].to_pylist() == list(range(1000, 1050))
    want = expected_labels(model, table.set_column(3, "f2", pa.array([1.0] * 50)), FEATURES)
    # CSV has no null: a row without a prediction reads back as an empty string.
    got = [None if g == "" else g for g in out["prediction"].to_pylist()]
    assert got[7] is None
    assert got[30] is None
    assert [g for i, g in enumerate(got) if i not in (7, 30)] == [
        w for i, w in enumerate(want) if i not in (7, 30)
    ]
    errors = _read(runtime, job.result["error_file"]).to_pylist()
    assert [(e["row"], e["id"]) for e in errors] == [(7, 1007), (30, 1030)]
    assert "'f1'" in errors[0]["reason"]
    assert "missing value" in errors[1]["reason"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_out_of_gpu_memory_retries_at_half_the_batch_from_the_last_chunk(
    runtime, sessions, tmp_path, monkeypatch
):
    model, _ = register_model(sessions, runtime.store, tmp_path)
    table = feature_table(60)
    dataset = _csv_dataset(runtime, sessions, tmp_path, table)
    spec = {"model": "m", "dataset": dataset, "chunk_rows": 20, "batch_size": 16}
    job_id = _job(sessions, {**spec, "passthrough": ["id"]})
    batch_sizes: list[int] = []
    real_score = batch._score

    def score_until_the_gpu_fills_up(model, features, batch_size, device):
        batch_sizes.append(batch_size)
        if batch_size > 8 and len(batch_sizes) == 2:  # the second chunk does not fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real_score(model, features, batch_size, device)

    monkeypatch.setattr(batch, "_score", score_until_the_gpu_fills_up)
    sent: list[int] = []
    execute_attempt(runtime, job_id, 0, "w1", lambda job, _: sent.append(job.attempt))

    requeued = _state(sessions, job_id)
    assert (requeued.state, requeued.oom_retries) == ("queued", 1)
    assert sent == [requeued.attempt]
    execute_attempt(runtime, job_id, requeued.attempt, "w1", never_resent)

    job = _state(sessions, job_id)
    assert job.state == "succeeded", job.error_message
    assert batch_sizes == [16, 16, 8, 8]  # chunk 1 kept; chunks 2 and 3 at half the batch
    out = _read(runtime, job.result["output"])
    assert out["id"].to_pylist() == list(range(1000, 1060))
    assert out["prediction"].to_pylist() == expected_labels(model, table, FEATURES)


def _killed_at_chunk(runtime, sessions, tmp_path, monkeypatch, chunk: int):
    """A 100-row job in chunks of 10 whose first attempt dies scoring chunk `chunk` (counted
    from 1) and is re-queued; the model, the input, the job's id and the row counts every
    _score call got, this attempt's and the next's."""
    model, _ = register_model(sessions, runtime.store, tmp_path)
    table = feature_table(100)
    dataset = _csv_dataset(runtime, sessions, tmp_path, table)
    job_id = _job(
        sessions, {"model": "m", "dataset": dataset, "chunk_rows": 10, "passthrough": ["id"]}
    )
    scored: list[int] = []
    real_score = batch._score

    def score_then_die(model, features, batch_size, device):
        scored.append(len(features))
        if len(scored) == chunk:
            raise Killed
        return real_score(model, features, batch_size, device)

    monkeypatch.setattr(batch, "_score", score_then_die)
    with pytest.raises(Killed):
        execute_attempt(runtime, job_id, 0, "w1", never_resent)
    with session_scope(sessions) as session:
        assert jobs.requeue(session, job_id, 1, "worker lost")
    return model, table, job_id, scored


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_killed_attempt_resumes_at_the_last_committed_chunk(
    runtime, sessions, tmp_path, monkeypatch
):
    model, table, job_id, scored = _killed_at_chunk(runtime, sessions, tmp_path, monkeypatch, 4)

    execute_attempt(runtime, job_id, 1, "w2", never_resent)

    job = _state(sessions, job_id)
    assert job.state == "succeeded", job.error_message
    assert job.attempt == 2
    # Three chunks were committed before the kill; the new attempt scored the other seven.
    assert len(scored) == 4 + 7
    out = _read(runtime, job.result["output"])
    assert out["id"].to_pylist() == list(range(1000, 1100))
    assert out["prediction"].to_pylist() == expected_labels(model, table, FEATURES)
    assert not (runtime.settings.data_dir / "work" / job_id / "batch").exists()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("torn_in_store", "scored_again"),
    [(False, 6), (True, 8)],  # chunks 4-9; or 2-9 when the store's copy is torn too
)
def test_a_torn_part_is_fetched_again_or_scored_again_with_everything_after_it(
    runtime, sessions, tmp_path, monkeypatch, torn_in_store, scored_again
):
    """Parts in the scratch folder are not fsynced: after a machine crash the last ones may
    be torn, and the store's committed copy replaces them. A part the store holds torn
    (it does not match its commit marker) is scored again, and every chunk after it."""
    model, table, job_id, scored = _killed_at_chunk(runtime, sessions, tmp_path, monkeypatch, 5)
    part = runtime.settings.data_dir / "work" / job_id / "batch" / "out-000002.arrow"
    stored = runtime.settings.artifacts_dir / "jobs" / job_id / "batch" / part.name
    whole = part.read_bytes()
    part.unlink()  # the local store links the part: the scratch copy becomes its own file
    part.write_bytes(whole[:-20])  # the third of four committed parts, torn
    if torn_in_store:
        stored.write_bytes(whole[:-20])

    execute_attempt(runtime, job_id, 1, "w2", never_resent)

    job = _state(sessions, job_id)
    assert job.state == "succeeded", job.error_message
    assert len(scored) == 5 + scored_again
    out = _read(runtime, job.result["output"])
    assert out["id"].to_pylist() == list(range(1000, 1100))
    assert out["prediction"].to_pylist() == expected_labels(model, table, FEATURES)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_past_the_error_fraction_the_job_fails_with_its_error_file(runtime, sessions, tmp_path):
    register_model(sessions, runtime.store, tmp_path)
    lines = [{"id": i, "x": [0.5] * (4 if i % 3 else 3)} for i in range(30)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset = add_dataset(sessions, runtime.store, tmp_path / "in.jsonl", "jsonl")
    spec = {"model": "m", "dataset": dataset, "features": ["x"], "passthrough": ["id"]}
    job_id = _job(sessions, spec | {"max_error_fraction": 0.2})

    execute_attempt(runtime, job_id, 0, "w1", never_resent)

    job = _state(sessions, job_id)
    assert job.state == "failed"
    assert "max_error_fraction=0.2" in job.error_message
    errors = _read(runtime, job.result["error_file"]).to_pylist()
    assert [e["row"] for e in errors] == list(range(0, 30, 3))
    assert errors[0]["reason"] == "the row has 3 values; the model takes 4"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_npz_vectors_of_the_right_width_are_scored(runtime, sessions, tmp_path):
    model, _ = register_model(sessions, runtime.store, tmp_path)
    x = np.random.default_rng(3).normal(size=(20, 4)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x, id=np.arange(20))
    dataset = add_dataset(sessions, runtime.store, tmp_path / "in.npz", "npz")
    spec = {"model": "m", "dataset": dataset, "features": ["x_0", "x_1", "x_2", "x_3"]}
    job_id = _job(sessions, spec | {"passthrough": ["id"], "probabilities": True})

    execute_attempt(runtime, job_id, 0, "w1", never_resent)

    job = _state(sessions, job_id)
    assert job.state == "succeeded", job.error_message
    out = _read(runtime, job.result["output"])
    table = pa.table({name: x[:, j] for j, name in enumerate(FEATURES)})
    assert out["prediction"].to_pylist() == expected_labels(model, table, FEATURES)
    total = sum(out[f"probability_{label}"].to_numpy() for label in ("a", "b", "c"))
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_dataset_without_the_model_features_fails_with_a_reason(runtime, sessions, tmp_path):
    register_model(sessions, runtime.store, tmp_path)
    dataset = _csv_dataset(runtime, sessions, tmp_path, pa.table({"id": [1], "f0": [0.1]}))
    job_id = _job(sessions, {"model": "m", "dataset": dataset})

    execute_attempt(runtime, job_id, 0, "w1", never_resent)

    job = _state(sessions, job_id)
    assert job.state == "failed"
    assert "has no columns ['f1', 'f2', 'f3']" in job.error_message


def _plan(path, fmt: str, rows: int) -> batch.Plan:
    return batch.Plan(
        key="k", dataset_path=path, dataset_format=fmt, total_rows=rows, model_version=1,
        model_digest="d", config={"feature_names": FEATURES}, features=FEATURES,
        vector_column=False,
    )  # fmt: skip


def test_the_read_ahead_thread_yields_what_reading_in_turn_does(tmp_path):
    """CUDA jobs read ahead in a thread; CPU jobs read in turn. Both must give the same
    chunks, from the same first chunk on."""
    pacsv.write_csv(feature_table(95), tmp_path / "in.csv")
    spec = BatchPredictSpec(model="m", dataset="d", chunk_rows=10)
    plan = _plan(tmp_path / "in.csv", "csv", 95)
    in_turn = list(batch._read(spec, plan, 2, pin=False))
    ahead = list(batch._read_ahead(spec, plan, 2, pin=False))
    assert [c.index for c in ahead] == [c.index for c in in_turn] == list(range(2, 10))
    for a, b in zip(ahead, in_turn, strict=True):
        assert torch.equal(a.features, b.features)
        assert a.batch.equals(b.batch)


def test_a_read_error_in_the_read_ahead_thread_reaches_the_job(tmp_path):
    (tmp_path / "in.csv").write_text("f0,f1\n1,2\n" + "x" * 100 + '\n"unclosed')
    spec = BatchPredictSpec(model="m", dataset="d", chunk_rows=10)
    with pytest.raises(UnsupportedDataset):
        list(batch._read_ahead(spec, _plan(tmp_path / "in.csv", "csv", 2), 0, pin=False))


def test_scoring_an_empty_slice_returns_no_rows():
    empty = torch.empty((0, 4))

    assert batch._score(torch.nn.Identity(), empty, 8, torch.device("cpu")).shape[0] == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_cancel_request_stops_the_job_between_chunks(runtime, sessions, tmp_path, monkeypatch):
    register_model(sessions, runtime.store, tmp_path)
    dataset = _csv_dataset(runtime, sessions, tmp_path, feature_table(60))
    job_id = _job(sessions, {"model": "m", "dataset": dataset, "chunk_rows": 10})
    monkeypatch.setattr("workers.context._THROTTLE_S", 0.0)
    scored: list[int] = []
    real_score = batch._score

    def score_and_ask_to_cancel(model, features, batch_size, device):
        scored.append(len(features))
        if len(scored) == 2:
            with sessions() as session:
                jobs.request_cancel(session, session.get(Job, job_id))
                session.commit()
        return real_score(model, features, batch_size, device)

    monkeypatch.setattr(batch, "_score", score_and_ask_to_cancel)

    execute_attempt(runtime, job_id, 0, "w1", never_resent)

    job = _state(sessions, job_id)
    assert job.state == "cancelled"
    assert len(scored) == 2  # the third chunk was never scored
    assert not (runtime.settings.data_dir / "work" / job_id / "batch").exists()


def _scored_unsharded(runtime, sessions, tmp_path, rows: int) -> tuple[dict, str]:
    """Model m, a Parquet dataset of `rows`, and the spec of a job scoring it in chunks of
    8: that spec, and the id of the job that ran it unsharded (the output to match)."""
    register_model(sessions, runtime.store, tmp_path)
    pq.write_table(feature_table(rows), tmp_path / "in.parquet")
    dataset = add_dataset(sessions, runtime.store, tmp_path / "in.parquet", "parquet")
    spec = {"model": "m", "dataset": dataset, "passthrough": ["id"], "chunk_rows": 8}
    single = _job(sessions, spec)
    execute_attempt(runtime, single, 0, "w1", never_resent)
    return spec, single


@pytest.mark.parametrize("shard_format", ["arrow", "parquet"])
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_sharded_job_joins_its_shards_into_the_file_one_job_writes(
    runtime, sessions, tmp_path, shard_format
):
    """The shards of a Parquet job write Parquet, which the join copies; shards that wrote
    Arrow (split by an earlier Kiln: a job sharded across an upgrade) are read and encoded
    again, into the same bytes."""
    spec, single = _scored_unsharded(runtime, sessions, tmp_path, rows=50)
    parent, mail = _job(sessions, spec | {"shards": 3}), Recorder()
    execute_attempt(runtime, parent, 0, "w1", mail)  # splits, and ends its attempt
    shard_messages, mail.sent = list(mail.sent), []
    with session_scope(sessions) as session:
        for shard_id, _ in shard_messages:
            shard = session.get_one(Job, shard_id)
            shard.spec = shard.spec | {"output_format": shard_format}

    for shard_id, attempt in shard_messages:
        execute_attempt(runtime, shard_id, attempt, "w2", mail)
    execute_attempt(runtime, parent, 1, "w1", never_resent)

    done, one = _state(sessions, parent), _state(sessions, single)
    assert done.state == "succeeded", done.error_message
    shards = [_state(sessions, shard_id) for shard_id, _ in shard_messages]
    assert [s.result["output"]["format"] for s in shards] == [shard_format] * 3
    assert (done.result["shards"], done.result["rows"]) == (3, 50)
    # Content-addressed: the same digest is the same bytes, row groups included.
    assert done.result["output"]["digest"] == one.result["output"]["digest"]
    assert _read(runtime, done.result["output"])["id"].to_pylist() == list(range(1000, 1050))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_shards_the_join_cannot_copy_are_joined_by_decoding_them(
    runtime, sessions, tmp_path, monkeypatch
):
    spec, single = _scored_unsharded(runtime, sessions, tmp_path, rows=30)

    def refuse(*_args: object) -> None:
        raise parquet_concat.Unsupported("a page index or encryption: not joined by copying")

    monkeypatch.setattr(parquet_concat, "concatenate", refuse)
    parent, mail = _job(sessions, spec | {"shards": 2}), Recorder()
    execute_attempt(runtime, parent, 0, "w1", mail)
    for shard_id, attempt in list(mail.sent):
        execute_attempt(runtime, shard_id, attempt, "w2", mail)
    execute_attempt(runtime, parent, 1, "w1", never_resent)

    done = _state(sessions, parent)
    assert done.state == "succeeded", done.error_message
    assert done.result["output"]["digest"] == _state(sessions, single).result["output"]["digest"]
    with sessions() as session:
        lines = session.scalars(select(JobEvent.message).where(JobEvent.job_id == parent)).all()
    assert any("by decoding them: a page index" in line for line in lines)
