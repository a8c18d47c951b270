"""batch_predict over many workers: a job with `shards` N (or `auto`) splits its rows into
ranges, each scored by a child job (a shard) on the ordinary queues, then assembles what
they wrote, in input order.

- Split (the job's first attempt): `split_rows` cuts the dataset into ranges of whole
  chunks (`chunk_rows`), so each shard's chunks are exactly the unsharded job's chunks and
  the assembled output is the file one worker would have written. Each shard's spec is
  the job's, with its version pinned to the number this attempt resolved (an alias that
  moves meanwhile changes no shard) and, for the `file` layout, the format the shards write
  (_shard_format). The shards are queued and the attempt ends: the job waits holding no
  worker (db/shards.py).
- Assemble (the attempt after the last shard succeeded): a Parquet output is the shards'
  Parquet files laid end to end under one footer (kiln/parquet_concat.py: a copy, no page
  decoded or encoded), byte for byte the file one worker would have written; any other
  format is the shards' Arrow outputs, read back in shard order and streamed into one file
  of the format asked for. Their error files (JSONL, rows numbered in the whole dataset) are
  joined in order. With `output_layout: parts` nothing is joined: the result lists the
  shards' files, each also served as that shard's job's output.
A dataset of one chunk, or `auto` with one live worker, is scored by the job itself.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from kiln import datasets, parquet_concat, routing
from kiln.errors import JobFailure
from kiln.specs import BatchPredictSpec
from workers.context import RunContext
from workers.runners import batch_parts


def _shard_format(output_format: str) -> str:
    """The format the shards of a `file` layout job write: Parquet for a Parquet output (the
    join copies their row groups, so the shards do the encoding, side by side), else Arrow
    IPC, which keeps every Arrow type, so that the output the join writes from it matches
    an unsharded job's in any format, and which the join reads back with no decoding."""
    return "parquet" if output_format == "parquet" else "arrow"


