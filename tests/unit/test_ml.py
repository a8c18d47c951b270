"""The PyTorch pieces, on CPU: data preparation, model bundles, predict's input checks."""

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest
import torch

from kiln.errors import JobFailure
from workers.ml import architectures, bundle, data
from workers.ml.training import Hooks, LoopConfig, fit, predict_proba
from workers.runners.predict import to_matrix, to_texts


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models on a shared machine: one thread avoids oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CONFIG = {
    "arch": "mlp",
    "arch_params": {"hidden": [32], "dropout": 0.0},
    "feature_names": ["a", "b"],
    "label_names": ["no", "yes"],
}


def test_builtin_digits_has_named_pixels_and_ten_labels() -> None:
    table = data.builtin("digits")
    assert table.features.shape == (1797, 64)
    assert table.feature_names[0] == "pixel_0"
    assert table.label_names == [str(i) for i in range(10)]


@pytest.mark.parametrize(
    ("name", "rows", "task", "classes"),
    [
        ("iris", 150, "classification", 3),
        ("wine", 178, "classification", 3),
        ("breast_cancer", 569, "classification", 2),
        ("diabetes", 442, "regression", 0),
    ],
)
def test_builtin_sklearn_sets_load_offline(name: str, rows: int, task: str, classes: int) -> None:
    table = data.builtin(name)
    assert (len(table.targets), table.task, len(table.label_names)) == (rows, task, classes)
    assert table.features.dtype == np.float32
    assert table.targets.dtype == (np.float32 if task == "regression" else np.int64)


def test_digits_images_are_one_channel_8x8() -> None:
    table = data.builtin("digits_images")
    assert table.shape == (1, 8, 8)
    assert table.features.shape == (1797, 64)


def test_unknown_builtin_is_a_job_failure() -> None:
    with pytest.raises(JobFailure, match="unknown built-in dataset 'mnist'"):
        data.builtin("mnist")


@pytest.mark.parametrize(
    ("column", "task"),
    [
        (pa.array([0.5, 1.25, 2.0]), "regression"),
        (pa.array([1.0, 2.0, 1.0]), "classification"),  # whole floats: class codes
        (pa.array([0, 1, 2]), "classification"),
        (pa.array(list(range(21))), "regression"),  # more than 20 distinct integers
        (pa.array(["a", "b", "a"]), "classification"),
    ],
)
def test_task_is_inferred_from_the_target(column: pa.Array, task: str) -> None:
    assert data.infer_task(pa.chunked_array([column])) == task


def test_float_class_codes_read_back_as_integers_in_numeric_order() -> None:
    table = pa.table({"a": [1.0, 2.0, 3.0, 4.0], "y": [10.0, 2.0, 2.0, 1.0]})
    prepared = data.from_arrow(table, "y")
    assert prepared.label_names == ["1", "2", "10"]
    assert prepared.targets.tolist() == [2, 1, 1, 0]


def test_regression_target_keeps_its_values() -> None:
    table = pa.table({"a": [1.0, 2.0, 3.0], "y": [0.5, 1.5, -2.25]})
    prepared = data.from_arrow(table, "y", task="auto")
    assert prepared.task == "regression"
    assert prepared.label_names == []
    assert prepared.targets.tolist() == [0.5, 1.5, -2.25]


def test_a_text_target_cannot_be_regressed() -> None:
    table = pa.table({"a": [1.0, 2.0], "y": ["x", "y"]})
    with pytest.raises(JobFailure, match="regression target must be numeric"):
        data.from_arrow(table, "y", task="regression")


@pytest.mark.parametrize(
    ("arch", "params", "shape"),
    [
        ("mlp", {"hidden": [16], "dropout": 0.0}, (64,)),
        ("mlp", {"hidden": [16], "dropout": 0.0}, (1, 8, 8)),
        ("logreg", {}, (64,)),
        ("cnn", {"channels": [4, 8], "kernel_size": 3, "dropout": 0.0}, (1, 8, 8)),
        ("text", {"text_column": "t", "hidden": [], "dropout": 0.0}, (384,)),
    ],
)
def test_every_zoo_arch_maps_a_batch_to_its_outputs(arch: str, params: dict, shape) -> None:
    net = architectures.build(arch, params, shape, 5)
    assert net(torch.zeros(3, *shape)).shape == (3, 5)


def test_cnn_refuses_flat_rows() -> None:
    with pytest.raises(ValueError, match="cnn needs image rows"):
        architectures.build("cnn", {"channels": [4], "kernel_size": 3, "dropout": 0.0}, (64,), 2)


