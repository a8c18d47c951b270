"""predict: score a few rows with a registered model version, batching waiting jobs together.

Dynamic batching: the job this worker claimed (the leader) looks in the database for other
queued predict jobs of the same owner, model and version reference that run on this device,
and claims each with the usual compare-and-set (so each gets its own attempt, and a job
cancelled while queued is never taken). Their rows go through one forward pass with the
leader's, up to `predict_batch_max_rows` rows, waiting at most `predict_batch_wait_ms` for
more when fewer are queued. Each job then succeeds or fails on its own, with its own result.
An hf version's jobs batch the same way when their task parameters are equal: their texts
share one set of length-sorted passes (workers/runners/hf_predict.py).
Their broker messages stay queued and are dropped as stale when a worker takes them (the
claim refuses a job that is no longer queued). The model comes from the worker's cache.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from kiln.errors import InvalidSpec, JobFailure
from kiln.families import HfParams
from kiln.specs import PredictSpec, Row, parse_spec
from workers import model_cache
from workers.context import RunContext
from workers.ml import bundle, hf, text
from workers.ml.inference import predict_proba, predict_values
from workers.runners import hf_predict

if TYPE_CHECKING:
    from db.models import Job

#: Candidates read per look at the queue, as a multiple of the rows still wanted.
_CANDIDATES_PER_ROW = 2
#: Forward passes one leader runs at most: its own, then passes of jobs still waiting.
_MAX_PASSES = 16


@dataclass
class Follower:
    job_id: str
    attempt: int
    spec: PredictSpec


def run(spec: PredictSpec, ctx: RunContext) -> dict[str, Any]:
    version = ctx.version(spec.model, spec.version)
    config, digest, number = version.config, version.artifact_digest, version.number
    if version.family == "hf":  # a transformers directory: texts in, task results out
        int8 = version.config.get(bundle.QUANTIZED_WEIGHTS) == bundle.INT8
        return _run_hf(spec, ctx, digest, version.task or "", number, int8)
    hf_predict.refuse_text_inputs(spec)
    followers = _claim_followers(spec, ctx, wait=True)
    with _failing_with_it(ctx, followers):
        model, device = model_cache.load_version(ctx, digest, config)
    score = functools.partial(_score_pass, ctx, model, device, config, spec.model, number)
    [own] = score([spec], followers)
    passes, jobs_scored = 1, 1 + len(followers)
    # Jobs that queued up meanwhile are scored here too, pass after pass, rather than each
    # waiting for its own message behind the stale messages of the jobs claimed above.
    batching = ctx.runtime.settings.predict_batch_max_rows > 1  # 1: one job, one pass
    while batching and passes < _MAX_PASSES and (more := _claim_followers(spec, ctx, wait=False)):
        score([], more)
        passes, jobs_scored = passes + 1, jobs_scored + len(more)
    if isinstance(own, JobFailure):
        raise own
    ctx.raise_if_cancelled()
    return own | {"batch_jobs": jobs_scored, "batch_passes": passes}


def _run_hf(
    spec: PredictSpec, ctx: RunContext, digest: str, task: str, number: int, int8: bool
) -> dict[str, Any]:
    """predict on an hf version, batched like zoo versions: the texts of the claimed
    followers (same version and task parameters) go through the same length-sorted passes
    as the leader's, and each job gets its own predictions or failure."""
    followers = _claim_followers(spec, ctx, wait=True)
    with _failing_with_it(ctx, followers):
        loaded = hf_predict.load_version(ctx, digest, task, int8)
    score = functools.partial(_hf_pass, ctx, loaded, number)
    [own] = score([spec], followers)
    passes, jobs_scored = 1, 1 + len(followers)
    batching = ctx.runtime.settings.predict_batch_max_rows > 1
    while batching and passes < _MAX_PASSES and (more := _claim_followers(spec, ctx, wait=False)):
        score([], more)
        passes, jobs_scored = passes + 1, jobs_scored + len(more)
    if isinstance(own, JobFailure):
        raise own
    ctx.raise_if_cancelled()
    return own | {"batch_jobs": jobs_scored, "batch_passes": passes}


