"""batch_predict: score every row of a dataset into an output file, chunk by chunk, resumably.

The input is read in chunks of `chunk_rows` rows (on CUDA a reader thread parses, validates
and pins the next chunk while the GPU scores this one). Each scored chunk is written as
two Arrow IPC part files in the job's scratch folder (its error rows, then its output rows),
then both go to the job's files in the artifact store and a commit marker written last
commits the chunk there (workers/runners/batch_parts.py). The same rows are appended to
the output file being built, so finishing costs no second pass. manifest.json, written
once, pins what the job scores with. A new attempt (the worker was killed and the job
re-queued, onto this host or another) brings the scratch folder in line with the committed
chunks (fetching what this host lacks), rebuilds the output from them and starts at the
first chunk they do not cover, so the final file has every input row exactly once, in
input order.

Nothing is fsynced per chunk (that would cost more than scoring a chunk): a killed process
loses nothing the kernel already holds. After a machine crash a part may be torn or lost;
a new attempt checks every part against its commit marker (size and CRC) and resumes at the
first one that matches neither here nor in the store.

Rows that cannot be scored (a missing value, NaN or infinity, a vector of the wrong width)
still get their output row, with no prediction, and a line in the error file (JSONL: row
number, reason, pass-through columns). The job fails once more than `max_error_fraction` of
the dataset's rows have failed; its error file is attached all the same.

A zoo version scores numeric features: a classifier writes a label and score, a regression
model a value (one per output of a multi-output model). An hf version scores a text column
for its task (workers/runners/batch_text.py): within a chunk the texts are scored sorted by
token length and written back in input order; a missing text, or one too long for the
model under truncation=error, is an error row like a bad numeric one.

A job with `shards` N (or auto) splits its rows among child jobs and later joins their
outputs (workers/runners/batch_shards.py); a child scores its row range like a job of its
own, its error rows numbered in the whole dataset.

This module plans, reads, scores and assembles; the part files and the manifest are
workers/runners/batch_parts.py, and turning a record batch into features is
workers/runners/batch_features.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from kiln import datasets
from kiln.errors import JobFailure, UnsupportedDataset
from kiln.families import HfParams
from kiln.specs import BatchPredictSpec
from workers import model_cache
from workers.context import JobCancelled, RetryableOOM, RunContext
from workers.ml import bundle, hf
from workers.runners import batch_features, batch_parts, batch_shards, batch_text, hf_predict

_PREFETCH_CHUNKS = 2


@dataclass(frozen=True)
class Plan:
    """What this job scores with, fixed at its first attempt and kept by every later one."""

    key: str
    dataset_path: Path
    dataset_format: str
    total_rows: int
    model_version: int
    model_digest: str
    config: dict[str, Any]
    features: list[str]
    #: The one list column that holds each row's feature vector, if the features come so.
    vector_column: bool
    #: The version's family; an `hf` version scores `text_column` for its `task`.
    family: str = "zoo"
    task: str | None = None
    text_column: str | None = None
    #: A shard scores `total_rows` rows from this row of the dataset on.
    first_row: int = 0
    #: The dataset's rows (a shard's are fewer): max_error_fraction counts against these.
    dataset_rows: int = 0
    shard: bool = False


@dataclass
class Chunk:
    index: int
    batch: pa.RecordBatch
    features: torch.Tensor  # the rows that can be scored, float32, pinned on CUDA
    ok: np.ndarray  # bool per row
    reasons: dict[int, str]  # row within the chunk -> why it cannot be scored


def run(spec: BatchPredictSpec, ctx: RunContext) -> dict[str, Any]:
    if spec.retry_of is not None:
        # Imported here: batch_retry scores through this module's functions.
        from workers.runners import batch_retry

        return batch_retry.run(spec, ctx)
    if ctx.split_into is not None:  # its shards succeeded: join what they wrote
        return batch_shards.assemble(spec, ctx)
    work = ctx.scratch_dir / "batch"
    try:
        return _run(spec, ctx, work)
    except (JobCancelled, JobFailure):
        # Finished for good: nothing to resume.
        batch_parts.clear(work, ctx.job_files(batch_parts.FOLDER))
        raise


def _run(spec: BatchPredictSpec, ctx: RunContext, work: Path) -> dict[str, Any]:
    files = ctx.job_files(batch_parts.FOLDER)
    manifest = batch_parts.read_manifest(work, files)
    plan = _plan(spec, ctx, manifest)
    if manifest is None and ctx.shard is None and spec.shards != 1:
        # Queues the shards and ends the attempt, unless the job is best scored in one piece.
        batch_shards.split(spec, ctx, plan.total_rows, plan.model_version)
    if manifest is None or manifest["key"] != plan.key:
        batch_parts.clear(work, files)
        manifest = {"key": plan.key, "version": plan.model_version, "digest": plan.model_digest}
        batch_parts.write_manifest(work, manifest, files)
    fetched = batch_parts.restore(work, files)
    progress = batch_parts.committed(work)
    if progress.chunks:
        ctx.log(f"resuming at row {progress.rows} ({progress.chunks} chunks were done)")
    if fetched:
        ctx.log(f"fetched {fetched} committed chunks from the artifact store")
    started, first_row = time.monotonic(), progress.rows
    output = batch_parts.Output(work / f"output.{spec.output_format}", spec.output_format)
    with contextlib.closing(output):
        for batch in batch_parts.parts(work, "out", progress.chunks):
            output.write(batch)  # a resumed attempt's output starts with the committed rows
        tokens: dict[str, int] = {}
        if plan.family == "hf":
            tokens = _score_text_chunks(spec, ctx, work, plan, progress, output)
        else:
            _score_chunks(spec, ctx, work, plan, progress, output)
        if progress.rows != plan.total_rows:
            raise JobFailure(
                f"the dataset yielded {progress.rows} rows, not the {plan.total_rows} "
                "recorded at upload; it may have changed on disk"
            )
        ctx.progress(1.0, "storing the output file", force=True)
        result = _assemble(spec, ctx, work, plan, progress, output.close())
    elapsed = time.monotonic() - started
    result["rows_per_s"] = round((progress.rows - first_row) / elapsed, 1)
    if plan.family == "hf":
        result |= {"task": plan.task, "text_column": plan.text_column}
        result |= {name: round(count / elapsed, 1) for name, count in tokens.items()}
        result["tokens"] = tokens["tokens_per_s"]
    batch_parts.clear(work, files)
    return result


def _score_chunks(
    spec: BatchPredictSpec,
    ctx: RunContext,
    work: Path,
    plan: Plan,
    progress: batch_parts.Progress,
    output: batch_parts.Output,
) -> None:
    """Score the chunks not yet committed, committing each and counting it in `progress`."""
    model, device = model_cache.load_version(ctx, plan.model_digest, plan.config)
    started, first_row = time.monotonic(), progress.rows
    batch_size = _batch_size(ctx, spec.batch_size)
    for chunk in _chunks(spec, plan, device, progress.chunks):
        ctx.raise_if_cancelled()
        with _retrying_oom(batch_size):
            outputs = _score(model, chunk.features, batch_size, device)
        out = _output_batch(spec, plan, chunk, outputs)
        errors = _error_batch(spec, chunk.batch, chunk.reasons, plan.first_row + progress.rows)
        _commit(spec, ctx, work, plan, progress, output, chunk.index, errors, out)
        _report(ctx, progress.rows - first_row, progress.rows, plan.total_rows, started)


def _score_text_chunks(
    spec: BatchPredictSpec,
    ctx: RunContext,
    work: Path,
    plan: Plan,
    progress: batch_parts.Progress,
    output: batch_parts.Output,
) -> dict[str, int]:
    """_score_chunks for an hf version: each chunk's texts through the task's scoring path,
    sorted by token length within the chunk and written back in input order. The tokens
    this attempt scored (and generated), by the name of their rate in the result."""
    assert plan.task is not None
    assert plan.text_column is not None
    int8 = plan.config.get(bundle.QUANTIZED_WEIGHTS) == bundle.INT8
    model = hf_predict.load_version(ctx, plan.model_digest, plan.task, int8)
    requested = min(spec.batch_size, hf.batch_size(plan.task))
    batch_size = _batch_size(ctx, requested)
    scorer = batch_text.TextScorer(
        model, spec.hf or HfParams(), plan.text_column, batch_size, spec.probabilities
    )
    ctx.log(f"scoring the text column {plan.text_column!r} ({plan.task})")
    started, first_row = time.monotonic(), progress.rows
    counts = {"tokens_per_s": 0}
    if plan.task == "text-generation":
        counts["generated_tokens_per_s"] = 0
    batches = _dataset_chunks(spec, plan)
    try:
        for index, batch in enumerate(batches):
            if index < progress.chunks:
                continue  # committed chunks are read past, not scored again
            ctx.raise_if_cancelled()

            def after_pass(done: int, total: int, rows: int = batch.num_rows) -> None:
                within = progress.rows + rows * done / max(total, 1)
                ctx.progress(within / plan.total_rows, f"{within:.0f}/{plan.total_rows} rows")
                ctx.raise_if_cancelled()  # a long generation chunk stops at its next pass

            with _retrying_oom(batch_size):
                scored = scorer.score(batch, after_pass)
            out = pa.RecordBatch.from_pydict(
                {name: batch.column(name) for name in spec.passthrough} | scored.columns
            )
            errors = _error_batch(spec, batch, scored.reasons, plan.first_row + progress.rows)
            _commit(spec, ctx, work, plan, progress, output, index, errors, out)
            counts["tokens_per_s"] += scored.tokens
            if "generated_tokens_per_s" in counts:
                counts["generated_tokens_per_s"] += scored.generated
            _report(ctx, progress.rows - first_row, progress.rows, plan.total_rows, started, counts)
    except UnsupportedDataset as exc:
        raise JobFailure(exc.message) from None
    return counts


def _batch_size(ctx: RunContext, requested: int) -> int:
    """Rows per forward pass: `requested`, halved for each earlier out-of-memory attempt."""
    batch_size = ctx.batch_size(requested)
    if batch_size < requested:
        ctx.log(f"scoring in batches of {batch_size}: an earlier attempt ran out of GPU memory")
    return batch_size


@contextlib.contextmanager
def _retrying_oom(batch_size: int) -> Iterator[None]:
    """Out of GPU memory: committed chunks stay; the next attempt goes on from the first
    chunk not committed, at half the batch."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        if batch_size == 1:
            raise JobFailure("out of GPU memory even at batch size 1") from exc
        raise RetryableOOM(f"CUDA out of memory at batch size {batch_size}") from exc