def test_split_is_seeded_and_disjoint() -> None:
    table = data.builtin("digits")
    train_a, val_a = data.split(table, 0.2, seed=7)
    _, val_b = data.split(table, 0.2, seed=7)
    assert np.array_equal(val_a.features, val_b.features)
    assert len(train_a.targets) + len(val_a.targets) == 1797
    assert len(val_a.targets) == round(1797 * 0.2)


def test_from_arrow_maps_labels_to_sorted_names() -> None:
    table = pa.table({"a": [1.0, 2.0, 3.0], "b": [0, 1, 0], "y": ["cat", "ant", "cat"]})
    prepared = data.from_arrow(table, "y")
    assert prepared.label_names == ["ant", "cat"]
    assert prepared.targets.tolist() == [1, 0, 1]
    assert prepared.features.dtype == np.float32


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pa.table({"a": [1.0]}), "target column 'y'"),
        (pa.table({"a": ["x"], "y": ["1"]}), "must be numeric"),
        (pa.table({"a": [None, 1.0], "y": ["1", "2"]}), "missing values"),
    ],
)
def test_from_arrow_refuses_unusable_tables(table: pa.Table, message: str) -> None:
    with pytest.raises(JobFailure, match=message):
        data.from_arrow(table, "y")


def test_fit_learns_a_separable_problem_and_reports_each_epoch() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 2)).astype(np.float32)
    targets = (features[:, 0] + features[:, 1] > 0).astype(np.int64)
    table = data.Table(features, targets, ["a", "b"], ["no", "yes"])
    train, val = data.split(table, 0.25, seed=0)
    model = bundle.build(CONFIG)
    epochs: list[int] = []
    result = fit(
        model, train, val, LoopConfig(30, 32, 0.01, "adam", 0), torch.device("cpu"),
        Hooks(epoch=lambda epoch, _: epochs.append(epoch)),
    )  # fmt: skip
    assert epochs == list(range(1, 31))
    assert result.metrics["val_accuracy"] >= 0.9


def test_fit_stops_when_the_step_hook_raises() -> None:
    table = data.builtin("digits")
    train, val = data.split(table, 0.2, seed=0)

    def cancel_at_third_step(epoch: int, step: int, steps: int) -> None:
        if step == 3:
            raise RuntimeError("cancelled")

    config = {**CONFIG, "feature_names": table.feature_names, "label_names": table.label_names}
    with pytest.raises(RuntimeError, match="cancelled"):
        fit(
            bundle.build(config), train, val, LoopConfig(5, 16, 0.01, "sgd", 0),
            torch.device("cpu"), Hooks(step=cancel_at_third_step),
        )  # fmt: skip


def test_bundle_round_trip_keeps_weights_and_normalisation(tmp_path) -> None:
    model = bundle.build(CONFIG)
    model.mean.copy_(torch.tensor([1.0, -2.0]))
    model.std.copy_(torch.tensor([3.0, 4.0]))
    path = tmp_path / "m.safetensors"
    bundle.save(model, CONFIG, path)
    loaded = bundle.load(path, CONFIG, torch.device("cpu"))
    x = np.array([[0.5, 0.25]], dtype=np.float32)
    assert np.allclose(
        predict_proba(model.eval(), x, torch.device("cpu")),
        predict_proba(loaded, x, torch.device("cpu")),
    )
    assert torch.equal(loaded.std, torch.tensor([3.0, 4.0]))


def test_regression_bundle_has_one_output(tmp_path) -> None:
    config = {**CONFIG, "label_names": [], "task": "regression"}
    model = bundle.build(config)
    assert model(torch.zeros(4, 2)).shape == (4, 1)


def test_to_texts_takes_the_text_column() -> None:
    assert to_texts([{"t": "hello"}], "t") == ["hello"]
    with pytest.raises(JobFailure, match="string 't'"):
        to_texts([[1.0]], "t")


def test_to_matrix_accepts_lists_and_named_rows() -> None:
    matrix = to_matrix([[1, 2], {"b": 4, "a": 3}], ["a", "b"])
    assert matrix.tolist() == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([[1.0]], "row 0 has 1 values; the model takes 2"),
        ([{"a": 1.0}], r"row 0 lacks features \['b'\]"),
        ([[1.0, float("nan")]], "NaN"),
        ([[1.0, 2.0], [1e308, 0.0]], r"row 1 has a value outside float32's range"),
        ([{"a": 1.0, "b": "two"}], "not numbers"),
    ],
)
def test_to_matrix_explains_bad_rows(rows: list, message: str) -> None:
    with pytest.raises(JobFailure, match=message):
        to_matrix(rows, ["a", "b"])
