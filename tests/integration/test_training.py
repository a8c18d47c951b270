"""Train and predict through real workers: the ML path a user takes, end to end."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from sklearn.datasets import load_digits, load_iris

pytestmark = pytest.mark.integration
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
EPOCHS = 15
#: Training on a loaded 2-core machine can take a while; this bounds a hang, not speed.
TRAIN_TIMEOUT_S = 240


def test_a_model_trained_on_digits_predicts_digits_and_refuses_rows_of_the_wrong_width(
    api: Any, worker: Any
) -> None:
    job = api.submit("train", {"model_name": "digits-mlp", "epochs": EPOCHS})

    trained = api.wait_for(job["id"], "succeeded", timeout=TRAIN_TIMEOUT_S)

    result = trained["result"]
    assert (result["model"], result["version"]) == ("digits-mlp", 1)
    assert result["metrics"]["val_accuracy"] >= 0.95
    series = api.get(f"/jobs/{job['id']}/metrics")["series"]
    for name in ("train_loss", "val_loss", "val_accuracy"):
        assert [point["step"] for point in series[name]] == list(range(1, EPOCHS + 1)), name
    model = api.get("/models/digits-mlp")
    assert [(v["number"], v["source_job_id"]) for v in model["versions"]] == [(1, job["id"])]

    digits = load_digits()
    rows, truth = digits.data[:20].tolist(), [str(t) for t in digits.target[:20]]
    predict = api.submit("predict", {"model": "digits-mlp", "version": "latest", "inputs": rows})
    predicted = api.wait_for(predict["id"], "succeeded")["result"]

    assert predicted["version"] == 1
    labels = [p["label"] for p in predicted["predictions"]]
    assert sum(label == want for label, want in zip(labels, truth, strict=True)) >= 18, labels
    for prediction in predicted["predictions"]:
        assert set(prediction["probabilities"]) == {str(d) for d in range(10)}
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)

    narrow = api.submit("predict", {"model": "digits-mlp", "inputs": [[0.0, 1.0, 2.0]]})
    failed = api.wait_for(narrow["id"], "failed")
    assert failed["error"] == {
        "type": "JobFailure",
        "message": "input row 0 has 3 values; the model takes 64",
    }


@SQLITE_ONLY
def test_training_on_an_uploaded_csv_dataset_succeeds(api: Any, worker: Any) -> None:
    dataset = api.upload("iris.csv", _iris_csv())
    assert (dataset["rows"], len(dataset["columns"])) == (150, 5)

    job = api.submit(
        "train",
        {"model_name": "iris-mlp", "dataset": dataset["id"], "target": "species", "epochs": 40},
    )
    trained = api.wait_for(job["id"], "succeeded", timeout=TRAIN_TIMEOUT_S)

    assert trained["result"]["metrics"]["val_accuracy"] >= 0.8
    version = api.get("/models/iris-mlp/versions/1")
    assert version["config"]["label_names"] == ["setosa", "versicolor", "virginica"]
    assert version["dataset_digest"] == dataset["digest"]


def _iris_csv() -> bytes:
    """Iris as a CSV upload: four numeric features and a string class column."""
    iris = load_iris()
    out = io.StringIO()
    writer = csv.writer(out)
    columns = [name.removesuffix(" (cm)").replace(" ", "_") for name in iris.feature_names]
    writer.writerow([*columns, "species"])
    for features, target in zip(iris.data, iris.target, strict=True):
        writer.writerow([*features, iris.target_names[target]])
    return out.getvalue().encode()
