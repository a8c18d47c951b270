"""batch_predict with `retry_of`: score only the rows an earlier job could not, and merge.

A batch_predict job that succeeded with an error file (rows it could not score: a missing
value, a vector of the wrong width, a text too long) can be retried for those rows alone:
fixing five bad rows of a million rescored five, not a million.

1. Plan: the source job (the owner's, a batch_predict that succeeded with an output and an
   error file, kiln.batch_retry) and its error file's row numbers. The rows are read by
   number from this spec's dataset: the source job's own dataset (the fix was in the model)
   or a corrected copy with the same rows in the same order (the fix was in the data),
   which must have exactly as many rows as the source job scored.
2. Score: those rows, copied into a small Parquet file in the scratch folder with their
   row number beside them, go through batch_predict's ordinary scoring
   (workers/runners/batch.py), with this spec's model, features and options.
3. Merge: the source job's output is streamed once, in input order, and each retried row
   is replaced by its new one; the result is a whole output in this spec's format. The
   new error file lists the rows that still fail, numbered as in the dataset.

The retried rows' number carries through scoring as a hidden pass-through column, so
error rows come back with the dataset's numbering whatever order chunks end in.
`max_error_fraction` still means a fraction of the dataset's rows. A retry is small: it
keeps no resumable parts between attempts (a new attempt scores its rows again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from kiln import datasets
from kiln.batch_retry import why_not_retryable
from kiln.errors import JobFailure, NotFound, UnsupportedDataset
from kiln.specs import BatchPredictSpec
from workers.context import RunContext
from workers.runners import batch, batch_parts

#: The hidden pass-through column that carries each retried row's number in the dataset.
ROW_COLUMN = "_kiln_source_row"


@dataclasses.dataclass(frozen=True)
class Source:
    """The job being retried: its id, rows, output file and the row numbers to score."""

    job_id: str
    rows: int
    output_path: Path
    output_format: str
    retry_rows: np.ndarray  # sorted, distinct row numbers (int64)


def run(spec: BatchPredictSpec, ctx: RunContext) -> dict[str, Any]:
    work = ctx.scratch_dir / "retry"
    shutil.rmtree(work, ignore_errors=True)  # a retry keeps nothing between attempts
    work.mkdir(parents=True)
    try:
        return _run(spec, ctx, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(spec: BatchPredictSpec, ctx: RunContext, work: Path) -> dict[str, Any]:
    started = time.monotonic()
    source = plan_source(spec, ctx)
    plan = batch._plan(spec, ctx, None)
    if plan.total_rows != source.rows:
        raise JobFailure(
            f"dataset {spec.dataset} has {plan.total_rows} rows; job {source.job_id} scored "
            f"{source.rows}: retry_of reads rows by number, so a corrected dataset must keep "
            "every row, in the same order"
        )
    count = len(source.retry_rows)
    ctx.log(f"retrying {count} rows of job {source.job_id} (of its {source.rows})")
    subset = _extract_rows(spec, plan, source.retry_rows, work / "rows.parquet")
    scoring = spec.model_copy(
        update={
            "passthrough": [ROW_COLUMN, *spec.passthrough],
            # A fraction of the dataset, as in the source job, not of the rows retried.
            "max_error_fraction": spec.max_error_fraction * source.rows / count,
        }
    )
    sub_plan = dataclasses.replace(
        plan, dataset_path=subset, dataset_format="parquet", total_rows=count
    )
    progress = batch_parts.Progress()
    scratch_output = batch_parts.Output(work / "retried.parquet", "parquet")
    try:
        with contextlib.closing(scratch_output):
            if plan.family == "hf":
                batch._score_text_chunks(scoring, ctx, work, sub_plan, progress, scratch_output)
            else:
                batch._score_chunks(scoring, ctx, work, sub_plan, progress, scratch_output)
    except JobFailure:
        if progress.errors <= int(scoring.max_error_fraction * count):
            raise
        # Past max_error_fraction: the error file attached so far numbers the retried rows
        # among themselves, and the reason counts them as the dataset; say it as a retry.
        errors = _renumber_errors(work, progress.chunks)
        ctx.attach_result({"error_file": batch._store(ctx, errors, "jsonl", progress.errors)})
        raise JobFailure(
            f"{progress.errors} of the {count} rows retried still cannot be scored, more "
            f"than max_error_fraction={spec.max_error_fraction} of the dataset's "
            f"{source.rows} rows allows; GET /api/v1/jobs/<id>/errors lists them"
        ) from None
    new_rows = pa.Table.from_batches(list(batch_parts.parts(work, "out", progress.chunks)))
    ctx.progress(1.0, f"merging into the output of job {source.job_id}", force=True)
    merged = _merge(spec, ctx, source, new_rows, work / f"output.{spec.output_format}")
    errors = _renumber_errors(work, progress.chunks)
    return {
        "model": spec.model,
        "version": plan.model_version,
        "rows": source.rows,
        "scored": source.rows - progress.errors,
        "errors": progress.errors,
        "output": batch._store(ctx, merged, spec.output_format, source.rows),
        "error_file": batch._store(ctx, errors, "jsonl", progress.errors),
        "retry_of": source.job_id,
        "retried": count,
        "fixed": count - progress.errors,
        "rows_per_s": round(count / max(time.monotonic() - started, 1e-9), 1),
    }


def plan_source(spec: BatchPredictSpec, ctx: RunContext) -> Source:
    """The job `spec.retry_of` names, checked again (it may have changed since the web
    accepted the retry), and the rows its error file lists."""
    assert spec.retry_of is not None
    try:
        job = ctx.job(spec.retry_of)
    except NotFound:
        raise JobFailure(f"retry_of: no job {spec.retry_of} of yours") from None
    problem = why_not_retryable(job.id, job.kind, job.state, job.result)
    if problem is not None:
        raise JobFailure(f"retry_of: {problem}")
    result: dict[str, Any] = job.result or {}
    rows = int(result["rows"])
    output, error_file = result["output"], result["error_file"]
    store = ctx.runtime.store
    retry_rows = _error_rows(store.path(error_file["digest"]), rows, job.id)
    return Source(job.id, rows, store.path(output["digest"]), output["format"], retry_rows)


def _error_rows(path: Path, rows: int, job_id: str) -> np.ndarray:
    """The row numbers an error file lists (JSONL, one {"row": n, "reason": ...} a line)."""
    found: set[int] = set()
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            row = json.loads(line).get("row")
            if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < rows:
                raise JobFailure(
                    f"the error file of job {job_id} names no row of its {rows} at line {number}"
                )
            found.add(row)
    if not found:
        raise JobFailure(f"the error file of job {job_id} lists no rows: nothing to retry")
    return np.array(sorted(found), dtype=np.int64)


def _extract_rows(spec: BatchPredictSpec, plan: batch.Plan, rows: np.ndarray, path: Path) -> Path:
    """Copy dataset rows `rows` (sorted) into a Parquet file with their number beside them,
    reading the dataset once, chunk by chunk."""
    output = batch_parts.Output(path, "parquet")
    start = 0
    try:
        for chunk in datasets.iter_batches(plan.dataset_path, plan.dataset_format, spec.chunk_rows):
            if ROW_COLUMN in chunk.schema.names:
                raise JobFailure(f"the dataset has a column named {ROW_COLUMN}, which Kiln uses")
            low, high = np.searchsorted(rows, [start, start + chunk.num_rows])
            if high > low:
                picked = chunk.take(pa.array(rows[low:high] - start))
                output.write(picked.add_column(0, ROW_COLUMN, pa.array(rows[low:high])))
            start += chunk.num_rows
    except UnsupportedDataset as exc:
        raise JobFailure(exc.message) from None
    written = output.close()
    assert written is not None  # the row numbers were checked against the row count
    return written


def _merge(
    spec: BatchPredictSpec, ctx: RunContext, source: Source, new_rows: pa.Table, path: Path
) -> Path | None:
    """The source output with each retried row replaced, streamed in input order."""
    numbers = new_rows.column(ROW_COLUMN).to_numpy()
    replacements = new_rows.drop_columns([ROW_COLUMN])
    schema = replacements.schema
    output = batch_parts.Output(path, spec.output_format)
    start = 0
    with contextlib.closing(output):
        for chunk in _read_output(source, schema, spec.chunk_rows):
            ctx.raise_if_cancelled()
            low, high = np.searchsorted(numbers, [start, start + chunk.num_rows])
            if high > low:
                order = np.arange(chunk.num_rows, dtype=np.int64)
                order[numbers[low:high] - start] = chunk.num_rows + np.arange(high - low)
                chunk = pa.concat_tables([chunk, replacements[low:high]]).take(pa.array(order))
            for piece in chunk.to_batches():
                output.write(piece)
            start += chunk.num_rows
        if start != source.rows:
            raise JobFailure(
                f"the output of job {source.job_id} holds {start} rows, not {source.rows}"
            )
        return output.close()


def _read_output(source: Source, schema: pa.Schema, chunk_rows: int) -> Iterator[pa.Table]:
    """The source job's output as tables of `schema` (the retried rows' columns): Parquet
    and Arrow keep their types; CSV and JSONL are read with those types, not guessed from
    the text."""
    if source.output_format == "parquet":
        batches = datasets.iter_batches(source.output_path, "parquet", chunk_rows)
    elif source.output_format == "arrow":
        batches = datasets.read_arrow(source.output_path)
    elif source.output_format == "csv":
        options = pacsv.ConvertOptions(column_types=schema)
        batches = pacsv.open_csv(source.output_path, convert_options=options)
    else:
        parse = pajson.ParseOptions(explicit_schema=schema)
        batches = pajson.open_json(source.output_path, parse_options=parse)
    try:
        for chunk in batches:
            if sorted(chunk.schema.names) != sorted(schema.names):
                raise JobFailure(
                    f"the output of job {source.job_id} has the columns "
                    f"{chunk.schema.names}, the retried rows {schema.names}: retry with the "
                    "same passthrough and probabilities, and a model with the same outputs"
                )
            yield pa.Table.from_batches([chunk]).select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise JobFailure(f"the output of job {source.job_id} cannot be merged: {exc}") from None


def _renumber_errors(work: Path, chunks: int) -> Path | None:
    """The rows that still fail, as an error file numbered as in the dataset."""
    output = batch_parts.Output(work / "errors.jsonl", "jsonl")
    for part in batch_parts.parts(work, "err", chunks):
        renumbered = part.set_column(
            part.schema.get_field_index("row"), "row", part.column(ROW_COLUMN)
        )
        output.write(renumbered.drop_columns([ROW_COLUMN]))
    return output.close()
