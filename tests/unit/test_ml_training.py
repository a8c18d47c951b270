"""The training loop on CPU: reproducibility, resuming, schedules, clipping, early stopping,
regression, step metrics and mixed-precision selection."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.ml import bundle, data
from workers.ml import checkpoint as ckpt
from workers.ml.training import (
    Diverged,
    FitResult,
    Hooks,
    LoopConfig,
    StopAtStep,
    autocast_dtype,
    evaluate,
    fit,
    macro_f1,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models on a shared machine: one thread avoids oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(table: data.Table, arch: str = "mlp", seed: int = 0, **params: object) -> bundle.Network:
    params = params or {"hidden": [32], "dropout": 0.1}
    torch.manual_seed(seed)  # the initial weights, as the train runner seeds them
    config = {
        "arch": arch,
        "arch_params": params,
        "feature_names": table.feature_names,
        "label_names": table.label_names,
        "task": table.task,
        "input_shape": list(table.shape),
    }
    model = bundle.build(config)
    mean, std = data.normalisation(table.features)
    model.mean.copy_(torch.tensor(mean))
    model.std.copy_(torch.tensor(std))
    return model


def _digits(rows: int = 600) -> tuple[data.Table, data.Table]:
    table = data.builtin("digits")
    small = data.Table(
        table.features[:rows], table.targets[:rows], table.feature_names, table.label_names
    )
    return data.split(small, 0.25, seed=0)


NO_HOOKS = Hooks()


def _train(config: LoopConfig, hooks: Hooks = NO_HOOKS, **kwargs: object) -> FitResult:
    train, val = _digits()
    return fit(_model(train, seed=config.seed), train, val, config, CPU, hooks, **kwargs)  # type: ignore[arg-type]


BASE = LoopConfig(epochs=4, batch_size=32, lr=3e-3, optimizer="adam", seed=3)


def test_the_result_metrics_are_the_final_weights_on_the_validation_rows() -> None:
    train, val = _digits()
    model = _model(train)
    result = fit(model, train, val, BASE, CPU)
    assert result.metrics == evaluate(model, val, CPU, BASE)
    assert set(result.metrics) == {"val_loss", "val_accuracy", "val_f1"}


def test_same_seed_gives_the_same_metrics_and_another_seed_does_not() -> None:
    first, again = _train(BASE), _train(BASE)
    other = _train(LoopConfig(**{**BASE.__dict__, "seed": 4}))
    assert first.history == again.history
    assert first.metrics == again.metrics
    assert first.history != other.history


def test_resuming_from_an_epoch_checkpoint_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    path = tmp_path / ckpt.FILENAME
    straight = _train(LoopConfig(**{**BASE.__dict__, "lr_schedule": "cosine"}))
    half = LoopConfig(**{**BASE.__dict__, "lr_schedule": "cosine"})

    def stop_in_epoch_3(epoch: int, step: int, steps: int) -> None:
        if epoch == 3:
            raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        _train(half, Hooks(step=stop_in_epoch_3), checkpoint=path)
    saved = ckpt.load(path)
    assert saved.info["position"]["epoch"] == 3
    assert saved.info["position"]["step"] == 0
    epochs: list[int] = []
    resumed = _train(half, Hooks(epoch=lambda e, _: epochs.append(e)), resume=saved)
    assert epochs == [3, 4]
    assert resumed.resumed_from is not None
    assert resumed.resumed_from.epoch == 3
    assert resumed.history == straight.history  # the checkpoint carries epochs 1-2
    assert resumed.metrics == straight.metrics


def test_resuming_mid_epoch_replays_the_same_shuffle(tmp_path: Path) -> None:
    path = tmp_path / ckpt.FILENAME
    every_step = LoopConfig(**{**BASE.__dict__, "optimizer": "sgd", "checkpoint_every_s": 0.0})
    straight = _train(every_step)

    def stop_at_epoch_2_step_5(epoch: int, step: int, steps: int) -> None:
        if (epoch, step) == (2, 5):
            raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        _train(every_step, Hooks(step=stop_at_epoch_2_step_5), checkpoint=path)
    saved = ckpt.load(path)
    assert (saved.info["position"]["epoch"], saved.info["position"]["step"]) == (2, 5)
    resumed = _train(every_step, resume=saved)
    assert resumed.history == straight.history


def test_a_stop_at_an_epochs_first_step_resumes_with_that_epochs_shuffle(tmp_path: Path) -> None:
    """A preemption or warm shutdown seen before the first step of an epoch (after the
    epoch's shuffle was drawn) checkpoints step 0; the resumed run draws the same order."""
    path = tmp_path / ckpt.FILENAME
    straight = _train(BASE)

    def stop_before_epoch_3(epoch: int, step: int, steps: int) -> None:
        if (epoch, step) == (3, 0):
            raise StopAtStep(RuntimeError("preempted"))

    with pytest.raises(RuntimeError, match="preempted"):
        _train(BASE, Hooks(step=stop_before_epoch_3), checkpoint=path)
    saved = ckpt.load(path)
    assert (saved.info["position"]["epoch"], saved.info["position"]["step"]) == (3, 0)
    resumed = _train(BASE, resume=saved)
    assert resumed.history == straight.history
    assert resumed.metrics == straight.metrics


def test_cosine_and_step_schedules_lower_the_rate() -> None:
    cosine = _train(LoopConfig(**{**BASE.__dict__, "lr_schedule": "cosine"}))
    step = _train(
        LoopConfig(**{**BASE.__dict__, "lr_schedule": "step", "lr_step_epochs": 2, "lr_gamma": 0.5})
    )
    flat = _train(BASE)
    assert [round(m["lr"], 6) for m in step.history] == [3e-3, 3e-3, 1.5e-3, 1.5e-3]
    lrs = [m["lr"] for m in cosine.history]
    assert lrs[0] == pytest.approx(3e-3)
    assert lrs == sorted(lrs, reverse=True)
    assert lrs[-1] < 1e-3
    assert {m["lr"] for m in flat.history} == {3e-3}


def test_gradient_clipping_bounds_each_update() -> None:
    train, val = _digits()

    def moved(clip: float | None) -> float:
        model = _model(train)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        config = LoopConfig(1, 32, 0.1, "sgd", 0, grad_clip=clip)
        fit(model, train, val, config, CPU)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        return float((after - before).norm())

    steps = 15  # 450 training rows in batches of 32
    clipped = moved(1e-3)
    # Each step's gradient norm is at most 1e-3; momentum 0.9 at most multiplies it by 10.
    assert clipped <= 0.1 * 1e-3 * 10 * steps
    assert moved(None) > 10 * clipped


def test_weight_decay_shrinks_the_weights() -> None:
    train, val = _digits()

    def norm(decay: float) -> float:
        model = _model(train)
        fit(model, train, val, LoopConfig(3, 32, 3e-3, "adamw", 0, weight_decay=decay), CPU)
        return float(sum(p.detach().norm() for p in model.net.parameters()))

    assert norm(0.9) < norm(0.0)


def test_a_loss_that_stops_being_a_number_fails_the_run_with_the_step_it_happened_at(
    tmp_path: Path,
) -> None:
    exploding = dataclasses.replace(BASE, optimizer="sgd", lr=1e12)
    with pytest.raises(Diverged, match=r"the training loss became (nan|inf) at epoch 1, step"):
        _train(exploding, checkpoint=tmp_path / ckpt.FILENAME)


def test_early_stopping_stops_and_keeps_the_best_epoch() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 2)).astype(np.float32)
    features[:, 0] += np.where(np.arange(300) % 2 == 0, 4.0, -4.0)
    targets = (np.arange(300) % 2).astype(np.int64)
    table = data.Table(features, targets, ["a", "b"], ["even", "odd"])
    train, val = data.split(table, 0.3, seed=0)
    logs: list[str] = []
    config = LoopConfig(50, 16, 1e-2, "adam", 0, patience=2, monitor="val_accuracy")
    model = _model(train)
    result = fit(model, train, val, config, CPU, Hooks(log=logs.append))
    assert result.metrics == evaluate(model, val, CPU, config)  # the weights it returns
    assert result.stopped_early
    assert result.epochs_run < 50
    assert any("early stopping" in line for line in logs)
    best = max(result.history, key=lambda m: m["val_accuracy"])  # the first epoch at the top
    assert result.epochs_run == result.history.index(best) + 1 + 2
    assert result.metrics["val_loss"] == pytest.approx(best["val_loss"])  # its weights