def split_rows(rows: int, shards: int, chunk_rows: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most `shards` shards over `rows` rows: whole chunks
    of `chunk_rows` rows each, as even as whole chunks allow, in order, none empty."""
    if rows <= 0:
        return []
    chunks = math.ceil(rows / chunk_rows)
    count = max(1, min(shards, chunks))
    bounds = [min(rows, (k * chunks // count) * chunk_rows) for k in range(count + 1)]
    return list(itertools.pairwise(bounds))


def shard_count(spec: BatchPredictSpec, ctx: RunContext) -> int:
    """`shards` as a number: `auto` is the live workers consuming the job's queue (at least 1)."""
    if spec.shards != "auto":
        return spec.shards
    if ctx.live_workers is None:
        return 1
    return max(1, ctx.live_workers(routing.queue_for(spec)))


def split(spec: BatchPredictSpec, ctx: RunContext, rows: int, version: int) -> None:
    """Queue the job's shards and end the attempt (AwaitingShards); returns only when the
    job is better scored in one piece (one shard, or one chunk of rows)."""
    count = shard_count(spec, ctx)
    ranges = split_rows(rows, count, spec.chunk_rows)
    if len(ranges) < 2:
        if spec.shards != 1:
            ctx.log(f"scoring in one piece: {rows} rows, shards={spec.shards} gave 1 shard")
        return
    output_format: str = spec.output_format
    if spec.output_layout == "file":
        output_format = _shard_format(spec.output_format)
    shard_spec = spec.model_copy(
        update={
            "shards": 1,
            "version": version,
            "output_layout": "file",
            "output_format": output_format,
        }
    )
    largest = max(stop - start for start, stop in ranges)
    ctx.log(f"splitting {rows:,} rows into {len(ranges)} shards of up to {largest:,} rows")
    ctx.start_shards(shard_spec.model_dump(mode="json"), ranges)


def assemble(spec: BatchPredictSpec, ctx: RunContext) -> dict[str, Any]:
    """The job's result from its shards' results: one output file (or the list of parts)
    and one error file, in input order."""
    shards = ctx.shard_jobs()
    unfinished = [s for s in shards if s.state != "succeeded" or not s.result]
    if len(shards) != ctx.split_into or unfinished:
        raise JobFailure(
            f"{len(unfinished)} of the {ctx.split_into} shards did not succeed; cannot assemble"
        )
    results = [shard.result or {} for shard in shards]
    rows = sum(int(r["rows"]) for r in results)
    errors = sum(int(r["errors"]) for r in results)
    work = ctx.scratch_dir / "assemble"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        error_file = _join_errors(ctx, work, results, errors)
        budget = int(spec.max_error_fraction * rows)
        if errors > budget:
            ctx.attach_result({"error_file": error_file})
            raise JobFailure(
                f"{errors} of the dataset's {rows} rows could not be scored, more than "
                f"max_error_fraction={spec.max_error_fraction}; "
                "GET /api/v1/jobs/<id>/errors lists them"
            )
        result: dict[str, Any] = {
            "model": spec.model,
            "version": results[0]["version"],
            "rows": rows,
            "scored": rows - errors,
            "errors": errors,
            "error_file": error_file,
            "shards": len(shards),
        }
        if spec.output_layout == "parts":
            pairs = zip(shards, results, strict=True)
            parts = [r["output"] | {"job": s.id} for s, r in pairs if r.get("output")]
            result |= {"output": None, "parts": parts}
        else:
            result["output"] = _join_outputs(spec, ctx, work, results, rows)
        result |= _text_fields(results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    split_at = min(shard.created_at for shard in shards)
    elapsed = (datetime.now(UTC) - split_at).total_seconds()
    result["rows_per_s"] = round(rows / elapsed, 1) if elapsed > 0 else None
    return result


def _join_outputs(
    spec: BatchPredictSpec,
    ctx: RunContext,
    work: Path,
    results: list[dict[str, Any]],
    rows: int,
) -> dict[str, Any] | None:
    """The shards' outputs as one file of the format asked for, stored."""
    fmt = spec.output_format
    parts = [r["output"] for r in results if r.get("output")]
    if not parts:
        return None
    target = work / f"output.{fmt}"
    paths = [ctx.runtime.store.path(part["digest"]) for part in parts]
    started = time.monotonic()

    def joined(count: int, done: int) -> None:
        ctx.raise_if_cancelled()
        rate = done / max(time.monotonic() - started, 1e-9)
        ctx.progress(1.0, f"joined {count}/{len(parts)} shards, {done}/{rows} rows "
                     f"({rate:,.0f} rows/s)")  # fmt: skip

    copied = fmt == "parquet" and all(part["format"] == "parquet" for part in parts)
    if copied:
        ends = list(itertools.accumulate(int(part["rows"]) for part in parts))
        try:
            parquet_concat.concatenate(paths, target, lambda k: joined(k + 1, ends[k]))
        except parquet_concat.Unsupported as exc:
            ctx.log(f"joining the shards' Parquet files by decoding them: {exc}")
            copied = False
    if not copied:
        _stream_outputs(spec, paths, parts, target, joined)
    stored = ctx.runtime.store.move_file(target)
    return {"digest": stored.digest, "size": stored.size, "format": fmt, "rows": rows}


def _stream_outputs(
    spec: BatchPredictSpec,
    paths: list[Path],
    parts: list[dict[str, Any]],
    target: Path,
    joined: Callable[[int, int], None],
) -> None:
    """The shards' outputs, record batch by record batch (each a chunk, as the shard scored
    it), streamed into `target` in the format asked for."""
    output = batch_parts.Output(target, spec.output_format)
    done = 0
    with contextlib.closing(output):
        for count, (path, part) in enumerate(zip(paths, parts, strict=True), start=1):
            for batch in _shard_output(path, part["format"], spec):
                output.write(batch)
                done += batch.num_rows
            joined(count, done)


def _shard_output(path: Path, fmt: str, spec: BatchPredictSpec) -> Iterator[pa.RecordBatch]:
    """A shard's output, chunk by chunk: Arrow as the shard wrote it, or Parquet from a shard
    that an earlier Kiln split (a job sharded across an upgrade), read in whole chunks."""
    if fmt == "arrow":
        return datasets.read_arrow(path)
    return datasets.iter_batches(path, fmt, spec.chunk_rows)


def _join_errors(
    ctx: RunContext, work: Path, results: list[dict[str, Any]], errors: int
) -> dict[str, Any] | None:
    """The shards' error files (JSONL, whole lines, rows numbered in the dataset) joined in
    order; stored, or None when no row failed."""
    parts = [r["error_file"] for r in results if r.get("error_file")]
    if not parts:
        return None
    path = work / "errors.jsonl"
    with path.open("wb") as sink:
        for part in parts:
            with ctx.runtime.store.path(part["digest"]).open("rb") as source:
                shutil.copyfileobj(source, sink)
    stored = ctx.runtime.store.move_file(path)
    return {"digest": stored.digest, "size": stored.size, "format": "jsonl", "rows": errors}


def _text_fields(results: list[dict[str, Any]]) -> dict[str, Any]:
    """An hf version's task and text column, and the tokens all shards scored."""
    first = results[0]
    if "task" not in first:
        return {}
    fields: dict[str, Any] = {"task": first["task"], "text_column": first["text_column"]}
    fields["tokens"] = sum(int(r.get("tokens", 0)) for r in results)
    return fields
