"""optimize: dynamic int8 quantization of a version into a new version of the same model.

How the quantized version is stored: its Linear layers' int8 weights with their scales and
zero points, every other tensor as floats, as safetensors, with `quantization: dynamic_int8`
and `quantized_weights: int8` in its config (workers/ml/quantized.py): about a quarter of
the float file for a Linear-dominated model. Loading sets those int8 weights exactly, so it
computes what quantizing the float weights at load did (versions optimized before int8
storage hold floats, and are still quantized at load). Zoo and plugin versions can be
optimized; convolutions stay float (dynamic quantization covers Linear layers only); hf
versions go to workers/runners/optimize_hf.py.

Accuracy is measured on the same rows for both: the source's validation split, recomputed
from its lineage (the training spec's dataset, target, split fraction and seed; the dataset
file cannot be deleted while a version names it), or every row of a dataset the spec names.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from kiln import datasets
from kiln.errors import JobFailure
from kiln.specs import OptimizeSpec, TrainSpec
from workers.context import RunContext
from workers.ml import bundle, data
from workers.ml.training import evaluate
from workers.runners import optimize_hf

#: Rows scored per timing pass, so the figure does not hinge on a tiny validation split.
_TIMED_ROWS = 8192
_TIMED_PASSES = 5


def run(spec: OptimizeSpec, ctx: RunContext) -> dict[str, Any]:
    source = ctx.version(spec.model, spec.version)
    number, config, lineage = source.number, source.config, source.lineage
    digest, dataset_digest, arch = source.artifact_digest, source.dataset_digest, source.arch
    family, size = source.family, source.artifact_size
    if family == "hf":  # a transformers directory: quantized and stored by its own runner
        return optimize_hf.run(spec, ctx)
    if config.get(bundle.QUANTIZATION):
        raise JobFailure(f"version {number} is already quantized ({config[bundle.QUANTIZATION]})")
    rows, evaluated_on = _evaluation_rows(spec, ctx, config, lineage, dataset_digest)
    ctx.progress(0.1, f"quantizing version {number}", force=True)
    cpu = torch.device("cpu")
    original, _ = bundle.load_for_inference(ctx.runtime.store.path(digest), config, cpu)
    quantized = bundle.quantize_dynamic_int8(original)
    ctx.progress(0.3, f"measuring on {len(rows.targets)} rows", force=True)
    before = _measure(original, rows)
    ctx.progress(0.6, "measuring the quantized copy", force=True)
    after = _measure(quantized, rows)
    ctx.log(f"original {before}; quantized {after}")

    new_config = {
        **config,
        bundle.QUANTIZATION: bundle.DYNAMIC_INT8,
        bundle.QUANTIZED_WEIGHTS: bundle.INT8,
    }
    stored = ctx.runtime.store.put_bytes(bundle.to_int8_bytes(original, quantized, new_config))
    new_number = ctx.register_version(
        name=spec.model,
        arch=arch,
        config=new_config,
        metrics={"val_accuracy": after["accuracy"], "rows_per_s": after["rows_per_s"]},
        artifact_digest=stored.digest,
        artifact_size=stored.size,
        # The source's training data stays pinned: this version's lineage runs through it.
        dataset_digest=dataset_digest,
        lineage={
            "origin": "optimize",
            "source_version": number,
            "quantization": bundle.DYNAMIC_INT8,
            "evaluated_on": evaluated_on,
            # The source's training spec, so this version's split can be recomputed too.
            "spec": lineage.get("spec", {}),
        },
        family=family,
    )
    return {
        "model": spec.model,
        "version": new_number,
        "source_version": number,
        "quantization": bundle.DYNAMIC_INT8,
        "evaluated_on": evaluated_on,
        "original": before,
        "quantized": after,
        "speedup": after["rows_per_s"] / before["rows_per_s"],
        "size_bytes": {"original": size, "quantized": stored.size},
        "threads": torch.get_num_threads(),
    }


def _evaluation_rows(
    spec: OptimizeSpec,
    ctx: RunContext,
    config: dict[str, Any],
    lineage: dict[str, Any],
    dataset_digest: str | None,
) -> tuple[data.Table, str]:
    """The rows accuracy is measured on, and a description of them for the result."""
    if spec.dataset is not None:
        table = _dataset_table(ctx, spec.dataset, spec.target, None)
        return _align(table, config), f"every row of dataset {spec.dataset}"
    if lineage.get("origin") != "train" or "spec" not in lineage:
        raise JobFailure(
            "this version has no training lineage to recompute its validation split from "
            "(an uploaded model, say): name a dataset to measure accuracy on in spec.dataset"
        )
    try:
        train = TrainSpec.model_validate(lineage["spec"])
    except ValidationError:
        raise JobFailure(
            "this version's training spec can no longer be read to recompute its validation "
            "split: name a dataset to measure accuracy on in spec.dataset"
        ) from None
    if train.dataset.startswith("builtin:"):
        table = data.builtin(train.dataset.removeprefix("builtin:"))
    else:
        table = _dataset_table(ctx, train.dataset, train.target, dataset_digest)
    _, validation = data.split(table, train.val_fraction, train.seed)
    described = (
        f"validation split of {train.dataset} (fraction {train.val_fraction}, seed {train.seed})"
    )
    return _align(validation, config), described


def _dataset_table(
    ctx: RunContext, dataset_id: str, target: str, expected_digest: str | None
) -> data.Table:
    found = ctx.dataset(dataset_id)
    fmt, digest = found.format, found.digest
    if expected_digest is not None and digest != expected_digest:
        raise JobFailure(f"dataset {dataset_id} is not the file the version was trained on")
    return data.from_arrow(datasets.read_table(ctx.runtime.store.path(digest), fmt), target)


def _align(table: data.Table, config: dict[str, Any]) -> data.Table:
    """The table with columns in the model's feature order and targets as its label indices."""
    if len(table.targets) == 0:
        raise JobFailure("the evaluation data has no rows")
    features, labels = config["feature_names"], config["label_names"]
    column = {name: i for i, name in enumerate(table.feature_names)}
    missing = [name for name in features if name not in column]
    if missing:
        raise JobFailure(f"the evaluation data lacks the model's features {missing[:5]}")
    unknown = sorted(set(table.label_names) - set(labels))
    if unknown:
        raise JobFailure(f"the evaluation data has labels the model does not know: {unknown[:5]}")
    index = {name: i for i, name in enumerate(labels)}
    remap = np.array([index[name] for name in table.label_names], dtype=np.int64)
    return data.Table(
        features=np.ascontiguousarray(table.features[:, [column[n] for n in features]]),
        targets=remap[table.targets],
        feature_names=list(features),
        label_names=list(labels),
    )


def _measure(model: nn.Module, rows: data.Table) -> dict[str, float]:
    """Accuracy on `rows`, and CPU throughput (best of a few passes over a fixed batch)."""
    cpu = torch.device("cpu")
    accuracy = evaluate(model, rows, cpu)["val_accuracy"]
    repeats = -(-_TIMED_ROWS // len(rows.targets))
    batch = torch.from_numpy(np.tile(rows.features, (repeats, 1))[:_TIMED_ROWS])
    best = float("inf")
    with torch.inference_mode():
        model(batch)  # warm-up: first calls allocate and pick kernels
        for _ in range(_TIMED_PASSES):
            started = time.perf_counter()
            model(batch)
            best = min(best, time.perf_counter() - started)
    return {"accuracy": accuracy, "rows_per_s": len(batch) / best}
