"""batch_predict on zoo regression models: a `value` column, or one `value_<target>` column per
output of a multi-output model, in target units, with null where a row could not be scored."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from modelkit import FEATURES, add_dataset, config, feature_table, never_resent, register_model

from db import jobs
from db.models import Job
from kiln import datasets
from kiln.artifacts import ArtifactStore
from workers.execute import execute_attempt
from workers.runtime import Runtime


@pytest.fixture
def runtime(settings, sessions):
    return Runtime(
        settings=settings, sessions=sessions, store=ArtifactStore(settings.artifacts_dir)
    )


def _run(runtime, sessions, tmp_path, table: pa.Table, **spec) -> Job:
    pq.write_table(table, tmp_path / "in.parquet")
    dataset = add_dataset(sessions, runtime.store, tmp_path / "in.parquet", "parquet")
    spec = {"model": "m", "dataset": dataset, "passthrough": ["id"], "chunk_rows": 16} | spec
    with sessions() as session:
        job = jobs.create(session, kind="batch_predict", owner="alice", spec=spec, queue="cpu")
        session.commit()
        job_id = job.id
    execute_attempt(runtime, job_id, 0, "w1", never_resent)
    with sessions() as session:
        return session.get(Job, job_id)


def _read(runtime, described: dict) -> pa.Table:
    path = runtime.store.path(described["digest"])
    return pa.Table.from_batches(list(datasets.iter_batches(path, described["format"], 10_000)))


def _outputs(model: torch.nn.Module, table: pa.Table) -> np.ndarray:
    matrix = np.column_stack([table[n].to_numpy() for n in FEATURES]).astype(np.float32)
    with torch.inference_mode():
        return model(torch.from_numpy(matrix)).double().numpy()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_regression_model_writes_one_value_column_in_target_units(runtime, sessions, tmp_path):
    cfg = config() | {"task": "regression", "target_mean": 10.0, "target_std": 2.5}
    cfg.pop("label_names")
    model, _ = register_model(sessions, runtime.store, tmp_path, cfg=cfg)
    table = feature_table(40)
    f2 = table["f2"].to_numpy().copy()
    f2[5] = np.nan
    table = table.set_column(3, "f2", pa.array(f2))

    job = _run(runtime, sessions, tmp_path, table, max_error_fraction=0.1, output_format="csv")

    assert job.state == "succeeded", job.error_message
    out = _read(runtime, job.result["output"])
    assert out.column_names == ["id", "value"]
    assert out["id"].to_pylist() == list(range(1000, 1040))
    want = _outputs(model, table)[:, 0] * 2.5 + 10.0
    got = out["value"].to_pylist()
    assert got[5] is None
    assert np.allclose([g for i, g in enumerate(got) if i != 5], np.delete(want, 5), atol=1e-4)
    assert job.result["errors"] == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_multi_output_model_writes_one_column_per_output(runtime, sessions, tmp_path):
    cfg = config() | {
        "task": "regression",
        "target_names": ["price", "demand"],
        "target_mean": [100.0, -3.0],
        "target_std": [20.0, 0.5],
    }
    cfg.pop("label_names")
    model, _ = register_model(sessions, runtime.store, tmp_path, cfg=cfg)
    table = feature_table(35)

    job = _run(runtime, sessions, tmp_path, table)

    assert job.state == "succeeded", job.error_message
    out = _read(runtime, job.result["output"])
    assert out.column_names == ["id", "value_price", "value_demand"]
    want = _outputs(model, table) * np.array([20.0, 0.5]) + np.array([100.0, -3.0])
    assert np.allclose(out["value_price"].to_numpy(), want[:, 0], atol=1e-4)
    assert np.allclose(out["value_demand"].to_numpy(), want[:, 1], atol=1e-4)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_predict_on_a_multi_output_model_gives_a_value_per_target(runtime, sessions, tmp_path):
    cfg = config() | {"task": "regression", "target_names": ["price", "demand"]}
    cfg |= {"target_mean": [100.0, -3.0], "target_std": [20.0, 0.5]}
    cfg.pop("label_names")
    model, _ = register_model(sessions, runtime.store, tmp_path, cfg=cfg)
    table = feature_table(3)
    rows = [[row[n] for n in FEATURES] for row in table.to_pylist()]
    with sessions() as session:
        job = jobs.create(
            session, kind="predict", owner="alice", spec={"model": "m", "inputs": rows}, queue="cpu"
        )
        session.commit()
        job_id = job.id

    execute_attempt(runtime, job_id, 0, "w1", never_resent)

    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.state == "succeeded", job.error_message
        got = [p["values"] for p in job.result["predictions"]]
    want = _outputs(model, table) * np.array([20.0, 0.5]) + np.array([100.0, -3.0])
    assert [g["price"] for g in got] == pytest.approx(want[:, 0].tolist(), abs=1e-4)
    assert [g["demand"] for g in got] == pytest.approx(want[:, 1].tolist(), abs=1e-4)
