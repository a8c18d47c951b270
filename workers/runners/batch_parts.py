"""batch_predict's part-commit protocol: how scored chunks are kept in the job's scratch folder
so that a new attempt resumes where the last one stopped, without a lost or repeated row.

Each scored chunk is two Arrow IPC part files, `err-<index>.arrow` then `out-<index>.arrow`,
each written under a temporary name and renamed into place: the output part's rename commits
the chunk. `committed` counts the chunks whose parts read back whole (a machine crash may
tear the last ones); `parts` reads them back in order. manifest.json, written once, pins
what the job scores with. Nothing is fsynced here: see workers/runners/batch.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from kiln import datasets

MANIFEST = "manifest.json"


@dataclass
class Progress:
    """The committed chunks and the input rows and error rows they hold."""

    chunks: int = 0
    rows: int = 0
    errors: int = 0


def commit_chunk(work: Path, index: int, errors: pa.RecordBatch, output: pa.RecordBatch) -> None:
    """Write chunk `index`: its error rows, then its output rows, whose rename commits it."""
    _write_part(work / f"err-{index:06d}.arrow", errors)
    _write_part(work / f"out-{index:06d}.arrow", output)


def _write_part(path: Path, batch: pa.RecordBatch) -> None:
    """Write the part file under a temporary name, then rename it: it is whole or absent."""
    tmp = path.with_suffix(".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    os.replace(tmp, path)


def committed(work: Path) -> Progress:
    """What the parts already written hold: chunks 0, 1, ... up to the first one whose
    parts are missing or do not read back whole (torn by a machine crash)."""
    progress = Progress()
    while True:
        index = progress.chunks
        try:
            rows, errors = (
                _part_rows(work / f"{kind}-{index:06d}.arrow") for kind in ("out", "err")
            )
        except (OSError, pa.ArrowInvalid):
            return progress
        progress.chunks, progress.rows, progress.errors = (
            index + 1,
            progress.rows + rows,
            progress.errors + errors,
        )


def _part_rows(path: Path) -> int:
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def read_manifest(work: Path) -> dict[str, Any] | None:
    try:
        return json.loads((work / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_manifest(work: Path, manifest: dict[str, Any]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, work / MANIFEST)


def parts(work: Path, prefix: str, count: int) -> Iterator[pa.RecordBatch]:
    for index in range(count):
        with pa.memory_map(str(work / f"{prefix}-{index:06d}.arrow")) as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)


class Output:
    """A file of `fmt` written batch by batch, opened at the first row; close() gives its
    path, or None when no batch had rows."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt = path, fmt
        self._writer: datasets.TableWriter | None = None
        self._finished: Path | None = None

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows:
            self._writer = self._writer or datasets.TableWriter(self.path, self.fmt, batch.schema)
            self._writer.write(batch)

    def close(self) -> Path | None:
        """Finish the file (again: no-op); its path."""
        if self._writer is not None:
            self._writer.close()
            self._writer, self._finished = None, self.path
        return self._finished


def concatenate(work: Path, prefix: str, count: int, fmt: str, name: str) -> Path | None:
    """Stream the committed parts into one file of `fmt`; None when there are no rows."""
    output = Output(work / name, fmt)
    for batch in parts(work, prefix, count):
        output.write(batch)
    return output.close()