def _commit(
    spec: BatchPredictSpec,
    ctx: RunContext,
    work: Path,
    plan: Plan,
    progress: batch_parts.Progress,
    output: batch_parts.Output,
    index: int,
    errors: pa.RecordBatch,
    out: pa.RecordBatch,
) -> None:
    """Commit chunk `index`, append its rows to the output, count it; fail the job once
    more rows failed than the spec allows."""
    batch_parts.commit_chunk(work, index, errors, out, ctx.job_files(batch_parts.FOLDER))
    output.write(out)
    progress.chunks += 1
    progress.rows += out.num_rows
    progress.errors += errors.num_rows
    if progress.errors > int(spec.max_error_fraction * plan.dataset_rows):
        _attach_errors(ctx, work, progress)
        raise JobFailure(_too_many_errors(spec, plan, progress))


def _plan(spec: BatchPredictSpec, ctx: RunContext, manifest: dict[str, Any] | None) -> Plan:
    """Resolve the dataset and the model version; a resumed job keeps the version it began
    with, even if an alias such as `production` has moved since."""
    dataset = ctx.dataset(spec.dataset)
    version = ctx.version(spec.model, manifest["version"] if manifest else spec.version)
    number, digest, config = version.number, version.artifact_digest, version.config
    columns = {c["name"]: c["dtype"] for c in dataset.columns}
    fmt, rows, data_digest = dataset.format, dataset.rows, dataset.digest
    first_row, total = 0, rows
    if ctx.shard is not None:  # a shard of a sharded job: its range of rows only
        first_row, total = ctx.shard.start, ctx.shard.stop - ctx.shard.start
    spec_hash = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]
    common: dict[str, Any] = {
        "key": f"{spec_hash}:{data_digest}",
        "dataset_path": ctx.runtime.store.path(data_digest),
        "dataset_format": fmt,
        "total_rows": total,
        "first_row": first_row,
        "dataset_rows": rows,
        "shard": ctx.shard is not None,
        "model_version": number,
        "model_digest": digest,
        "config": config,
    }
    if version.family == "hf":
        return Plan(**common, **_text_plan(spec, version.task or "", columns))
    if spec.text_column is not None or spec.hf is not None:
        raise JobFailure(
            f"model {spec.model!r} is a zoo model: text_column and hf are for hf models"
        )
    if config.get("input") == "text":
        raise JobFailure(
            "batch_predict scores zoo models over numeric features; this version is a zoo "
            "text model (use predict jobs for it)"
        )
    features = spec.features or list(config["feature_names"])
    width = len(config["feature_names"])
    vector = len(features) == 1 and width != 1 and "list" in columns.get(features[0], "")
    missing = [name for name in [*features, *spec.passthrough] if name not in columns]
    if missing:
        raise JobFailure(f"the dataset has no columns {missing[:5]}; it has {list(columns)[:20]}")
    if not vector and len(features) != width:
        raise JobFailure(f"{len(features)} feature columns given; the model takes {width}")
    if not vector:
        numeric = ("int", "uint", "float", "double", "halffloat", "bool")
        bad = [n for n in features if not columns[n].startswith(numeric)]
        if bad:
            raise JobFailure(f"feature columns must be numeric; these are not: {bad[:5]}")
    return Plan(**common, features=features, vector_column=vector)


