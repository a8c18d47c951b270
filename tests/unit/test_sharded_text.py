"""A sharded batch job on an hf version, in-process: the parent splits, each shard runs as its
own attempt (execute_attempt, as a worker runs it), the last one to finish queues the parent,
and its next attempt joins outputs and error files that equal the unsharded job's, byte for
byte. tests/integration/test_sharded_batch.py runs zoo versions on real workers."""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from modelkit import Recorder, add_dataset, never_resent

from db import jobs
from db.models import Job
from tests.hf_fixtures import database_url, directories, one_thread, runtime  # noqa: F401 (fixtures)
from workers.execute import execute_attempt

WORDS = ["alice", "went", "to", "paris", "and", "met", "bob", "in", "london"]


@pytest.fixture
def dataset(client, alice, directories, runtime, sessions, tmp_path) -> str:
    task = "text-classification"
    files = [(io.BytesIO(p.read_bytes()), p.name) for p in sorted(directories[task].iterdir())]
    response = client.post(
        f"/api/v1/models/{task}/versions",
        data={"family": "hf", "task": task, "files": files},
        headers=alice,
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    texts: list[str | None] = [
        " ".join(WORDS[(i + k) % len(WORDS)] for k in range(i % 13 + 1)) for i in range(50)
    ]
    texts[7] = texts[41] = None  # error rows, in two different shards
    table = pa.table({"id": pa.array(range(50)), "text": pa.array(texts, pa.string())})
    pq.write_table(table, tmp_path / "texts.parquet")
    return add_dataset(sessions, runtime.store, tmp_path / "texts.parquet", "parquet")


def _job(sessions, spec: dict[str, Any]) -> str:
    with sessions() as session:
        job = jobs.create(session, kind="batch_predict", owner="alice", spec=spec, queue="cpu")
        session.commit()
        return job.id


def _get(sessions, job_id: str) -> Job:
    with sessions() as session:
        job = session.get_one(Job, job_id)
        session.expunge(job)
        return job


def test_a_sharded_text_job_joins_what_one_job_writes(runtime, sessions, dataset):
    spec = {"model": "text-classification", "dataset": dataset, "text_column": "text"}
    spec |= {"passthrough": ["id"], "chunk_rows": 8, "max_error_fraction": 0.1}
    spec |= {"output_format": "jsonl"}
    single_id = _job(sessions, spec)
    execute_attempt(runtime, single_id, 0, "w1", never_resent)
    single = _get(sessions, single_id)
    assert single.state == "succeeded", single.error_message

    parent_id = _job(sessions, spec | {"shards": 3})
    mail = Recorder()
    execute_attempt(runtime, parent_id, 0, "w1", mail)  # splits, and ends its attempt
    waiting = _get(sessions, parent_id)
    assert (waiting.state, waiting.awaiting_shards, waiting.shard_count) == ("running", True, 3)
    shard_messages, mail.sent = list(mail.sent), []
    for shard_id, attempt in reversed(shard_messages):  # any order: each is a job of its own
        execute_attempt(runtime, shard_id, attempt, "w2", mail)
    assert mail.sent == [(parent_id, 1)]  # the last shard to finish queued the parent
    execute_attempt(runtime, parent_id, 1, "w1", never_resent)

    done = _get(sessions, parent_id)
    assert done.state == "succeeded", done.error_message
    shards = [_get(sessions, shard_id) for shard_id, _ in shard_messages]
    assert [(s.row_start, s.row_stop) for s in shards] == [(0, 16), (16, 32), (32, 50)]
    assert (done.result["rows"], done.result["errors"], done.result["shards"]) == (50, 2, 3)
    assert done.result["task"] == "text-classification"
    assert done.result["tokens"] == single.result["tokens"]
    assert done.result["error_file"]["digest"] == single.result["error_file"]["digest"]
    # The shards wrote Arrow; the parent joined them into the JSONL one job writes.
    assert all(s.result["output"]["format"] == "arrow" for s in shards)
    assert done.result["output"]["digest"] == single.result["output"]["digest"]
    lines = runtime.store.path(done.result["output"]["digest"]).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == list(range(50))
