"""batch_predict's part-commit protocol: how scored chunks are kept so that a new attempt, on
this host or any other, resumes where the last one stopped, without a lost or repeated row.

Each scored chunk is two Arrow IPC part files, `err-<index>.arrow` then `out-<index>.arrow`,
written to the job's scratch folder, each under a temporary name and renamed into place:
the output part's rename commits the chunk on this host. `committed` counts the chunks
whose parts read back whole (a machine crash may tear the last ones); `parts` reads them
back in order. manifest.json, written once, pins what the job scores with.

Given the job's files in the artifact store (`files`, kiln/job_files.py), the store is
where chunks are committed and the scratch folder is only this host's cache: both parts go
up, then `commit-<index>.json` (their sizes and CRCs) is written last, and that put
commits the chunk. `restore` makes the scratch folder hold exactly the chunks the store
has committed, chunks 0, 1, ... up to the first without a commit marker or whose parts do
not match it (fetching the ones this host lacks), so an attempt on another host goes on
from there. Nothing is fsynced in the scratch folder: see workers/runners/batch.py.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from kiln import datasets
from kiln.job_files import JobFiles

MANIFEST = "manifest.json"
#: The folder of a job's files (kiln/job_files.py) that holds its committed chunks.
FOLDER = "batch"
_KINDS = ("err", "out")


@dataclass
class Progress:
    """The committed chunks and the input rows and error rows they hold."""

    chunks: int = 0
    rows: int = 0
    errors: int = 0


def commit_chunk(
    work: Path,
    index: int,
    errors: pa.RecordBatch,
    output: pa.RecordBatch,
    files: JobFiles | None = None,
) -> None:
    """Write chunk `index`: its error rows, then its output rows, whose rename commits it
    here; with `files`, both parts go up and the chunk's commit marker, written last,
    commits it in the store."""
    marker: dict[str, Any] = {"rows": output.num_rows, "errors": errors.num_rows}
    for kind, batch in zip(_KINDS, (errors, output), strict=True):
        path = work / _part_name(kind, index)
        data = _write_part(path, batch)
        if files is not None:  # a part file is replaced or deleted, never written to again
            files.put_file(path.name, path, immutable=True)
            marker[kind] = {"size": len(data), "crc32": zlib.crc32(data)}
    if files is not None:
        files.put_bytes(_marker_name(index), json.dumps(marker).encode())


def _part_name(kind: str, index: int) -> str:
    return f"{kind}-{index:06d}.arrow"


def _marker_name(index: int) -> str:
    return f"commit-{index:06d}.json"


def _fingerprint(path: Path) -> dict[str, int]:
    """What a commit marker records of a part: its size and CRC-32."""
    crc = 0
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            crc = zlib.crc32(block, crc)
    return {"size": path.stat().st_size, "crc32": crc}


def _matches(path: Path, fingerprint: dict[str, int]) -> bool:
    try:
        return path.stat().st_size == fingerprint["size"] and _fingerprint(path) == fingerprint
    except FileNotFoundError:
        return False


def restore(work: Path, files: JobFiles) -> int:
    """Make the scratch folder hold the chunks committed in the store, and only those:
    fetch the parts this host lacks, drop parts the store never committed (they are
    scored again). Returns how many chunks were fetched. The markers from the first chunk
    that cannot be read back whole on are deleted: that chunk and the rest are scored again."""
    names = set(files.names())
    index = fetched = 0
    while _marker_name(index) in names:
        marker = _read_marker(files, index)
        found = [_cached(work, files, kind, index, marker) for kind in _KINDS] if marker else []
        if not found or None in found:
            break
        fetched += "fetched" in found
        index += 1
    for name in sorted(names):
        if name.startswith("commit-") and int(name[7:13]) >= index:
            files.remove(name)  # a later attempt commits that chunk afresh
    for kind in _KINDS:
        for path in work.glob(f"{kind}-*.arrow"):
            if int(path.stem.split("-")[1]) >= index:
                path.unlink()  # written here, never committed in the store
    return fetched


def _read_marker(files: JobFiles, index: int) -> dict[str, Any] | None:
    raw = files.get_bytes(_marker_name(index))
    try:
        marker = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return marker if isinstance(marker, dict) and set(_KINDS) <= marker.keys() else None


def _cached(
    work: Path, files: JobFiles, kind: str, index: int, marker: dict[str, Any]
) -> str | None:
    """ "here" if this host holds the part the marker commits, "fetched" if it had to come
    from the store, None if the store's copy does not match its marker either."""
    path = work / _part_name(kind, index)
    if _matches(path, marker[kind]):
        return "here"
    work.mkdir(parents=True, exist_ok=True)
    if files.get_file(path.name, path) and _matches(path, marker[kind]):
        return "fetched"
    path.unlink(missing_ok=True)
    return None


def clear(work: Path, files: JobFiles | None = None) -> None:
    """Drop the job's parts: the scratch folder, and the store's copies with `files`."""
    shutil.rmtree(work, ignore_errors=True)
    if files is not None:
        files.clear()


def _write_part(path: Path, batch: pa.RecordBatch) -> bytes:
    """Write the part file under a temporary name, then rename it: it is whole or absent.
    Returns its bytes (serialised in memory once, for the file and the store alike)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    data = sink.getvalue().to_pybytes()
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return data


def committed(work: Path) -> Progress:
    """What the parts already written hold: chunks 0, 1, ... up to the first one whose
    parts are missing or do not read back whole (torn by a machine crash)."""
    progress = Progress()
    while True:
        index = progress.chunks
        try:
            rows, errors = (_part_rows(work / _part_name(kind, index)) for kind in ("out", "err"))
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


def read_manifest(work: Path, files: JobFiles | None = None) -> dict[str, Any] | None:
    """The manifest: the store's with `files` (the scratch folder's copy is a cache)."""
    try:
        if files is not None:
            raw = files.get_bytes(MANIFEST)
            return json.loads(raw) if raw is not None else None
        return json.loads((work / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_manifest(work: Path, manifest: dict[str, Any], files: JobFiles | None = None) -> None:
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, work / MANIFEST)
    if files is not None:
        files.put_bytes(MANIFEST, json.dumps(manifest).encode())


def parts(work: Path, prefix: str, count: int) -> Iterator[pa.RecordBatch]:
    for index in range(count):
        with pa.memory_map(str(work / _part_name(prefix, index))) as source:
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