def _text_plan(spec: BatchPredictSpec, task: str, columns: dict[str, str]) -> dict[str, Any]:
    """The Plan fields of an hf version: its task and the column of texts."""
    if spec.features is not None:
        raise JobFailure("features are for zoo models; an hf model reads text_column")
    column = batch_text.text_column(spec.text_column, columns)
    missing = [name for name in spec.passthrough if name not in columns]
    if missing:
        raise JobFailure(f"the dataset has no columns {missing[:5]}; it has {list(columns)[:20]}")
    if task == "embedding" and spec.output_format == "csv":
        raise JobFailure("embeddings are lists, which CSV cannot hold: write parquet or jsonl")
    return {
        "features": [],
        "vector_column": False,
        "family": "hf",
        "task": task,
        "text_column": column,
    }


def _chunks(spec: BatchPredictSpec, plan: Plan, device: torch.device, skip: int) -> Iterator[Chunk]:
    """Chunks from `skip` on, parsed and validated. On CUDA a reader thread prepares and
    pins one or two chunks ahead while the GPU scores. On the CPU they are read in turn:
    the forward pass keeps every core busy, and a reader thread beside it preempts one of
    torch's threads, which the others then wait for (a job measured 15-20% slower so)."""
    try:
        if device.type == "cuda":
            yield from _read_ahead(spec, plan, skip, pin=True)
        else:
            yield from _read(spec, plan, skip, pin=False)
    except UnsupportedDataset as exc:
        raise JobFailure(exc.message) from None


