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


def score_jobs(
    ctx: RunContext, bundle: hf.HfModel, specs: list[PredictSpec], number: int
) -> list[dict[str, Any] | JobFailure]:
    """Each job's result, or why it cannot run, with the texts of all of them scored in one
    set of length-sorted passes (the jobs share their task parameters: the first's). The
    running job's progress counts the inputs of all; a cancel request stops it between
    passes."""
    params = specs[0].hf or HfParams()
    room = hf.check(bundle, params)
    jobs: list[tuple[list[str], list[int]] | JobFailure] = []
    for spec in specs:
        try:
            texts = hf.to_texts(spec.inputs)
            lengths = hf.token_counts(bundle.tokenizer, texts)
            for i, length in enumerate(lengths):
                if length > room and params.truncation == "error":
                    raise JobFailure(hf.too_long(i, length, room))
            jobs.append((texts, lengths))
        except JobFailure as exc:
            jobs.append(exc)
    ctx.raise_if_cancelled()

    def after_batch(done: int, total: int) -> None:
        ctx.progress(done / total, f"{done}/{total} inputs")
        ctx.raise_if_cancelled()  # a long generation job stops at its next batch

    scored = [job for job in jobs if not isinstance(job, JobFailure)]
    texts = [text for job_texts, _ in scored for text in job_texts]
    lengths = [n for _, job_lengths in scored for n in job_lengths]
    started = time.monotonic()
    predictions = hf.results(bundle, texts, lengths, params, after_batch=after_batch)
    elapsed = time.monotonic() - started  # the jobs' passes are shared: so is their time
    results: list[dict[str, Any] | JobFailure] = []
    start = 0
    for spec, job in zip(specs, jobs, strict=True):
        if isinstance(job, JobFailure):
            results.append(job)
            continue
        mine = predictions[start : start + len(job[0])]
        start += len(job[0])
        results.append(
            {
                "model": spec.model,
                "version": number,
                "task": bundle.task,
                "predictions": mine,
                **token_rate(mine, elapsed),
            }
        )
    return results


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
