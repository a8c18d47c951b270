"""predict on an `hf` version: texts in, one task result per text (see workers/ml/hf.py).

The version's directory is unpacked once per host under the data directory, and the loaded
model and tokenizer stay in the worker's model cache, keyed like every other version (the
artifact's digest and the device).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from kiln.errors import JobFailure
from kiln.families import HfParams
from kiln.specs import PredictSpec
from workers import metrics, model_cache
from workers.context import RunContext
from workers.ml import hf


def run(
    spec: PredictSpec,
    ctx: RunContext,
    *,
    digest: str,
    task: str,
    number: int,
    int8: bool = False,
) -> dict[str, Any]:
    texts = hf.to_texts(spec.inputs)
    bundle = load_version(ctx, digest, task, int8)
    ctx.raise_if_cancelled()

    def after_batch(done: int, total: int) -> None:
        ctx.progress(done / total, f"{done}/{total} inputs")
        ctx.raise_if_cancelled()  # a long generation job stops at its next batch

    started = time.monotonic()
    predictions = hf.run(bundle, texts, spec.hf or HfParams(), after_batch)
    elapsed = time.monotonic() - started
    return {
        "model": spec.model,
        "version": number,
        "task": task,
        "predictions": predictions,
        **token_rate(predictions, elapsed),
    }


def token_rate(predictions: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
    """The job's token counts and throughput (the job page shows tokens_per_s): input
    tokens after truncation, plus generated tokens for text-generation."""
    tokens = sum(int(p.get("tokens", 0)) for p in predictions)
    generated = sum(int(p.get("generated_tokens", 0)) for p in predictions)
    rate = (tokens + generated) / elapsed if elapsed > 0 else 0.0
    return {"tokens": tokens, "generated_tokens": generated, "tokens_per_s": round(rate, 1)}


def load_version(ctx: RunContext, digest: str, task: str, int8: bool = False) -> hf.HfModel:
    """The version's model on the job's device (an int8 version on the CPU, where its
    kernels run), from the worker's cache when loaded."""
    settings = ctx.runtime.settings
    cache = model_cache.shared(settings.model_cache_models, settings.model_cache_bytes)
    device = torch.device("cpu") if int8 else ctx.device

    def load() -> hf.HfModel:
        directory = hf.materialise(ctx.runtime.store, digest, settings.data_dir / "hf-models")
        return hf.load(directory, task, device, int8=int8)

    bundle, hit = cache.get(digest, device, load)
    metrics.record_model_cache(ctx.worker, hit)
    assert isinstance(bundle, hf.HfModel)  # a digest is one artifact: one family
    return bundle


def refuse_text_inputs(spec: PredictSpec) -> None:
    """A zoo version takes rows of numbers (or {column: text} for the `text` arch): plain
    strings and hf task parameters are for hf versions."""
    if spec.hf is not None or any(isinstance(row, str) for row in spec.inputs):
        raise JobFailure(
            f"model {spec.model!r} is a zoo model: inputs are rows of numbers (or objects for "
            "a text arch); plain strings and 'hf' parameters are for hf models"
        )