def _read(spec: BatchPredictSpec, plan: Plan, skip: int, pin: bool) -> Iterator[Chunk]:
    width = len(plan.config["feature_names"])
    for index, batch in enumerate(_dataset_chunks(spec, plan)):
        if index >= skip:  # committed chunks are read past, not scored again
            yield _prepare(index, batch, plan, width, pin)


def _read_ahead(spec: BatchPredictSpec, plan: Plan, skip: int, pin: bool) -> Iterator[Chunk]:
    """_read in a thread, _PREFETCH_CHUNKS chunks ahead of the consumer."""
    ready: queue.Queue[Chunk | BaseException | None] = queue.Queue(_PREFETCH_CHUNKS)
    stop = threading.Event()

    def reader() -> None:  # put prepared chunks, then None at the end (or the error)
        try:
            for chunk in _read(spec, plan, skip, pin):
                if stop.is_set():
                    return
                ready.put(chunk)
            ready.put(None)
        except BaseException as exc:
            ready.put(exc)

    thread = threading.Thread(target=reader, name="batch-reader", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.05)


def _dataset_chunks(spec: BatchPredictSpec, plan: Plan) -> Iterator[pa.RecordBatch]:
    """The chunks of rows this job scores: the dataset's, or a shard's range (whole chunks
    of the dataset, so the k-th chunk of a shard is a chunk an unsharded job scores too)."""
    batches = datasets.iter_batches(
        plan.dataset_path, plan.dataset_format, spec.chunk_rows, plan.first_row
    )
    if not plan.shard:
        yield from batches  # to the end: a file that grew since upload is caught after
        return
    # Its last chunk is whole (ranges end on chunk bounds) or the dataset's last.
    yield from itertools.islice(batches, math.ceil(plan.total_rows / spec.chunk_rows))


