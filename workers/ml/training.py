"""The training loop: seeded, checkpointed, resumable, cancellable between steps; runs alone
or as one rank of a DistributedDataParallel group."""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kiln.errors import JobFailure
from workers.ml import checkpoint as ckpt
from workers.ml.data import REGRESSION, Table
from workers.ml.inference import outputs
from workers.ml.inference import predict_proba as predict_proba  # its home before inference.py


@dataclass(frozen=True)
class LoopConfig:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    seed: int
    weight_decay: float = 0.0
    lr_schedule: str = "none"
    lr_step_epochs: int = 10
    lr_gamma: float = 0.1
    grad_clip: float | None = None
    patience: int | None = None
    monitor: str = "auto"
    precision: str = "auto"
    log_every_steps: int | None = None
    checkpoint_every_s: float = 60.0
    task: str = "classification"
    #: Regression: the network learns (target - mean) / std; metrics are in target units.
    target_mean: float = 0.0
    target_std: float = 1.0

    @property
    def monitored(self) -> str:
        if self.monitor != "auto":
            return self.monitor
        return "val_mae" if self.task == REGRESSION else "val_accuracy"


def _ignore(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class Hooks:
    """How the loop reports; each may raise to stop training (cancellation)."""

    #: Before every step: (epoch, step, steps_per_epoch).
    step: Callable[[int, int, int], None] = _ignore
    #: After every epoch: (epoch, metrics).
    epoch: Callable[[int, dict[str, float]], None] = _ignore
    #: Every log_every_steps steps: (global step, that step's training loss).
    step_loss: Callable[[int, float], None] = _ignore
    log: Callable[[str], None] = _ignore


class Diverged(JobFailure):
    """The training loss or a validation metric stopped being a finite number: the run
    cannot recover by itself (and a NaN has no place in a metric series)."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"training diverged: {what}; try a lower lr, grad_clip or another optimizer "
            "(resume_from this job keeps the epochs before it)"
        )


class StopAtStep(Exception):
    """Raised by a step hook to stop training between two steps (shutdown, cancel, time
    limit): fit() first writes a checkpoint of this exact point, so the next attempt (or a
    `resume_from` job) continues from here, then `cause` propagates."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True)
class Group:
    """This process's place in a DistributedDataParallel group."""

    rank: int
    world: int


@dataclass
class Position:
    """Where training stands: everything besides tensors that a checkpoint must restore."""

    epoch: int = 1
    step: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    finished: bool = False
    stopped_early: bool = False


@dataclass
class FitResult:
    metrics: dict[str, float]
    epochs_run: int
    stopped_early: bool
    resumed_from: Position | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def make_optimizer(config: LoopConfig, model: nn.Module) -> torch.optim.Optimizer:
    # Frozen parameters (a LoRA run's base weights) are left out: no moments kept for them.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = config.weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def make_schedule(
    config: LoopConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-epoch learning-rate schedule, or None for a constant rate."""
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=config.lr_step_epochs, gamma=config.lr_gamma
        )
    return None


def seed(value: int, device: torch.device) -> None:
    """Seed the generators training on `device` draws from. (torch.manual_seed also queues
    a seed for every other device kind not yet initialised, formatting the caller's stack
    for each: 0.6 ms a call, twice a job, for devices a CPU job never touches.)"""
    torch.default_generator.manual_seed(value)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(value)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype: CUDA only, so the CPU path stays exactly fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


class Trainer:
    """One training run's state: model, optimizer, schedule, RNGs and position."""

    def __init__(
        self,
        model: nn.Module,
        train: Table,
        config: LoopConfig,
        device: torch.device,
        group: Group | None = None,
    ) -> None:
        seed(config.seed, device)
        self.model, self.config, self.device, self.group = model, config, device, group
        self.generator = torch.Generator().manual_seed(config.seed)
        self.epoch_rng = self.generator.get_state()
        self.x = torch.from_numpy(train.features).to(device)
        targets = torch.from_numpy(train.targets)
        if config.task == REGRESSION:
            targets = (targets - config.target_mean) / config.target_std
        self.y = targets.to(device)
        self.optimizer = make_optimizer(config, model)
        self.schedule = make_schedule(config, self.optimizer)
        self.dtype = autocast_dtype(config.precision, device)
        #: Entered around every forward pass; made once, as steps can be a few ms.
        self.autocast: AbstractContextManager[Any] = (
            nullcontext()
            if self.dtype is None
            else torch.autocast(device_type="cuda", dtype=self.dtype)
        )
        #: Loss scaling, for fp16 only (bf16 has fp32's range).
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.position = Position()
        #: The model's tensors as a checkpoint saves them: training and restore() update
        #: them in place, so they are looked up once rather than on every save.
        self.model_state = trained_state(model)
        self.best_state: dict[str, torch.Tensor] | None = None
        #: Each finished epoch's metrics, kept in checkpoints so a resumed job can restore
        #: series points its lost attempt had not yet written. Saved as one float64 table
        #: with a row for every epoch of the run: the checkpoint's layout stays the same
        #: from save to save, and no JSON grows with the run.
        self.history: list[dict[str, float]] = []
        self.history_table: torch.Tensor | None = None
        self.net: nn.Module = model
        if group is not None:
            ids = [device.index] if device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    @property
    def steps(self) -> int:
        """Steps per epoch; under DDP every step gives each rank at least one row."""
        n, size = len(self.y), self.config.batch_size
        steps = math.ceil(n / size)
        if self.group is not None and n - (steps - 1) * size < self.group.world:
            steps -= 1
        return steps

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.config.task == REGRESSION:
            return nn.functional.mse_loss(output.squeeze(1).float(), target)
        return nn.functional.cross_entropy(output.float(), target)

    def train_step(self, rows: torch.Tensor) -> float:
        with self.autocast:
            loss = self.loss(self.net(self.x[rows]), self.y[rows])
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self._clip()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
            self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return float(loss.item())

    def _clip(self) -> None:
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)

    # --- checkpoints -------------------------------------------------------------------

    def record(self, metrics: dict[str, float]) -> None:
        """Add a finished epoch's metrics (the same names, in the same order, each epoch)."""
        self.history.append(metrics)
        row = len(self.history) - 1
        if self.history_table is None or len(self.history_table) <= row:
            self.history_table = _table(self.history, max(self.config.epochs, row + 1))
        else:
            self.history_table[row] = torch.tensor(list(metrics.values()), dtype=torch.float64)

    def save(self, writer: ckpt.Writer, config_key: str, stopping: bool = False) -> None:
        writer.save(self.state(config_key), stopping)

    def state(self, config_key: str) -> ckpt.Checkpoint:
        optim_tensors, optim_rest = ckpt.optimizer_parts(self.optimizer.state_dict())
        rng = {"torch": torch.get_rng_state(), "shuffle": self.generator.get_state()}
        rng["shuffle_epoch"] = self.epoch_rng
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        tensors = {"model": self.model_state, "optim": optim_tensors, "rng": rng}
        if self.best_state is not None:
            tensors["best"] = self.best_state
        if self.history_table is not None:
            tensors["history"] = {"table": self.history_table}
        info = {
            "position": vars(self.position).copy(),  # its fields are all scalars
            "optim": optim_rest,
            "schedule": self.schedule.state_dict() if self.schedule else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "key": config_key,
            "history": {"names": list(self.history[0]) if self.history else [],
                        "epochs": len(self.history)},
        }  # fmt: skip
        return ckpt.Checkpoint(tensors=tensors, info=info)

    def restore(self, saved: ckpt.Checkpoint) -> None:
        load_trained_state(self.model, saved.tensors["model"])
        self.optimizer.load_state_dict(
            ckpt.optimizer_state(saved.tensors.get("optim", {}), saved.info["optim"])
        )
        if self.schedule is not None and saved.info["schedule"] is not None:
            self.schedule.load_state_dict(saved.info["schedule"])
        if self.scaler is not None and saved.info["scaler"] is not None:
            self.scaler.load_state_dict(saved.info["scaler"])
        rng = saved.tensors["rng"]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.generator.set_state(rng["shuffle"])
        self.epoch_rng = rng["shuffle_epoch"]
        self.best_state = saved.tensors.get("best")
        self.position = Position(**saved.info["position"])
        self.history = saved_history(saved)
        if self.history:
            self.history_table = _table(self.history, max(self.config.epochs, len(self.history)))


