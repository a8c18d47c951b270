"""Dataset files: check an upload against its declared format, and stream it back as Arrow.

Formats: CSV, Parquet and JSONL are tables; NPZ holds numpy arrays. Every reader streams
(`iter_batches`), so a worker's memory does not grow with the file. An NPZ file is read as
a table too: each array is one row per entry of its first axis, a 1-D array `y` becomes
column `y`, and an array `x` of shape (n, d1, d2, ...) is flattened row-major into columns
`x_0 ... x_{k-1}`. Every array must have the same first dimension. The .npy members are read
through numpy's header parser and then as raw bytes, a few rows at a time; an object array
is refused before any of its data is read (the guarantee of np.load(allow_pickle=False)),
so nothing in an upload is ever unpickled.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from kiln import safejson
from kiln.errors import UnsupportedDataset

FORMATS = ("csv", "parquet", "jsonl", "npz")
#: Formats a job can write its output in (NPZ is input only). `arrow` is the Arrow IPC
#: file format: no encoding at all, read back memory-mapped (pyarrow, Polars, DuckDB).
OUTPUT_FORMATS = ("parquet", "csv", "jsonl", "arrow")
_SUFFIXES = {"csv": "csv", "parquet": "parquet", "pq": "parquet", "jsonl": "jsonl"}
_SUFFIXES |= {"ndjson": "jsonl", "npz": "npz"}
#: The most bytes an NPZ's arrays may hold uncompressed.
MAX_NPZ_BYTES = 8 * 1024**3
#: The most columns a dataset may have (a model reads at most 100,000 features); an NPZ's
#: arrays are checked before their column names are made.
MAX_COLUMNS = 100_000
#: Arrow readers parse this many bytes at a time.
_BLOCK_BYTES = 1 << 20
#: Anything a malformed file can make a parser raise; all of it means "not this format".
_PARSE_ERRORS = (
    pa.ArrowException,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OSError,
    EOFError,
    OverflowError,
    UnicodeDecodeError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    struct.error,
    SyntaxError,  # numpy parses an .npy header with ast.literal_eval
    NotImplementedError,
    RecursionError,
)


@dataclass(frozen=True)
class DatasetInfo:
    format: str
    rows: int
    columns: list[dict[str, str]]


def format_of(filename: str) -> str:
    """The format a file name declares by its suffix; UnsupportedDataset if none we read."""
    suffix = Path(filename).suffix.lower().lstrip(".")
    if suffix not in _SUFFIXES:
        raise UnsupportedDataset(
            f"cannot read {filename!r}: supported formats are {', '.join(FORMATS)}"
        )
    return _SUFFIXES[suffix]


def inspect(path: Path, fmt: str) -> DatasetInfo:
    """Parse the whole file once, streaming, so a bad file is refused at upload time."""
    rows, schema = 0, None
    for batch in iter_batches(path, fmt, 65_536):
        rows += batch.num_rows
        schema = batch.schema
    if schema is None or not schema.names or rows == 0:
        raise UnsupportedDataset("the file has no rows")
    if len(schema) > MAX_COLUMNS:
        raise UnsupportedDataset(f"the file has {len(schema)} columns; at most {MAX_COLUMNS}")
    columns = [{"name": f.name, "dtype": str(f.type)} for f in schema]
    return DatasetInfo(format=fmt, rows=rows, columns=columns)


def iter_batches(
    path: Path, fmt: str, batch_rows: int, start_row: int = 0
) -> Iterator[pa.RecordBatch]:
    """The file's rows in order from row `start_row`, as record batches of exactly
    `batch_rows` rows (the last may be shorter), so the k-th batch always holds the same rows.
    Raises UnsupportedDataset (and only that) when the file is not valid `fmt`, at whatever
    row that shows. A Parquet file's row groups before `start_row` are not read at all (a
    shard of a batch job starts there); other formats are parsed up to it."""
    if fmt not in FORMATS:
        raise UnsupportedDataset(f"unsupported format {fmt!r}")
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    try:
        with ExitStack() as stack:
            if fmt == "parquet":
                batches, skipped = _parquet_from(path, stack, start_row)
            else:
                batches, skipped = _READERS[fmt](path, stack), 0
            yield from _rechunk(_drop(batches, start_row - skipped), batch_rows)
    except UnsupportedDataset:
        raise
    except _PARSE_ERRORS as exc:
        raise UnsupportedDataset(
            f"the file is not valid {fmt.upper()}: {_parse_failure(path, exc)}"
        ) from None


def _parse_failure(path: Path, exc: Exception) -> str:
    """Why Arrow could not parse the file, in the user's terms where Arrow's are about its
    blocks: a line longer than a block reads as a straddling object, or, as the first
    line, as an empty file."""
    limit = f"{_BLOCK_BYTES >> 20} MiB"
    text = str(exc)
    if "straddles two block boundaries" in text:
        return f"a row is longer than {limit}, the longest Kiln reads"
    if "cannot infer number of columns" in text and path.stat().st_size > 0:
        return f"the first line (the header row) is longer than {limit}, the longest Kiln reads"
    return text


def read_table(path: Path, fmt: str) -> pa.Table:
    """The whole file as one table (for data that must fit in memory, such as training)."""
    batches = list(iter_batches(path, fmt, 65_536))
    if not batches:
        raise UnsupportedDataset("the file has no rows")
    return pa.Table.from_batches(batches)


def _rechunk(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        held += batch.num_rows
        if held < size:
            continue
        merged = pa.concat_batches(pending)
        start = 0
        while held - start >= size:
            yield merged.slice(start, size)
            start += size
        pending = [merged.slice(start)] if start < held else []
        held -= start
    if held:
        yield pa.concat_batches(pending)


def _drop(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """The batches without their first `rows` rows."""
    for batch in batches:
        if rows >= batch.num_rows:
            rows -= batch.num_rows
            continue
        yield batch.slice(rows) if rows else batch
        rows = 0


def _parquet_from(
    path: Path, stack: ExitStack, start_row: int
) -> tuple[Iterator[pa.RecordBatch], int]:
    """The Parquet file's batches from the row group that holds `start_row` on, and how
    many rows the row groups skipped held."""
    handle = stack.enter_context(pq.ParquetFile(path))
    skipped, first_group = 0, 0
    metadata = handle.metadata
    while first_group < metadata.num_row_groups:
        rows = metadata.row_group(first_group).num_rows
        if skipped + rows > start_row:
            break
        skipped += rows
        first_group += 1
    groups = list(range(first_group, metadata.num_row_groups))
    return handle.iter_batches(batch_size=65_536, row_groups=groups), skipped


def _csv(path: Path, stack: ExitStack) -> Iterator[pa.RecordBatch]:
    reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=_BLOCK_BYTES))
    stack.callback(reader.close)
    # Column names are decoded lazily: touching the schema fails a binary file here.
    _ = [field.name for field in reader.schema]
    yield from reader


def _parquet(path: Path, stack: ExitStack) -> Iterator[pa.RecordBatch]:
    handle = stack.enter_context(pq.ParquetFile(path))
    yield from handle.iter_batches(batch_size=65_536)


def _jsonl(path: Path, stack: ExitStack) -> Iterator[pa.RecordBatch]:
    _check_jsonl_depth(path)
    reader = pajson.open_json(path, read_options=pajson.ReadOptions(block_size=_BLOCK_BYTES))
    stack.callback(reader.close)
    yield from reader


def _check_jsonl_depth(path: Path) -> None:
    """Refuse a line nested deeper than safejson.MAX_DEPTH before pyarrow reads any of it:
    its JSON reader recurses, and crashes the process (SIGSEGV) past ~20,000 levels. A line
    with no more brackets than the limit cannot be deeper; others get the exact scan."""
    carry = b""
    number = 0
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK_BYTES):
            lines = (carry + block).split(b"\n")
            carry = lines.pop()
            if len(carry) > _BLOCK_BYTES:  # pyarrow would refuse it too, straddling blocks
                raise UnsupportedDataset(f"line {number + 1} is longer than {_BLOCK_BYTES} bytes")
            for line in lines:
                number += 1
                _check_line_depth(line, number)
    _check_line_depth(carry, number + 1)


def _check_line_depth(line: bytes, number: int) -> None:
    if line.count(b"[") + line.count(b"{") <= safejson.MAX_DEPTH:
        return
    try:
        text = line.decode("utf-8", "replace")
        safejson.check_depth(text, what=f"line {number}", strings=False)
    except safejson.InvalidJson as exc:
        raise UnsupportedDataset(f"the file is not valid JSONL: {exc.message}") from None


def _npz(path: Path, stack: ExitStack) -> Iterator[pa.RecordBatch]:
    archive = stack.enter_context(zipfile.ZipFile(path))
    members = [m for m in archive.namelist() if m.endswith(".npy")]
    if not members:
        raise UnsupportedDataset("the NPZ file holds no arrays")
    # A zip's members may inflate a thousandfold (a zip bomb): bound what the directory
    # declares; zipfile never returns more than a member's declared size.
    inflated = sum(archive.getinfo(m).file_size for m in members)
    if inflated > MAX_NPZ_BYTES:
        raise UnsupportedDataset(
            f"the NPZ arrays hold {inflated} bytes uncompressed; at most {MAX_NPZ_BYTES} are read"
        )
    arrays = [
        _NpyStream(m.removesuffix(".npy"), stack.enter_context(archive.open(m))) for m in members
    ]
    rows = {a.shape[0] for a in arrays}
    if len(rows) != 1:
        raise UnsupportedDataset("every array in the NPZ file must have the same first dimension")
    width = sum(max(1, a.width) for a in arrays)
    if width > MAX_COLUMNS:
        raise UnsupportedDataset(
            f"the NPZ arrays flatten to {width} columns; at most {MAX_COLUMNS} are read"
        )
    names = [name for a in arrays for name in a.column_names]
    if len(set(names)) != len(names):
        raise UnsupportedDataset(f"the NPZ arrays flatten to duplicate column names: {names}")
    left = rows.pop()
    step = max(1, min(65_536, (_BLOCK_BYTES * 8) // max(1, sum(a.row_bytes for a in arrays))))
    while left > 0:
        take = min(step, left)
        columns = [column for a in arrays for column in a.read(take)]
        yield pa.RecordBatch.from_arrays(columns, names=names)
        left -= take


class _NpyStream:
    """One .npy member of an NPZ archive, read a few rows at a time without loading it."""

    def __init__(self, name: str, handle: IO[bytes]) -> None:
        version = np.lib.format.read_magic(handle)
        if version not in _HEADER_READERS:
            raise UnsupportedDataset(f"array {name!r} uses .npy format {version}; 1.0 or 2.0 read")
        shape, fortran, dtype = _HEADER_READERS[version](handle)
        if dtype.hasobject:
            raise UnsupportedDataset(f"array {name!r} holds Python objects; only numbers are read")
        if dtype.fields is not None or dtype.subdtype is not None:
            raise UnsupportedDataset(f"array {name!r} has a structured dtype; use plain arrays")
        if not shape:
            raise UnsupportedDataset(f"array {name!r} is a scalar; arrays need one row per entry")
        if fortran and len(shape) > 1:
            raise UnsupportedDataset(f"array {name!r} is Fortran-ordered; save it C-ordered")
        self.name, self.handle, self.dtype, self.shape = name, handle, dtype, shape
        self.width = math.prod(shape[1:]) if len(shape) > 1 else 0  # exact: no int64 wrap
        self.row_bytes = dtype.itemsize * max(1, self.width)

    @property
    def column_names(self) -> list[str]:
        if len(self.shape) == 1:
            return [self.name]
        return [f"{self.name}_{i}" for i in range(self.width)]

    def read(self, rows: int) -> list[pa.Array]:
        wanted = rows * self.row_bytes
        data = self.handle.read(wanted)
        if len(data) != wanted:
            raise UnsupportedDataset(f"array {self.name!r} ends before its declared shape")
        values = np.frombuffer(data, dtype=self.dtype)
        if not self.dtype.isnative:  # Arrow holds native byte order only
            values = values.astype(self.dtype.newbyteorder("="))
        if len(self.shape) == 1:
            return [pa.array(values)]
        matrix = values.reshape(rows, self.width)
        return [pa.array(matrix[:, i]) for i in range(self.width)]


_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
_READERS = {"csv": _csv, "parquet": _parquet, "jsonl": _jsonl, "npz": _npz}


def read_arrow(path: Path) -> Iterator[pa.RecordBatch]:
    """An Arrow IPC file's record batches, memory-mapped (a job's `arrow` output)."""
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        for index in range(reader.num_record_batches):
            yield reader.get_batch(index)


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns a Parquet output dictionary-encodes: text, whose values repeat (a label).
    Numbers are written plain: ids, scores and probabilities are nearly all distinct, and
    trying a dictionary before falling back took half the encoding time and made the file
    40% larger (measured on 10^6 rows of id, label, score)."""
    repeating = (pa.types.is_string, pa.types.is_large_string, pa.types.is_dictionary)
    return [f.name for f in schema if any(test(f.type) for test in repeating)]


class TableWriter:
    """Write record batches to a Parquet, CSV, JSONL or Arrow IPC file, streaming."""

    def __init__(self, path: Path, fmt: str, schema: pa.Schema) -> None:
        if fmt not in OUTPUT_FORMATS:
            raise ValueError(f"cannot write {fmt!r}; formats: {', '.join(OUTPUT_FORMATS)}")
        self.fmt = fmt
        self._writer: Any
        if fmt == "parquet":
            self._writer = pq.ParquetWriter(
                path, schema, use_dictionary=_dictionary_columns(schema)
            )
        elif fmt == "csv":
            self._writer = pacsv.CSVWriter(path, schema)
        elif fmt == "arrow":
            self._writer = pa.ipc.new_file(str(path), schema)
        else:
            self._writer = path.open("w", encoding="utf-8")

    def write(self, batch: pa.RecordBatch) -> None:
        if self.fmt == "jsonl":
            lines = (json.dumps(row, default=str) for row in batch.to_pylist())
            self._writer.write("".join(f"{line}\n" for line in lines))
        else:
            self._writer.write_batch(batch)

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