def _prepare(index: int, batch: pa.RecordBatch, plan: Plan, width: int, pin: bool) -> Chunk:
    """The chunk's feature matrix for the rows that can be scored, and why the rest cannot."""
    if plan.vector_column:
        matrix, ok, reasons = batch_features.from_vectors(batch.column(plan.features[0]), width)
    else:
        matrix, ok, reasons = batch_features.from_columns(batch, plan.features)
    tensor = torch.from_numpy(matrix)
    return Chunk(index, batch, tensor.contiguous().pin_memory() if pin else tensor, ok, reasons)


@torch.inference_mode()
def _score(
    model: nn.Module, features: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """The network's outputs for every row (on the CPU: logits, or standardised values for
    regression), in forward passes of `batch_size` rows; the copy of the next slice to the
    device is issued before the current slice is computed."""
    if len(features) == 0:
        return torch.empty(0, 0)
    non_blocking = device.type == "cuda"
    slices = [features[i : i + batch_size] for i in range(0, len(features), batch_size)]
    outputs = []
    upcoming = slices[0].to(device, non_blocking=non_blocking)
    for i in range(len(slices)):
        current = upcoming
        if i + 1 < len(slices):
            upcoming = slices[i + 1].to(device, non_blocking=non_blocking)
        outputs.append(model(current).float())
    return torch.cat(outputs).cpu()


def _output_batch(
    spec: BatchPredictSpec, plan: Plan, chunk: Chunk, outputs: torch.Tensor
) -> pa.RecordBatch:
    """One output row per input row; a row that could not be scored has null predictions."""
    if bundle.task(plan.config) == "regression":
        return _values_batch(spec, plan.config, chunk, outputs)
    labels = pa.array(plan.config["label_names"], pa.string())
    probabilities = torch.softmax(outputs, dim=1) if len(outputs) else outputs
    n, missing = chunk.batch.num_rows, ~chunk.ok
    best = np.zeros(n, dtype=np.int64)
    score = np.zeros(n, dtype=np.float32)
    if len(probabilities):
        top, index = probabilities.max(dim=1)  # torch's row-wise max beats NumPy's 3x
        best[chunk.ok], score[chunk.ok] = index.numpy(), top.numpy()
    columns = {name: chunk.batch.column(name) for name in spec.passthrough}
    columns["prediction"] = labels.take(pa.array(best, mask=missing))
    columns["score"] = pa.array(score, mask=missing)
    if spec.probabilities:
        full = np.zeros((n, len(labels)), dtype=np.float32)
        if len(probabilities):
            full[chunk.ok] = probabilities.numpy()
        for j, label in enumerate(labels.to_pylist()):
            columns[f"probability_{label}"] = pa.array(full[:, j], mask=missing)
    return pa.RecordBatch.from_pydict(columns)


def _values_batch(
    spec: BatchPredictSpec, config: dict[str, Any], chunk: Chunk, outputs: torch.Tensor
) -> pa.RecordBatch:
    """A regression model's rows: `value`, or `value_<target>` per output of a multi-output
    model, in target units (the network predicts standardised targets)."""
    names = config.get("target_names") or []
    width = max(len(names), 1)
    mean = np.asarray(config["target_mean"], dtype=np.float64)
    std = np.asarray(config["target_std"], dtype=np.float64)
    values = np.zeros((chunk.batch.num_rows, width), dtype=np.float64)
    if len(outputs):
        values[chunk.ok] = outputs.double().numpy().reshape(-1, width) * std + mean
    columns = {name: chunk.batch.column(name) for name in spec.passthrough}
    missing = ~chunk.ok
    if len(names) > 1:
        for j, name in enumerate(names):
            columns[f"value_{name}"] = pa.array(values[:, j], mask=missing)
    else:
        columns["value"] = pa.array(values[:, 0], mask=missing)
    return pa.RecordBatch.from_pydict(columns)


def _error_batch(
    spec: BatchPredictSpec, batch: pa.RecordBatch, reasons: dict[int, str], first_row: int
) -> pa.RecordBatch:
    rows = sorted(reasons)
    columns: dict[str, pa.Array] = {
        "row": pa.array([first_row + r for r in rows], pa.int64()),
        "reason": pa.array([reasons[r] for r in rows], pa.string()),
    }
    for name in spec.passthrough:
        columns[name] = batch.column(name).take(pa.array(rows, pa.int64()))
    return pa.RecordBatch.from_pydict(columns)


def _store(ctx: RunContext, path: Path | None, fmt: str, rows: int) -> dict[str, Any] | None:
    if path is None:
        return None
    stored = ctx.runtime.store.move_file(path)
    return {"digest": stored.digest, "size": stored.size, "format": fmt, "rows": rows}


def _attach_errors(ctx: RunContext, work: Path, progress: batch_parts.Progress) -> None:
    """Store the error file so far and record it on the job before it fails."""
    path = batch_parts.concatenate(work, "err", progress.chunks, "jsonl", "errors.jsonl")
    error_file = _store(ctx, path, "jsonl", progress.errors)
    ctx.attach_result({"error_file": error_file})


def _assemble(
    spec: BatchPredictSpec,
    ctx: RunContext,
    work: Path,
    plan: Plan,
    progress: batch_parts.Progress,
    output: Path | None,
) -> dict[str, Any]:
    fmt = spec.output_format
    errors = batch_parts.concatenate(work, "err", progress.chunks, "jsonl", "errors.jsonl")
    return {
        "model": spec.model,
        "version": plan.model_version,
        "rows": progress.rows,
        "scored": progress.rows - progress.errors,
        "errors": progress.errors,
        "output": _store(ctx, output, fmt, progress.rows),
        "error_file": _store(ctx, errors, "jsonl", progress.errors),
    }


def _too_many_errors(spec: BatchPredictSpec, plan: Plan, progress: batch_parts.Progress) -> str:
    return (
        f"{progress.errors} of the dataset's {plan.dataset_rows} rows could not be scored, "
        f"more than max_error_fraction={spec.max_error_fraction}; "
        "GET /api/v1/jobs/<id>/errors lists them"
    )


def _report(
    ctx: RunContext,
    done_here: int,
    done: int,
    total: int,
    started: float,
    tokens: dict[str, int] | None = None,
) -> None:
    """Progress with rows/s (and, for hf versions, tokens/s) in its message; the rates also
    go to the job's metrics, one point per committed chunk."""
    elapsed = time.monotonic() - started
    rate = done_here / elapsed if elapsed > 0 else 0.0
    eta = f", about {(total - done) / rate:.0f}s left" if rate > 0 else ""
    rates = {"rows_per_s": rate}
    for name, count in (tokens or {}).items():
        rates[name] = count / elapsed if elapsed > 0 else 0.0
    extra = "".join(
        f", {value:,.0f} {name.removesuffix('_per_s').replace('_', ' ')}/s"
        for name, value in rates.items()
        if name != "rows_per_s"
    )
    ctx.progress(done / total, f"{done}/{total} rows, {rate:,.0f} rows/s{extra}{eta}")
    if tokens is not None:
        ctx.metrics([(name, done, round(value, 1)) for name, value in rates.items()])