def _hf_pass(
    ctx: RunContext,
    loaded: hf.HfModel,
    number: int,
    own: list[PredictSpec],
    followers: list[Follower],
) -> list[dict[str, Any] | JobFailure]:
    """_score_pass for an hf version."""
    with _failing_with_it(ctx, followers):
        results = hf_predict.score_jobs(ctx, loaded, [*own, *_specs(followers)], number)
    _finish_followers(ctx, followers, results[len(own) :])
    return results[: len(own)]


def _score_pass(
    ctx: RunContext,
    model: nn.Module,
    device: torch.device,
    config: dict[str, Any],
    model_name: str,
    number: int,
    own: list[PredictSpec],
    followers: list[Follower],
) -> list[dict[str, Any] | JobFailure]:
    """One forward pass over the rows of `own` (the leader's spec, or none) and of the
    followers; records each follower's ending and returns the results of `own`."""
    with _failing_with_it(ctx, followers):
        inputs = [_features_or_error(s, config, device) for s in [*own, *_specs(followers)]]
        good = [m for m in inputs if isinstance(m, np.ndarray)]
        predictions = _predict(model, np.concatenate(good), device, config) if good else []
    results = _split(inputs, predictions, model_name, number)
    _finish_followers(ctx, followers, results[len(own) :])
    return results[: len(own)]


def _specs(followers: list[Follower]) -> list[PredictSpec]:
    return [f.spec for f in followers]


def _claim_followers(spec: PredictSpec, ctx: RunContext, *, wait: bool) -> list[Follower]:
    """Claim queued predict jobs that can share a forward pass with `spec` (CAS per job):
    for the leader's own pass (`wait`: up to predict_batch_wait_ms for more to arrive), or
    for a further pass of followers alone."""
    settings = ctx.runtime.settings
    budget = settings.predict_batch_max_rows - (len(spec.inputs) if wait else 0)
    followers: list[Follower] = []
    deadline = time.monotonic() + (settings.predict_batch_wait_ms / 1000 if wait else 0)
    while budget > 0:
        found = _claim_some(spec, ctx, budget)
        if found:
            followers += found
            budget -= sum(len(f.spec.inputs) for f in found)
        elif time.monotonic() >= deadline:
            break
        else:
            time.sleep(0.001)
    return followers


def _claim_some(spec: PredictSpec, ctx: RunContext, budget: int) -> list[Follower]:
    claimed = ctx.claim_followers(
        lambda job: _compatible(job, spec, ctx),
        lambda other: len(other.inputs),
        budget=budget,
        limit=budget * _CANDIDATES_PER_ROW,
    )
    return [Follower(job_id, attempt, other) for job_id, attempt, other in claimed]


def _compatible(job: Job, spec: PredictSpec, ctx: RunContext) -> PredictSpec | None:
    """The job's spec if it names the same model and version and runs on this device."""
    try:
        other = parse_spec("predict", job.spec)
        same_device = ctx.runtime.device_for(other.device) == ctx.device
    except (InvalidSpec, JobFailure):
        return None
    if not isinstance(other, PredictSpec) or not same_device:
        return None
    if (other.model, str(other.version)) != (spec.model, str(spec.version)):
        return None
    if (other.hf or HfParams()) != (spec.hf or HfParams()):  # hf passes share parameters
        return None
    return other


def _features_or_error(
    spec: PredictSpec, config: dict[str, Any], device: torch.device
) -> np.ndarray | JobFailure:
    """One job's rows as the model's input matrix, or why they cannot be scored."""
    try:
        hf_predict.refuse_text_inputs(spec)  # a follower may have sent plain strings
        rows = cast(list[Row], spec.inputs)  # so: no plain strings
        if config.get("input") == "text":
            return text.embed(to_texts(rows, config["text_column"]), device)
        return to_matrix(rows, config["feature_names"])
    except JobFailure as exc:
        return exc
    except (ValueError, TypeError) as exc:
        return JobFailure(f"inputs are not numbers: {exc}")


