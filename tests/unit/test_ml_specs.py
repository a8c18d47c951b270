"""TrainSpec: per-arch params (a discriminated union on arch) and the loop's fields."""

from __future__ import annotations

import pytest

from kiln.errors import InvalidSpec
from kiln.specs import CNNParams, LogRegParams, TextParams, TrainSpec, parse_spec


def _train(**fields: object) -> TrainSpec:
    spec = parse_spec("train", {"model_name": "m", **fields})
    assert isinstance(spec, TrainSpec)
    return spec


@pytest.mark.parametrize(
    ("arch", "params_type"), [("cnn", CNNParams), ("logreg", LogRegParams), ("text", TextParams)]
)
def test_arch_picks_its_params_model_with_defaults(arch: str, params_type: type) -> None:
    spec = _train(arch=arch)
    assert isinstance(spec.arch_params, params_type)


def test_defaults_are_the_tuned_ones() -> None:
    spec = _train()
    assert (spec.lr, spec.lr_schedule, spec.epochs, spec.gpus, spec.task) == (
        3e-3,
        "cosine",
        20,
        1,
        "auto",
    )


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        (
            {"arch": "cnn", "arch_params": {"channels": [0]}},
            ["arch_params", "cnn", "channels", "0"],
        ),
        ({"arch": "cnn", "arch_params": {"hidden": [8]}}, ["arch_params", "cnn", "hidden"]),
        ({"arch": "cnn", "arch_params": {"kernel_size": 4}}, ["arch_params", "cnn", "kernel_size"]),
        ({"arch": "logreg", "arch_params": {"dropout": 0.1}}, ["arch_params", "logreg", "dropout"]),
        (
            {"arch": "text", "arch_params": {"text_column": ""}},
            ["arch_params", "text", "text_column"],
        ),
        ({"arch": "transformer"}, ["arch"]),
        ({"task": "ranking"}, ["task"]),
        ({"lr_schedule": "linear"}, ["lr_schedule"]),
        ({"grad_clip": 0}, ["grad_clip"]),
        ({"early_stopping_patience": 0}, ["early_stopping_patience"]),
        ({"precision": "fp8"}, ["precision"]),
        ({"weight_decay": -1}, ["weight_decay"]),
        ({"log_every_steps": 0}, ["log_every_steps"]),
        ({"checkpoint_every_s": 0}, ["checkpoint_every_s"]),
        ({"gpus": 0}, ["gpus"]),
        ({"resume_from": "../../etc"}, ["resume_from"]),
        ({"dataset": "builtin:mnist"}, ["dataset"]),
    ],
)
def test_a_bad_field_is_a_422_naming_it(fields: dict, loc: list[str]) -> None:
    with pytest.raises(InvalidSpec) as caught:
        parse_spec("train", {"model_name": "m", **fields})
    assert caught.value.status == 422
    assert caught.value.details[0]["loc"] == ["spec", *loc]


def test_arch_params_may_repeat_the_arch_but_not_contradict_it() -> None:
    assert _train(arch="cnn", arch_params={"arch": "cnn"}).arch == "cnn"
    with pytest.raises(InvalidSpec, match=r"arch_params\.arch differs from arch"):
        parse_spec("train", {"model_name": "m", "arch": "cnn", "arch_params": {"arch": "mlp"}})


@pytest.mark.parametrize(
    "dataset",
    [
        "builtin:digits",
        "builtin:digits_images",
        "builtin:iris",
        "builtin:wine",
        "builtin:breast_cancer",
        "builtin:diabetes",
    ],
)
def test_every_builtin_dataset_is_accepted(dataset: str) -> None:
    assert _train(dataset=dataset).dataset == dataset


def test_a_full_spec_round_trips_through_json() -> None:
    spec = _train(
        arch="cnn",
        arch_params={"channels": [8, 16]},
        dataset="builtin:digits_images",
        optimizer="sgd",
        lr_schedule="step",
        grad_clip=1.0,
        early_stopping_patience=3,
        resume_from="abc123",
        gpus=2,
    )
    stored = spec.model_dump(mode="json")
    assert stored["arch_params"]["arch"] == "cnn"
    assert parse_spec("train", stored) == spec
