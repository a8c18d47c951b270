"""Job specs: what the web accepts is exactly what the worker will parse."""

import pytest

from kiln.errors import InvalidSpec
from kiln.specs import KINDS, PredictSpec, TrainSpec, parse_spec


def test_train_spec_defaults_are_a_runnable_job() -> None:
    spec = parse_spec("train", {"model_name": "digits"})
    assert isinstance(spec, TrainSpec)
    assert (spec.dataset, spec.arch, spec.device) == ("builtin:digits", "mlp", "auto")
    assert spec.arch_params.hidden == [128, 64]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"model_name": "m", "epochs": 0}, "epochs"),
        ({"model_name": "m", "lr": -1}, "lr"),
        ({"model_name": "m", "optimizer": "rmsprop"}, "optimizer"),
        ({"model_name": "m", "val_fraction": 1.0}, "val_fraction"),
        ({"model_name": "../etc"}, "model_name"),
        ({"model_name": "m", "dataset": "builtin:imagenet"}, "dataset"),
        ({"model_name": "m", "arch_params": {"hidden": [0]}}, "arch_params"),
        ({"model_name": "m", "epoch": 3}, "epoch"),  # a typo is an error, not ignored
        ({"model_name": "m", "device": "tpu"}, "device"),
    ],
)
def test_bad_train_spec_names_the_field(raw: dict, field: str) -> None:
    with pytest.raises(InvalidSpec) as caught:
        parse_spec("train", raw)
    assert caught.value.details[0]["loc"][:2] == ["spec", field]
    assert caught.value.status == 422


def test_unknown_kind_lists_the_known_ones() -> None:
    with pytest.raises(
        InvalidSpec, match="known kinds: batch_predict, echo, export, optimize, predict, train"
    ):
        parse_spec("sleep", {})


def test_predict_spec_takes_rows_as_lists_or_dicts() -> None:
    spec = parse_spec("predict", {"model": "m", "inputs": [[1, 2], {"a": 1.5}]})
    assert isinstance(spec, PredictSpec)
    assert spec.version == "latest"
    assert spec.inputs == [[1.0, 2.0], {"a": 1.5}]


def test_predict_spec_needs_at_least_one_row() -> None:
    with pytest.raises(InvalidSpec, match="inputs"):
        parse_spec("predict", {"model": "m", "inputs": []})


def test_every_kind_round_trips_through_json() -> None:
    # The web stores model_dump(mode="json"); the worker parses it back with the same model.
    samples = {
        "train": {"model_name": "m"},
        "predict": {"model": "m", "inputs": [[1.0]]},
        "echo": {"message": "hi"},
        "optimize": {"model": "m", "version": "production"},
        "export": {"model": "m", "version": 2},
        "batch_predict": {"model": "m", "version": "production", "dataset": "d1"},
    }
    assert set(samples) == set(KINDS)
    for kind, raw in samples.items():
        stored = parse_spec(kind, raw).model_dump(mode="json")
        assert parse_spec(kind, stored).model_dump(mode="json") == stored


@pytest.mark.parametrize("version", [3, "3", "latest", "production", "staging-2"])
def test_predict_accepts_a_number_an_alias_or_latest(version: int | str) -> None:
    spec = parse_spec("predict", {"model": "m", "version": version, "inputs": [[1.0]]})
    assert spec.version == version  # type: ignore[attr-defined]


@pytest.mark.parametrize("version", [0, -1, "", "../x", "a b", 1.5])
def test_predict_refuses_a_malformed_version(version: object) -> None:
    with pytest.raises(InvalidSpec) as caught:
        parse_spec("predict", {"model": "m", "version": version, "inputs": [[1.0]]})
    assert caught.value.details[0]["loc"][:2] == ["spec", "version"]


@pytest.mark.parametrize("kind", ["optimize", "export"])
def test_optimize_and_export_run_on_the_cpu_only(kind: str) -> None:
    assert parse_spec(kind, {"model": "m"}).device == "cpu"
    with pytest.raises(InvalidSpec, match="device"):
        parse_spec(kind, {"model": "m", "device": "gpu"})


def test_a_version_is_a_number_latest_or_an_alias() -> None:
    for ref in (3, "latest", "production", "3"):
        assert parse_spec("predict", {"model": "m", "version": ref, "inputs": [[1.0]]})
    with pytest.raises(InvalidSpec, match="version"):
        parse_spec("batch_predict", {"model": "m", "version": "no spaces", "dataset": "d"})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_number_is_refused_in_plain_words(value: float) -> None:
    # A spec from a form or from Python, not JSON: safejson never saw it.
    with pytest.raises(InvalidSpec) as refused:
        parse_spec("train", {"model_name": "m", "lr": value})
    assert refused.value.details == [{"loc": ["spec", "lr"], "msg": "must be a finite number"}]
    assert refused.value.message == "spec.lr: must be a finite number"
