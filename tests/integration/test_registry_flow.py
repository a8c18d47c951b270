"""The registry end to end: a real Celery worker trains, predicts by alias, quantizes and
exports digits models that the API then serves, moves and refuses to delete."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load
from sklearn.datasets import load_digits

from kiln.settings import Settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
#: A safety net against a hung worker, not a speed assertion.
JOB_DEADLINE_S = 240


@pytest.fixture
def broker(redis_url: str) -> str:
    """A Redis database of this test's own (tests/redis_claim.py), or skip without Redis."""
    return redis_url


@pytest.fixture
def worker(settings: Settings, broker: str) -> Iterator[subprocess.Popen[bytes]]:
    """One real Celery worker process on the cpu queue, sharing the test's database and data."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "KILN_DATABASE_URL": settings.resolved_database_url,
        "KILN_DATA_DIR": str(settings.data_dir),
        "KILN_REDIS_URL": broker,
        "CUDA_VISIBLE_DEVICES": "",
    }
    argv = [
        sys.executable, "-m", "celery", "-A", "workers.main", "worker",
        "--queues", "interactive.cpu,cpu", "--pool", "solo", "--concurrency", "1",
        "--hostname", f"test-{uuid.uuid4().hex[:8]}@%h",
        "--without-mingle", "--without-gossip", "--loglevel", "WARNING",
    ]  # fmt: skip
    log = settings.data_dir / "worker.log"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    yield process
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def api(make_app, broker, worker, create_key, auth):
    """call(method, path, **kwargs) -> response, as alice, on an app sending to the broker."""
    client = make_app(sender=None, redis_url=broker).test_client()
    headers = auth(create_key("alice"))

    def call(method: str, path: str, **kwargs):
        response = client.open(f"/api/v1{path}", method=method, headers=headers, **kwargs)
        response.get_data()
        response.close()
        return response

    return call


def run_job(api: Callable, kind: str, spec: dict) -> dict:
    """Submit a job and wait for it to finish; returns the finished job."""
    submitted = api("POST", "/jobs", json={"kind": kind, "spec": spec})
    assert submitted.status_code == 202, submitted.get_json()
    job_id = submitted.get_json()["id"]
    deadline = time.monotonic() + JOB_DEADLINE_S
    while time.monotonic() < deadline:
        job = api("GET", f"/jobs/{job_id}").get_json()
        if job["state"] in {"succeeded", "failed", "cancelled"}:
            return job
        time.sleep(0.2)
    pytest.fail(f"{kind} job {job_id} did not finish within {JOB_DEADLINE_S}s")


def succeeded(job: dict) -> dict:
    assert job["state"] == "succeeded", job["error"]
    return job["result"]


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_train_alias_predict_optimize_export_download_and_delete(api, tmp_path):
    digits = load_digits()
    rows = digits.data[:20].tolist()

    trained = succeeded(
        run_job(
            api,
            "train",
            {"model_name": "digits", "epochs": 10, "arch_params": {"hidden": [64]}, "seed": 0},
        )
    )
    assert trained["version"] == 1
    original_accuracy = trained["metrics"]["val_accuracy"]
    assert original_accuracy > 0.85

    # Lineage, input schema and labels on the registered version.
    v1 = api("GET", "/models/digits/versions/1").get_json()
    assert v1["lineage"]["origin"] == "train"
    assert v1["lineage"]["spec"]["seed"] == 0
    assert v1["feature_names"][:2] == ["pixel_0", "pixel_1"]
    assert v1["label_names"] == [str(n) for n in range(10)]

    # An alias, then a prediction through it.
    assert api("PUT", "/models/digits/aliases/production", json={"version": 1}).status_code == 200
    predicted = succeeded(
        run_job(api, "predict", {"model": "digits", "version": "production", "inputs": rows})
    )
    assert predicted["version"] == 1
    labels = [int(p["label"]) for p in predicted["predictions"]]
    assert np.mean(np.array(labels) == digits.target[:20]) >= 0.8

    # The aliased version cannot be deleted.
    refused = api("DELETE", "/models/digits/versions/1")
    assert refused.status_code == 409
    assert refused.get_json()["code"] == "in_use"

    # Quantize it into version 2, measured beside the original on the same validation rows.
    optimized = succeeded(run_job(api, "optimize", {"model": "digits", "version": "production"}))
    assert optimized["version"] == 2
    assert optimized["source_version"] == 1
    assert optimized["original"]["accuracy"] == pytest.approx(original_accuracy)
    assert abs(optimized["quantized"]["accuracy"] - original_accuracy) <= 0.03
    assert optimized["quantized"]["rows_per_s"] > 0
    assert optimized["original"]["rows_per_s"] > 0
    print(  # the figures, for the report; speed is never asserted
        f"\noriginal {optimized['original']}, quantized {optimized['quantized']}, "
        f"speedup {optimized['speedup']:.2f}x on {optimized['threads']} threads"
    )
    v2 = api("GET", "/models/digits/versions/2").get_json()
    assert v2["config"]["quantization"] == "dynamic_int8"
    assert v2["lineage"]["source_version"] == 1
    assert v2["metrics"]["val_accuracy"] == optimized["quantized"]["accuracy"]

    # The quantized version predicts too, nearly as the original does.
    quantized = succeeded(
        run_job(api, "predict", {"model": "digits", "version": 2, "inputs": rows})
    )
    quantized_labels = [int(p["label"]) for p in quantized["predictions"]]
    assert np.mean(np.array(quantized_labels) == np.array(labels)) >= 0.9

    # The weights download is plain safetensors.
    weights = api("GET", "/models/digits/versions/1/weights")
    assert weights.status_code == 200
    tensors = load(weights.data)
    assert tensors["mean"].shape == (64,)
    assert tensors["net.0.weight"].shape == (64, 64)

    # Re-uploaded with its config, the same weights predict the same labels.
    config = {k: v1["config"][k] for k in ("arch", "arch_params", "feature_names", "label_names")}
    uploaded = api(
        "POST",
        "/models/copy/versions",
        data={"weights": (io.BytesIO(weights.data), "w.safetensors"), "config": json.dumps(config)},
    )
    assert uploaded.status_code == 201, uploaded.get_json()
    copied = succeeded(run_job(api, "predict", {"model": "copy", "inputs": rows}))
    assert [int(p["label"]) for p in copied["predictions"]] == labels

    # TorchScript export: missing until an export job runs, then our own file downloads.
    missing = api("GET", "/models/digits/versions/1/export?format=torchscript")
    assert missing.status_code == 404
    assert missing.get_json()["code"] == "export_missing"
    exported = succeeded(run_job(api, "export", {"model": "digits", "version": "production"}))
    download = api("GET", "/models/digits/versions/1/export?format=torchscript")
    assert download.status_code == 200
    assert len(download.data) == exported["size"]
    script_path = tmp_path / "ours.pt"
    script_path.write_bytes(download.data)
    # Loading TorchScript is fine here: this is the file Kiln itself wrote, never an upload.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates torch.jit
        scripted = torch.jit.load(str(script_path))
    with torch.inference_mode():
        logits = scripted(torch.tensor(rows, dtype=torch.float32))
    assert logits.argmax(dim=1).tolist() == labels

    # Once the alias moves away, version 1 can be deleted; version numbers are not reused.
    api("PUT", "/models/digits/aliases/production", json={"version": 2})
    assert api("DELETE", "/models/digits/versions/1").status_code == 204
    assert api("GET", "/models/digits/versions/1").status_code == 404
    assert api("GET", "/models/digits/versions/production").get_json()["number"] == 2


def digits_csv() -> bytes:
    digits = load_digits()
    header = ",".join([*(f"p{i}" for i in range(64)), "label"])
    lines = [
        header,
        *(
            ",".join([*map(str, map(int, r)), str(t)])
            for r, t in zip(digits.data, digits.target, strict=True)
        ),
    ]
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_uploaded_dataset_is_pinned_by_its_versions_and_reused_to_evaluate(api):
    dataset = api("POST", "/datasets", data={"file": (io.BytesIO(digits_csv()), "digits.csv")})
    assert dataset.status_code == 201, dataset.get_json()
    dataset_id = dataset.get_json()["id"]
    spec = {
        "model_name": "mine",
        "dataset": dataset_id,
        "epochs": 5,
        "arch_params": {"hidden": [32]},
    }
    trained = succeeded(run_job(api, "train", spec))

    # The version's lineage names the dataset's file, so the dataset cannot go.
    refused = api("DELETE", f"/datasets/{dataset_id}")
    assert refused.status_code == 409
    assert "mine v1" in refused.get_json()["detail"]

    # Optimize recomputes the validation split from that file and the training seed.
    optimized = succeeded(run_job(api, "optimize", {"model": "mine"}))
    assert optimized["evaluated_on"].startswith(f"validation split of {dataset_id}")
    assert optimized["original"]["accuracy"] == pytest.approx(trained["metrics"]["val_accuracy"])

    # An uploaded model has no split to recompute: optimize says so, then uses a named dataset.
    weights = api("GET", f"/models/mine/versions/{trained['version']}/weights").data
    config = api("GET", "/models/mine/versions/1").get_json()["config"]
    upload = api(
        "POST",
        "/models/ext/versions",
        data={"weights": (io.BytesIO(weights), "w.safetensors"), "config": json.dumps(config)},
    )
    assert upload.status_code == 201, upload.get_json()
    failed = run_job(api, "optimize", {"model": "ext"})
    assert failed["state"] == "failed"
    assert "spec.dataset" in failed["error"]["message"]
    evaluated = succeeded(run_job(api, "optimize", {"model": "ext", "dataset": dataset_id}))
    assert evaluated["evaluated_on"] == f"every row of dataset {dataset_id}"
    assert evaluated["quantized"]["accuracy"] > 0.8

    # With every version trained on it gone, the dataset can be deleted.
    for number in (1, 2):
        assert api("DELETE", f"/models/mine/versions/{number}").status_code == 204
    assert api("DELETE", f"/datasets/{dataset_id}").status_code == 204
