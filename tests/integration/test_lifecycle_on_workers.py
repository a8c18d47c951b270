"""Deadlines, queue standing and batch_predict retry_of through real processes: the app,
Redis, a Celery worker and the database."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from modelkit import FEATURES, expected_labels, feature_table, register_model

from kiln.artifacts import ArtifactStore

pytestmark = pytest.mark.integration
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _submit(api: Any, kind: str, spec: dict[str, Any], **top: Any) -> dict[str, Any]:
    body = {"kind": kind, "spec": spec, **top}
    response = api.client.post("/api/v1/jobs", json=body, headers=api.headers)
    assert response.status_code == 202, response.get_json()
    return response.get_json()  # type: ignore[no-any-return]


def test_a_running_job_past_its_deadline_ends_cancelled_with_the_reason(
    api: Any, worker: Any
) -> None:
    job = _submit(api, "echo", {"message": "slow", "sleep_s": 300}, deadline_s=3)

    ended = api.wait_for(job["id"], "cancelled")

    assert ended["error"] == {"type": "DeadlineExceeded", "message": "deadline of 3 s passed"}
    assert ended["started_at"] is not None  # it ran, and was stopped
    assert ended["result"] is None


@SQLITE_ONLY
def test_a_queued_job_past_its_deadline_never_runs_and_the_standing_is_shown(
    api: Any, worker: Any, reconcile_once: Callable[[], Any], wait_until: Callable[..., Any]
) -> None:
    api.wait_for(_submit(api, "echo", {"message": "warm-up"})["id"], "succeeded")
    busy = _submit(api, "echo", {"message": "busy", "sleep_s": 300})
    api.wait_for(busy["id"], "running")
    # The worker runs one job at a time and reserves none: these wait in Redis.
    late = _submit(api, "echo", {"message": "late"}, deadline_s=1.5)
    behind = _submit(api, "echo", {"message": "behind"})

    standing = api.job(behind["id"])
    assert standing["queue_position"] == 2
    assert standing["estimated_start_at"] is not None  # the warm-up's duration is recorded
    wait_until(lambda: reconcile_once().expired == 1, "the sweep to cancel the late job")

    ended = api.job(late["id"])
    assert ended["state"] == "cancelled"
    assert ended["error"] == {"type": "DeadlineExceeded", "message": "deadline of 1.5 s passed"}
    assert ended["started_at"] is None
    assert api.job(behind["id"])["queue_position"] == 1
    api.cancel(busy["id"])
    assert api.wait_for(behind["id"], "succeeded")["result"] == {"message": "behind"}


@SQLITE_ONLY
def test_retry_of_scores_the_error_rows_on_a_worker_and_merges_them(
    api: Any, worker: Any, live_settings: Any, sessions: Any, tmp_path: Any
) -> None:
    model, _ = register_model(sessions, ArtifactStore(live_settings.artifacts_dir), tmp_path)
    good = feature_table(40)
    f2 = good["f2"].to_numpy().copy()
    f2[[6, 33]] = np.nan
    broken = good.set_column(good.schema.get_field_index("f2"), "f2", pa.array(f2))
    buffers = {}
    for name, table in (("broken", broken), ("fixed", good)):
        sink = io.BytesIO()
        pq.write_table(table, sink)
        buffers[name] = api.upload(f"{name}.parquet", sink.getvalue())["id"]
    spec = {"model": "m", "passthrough": ["id"], "max_error_fraction": 0.1, "chunk_rows": 8}
    spec |= {"output_format": "csv"}
    source = _submit(api, "batch_predict", {**spec, "dataset": buffers["broken"]})
    assert api.wait_for(source["id"], "succeeded")["result"]["errors"] == 2

    retry = _submit(
        api, "batch_predict", {**spec, "dataset": buffers["fixed"], "retry_of": source["id"]}
    )
    done = api.wait_for(retry["id"], "succeeded")

    assert (done["result"]["retried"], done["result"]["errors"]) == (2, 0)
    with api.client.get(f"/api/v1/jobs/{retry['id']}/output", headers=api.headers) as response:
        assert response.status_code == 200
        merged = pacsv.read_csv(io.BytesIO(response.data))
    assert merged["id"].to_pylist() == list(range(1000, 1040))
    assert merged["prediction"].to_pylist() == expected_labels(model, good, FEATURES)
    refused = api.client.post(
        "/api/v1/jobs",
        json={"kind": "batch_predict", "spec": {**spec, "dataset": "x", "retry_of": retry["id"]}},
        headers=api.headers,
    )
    assert refused.status_code == 422  # nothing left to retry: no error file
