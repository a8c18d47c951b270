"""batch_predict retry_of: only the source job's error rows are scored, then merged into
its output in input order, with a new error file of the rows that still fail."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from modelkit import FEATURES, add_dataset, expected_labels, feature_table, never_resent
from modelkit import register_model as register
from sqlalchemy import update

from db import jobs
from db.models import Job
from kiln import datasets
from kiln.artifacts import ArtifactStore
from workers.execute import execute_attempt
from workers.runtime import Runtime

SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
BAD_ROWS = (3, 17, 41)


@pytest.fixture
def runtime(settings, sessions):
    return Runtime(
        settings=settings, sessions=sessions, store=ArtifactStore(settings.artifacts_dir)
    )


def _run(runtime, sessions, spec: dict) -> Job:
    with sessions() as session:
        job = jobs.create(session, kind="batch_predict", owner="alice", spec=spec, queue="cpu")
        session.commit()
    execute_attempt(runtime, job.id, 0, "w1", never_resent)
    with sessions() as session:
        return session.get(Job, job.id)


def _read(runtime, described: dict) -> pa.Table:
    path = runtime.store.path(described["digest"])
    if described["format"] == "arrow":
        return pa.Table.from_batches(list(datasets.read_arrow(path)))
    return pa.Table.from_batches(list(datasets.iter_batches(path, described["format"], 10_000)))


def _labels(table: pa.Table) -> list[str | None]:
    # CSV has no null: a row without a prediction reads back as an empty string.
    return [None if v == "" else v for v in table["prediction"].to_pylist()]


def _with_bad_rows(table: pa.Table, rows: tuple[int, ...]) -> pa.Table:
    f1 = table["f1"].to_numpy().copy()
    f1[list(rows)] = np.nan
    return table.set_column(table.schema.get_field_index("f1"), "f1", pa.array(f1))


def _dataset(runtime, sessions, tmp_path, table: pa.Table, name: str) -> str:
    pq.write_table(table, tmp_path / name)
    return add_dataset(sessions, runtime.store, tmp_path / name, "parquet")


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("source_format", "retry_format"),
    [
        ("parquet", "parquet"),
        ("csv", "csv"),
        ("jsonl", "jsonl"),
        ("arrow", "arrow"),
        ("csv", "parquet"),
    ],
)
def test_only_the_error_rows_are_rescored_and_merged_in_input_order(
    runtime, sessions, tmp_path, source_format, retry_format
):
    v1, _ = register(sessions, runtime.store, tmp_path, seed=0)
    good = feature_table(60)
    source_data = _dataset(runtime, sessions, tmp_path, _with_bad_rows(good, BAD_ROWS), "a.parquet")
    common = {"model": "m", "passthrough": ["id"], "chunk_rows": 16, "max_error_fraction": 0.1}
    source = _run(
        runtime,
        sessions,
        {**common, "version": 1, "dataset": source_data, "output_format": source_format},
    )
    assert source.state == "succeeded", source.error_message
    assert source.result["errors"] == 3
    # The data is fixed for two of the three rows, and a new model version scores them:
    # every other row must keep the source job's (version 1) prediction.
    fixed = _with_bad_rows(good, (41,))
    fixed_data = _dataset(runtime, sessions, tmp_path, fixed, "b.parquet")
    v2, _ = register(sessions, runtime.store, tmp_path, seed=1)
    want_v1, want_v2 = (expected_labels(m, good, FEATURES) for m in (v1, v2))
    assert want_v1 != want_v2  # the test can tell which version scored a row

    retry = _run(
        runtime,
        sessions,
        {**common, "dataset": fixed_data, "retry_of": source.id, "output_format": retry_format},
    )

    assert retry.state == "succeeded", retry.error_message
    result = retry.result
    assert (result["retry_of"], result["retried"], result["fixed"]) == (source.id, 3, 2)
    assert (result["rows"], result["scored"], result["errors"], result["version"]) == (60, 59, 1, 2)
    assert result["output"]["format"] == retry_format
    merged = _read(runtime, result["output"])
    assert merged.num_rows == 60
    assert merged["id"].to_pylist() == list(range(1000, 1060))
    want = [want_v2[i] if i in (3, 17) else want_v1[i] for i in range(60)]
    want[41] = None
    assert _labels(merged) == want
    errors = _read(runtime, result["error_file"]).to_pylist()
    assert [(e["row"], e["id"]) for e in errors] == [(41, 1041)]
    assert "f1" in errors[0]["reason"]


@SQLITE_ONLY
def test_a_retry_that_fixes_every_row_has_no_error_file(runtime, sessions, tmp_path):
    register(sessions, runtime.store, tmp_path)
    good = feature_table(20)
    bad = _dataset(runtime, sessions, tmp_path, _with_bad_rows(good, (5,)), "a.parquet")
    spec = {"model": "m", "max_error_fraction": 0.5, "chunk_rows": 8}
    source = _run(runtime, sessions, {**spec, "dataset": bad})
    fixed = _dataset(runtime, sessions, tmp_path, good, "b.parquet")

    retry = _run(runtime, sessions, {**spec, "dataset": fixed, "retry_of": source.id})

    assert retry.state == "succeeded", retry.error_message
    assert (retry.result["errors"], retry.result["error_file"]) == (0, None)
    assert None not in _labels(_read(runtime, retry.result["output"]))


@SQLITE_ONLY
def test_a_corrected_dataset_with_another_row_count_fails_with_the_reason(
    runtime, sessions, tmp_path
):
    register(sessions, runtime.store, tmp_path)
    good = feature_table(20)
    bad = _dataset(runtime, sessions, tmp_path, _with_bad_rows(good, (5,)), "a.parquet")
    spec = {"model": "m", "max_error_fraction": 0.5}
    source = _run(runtime, sessions, {**spec, "dataset": bad})
    shorter = _dataset(runtime, sessions, tmp_path, good.slice(0, 19), "b.parquet")

    retry = _run(runtime, sessions, {**spec, "dataset": shorter, "retry_of": source.id})

    assert retry.state == "failed"
    assert "has 19 rows" in retry.error_message
    assert "same order" in retry.error_message


@SQLITE_ONLY
def test_other_columns_than_the_source_output_fail_the_merge_with_the_reason(
    runtime, sessions, tmp_path
):
    register(sessions, runtime.store, tmp_path)
    good = feature_table(20)
    bad = _dataset(runtime, sessions, tmp_path, _with_bad_rows(good, (5,)), "a.parquet")
    spec = {"model": "m", "max_error_fraction": 0.5, "dataset": bad}
    source = _run(runtime, sessions, spec)

    retry = _run(runtime, sessions, {**spec, "probabilities": True, "retry_of": source.id})

    assert retry.state == "failed"
    assert "same passthrough and probabilities" in retry.error_message


@SQLITE_ONLY
def test_a_retry_past_the_error_fraction_fails_with_its_error_file_in_dataset_numbers(
    runtime, sessions, tmp_path
):
    register(sessions, runtime.store, tmp_path)
    bad = _with_bad_rows(feature_table(30), (4, 25))
    dataset = _dataset(runtime, sessions, tmp_path, bad, "a.parquet")
    spec = {"model": "m", "dataset": dataset, "passthrough": ["id"], "chunk_rows": 8}
    source = _run(runtime, sessions, {**spec, "max_error_fraction": 0.1})

    # Nothing was fixed, and the retry allows no bad row at all.
    retry = _run(runtime, sessions, {**spec, "max_error_fraction": 0.0, "retry_of": source.id})

    assert retry.state == "failed"
    assert retry.error_message.startswith("2 of the 2 rows retried still cannot be scored")
    assert "max_error_fraction=0.0 of the dataset's 30 rows" in retry.error_message
    errors = _read(runtime, retry.result["error_file"]).to_pylist()
    assert [(e["row"], e["id"]) for e in errors] == [(4, 1004), (25, 1025)]
    assert all("_kiln_source_row" not in e for e in errors)


# --- checked at submission ------------------------------------------------------------------


@pytest.fixture
def submit_retry(client, version_row, dataset_row):
    """submit_retry(headers, source id): alice's batch_predict of her model m over her
    dataset, retrying that job."""
    version_row("m")
    dataset_id = dataset_row()

    def submit(headers, source_id: str):
        spec = {"model": "m", "dataset": dataset_id, "retry_of": source_id}
        return client.post(
            "/api/v1/jobs", json={"kind": "batch_predict", "spec": spec}, headers=headers
        )

    return submit


def _set_result(sessions, job_id: str, result: dict | None) -> None:
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(result=result))
        session.commit()


FILE = {"digest": "0" * 64, "size": 1, "format": "jsonl", "rows": 1}


def test_a_retry_of_a_succeeded_batch_job_with_an_error_file_is_accepted(
    alice, create_job, sessions, submit_retry
):
    source = create_job(kind="batch_predict", state="succeeded")
    _set_result(sessions, source.id, {"rows": 5, "output": FILE, "error_file": FILE})

    response = submit_retry(alice, source.id)

    assert response.status_code == 202, response.get_json()
    assert response.get_json()["spec"]["retry_of"] == source.id


@pytest.mark.parametrize(
    ("kind", "state", "result", "owner", "says"),
    [
        ("echo", "succeeded", {"output": FILE, "error_file": FILE}, "alice", "of kind echo"),
        ("batch_predict", "failed", {"error_file": FILE}, "alice", "is failed"),
        ("batch_predict", "running", None, "alice", "is running"),
        ("batch_predict", "succeeded", {"output": FILE, "error_file": None}, "alice", "no error"),
        ("batch_predict", "succeeded", {"output": FILE, "error_file": FILE}, "bob", "of yours"),
    ],
)
def test_a_retry_of_a_job_it_cannot_retry_is_422_on_the_field(
    alice, create_job, sessions, sent, submit_retry, kind, state, result, owner, says
):
    source = create_job(kind=kind, state=state, owner=owner)
    _set_result(sessions, source.id, result)

    response = submit_retry(alice, source.id)

    assert response.status_code == 422
    body = response.get_json()
    assert body["code"] == "invalid_spec"
    assert body["errors"][0]["loc"] == ["spec", "retry_of"]
    assert says in body["errors"][0]["msg"]
    assert sent == []


def test_a_retry_of_an_unknown_job_is_422(alice, sent, submit_retry):
    response = submit_retry(alice, "f" * 32)
    assert response.status_code == 422
    assert "no job" in response.get_json()["detail"]