def test_regression_on_diabetes_beats_predicting_the_mean() -> None:
    table = data.builtin("diabetes")
    train, val = data.split(table, 0.2, seed=0)
    mean, std = data.target_scale(train)
    config = LoopConfig(
        30, 32, 3e-3, "adam", 0, task="regression", target_mean=mean, target_std=std
    )
    result = fit(_model(train, hidden=[32], dropout=0.0), train, val, config, CPU)
    baseline_mae = float(np.abs(val.targets - mean).mean())
    assert set(result.metrics) == {"val_loss", "val_mae", "val_rmse"}
    assert result.metrics["val_mae"] < 0.85 * baseline_mae
    assert result.metrics["val_rmse"] >= result.metrics["val_mae"]


def test_step_losses_are_reported_every_n_steps() -> None:
    seen: list[int] = []
    config = LoopConfig(**{**BASE.__dict__, "epochs": 2, "log_every_steps": 5})
    _train(config, Hooks(step_loss=lambda step, loss: seen.append(step)))
    assert seen == list(range(5, 31, 5))  # 15 steps per epoch, 2 epochs


def test_classification_metrics_include_macro_f1() -> None:
    result = _train(BASE)
    assert set(result.metrics) == {"val_loss", "val_accuracy", "val_f1"}
    assert 0.8 < result.metrics["val_f1"] <= 1.0


def test_mixed_precision_only_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("bf16", CPU) is None
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("fp16", cuda) is torch.float16
    assert autocast_dtype("fp32", cuda) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert autocast_dtype("auto", cuda) is torch.float16


def test_cnn_learns_digit_images() -> None:
    table = data.builtin("digits_images")
    train, val = data.split(table, 0.2, seed=0)
    model = _model(train, arch="cnn", channels=[16, 32], kernel_size=3, dropout=0.0)
    result = fit(model, train, val, LoopConfig(5, 32, 3e-3, "adam", 0), CPU)
    assert result.metrics["val_accuracy"] > 0.9


def test_macro_f1_matches_scikit_learn() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    targets = rng.integers(0, 5, size=200)
    predicted = np.where(rng.random(200) < 0.7, targets, rng.integers(0, 6, size=200))
    expected = f1_score(targets, predicted, average="macro", zero_division=0)
    assert macro_f1(predicted, targets) == pytest.approx(expected)
