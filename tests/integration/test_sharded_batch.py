"""Sharded batch_predict with real worker processes: the parent splits its rows among child
jobs on two workers, and the assembled output is the file one unsharded job writes, byte for
byte, in input order; cancelling the parent cancels its shards; a shard whose worker dies is
retried on its own while the other shard's work stands."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from modelkit import add_dataset, register_model, slow_config

from db.models import Job
from kiln.artifacts import open_store
from kiln.settings import Settings

pytestmark = pytest.mark.integration

ROWS, CHUNK = 40_000, 2_000
BAD_ROWS = [3, 17_000, 39_999]  # a NaN feature: an error row, numbered in the whole dataset


def _dataset(
    sessions: Any, settings: Settings, tmp_path: Path, rows: int = ROWS, slow: bool = False
) -> str:
    """The dataset, and model m: a wide one (`slow`) where a test must catch a shard running."""
    store = open_store(settings)
    register_model(sessions, store, tmp_path, cfg=slow_config() if slow else None)
    rng = np.random.default_rng(0)
    columns: dict[str, Any] = {"id": np.arange(rows) + 1000}
    for i in range(4):
        values = rng.normal(size=rows)
        values[[r for r in BAD_ROWS if r < rows]] = np.nan if i == 1 else values[0]
        columns[f"f{i}"] = values
    pq.write_table(pa.table(columns), tmp_path / "in.parquet", row_group_size=5_000)
    return add_dataset(sessions, store, tmp_path / "in.parquet", "parquet")


def _download(api: Any, path: str) -> bytes:
    """A file the API streams, read whole (and the stream closed)."""
    response = api.client.get(f"/api/v1{path}", headers=api.headers)
    try:
        assert response.status_code == 200, response.get_data(as_text=True)
        return bytes(response.data)
    finally:
        response.close()


def _spec(dataset: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "dataset": dataset, "passthrough": ["id"], "chunk_rows": CHUNK,
            "max_error_fraction": 0.01, **extra}  # fmt: skip


def test_a_sharded_job_on_two_workers_writes_the_unsharded_output(
    api, start_worker, sessions, live_settings, tmp_path
):
    dataset = _dataset(sessions, live_settings, tmp_path)
    start_worker(), start_worker()

    single = api.wait_for(api.submit("batch_predict", _spec(dataset))["id"], "succeeded")
    parent = api.submit("batch_predict", _spec(dataset, shards="auto"))
    done = api.wait_for(parent["id"], "succeeded", timeout=180)

    # auto: the two live workers serving the cpu queue.
    assert [(s["index"], s["state"], s["rows"]) for s in done["shards"]] == [
        (0, "succeeded", 20_000),
        (1, "succeeded", 20_000),
    ]
    assert all(s["rows_done"] == s["rows"] for s in done["shards"])
    result, expected = done["result"], single["result"]
    assert result["shards"] == 2
    assert (result["rows"], result["errors"]) == (ROWS, len(BAD_ROWS)) == (
        expected["rows"], expected["errors"]
    )  # fmt: skip
    # Content-addressed: the same digest is the same bytes, row for row in input order.
    assert result["output"]["digest"] == expected["output"]["digest"]
    assert result["error_file"]["digest"] == expected["error_file"]["digest"]
    errors = _download(api, f"/jobs/{parent['id']}/errors")
    assert [json.loads(line)["row"] for line in errors.splitlines()] == BAD_ROWS
    table = pq.read_table(pa.BufferReader(_download(api, f"/jobs/{parent['id']}/output")))
    assert table.column("id").to_pylist() == list(range(1000, 1000 + ROWS))
    # The shards are jobs of their own, hidden from the plain listing.
    listed = [j["id"] for j in api.get("/jobs?kind=batch_predict")["jobs"]]
    assert listed == [parent["id"], single["id"]]
    children = api.get(f"/jobs?parent={parent['id']}")["jobs"]
    assert sorted(j["shard_index"] for j in children) == [0, 1]


def test_the_parts_layout_lists_the_shards_files_in_order(
    api, start_worker, sessions, live_settings, tmp_path
):
    dataset = _dataset(sessions, live_settings, tmp_path)
    start_worker(), start_worker()
    spec = _spec(dataset, shards=3, output_layout="parts", output_format="csv")
    done = api.wait_for(api.submit("batch_predict", spec)["id"], "succeeded", timeout=180)

    parts = done["result"]["parts"]
    assert done["result"]["output"] is None
    assert [p["job"] for p in parts] == [s["id"] for s in done["shards"]]
    assert [p["rows"] for p in parts] == [12_000, 14_000, 14_000]
    ids: list[int] = []
    for part in parts:
        body = _download(api, f"/jobs/{part['job']}/output")
        assert part["format"] == "csv"
        ids += [int(line.split(b",")[0]) for line in body.splitlines()[1:]]
    assert ids == list(range(1000, 1000 + ROWS))
    whole = api.client.get(f"/api/v1/jobs/{done['id']}/output", headers=api.headers)
    assert whole.status_code == 404
    assert whole.get_json()["code"] == "no_output"
    assert "result.parts lists them" in whole.get_json()["detail"]


def test_cancelling_the_parent_cancels_its_shards(
    api, start_worker, sessions, live_settings, tmp_path, wait_until
):
    dataset = _dataset(sessions, live_settings, tmp_path, rows=120_000, slow=True)
    start_worker()
    parent = api.submit("batch_predict", _spec(dataset, shards=2, chunk_rows=500))

    def a_shard_runs() -> bool:
        job = api.job(parent["id"])
        return any(s["state"] == "running" for s in job.get("shards") or [])

    wait_until(a_shard_runs, "a shard to start")
    api.cancel(parent["id"])

    def all_ended() -> list[str] | None:
        states = [s["state"] for s in api.job(parent["id"])["shards"]]
        return states if all(s == "cancelled" for s in states) else None

    wait_until(all_ended, lambda: f"the shards to be cancelled: {api.job(parent['id'])}")
    assert api.job(parent["id"])["state"] == "cancelled"


def test_a_shard_whose_worker_dies_is_retried_alone(
    api,
    start_worker,
    sessions,
    live_settings,
    tmp_path,
    wait_until,
    reconcile_once: Callable[[], Any],
):
    dataset = _dataset(sessions, live_settings, tmp_path, rows=120_000, slow=True)
    spec = _spec(dataset, chunk_rows=1_000)
    first = start_worker()
    single = api.wait_for(api.submit("batch_predict", spec)["id"], "succeeded", timeout=180)
    parent = api.submit("batch_predict", {**spec, "shards": 2})

    def running_shard() -> dict[str, Any] | None:
        shards = api.job(parent["id"]).get("shards") or []
        return next((s for s in shards if s["state"] == "running" and s["rows_done"]), None)

    victim = wait_until(running_shard, "a shard to score some rows")
    first.kill()
    wait_until(lambda: reconcile_once().requeued == 1, "the reconciler to re-queue the shard")
    start_worker()
    done = api.wait_for(parent["id"], "succeeded", timeout=240)

    with sessions() as session:
        attempts = {s["id"]: session.get_one(Job, s["id"]).attempt for s in done["shards"]}
    assert attempts[victim["id"]] == 2  # the killed shard ran again, and only it
    assert [a for shard_id, a in attempts.items() if shard_id != victim["id"]] == [1]
    assert done["result"]["output"]["digest"] == single["result"]["output"]["digest"]
