"""train with `arch: hf`: fine-tune a registered hf version (a text-classification model, or
an embedding model given a new head) on an uploaded dataset's text and label columns, fully
or with LoRA, and register the result as a new hf text-classification version whose
lineage names its base.

The same loop as the zoo's train jobs (workers/ml/training.py) runs it, so checkpoints,
resume (a redelivered attempt, or `resume_from`), cancellation, early stopping, mixed
precision and the metric series behave the same; workers/runners/train.py's reporting,
loop settings and resume checks are shared, not copied.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from kiln import hfdir
from kiln.errors import JobFailure
from kiln.specs import HfTrainParams, TrainSpec
from workers.context import RunContext
from workers.ml import checkpoint as ckpt
from workers.ml import data, finetune, hf
from workers.ml.training import FitResult, fit, seed
from workers.runners import train

if TYPE_CHECKING:
    from db.models import ModelVersion

#: Base versions a fine-tune starts from.
BASE_TASKS = ("text-classification", "embedding")
TASK = "text-classification"
#: The worker checks the directory it saved as the web checks an upload; the upload limit
#: is for users' requests, not for a model the worker made from one it already holds.
_NO_LIMIT = 2**62


def run(spec: TrainSpec, ctx: RunContext) -> dict[str, Any]:
    params = spec.arch_params
    assert isinstance(params, HfTrainParams)  # train.run sends only arch hf here
    base = ctx.version(params.base_model, params.base_version)
    if base.family != "hf" or base.task not in BASE_TASKS:
        raise JobFailure(
            f"{params.base_model} version {base.number} is a {base.family} "
            f"{base.task or 'model'}; fine-tuning starts from an hf text-classification or "
            "embedding version"
        )
    settings = ctx.runtime.settings
    directory = hf.materialise(
        ctx.runtime.store, base.artifact_digest, settings.data_dir / "hf-models"
    )
    arrow, dataset_digest = train.uploaded_table(spec, ctx)
    texts = data.text_column(arrow, params.text_column, spec.target)
    tokenizer = finetune.load_tokenizer(directory)
    length = finetune.max_length(directory, tokenizer, params.max_length)
    rows, cut = finetune.encode(tokenizer, texts, length)
    table = data.with_target(rows, [], arrow[spec.target], spec.target, data.CLASSIFICATION)
    if len(table.label_names) < 2:
        raise JobFailure(f"the label column {spec.target!r} has fewer than two labels")
    train_rows, val_rows = data.split(table, spec.val_fraction, spec.seed)
    seed(spec.seed, ctx.device)  # a new head and the adapters are drawn from it
    model, built = finetune.load_classifier(directory, base.task, table.label_names, params)
    network = finetune.TokenClassifier(model).to(ctx.device)
    trainable, total = finetune.trainable_parameters(network)
    loop = train.loop_config(spec, data.CLASSIFICATION, 0.0, 1.0)
    key = _checkpoint_key(spec, base.artifact_digest, table.label_names, rows.shape[-1])
    checkpoint = ctx.scratch_dir / ckpt.FILENAME
    resume, _ = train.load_resume(spec, ctx, checkpoint, key)
    ctx.log(
        f"fine-tuning {params.base_model} version {base.number} ({base.task}) with {built}: "
        f"{trainable:,} of {total:,} parameters train ({params.method}); "
        f"{len(train_rows.targets)} texts, validating on {len(val_rows.targets)}, "
        f"device {ctx.device}"
    )
    if cut:
        ctx.log(f"{cut} of {len(texts)} texts are longer than {length} tokens and were cut")
    train.report_resume(ctx, resume)
    result = fit(
        network,
        train_rows,
        val_rows,
        loop,
        ctx.device,
        train.job_hooks(spec, ctx),
        checkpoint,
        resume,
        config_key=key,
        on_save=train.publisher(spec, ctx),
    )
    return _register(spec, ctx, model, base, directory, result, dataset_digest) | {
        "method": params.method,
        "trainable_parameters": trainable,
    }


def _register(
    spec: TrainSpec,
    ctx: RunContext,
    model: nn.Module,
    base: ModelVersion,
    base_dir: Path,
    result: FitResult,
    dataset_digest: str,
) -> dict[str, Any]:
    params = spec.arch_params
    assert isinstance(params, HfTrainParams)
    ctx.progress(1.0, "saving the model")
    saved = finetune.save_directory(finetune.merged(model), base_dir, ctx.scratch_dir / "model")
    checked = finetune.checked_directory(saved, _NO_LIMIT)
    stored = ctx.runtime.store.put_chunks(hfdir.tar_chunks(checked))
    summary = checked.summary
    origin = {"model": params.base_model, "version": base.number, "digest": base.artifact_digest}
    number = ctx.register_version(
        name=spec.model_name,
        arch=summary["model_type"][:32],
        config={"hf": summary, "label_names": summary["label_names"]},
        metrics=result.metrics,
        artifact_digest=stored.digest,
        artifact_size=stored.size,
        dataset_digest=dataset_digest,
        lineage={"origin": "train", "spec": spec.model_dump(mode="json"), "base": origin},
        family="hf",
        task=TASK,
    )
    # The version is registered: done with the checkpoint, here and in the artifact store.
    ckpt.discard(ctx.scratch_dir / ckpt.FILENAME, ctx.job_files(ckpt.FOLDER))
    shutil.rmtree(saved, ignore_errors=True)
    resumed = result.resumed_from
    return {
        "model": spec.model_name,
        "version": number,
        "task": TASK,
        "base": origin,
        "metrics": result.metrics,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": resumed.epoch if resumed is not None else None,
    }


def _checkpoint_key(spec: TrainSpec, base_digest: str, labels: list[str], width: int) -> str:
    """What a checkpoint must have been trained with to be resumed here: the same base,
    labels, method and adapters, token width, optimizer and schedule."""
    fit = {
        "base": base_digest,
        "labels": labels,
        "params": spec.arch_params.model_dump(mode="json"),
        "width": width,
        "optimizer": spec.optimizer,
        "lr_schedule": spec.lr_schedule,
    }
    return hashlib.sha256(json.dumps(fit, sort_keys=True).encode()).hexdigest()