def _predict(
    model: nn.Module, features: np.ndarray, device: torch.device, config: dict[str, Any]
) -> list[dict[str, Any]]:
    """One prediction per row: a value (regression) or a label with class probabilities."""
    if bundle.task(config) == "regression":
        values = predict_values(
            model, features, device, config["target_mean"], config["target_std"]
        )
        names = config.get("target_names") or []
        if len(names) > 1:  # a multi-output model: a value per target
            return [{"values": dict(zip(names, map(float, row), strict=True))} for row in values]
        return [{"value": float(row[0])} for row in values]
    labels = config["label_names"]
    return [
        {
            "label": labels[int(row.argmax())],
            "probabilities": {label: float(p) for label, p in zip(labels, row, strict=True)},
        }
        for row in predict_proba(model, features, device)
    ]


def _split(
    inputs: list[np.ndarray | JobFailure],
    predictions: list[dict[str, Any]],
    model_name: str,
    number: int,
) -> list[dict[str, Any] | JobFailure]:
    """Each job's own result (or failure), in the order the inputs were stacked."""
    results: list[dict[str, Any] | JobFailure] = []
    start = 0
    for matrix in inputs:
        if isinstance(matrix, JobFailure):
            results.append(matrix)
            continue
        mine = predictions[start : start + len(matrix)]
        start += len(matrix)
        results.append({"model": model_name, "version": number, "predictions": mine})
    return results


def _finish_followers(
    ctx: RunContext, followers: list[Follower], results: list[dict[str, Any] | JobFailure]
) -> None:
    """Record each follower's own ending in one transaction; a cancel request that came in
    while it ran is honoured."""
    if followers:
        ctx.finish_followers(
            [
                (f.job_id, f.attempt, str(r) if isinstance(r, JobFailure) else r)
                for f, r in zip(followers, results, strict=True)
            ]
        )


@contextmanager
def _failing_with_it(ctx: RunContext, followers: list[Follower]) -> Iterator[None]:
    """Fail the claimed followers with whatever escapes the block, then let it propagate:
    this job claimed them, so no other attempt will finish them."""
    try:
        yield
    except BaseException as exc:
        message = f"the batch this job was scored in failed: {exc!r}"
        ctx.fail_followers([(f.job_id, f.attempt) for f in followers], "BatchFailed", message)
        raise


def to_matrix(rows: list[Row], feature_names: list[str]) -> np.ndarray:
    """Rows (lists in feature order, or dicts by feature name) as a float32 matrix."""
    matrix = np.empty((len(rows), len(feature_names)), dtype=np.float32)
    with np.errstate(over="ignore"):  # a value that overflows float32 is refused below
        for i, row in enumerate(rows):
            try:
                matrix[i] = _row_values(i, row, feature_names)
            except (TypeError, ValueError):
                raise JobFailure(f"input row {i} has values that are not numbers") from None
    unusable = ~np.isfinite(matrix).all(axis=1)
    if unusable.any():  # the API refuses NaN and Infinity: a finite number overflowed float32
        raise JobFailure(
            f"input row {int(unusable.argmax())} has a value outside float32's range "
            "(about ±3.4e38), or NaN or infinity"
        )
    return matrix


def _row_values(i: int, row: Row, feature_names: list[str]) -> Sequence[float | str]:
    """Input row `i`'s values in feature order, or a JobFailure saying what is missing."""
    if isinstance(row, dict):
        missing = [name for name in feature_names if name not in row]
        if missing:
            raise JobFailure(f"input row {i} lacks features {missing[:5]}")
        return [row[name] for name in feature_names]
    if len(row) != len(feature_names):
        raise JobFailure(
            f"input row {i} has {len(row)} values; the model takes {len(feature_names)}"
        )
    return row


def to_texts(rows: list[Row], column: str) -> list[str]:
    """Rows for a text model: {column: "some text"} each."""
    texts = []
    for i, row in enumerate(rows):
        value = row.get(column) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise JobFailure(f"input row {i} must be an object with a string {column!r}")
        texts.append(value)
    return texts