def _frozen(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changes, as checkpoints save them: the whole state_dict but the
    frozen parameters (a LoRA run's base weights, which come back from the base version)."""
    state, frozen = model.state_dict(), _frozen(model)
    return {k: v for k, v in state.items() if k not in frozen} if frozen else state


def load_trained_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what trained_state saved: every tensor but the frozen parameters, exactly."""
    frozen = _frozen(model)
    result = model.load_state_dict(state, strict=not frozen)
    missing = set(result.missing_keys) - frozen
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"the saved state does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )


def _table(history: list[dict[str, float]], rows: int) -> torch.Tensor:
    """`history` as the first rows of a float64 table of `rows` rows (the rest NaN)."""
    table = torch.full((rows, len(history[0])), math.nan, dtype=torch.float64)
    table[: len(history)] = torch.tensor([list(m.values()) for m in history], dtype=torch.float64)
    return table


def saved_history(saved: ckpt.Checkpoint) -> list[dict[str, float]]:
    """The per-epoch metrics a checkpoint holds, oldest first."""
    table = saved.tensors.get("history", {}).get("table")
    if table is None:
        return []
    names, epochs = saved.info["history"]["names"], saved.info["history"]["epochs"]
    return [dict(zip(names, row, strict=True)) for row in table[:epochs].tolist()]


def fit(
    model: nn.Module,
    train: Table,
    val: Table,
    config: LoopConfig,
    device: torch.device,
    hooks: Hooks = Hooks(),
    checkpoint: Path | None = None,
    resume: ckpt.Checkpoint | None = None,
    group: Group | None = None,
    config_key: str = "",
    on_save: ckpt.OnSave | None = None,
) -> FitResult:
    """Train `model` in place (restoring the best epoch's weights when early stopping is
    on); checkpoints to `checkpoint` each epoch and every checkpoint_every_s seconds,
    calling `on_save` after each save (a ckpt.Publisher copies them off this host)."""
    trainer = Trainer(model, train, config, device, group)
    if resume is not None:
        trainer.restore(resume)
    resumed = copy.copy(trainer.position) if resume is not None else None
    writer = save = None
    if checkpoint is not None and (group is None or group.rank == 0):
        writer = ckpt.Writer(checkpoint, after=resume.sequence if resume else 0, on_save=on_save)
        save = functools.partial(trainer.save, writer, config_key)
    history, position = trainer.history, trainer.position
    try:
        while not position.finished and position.epoch <= config.epochs:
            epoch = position.epoch
            _train_epoch(trainer, hooks, save)
            metrics = _end_epoch(trainer, val, group)
            for name, value in metrics.items():
                if not math.isfinite(value):
                    raise Diverged(f"{name} became {value} after epoch {epoch}")
            trainer.record(metrics)
            hooks.epoch(epoch, metrics)
            if config.patience is not None and position.bad_epochs >= config.patience:
                position.finished = position.stopped_early = True
                hooks.log(
                    f"early stopping after epoch {epoch}: {config.monitored} has not improved "
                    f"for {config.patience} epochs (best {position.best:.4f} at epoch "
                    f"{position.best_epoch})"
                )
            if save is not None:
                save()
    finally:
        if writer is not None:
            writer.close()
    final = history[-1]  # epochs >= 1: a run, or the checkpoint it resumed from, has one
    if config.patience is not None and trainer.best_state is not None:
        load_trained_state(model, trainer.best_state)
        final = history[position.best_epoch - 1]
    # The epoch's validation pass already evaluated these very weights: no second pass.
    metrics = {name: value for name, value in final.items() if name.startswith("val_")}
    return FitResult(metrics, position.epoch - 1, position.stopped_early, resumed, history)


def _train_epoch(trainer: Trainer, hooks: Hooks, save: Callable[..., None] | None) -> None:
    """Run the rest of the current epoch's steps (all of them unless resuming mid-epoch);
    `save` is called whenever checkpoint_every_s has passed since the last save."""
    position, config, group = trainer.position, trainer.config, trainer.group
    if position.step == 0:
        trainer.epoch_rng = trainer.generator.get_state()
    else:  # resuming mid-epoch: replay this epoch's shuffle, then skip the steps done
        trainer.generator.set_state(trainer.epoch_rng)
    rows_total, size = len(trainer.y), config.batch_size
    order = torch.randperm(rows_total, generator=trainer.generator).to(trainer.device)
    trainer.model.train()
    steps, epoch, log_every = trainer.steps, position.epoch, config.log_every_steps
    next_save = time.monotonic() + config.checkpoint_every_s
    # The loop body runs once per step, so it keeps to plain ints (no tensor len()).
    for step in range(position.step, steps):
        try:
            hooks.step(epoch, step, steps)
        except StopAtStep as stop:
            if step == 0:
                # This epoch's shuffle is drawn but no step used it: a run resumed at step 0
                # draws it from the generator, so the save must hold the state before it.
                trainer.generator.set_state(trainer.epoch_rng)
            if save is not None:
                save(stopping=True)
            raise stop.cause from None
        rows = order[step * size : (step + 1) * size]
        seen = min(size, rows_total - step * size)
        if group is not None:
            rows = rows[group.rank :: group.world]
            seen = len(rows)
        loss = trainer.train_step(rows)
        # Under DDP every rank must stop at the same point: the epoch-end check does it.
        if group is None and not math.isfinite(loss):
            raise Diverged(f"the training loss became {loss} at epoch {epoch}, step {step + 1}")
        position.loss_sum += loss * seen
        position.seen += seen
        position.global_step += 1
        position.step = step + 1
        if log_every and position.global_step % log_every == 0:
            hooks.step_loss(position.global_step, loss)
        if save is not None and time.monotonic() >= next_save:
            save()
            next_save = time.monotonic() + config.checkpoint_every_s


def _end_epoch(trainer: Trainer, val: Table, group: Group | None) -> dict[str, float]:
    """Close the epoch: schedule step, evaluation, best-so-far tracking, next position."""
    position, config = trainer.position, trainer.config
    loss_sum, seen = position.loss_sum, float(position.seen)
    if group is not None:
        totals = torch.tensor([loss_sum, seen], dtype=torch.float64)
        dist.all_reduce(totals)
        loss_sum, seen = totals.tolist()
    lr = trainer.optimizer.param_groups[0]["lr"]
    if trainer.schedule is not None:
        trainer.schedule.step()
    # Every rank evaluates the same weights on the same rows, so all agree on stopping.
    metrics = {
        "train_loss": loss_sum / max(seen, 1.0),
        **evaluate(trainer.model, val, trainer.device, config),
        "lr": lr,
    }
    value = metrics[config.monitored]
    lower_is_better = config.monitored in ("val_loss", "val_mae")
    better = position.best is None or (
        value < position.best if lower_is_better else value > position.best
    )
    if better:
        position.best, position.best_epoch, position.bad_epochs = value, position.epoch, 0
        if config.patience is not None:  # only early stopping goes back to the best weights
            trainer.best_state = {k: v.clone() for k, v in trainer.model_state.items()}
    else:
        position.bad_epochs += 1
    position.epoch += 1
    position.step = position.seen = 0
    position.loss_sum = 0.0
    return metrics


def evaluate(
    model: nn.Module, data: Table, device: torch.device, config: LoopConfig | None = None
) -> dict[str, float]:
    """Validation metrics: loss, accuracy and macro F1; or loss, MAE and RMSE."""
    out = outputs(model, data.features, device)
    if data.task == REGRESSION:
        mean, std = (config.target_mean, config.target_std) if config else (0.0, 1.0)
        predicted = out.squeeze(1).double() * std + mean
        truth = torch.from_numpy(data.targets).double()
        error = predicted - truth
        return {
            "val_loss": float(((error / std) ** 2).mean()),
            "val_mae": float(error.abs().mean()),
            "val_rmse": float((error**2).mean().sqrt()),
        }
    # Counting is done in NumPy: on a few hundred rows its calls cost less than torch's.
    predicted_class = out.argmax(dim=1).numpy()
    return {
        "val_loss": float(nn.functional.cross_entropy(out, torch.from_numpy(data.targets))),
        "val_accuracy": float((predicted_class == data.targets).mean()),
        "val_f1": macro_f1(predicted_class, data.targets),
    }


def macro_f1(predicted: np.ndarray, targets: np.ndarray) -> float:
    """F1 averaged over the classes that occur in either array (as scikit-learn's macro F1)."""
    size = int(max(predicted.max(initial=0), targets.max(initial=0))) + 1
    hits = np.bincount(targets[predicted == targets], minlength=size)
    guessed = np.bincount(predicted, minlength=size)
    actual = np.bincount(targets, minlength=size)
    present = (guessed + actual) > 0
    return float((2 * hits[present] / (guessed[present] + actual[present])).mean())
