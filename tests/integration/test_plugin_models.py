"""A model plugin end to end (examples/kiln-plugin-resnet, installed by `make install`): a
real Celery worker trains the plugin's ResNet, predicts, batch-scores, quantizes and exports
it like a zoo model; the API refuses an architecture no plugin provides."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.datasets import load_digits

from kiln import plugins
from tests.integration.test_registry_flow import (  # the same real worker and API
    api,
    broker,
    run_job,
    succeeded,
    worker,
)

__all__ = ["api", "broker", "worker"]  # fixtures, imported to be used here

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        plugins.get("resnet") is None,
        reason="the example plugin is not installed: pip install -e examples/kiln-plugin-resnet",
    ),
]


def _pixels_csv(rows: np.ndarray) -> bytes:
    header = ",".join(f"pixel_{i}" for i in range(64))
    lines = [header, *(",".join(str(int(v)) for v in row) for row in rows)]
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.timeout(900)  # five jobs on a real worker; a safety net, not a speed check
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_plugin_model_trains_predicts_batch_scores_optimizes_and_exports(api, tmp_path: Path):
    digits = load_digits()
    rows = digits.data[:40]

    # An architecture nobody installed is refused at submit time, naming what is installed.
    refused = api(
        "POST", "/jobs", json={"kind": "train", "spec": {"model_name": "x", "arch": "vit"}}
    )
    assert refused.status_code == 422
    assert "installed plugins: resnet" in refused.get_json()["detail"]

    spec = {
        "model_name": "digits-resnet",
        "arch": "resnet",
        "arch_params": {"width": 8, "blocks": 1},
        "dataset": "builtin:digits_images",
        "epochs": 8,
        "lr": 0.01,
        "seed": 0,
    }
    trained = succeeded(run_job(api, "train", spec))
    assert trained["metrics"]["val_accuracy"] > 0.5
    v1 = api("GET", "/models/digits-resnet/versions/1").get_json()
    assert (v1["family"], v1["arch"]) == ("plugin", "resnet")
    assert v1["config"]["plugin"]["name"] == "resnet"
    assert v1["config"]["plugin"]["distribution"] == "kiln-plugin-resnet"
    assert v1["config"]["arch_params"] == {"width": 8, "blocks": 1, "dropout": 0.0}

    predicted = succeeded(
        run_job(api, "predict", {"model": "digits-resnet", "inputs": rows.tolist()})
    )
    labels = [p["label"] for p in predicted["predictions"]]
    assert np.mean(np.array(labels, dtype=int) == digits.target[:40]) >= 0.5

    dataset = api("POST", "/datasets", data={"file": (io.BytesIO(_pixels_csv(rows)), "d.csv")})
    assert dataset.status_code == 201, dataset.get_json()
    batch_job = run_job(
        api,
        "batch_predict",
        {"model": "digits-resnet", "version": 1, "dataset": dataset.get_json()["id"]},
    )
    assert succeeded(batch_job)["scored"] == 40
    output = api("GET", f"/jobs/{batch_job['id']}/output")
    assert output.status_code == 200
    table = pq.read_table(io.BytesIO(output.data)).to_pydict()
    assert table["prediction"] == labels

    optimized = succeeded(run_job(api, "optimize", {"model": "digits-resnet", "version": 1}))
    assert optimized["version"] == 2
    v2 = api("GET", "/models/digits-resnet/versions/2").get_json()
    assert (v2["family"], v2["arch"]) == ("plugin", "resnet")
    assert v2["config"]["quantized_weights"] == "int8"
    quantized = succeeded(
        run_job(api, "predict", {"model": "digits-resnet", "version": 2, "inputs": rows.tolist()})
    )
    quantized_labels = [p["label"] for p in quantized["predictions"]]
    assert np.mean(np.array(quantized_labels) == np.array(labels)) >= 0.9

    succeeded(run_job(api, "export", {"model": "digits-resnet", "version": 1}))
    download = api("GET", "/models/digits-resnet/versions/1/export?format=torchscript")
    assert download.status_code == 200
    script = tmp_path / "resnet.pt"
    script.write_bytes(download.data)
    # Kiln's own export, never an upload: loading TorchScript is fine here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.load(str(script))
    with torch.inference_mode():
        logits = traced(torch.tensor(rows, dtype=torch.float32))
    assert [str(i) for i in logits.argmax(dim=1).tolist()] == labels

    # The weights re-upload as a plugin version (safetensors, checked as for the zoo).
    weights = api("GET", "/models/digits-resnet/versions/1/weights")
    keys = ("arch", "arch_params", "feature_names", "label_names", "input_shape")
    config = {k: v1["config"][k] for k in keys}
    uploaded = api(
        "POST",
        "/models/resnet-copy/versions",
        data={"weights": (io.BytesIO(weights.data), "w.safetensors"), "config": json.dumps(config)},
    )
    assert uploaded.status_code == 201, uploaded.get_json()
    assert uploaded.get_json()["family"] == "plugin"
    copied = succeeded(run_job(api, "predict", {"model": "resnet-copy", "inputs": rows.tolist()}))
    assert [p["label"] for p in copied["predictions"]] == labels
