"""train: fit a zoo model on a dataset, checkpointing as it goes, and register the result
as a new model version. A redelivered attempt resumes from this job's checkpoint; a new
job resumes from another's with `resume_from`."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln import datasets, plugins
from kiln.errors import JobFailure, NotFound
from kiln.specs import TrainSpec
from kiln.states import JobState
from workers.context import JobCancelled, JobTimeout, RunContext, WorkerShutdown
from workers.ml import bundle, data, distributed, text
from workers.ml import checkpoint as ckpt
from workers.ml.training import (
    FitResult,
    Hooks,
    LoopConfig,
    StopAtStep,
    fit,
    saved_history,
    seed,
)


@dataclass(frozen=True)
class Prepared:
    """The dataset as the network sees it, and the bundle config that describes it."""

    table: data.Table
    dataset_digest: str | None
    config: dict[str, Any]


def run(spec: TrainSpec, ctx: RunContext) -> dict[str, Any]:
    if spec.arch == "hf":  # fine-tuning a transformers model: its own data and saving
        from workers.runners import finetune  # imports transformers: only for these jobs

        return finetune.run(spec, ctx)
    prepared = _prepare(spec, ctx)
    train_rows, val_rows = data.split(prepared.table, spec.val_fraction, spec.seed)
    config = dict(prepared.config)
    target_mean, target_std = 0.0, 1.0
    if prepared.table.task == data.REGRESSION:
        target_mean, target_std = data.target_scale(train_rows)
        config |= {"target_mean": target_mean, "target_std": target_std}
    seed(spec.seed, ctx.device)  # the initial weights are part of what the seed fixes
    try:
        model = bundle.build(config)
    except ValueError as exc:  # an arch that cannot take this data (cnn on flat rows)
        raise JobFailure(str(exc)) from None
    mean, std = data.normalisation(train_rows.features)
    model.mean.copy_(torch.tensor(mean))
    model.std.copy_(torch.tensor(std))
    loop = loop_config(spec, prepared.table.task, target_mean, target_std)
    key = _checkpoint_key(config, spec)
    checkpoint = ctx.scratch_dir / ckpt.FILENAME
    resume, resume_path = load_resume(spec, ctx, checkpoint, key)
    ctx.log(
        f"training {spec.arch} ({prepared.table.task}) on {len(train_rows.targets)} rows, "
        f"validating on {len(val_rows.targets)}, device {ctx.device}, {spec.gpus} process(es)"
    )
    report_resume(ctx, resume)
    result = _fit(
        spec, ctx, model, config, train_rows, val_rows, loop, checkpoint, resume, resume_path, key
    )
    return _register(spec, ctx, model, config, result, prepared.dataset_digest, checkpoint)


def report_resume(ctx: RunContext, resume: ckpt.Checkpoint | None) -> None:
    """Say where a resumed run starts, and write the metric points the lost attempt had
    reported but not written (they come back from the checkpoint's history)."""
    if resume is None:
        return
    at = resume.info["position"]
    ctx.log(f"resuming from checkpoint at epoch {at['epoch']} step {at['step']}")
    for number, metrics in enumerate(saved_history(resume), start=1):
        ctx.metrics(_points(number, metrics))


def _fit(
    spec: TrainSpec,
    ctx: RunContext,
    model: bundle.Network,
    config: dict[str, Any],
    train_rows: data.Table,
    val_rows: data.Table,
    loop: LoopConfig,
    checkpoint: Path,
    resume: ckpt.Checkpoint | None,
    resume_path: Path | None,
    key: str,
) -> FitResult:
    """Train in this process, or in spec.gpus DistributedDataParallel processes."""
    hooks = job_hooks(spec, ctx)
    publish = publisher(spec, ctx)
    if spec.gpus == 1:
        model.to(ctx.device)
        return fit(model, train_rows, val_rows, loop, ctx.device, hooks, checkpoint, resume,
                   config_key=key, on_save=publish)  # fmt: skip
    if ctx.device.type == "cuda" and torch.cuda.device_count() < spec.gpus:
        raise JobFailure(
            f"the job asks for {spec.gpus} GPUs but this worker sees "
            f"{torch.cuda.device_count()} (group GPUs for one worker: KILN_GPUS=0+1)"
        )
    job = distributed.Job(
        model_config=json.loads(json.dumps(config)),
        model_state={k: v.cpu() for k, v in model.state_dict().items()},
        train=train_rows,
        val=val_rows,
        loop=loop,
        device_type=ctx.device.type,
        checkpoint=checkpoint,
        resume=resume_path,
        weights_out=ctx.scratch_dir / "final.safetensors",
        rendezvous=ctx.scratch_dir / "ddp.rendezvous",
        config_key=key,
        on_save=publish,
    )
    try:
        result = distributed.run(job, spec.gpus, hooks)
    except distributed.Stopped:
        raise JobCancelled(ctx.job_id) from None
    distributed.load_weights(model, job.weights_out)
    model.to(ctx.device)
    return result


def _register(
    spec: TrainSpec,
    ctx: RunContext,
    model: bundle.Network,
    config: dict[str, Any],
    result: FitResult,
    dataset_digest: str | None,
    checkpoint: Path,
) -> dict[str, Any]:
    ctx.progress(1.0, "saving the model")
    stored = ctx.runtime.store.put_bytes(bundle.to_bytes(model, config))
    number = ctx.register_version(
        name=spec.model_name,
        arch=spec.arch,
        config=config,
        metrics=result.metrics,
        artifact_digest=stored.digest,
        artifact_size=stored.size,
        dataset_digest=dataset_digest,
        # The spec with its defaults filled in: the run can be repeated from it alone.
        lineage={"origin": "train", "spec": spec.model_dump(mode="json")},
        family=plugins.family_of(spec.arch),
    )
    # The version is registered: the checkpoint has served its purpose.
    ckpt.discard(checkpoint, ctx.job_files(ckpt.FOLDER))
    resumed = result.resumed_from
    return {
        "model": spec.model_name,
        "version": number,
        "task": config["task"],
        "metrics": result.metrics,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": resumed.epoch if resumed is not None else None,
    }


def _checkpoint_key(config: dict[str, Any], spec: TrainSpec) -> str:
    """What a checkpoint must have been trained with to be resumed here (the same network
    and optimizer shapes), as a digest: saved with every checkpoint, so kept short."""
    fit = {"config": config, "optimizer": spec.optimizer, "lr_schedule": spec.lr_schedule}
    return hashlib.sha256(json.dumps(fit, sort_keys=True).encode()).hexdigest()


def loop_config(spec: TrainSpec, task: str, target_mean: float, target_std: float) -> LoopConfig:
    return LoopConfig(
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        lr=spec.lr,
        optimizer=spec.optimizer,
        seed=spec.seed,
        weight_decay=spec.weight_decay,
        lr_schedule=spec.lr_schedule,
        lr_step_epochs=spec.lr_step_epochs,
        lr_gamma=spec.lr_gamma,
        grad_clip=spec.grad_clip,
        patience=spec.early_stopping_patience,
        monitor=spec.early_stopping_metric,
        precision=spec.precision,
        log_every_steps=spec.log_every_steps,
        checkpoint_every_s=spec.checkpoint_every_s,
        task=task,
        target_mean=target_mean,
        target_std=target_std,
    )


def _points(epoch: int, metrics: dict[str, float]) -> list[tuple[str, int, float]]:
    return [(name, epoch, value) for name, value in metrics.items()]


def job_hooks(spec: TrainSpec, ctx: RunContext) -> Hooks:
    """Report to the job: cancellation and progress with ETA per step, metrics per epoch."""
    started = time.monotonic()
    first: list[float] = []

    def step(epoch: int, index: int, steps: int) -> None:
        if not first or ctx.sync_due():  # the status line is only built to be written
            done = (epoch - 1 + index / steps) / spec.epochs
            if not first:
                first.append(done)  # a resumed run's ETA counts only the work left
            ctx.progress(done, f"epoch {epoch}/{spec.epochs}{_eta(started, first[0], done)}")
        try:
            ctx.raise_if_cancelled()
        except (WorkerShutdown, JobCancelled, JobTimeout) as stop:
            # Warm shutdown loses no work, and a cancelled or timed-out job keeps a
            # checkpoint of where it stopped for `resume_from`.
            raise StopAtStep(stop) from None

    def epoch(number: int, metrics: dict[str, float]) -> None:
        ctx.metrics(_points(number, metrics))
        ctx.log(f"epoch {number}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def step_loss(global_step: int, loss: float) -> None:
        ctx.metrics([("train_loss_step", global_step, loss)])

    return Hooks(step=step, epoch=epoch, step_loss=step_loss, log=ctx.log)


def _eta(started: float, first: float, done: float) -> str:
    if done <= first:
        return ""
    left = (time.monotonic() - started) * (1 - done) / (done - first)
    return f", about {left:.0f}s left"


def publisher(spec: TrainSpec, ctx: RunContext) -> ckpt.Publisher:
    """Copies the run's saves to the artifact store, so any host can resume the job."""
    return ckpt.Publisher(ctx.job_files(ckpt.FOLDER), spec.checkpoint_every_s)


def load_resume(
    spec: TrainSpec, ctx: RunContext, own: Path, key: str
) -> tuple[ckpt.Checkpoint | None, Path | None]:
    """The checkpoint to start from (and its path), checked to fit this run: this job's
    own (the newer of this host's and the one published from any host), else
    resume_from's."""
    if ckpt.fetch(ctx.job_files(ckpt.FOLDER), own):
        ctx.log("fetched this job's checkpoint from the artifact store")
    path = _resume_source(spec, ctx, own)
    if path is None:
        return None, None
    resume, unreadable = ckpt.load_or_none(path)
    if unreadable is not None:
        if path != own:
            raise JobFailure(f"cannot resume: the checkpoint of {spec.resume_from} is unreadable")
        ctx.log(f"ignoring an unreadable checkpoint ({unreadable}); starting over", "warning")
        return None, None
    if resume is not None and resume.info.get("key") != key:
        if path == own:  # written by an earlier Kiln for this very job: it cannot be read
            ctx.log("ignoring a checkpoint in an older layout; starting over", "warning")
            return None, None
        raise JobFailure(
            "the checkpoint to resume from was trained with another model, dataset, "
            "optimizer or schedule; resume with the same ones"
        )
    return resume, path


def _resume_source(spec: TrainSpec, ctx: RunContext, own: Path) -> Path | None:
    """This job's own checkpoint (an earlier attempt died), else resume_from's, else None."""
    if ckpt.exists(own):
        return own
    if spec.resume_from is None:
        return None
    try:
        source = ctx.job(spec.resume_from)
    except NotFound:
        source = None
    if source is None or source.kind != "train":
        raise JobFailure(f"cannot resume: no train job {spec.resume_from} of yours")
    state = source.state
    if state in (JobState.QUEUED, JobState.RUNNING):
        raise JobFailure(f"cannot resume from job {spec.resume_from}: it is still {state}")
    path = ctx.scratch_dir_of(spec.resume_from) / ckpt.FILENAME
    # The source may have run on another host: its published save, if newer than any here.
    ckpt.fetch(ctx.job_files(ckpt.FOLDER, spec.resume_from), path)
    if not ckpt.exists(path):
        raise JobFailure(
            f"cannot resume: job {spec.resume_from} left no checkpoint "
            "(a job that succeeded drops its checkpoint once its model is registered)"
        )
    return path


def _prepare(spec: TrainSpec, ctx: RunContext) -> Prepared:
    """Load the dataset (embedding text for the text arch) and describe it for the bundle."""
    embeds_text = _embeds_text(spec.arch)
    if spec.dataset.startswith("builtin:"):
        if embeds_text:
            raise JobFailure(
                f"the {spec.arch} architecture needs an uploaded dataset with a text column"
            )
        table, digest = data.builtin(spec.dataset.removeprefix("builtin:")), None
        if spec.task != "auto" and spec.task != table.task:
            raise JobFailure(f"{spec.dataset} is a {table.task} dataset, not {spec.task}")
    else:
        arrow, digest = uploaded_table(spec, ctx)
        if embeds_text:
            column = spec.arch_params.text_column  # type: ignore[union-attr]
            texts = data.text_column(arrow, column, spec.target)
            ctx.log(f"embedding {len(texts)} texts with {text.ENCODER}")
            features = text.embed(texts, ctx.device)
            names = [f"embedding_{i}" for i in range(features.shape[1])]
            table = data.with_target(features, names, arrow[spec.target], spec.target, spec.task)
        else:
            table = data.from_arrow(arrow, spec.target, spec.task)
    config: dict[str, Any] = {
        "arch": spec.arch,
        "arch_params": spec.arch_params.model_dump(exclude={"arch"}),
        "feature_names": table.feature_names,
        "label_names": table.label_names,
        "task": table.task,
        "input_shape": list(table.shape),
        "input": "features",
    }
    if embeds_text:
        config |= {"input": "text", "encoder": text.ENCODER, "text_column": column}
    if plugins.family_of(spec.arch) == "plugin":  # which plugin, in which version, made it
        config["plugin"] = plugins.version_note(spec.arch)
    return Prepared(table, digest, config)


def _embeds_text(arch: str) -> bool:
    """The zoo's text head and text plugins train on embeddings of a text column."""
    found = plugins.get(arch)
    return arch == "text" or (found is not None and found.plugin.input == "text")


def uploaded_table(spec: TrainSpec, ctx: RunContext) -> tuple[Any, str]:
    found = ctx.dataset(spec.dataset)
    fmt, digest = found.format, found.digest
    return datasets.read_table(ctx.runtime.store.path(digest), fmt), digest
