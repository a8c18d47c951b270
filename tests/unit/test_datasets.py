"""kiln.datasets: every format round-trips through its reader, and garbage is refused cleanly."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln import datasets
from kiln.errors import UnsupportedDataset

_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_names = st.lists(
    st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True), min_size=1, max_size=5, unique=True
)
_column_kinds = st.sampled_from(["int", "float", "string"])


@st.composite
def tables(draw: st.DrawFn) -> pa.Table:
    """A random table of int64, float64 and string columns (strings never look numeric, so
    CSV and JSON type inference reads back the type that was written)."""
    names = draw(_names)
    rows = draw(st.integers(min_value=1, max_value=60))
    columns = {}
    for name in names:
        kind = draw(_column_kinds)
        if kind == "int":
            values = st.integers(min_value=-(2**53), max_value=2**53)
            columns[name] = pa.array(
                draw(st.lists(values, min_size=rows, max_size=rows)), pa.int64()
            )
        elif kind == "float":
            values = st.floats(allow_nan=False, allow_infinity=False, width=64)
            floats = draw(st.lists(values, min_size=rows, max_size=rows))
            columns[name] = pa.array([float(v) + 0.5 if v == int(v) else v for v in floats])
        else:
            values = st.text(alphabet="abcdefghij KLM", min_size=0, max_size=8).map(
                lambda s: f"s{s}"
            )
            columns[name] = pa.array(draw(st.lists(values, min_size=rows, max_size=rows)))
    return pa.table(columns)


def _write(table: pa.Table, fmt: str, path: Path) -> None:
    with datasets.TableWriter(path, fmt, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=7):
            writer.write(batch)


def _read(path: Path, fmt: str, batch_rows: int) -> pa.Table:
    return pa.Table.from_batches(list(datasets.iter_batches(path, fmt, batch_rows)))


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
@_SETTINGS
@given(table=tables(), batch_rows=st.integers(min_value=1, max_value=50))
def test_a_random_table_round_trips_through_each_tabular_format(fmt, table, batch_rows):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data.{fmt}"
        _write(table, fmt, path)

        read = _read(path, fmt, batch_rows)
        info = datasets.inspect(path, fmt)
        sizes = [b.num_rows for b in datasets.iter_batches(path, fmt, batch_rows)]

    assert read.equals(table)
    assert info.rows == table.num_rows
    assert [c["name"] for c in info.columns] == table.column_names
    # Every batch but the last has exactly batch_rows rows: the k-th batch is stable.
    assert all(size == batch_rows for size in sizes[:-1])
    assert 0 < sizes[-1] <= batch_rows


@_SETTINGS
@given(table=tables())
def test_a_random_table_round_trips_through_an_arrow_output(table):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "output.arrow"
        _write(table, "arrow", path)
        batches = list(datasets.read_arrow(path))

    assert pa.Table.from_batches(batches, table.schema).equals(table)
    # Each written batch is one record batch of the file (a batch job's chunk).
    assert [b.num_rows for b in batches] == [b.num_rows for b in table.to_batches(7)]


def test_a_parquet_output_dictionary_encodes_text_and_writes_numbers_plain(tmp_path):
    rows = 1000
    table = pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "label": pa.array(["cat", "dog"] * (rows // 2)),
            "score": pa.array([i / rows for i in range(rows)], pa.float32()),
        }
    )
    _write(table, "parquet", tmp_path / "out.parquet")

    columns = pq.ParquetFile(tmp_path / "out.parquet").metadata.row_group(0)
    dictionary = {columns.column(i).path_in_schema: columns.column(i).has_dictionary_page
                  for i in range(columns.num_columns)}  # fmt: skip
    assert dictionary == {"id": False, "label": True, "score": False}
    assert _read(tmp_path / "out.parquet", "parquet", 100).equals(table)


_dtypes = st.sampled_from(["<f4", "<f8", "<i8", "<i4", "|u1", ">f4", "|b1"])


@_SETTINGS
@given(
    rows=st.integers(min_value=1, max_value=40),
    inner=st.lists(st.integers(min_value=1, max_value=3), min_size=0, max_size=2),
    dtype=_dtypes,
    with_y=st.booleans(),
    compressed=st.booleans(),
    batch_rows=st.integers(min_value=1, max_value=50),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_random_arrays_round_trip_through_npz(
    rows, inner, dtype, with_y, compressed, batch_rows, seed
):
    rng = np.random.default_rng(seed)
    x = (rng.random((rows, *inner)) * 100).astype(dtype)
    arrays = {"x": x}
    if with_y:
        arrays["y"] = rng.integers(0, 5, rows)
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.npz"
        path.write_bytes(buffer.getvalue())
        read = _read(path, "npz", batch_rows)

    flat = x.reshape(rows, -1) if inner else x.reshape(rows, 1)
    x_names = [f"x_{i}" for i in range(flat.shape[1])] if inner else ["x"]
    assert read.column_names == x_names + (["y"] if with_y else [])
    got = np.column_stack([read[name].to_numpy() for name in x_names])
    np.testing.assert_array_equal(got, flat)
    if with_y:
        np.testing.assert_array_equal(read["y"].to_numpy(), arrays["y"])


@pytest.mark.parametrize("fmt", datasets.FORMATS)
@_SETTINGS
@given(content=st.binary(max_size=600))
def test_garbage_bytes_raise_nothing_but_unsupported_dataset(fmt, content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data"
        path.write_bytes(content)
        try:
            info = datasets.inspect(path, fmt)
        except UnsupportedDataset:
            return
    assert info.rows > 0  # some garbage is valid CSV or JSONL; then it must have rows


@_SETTINGS
@given(content=st.binary(max_size=400), name=st.sampled_from(["x.npy", "y.npy"]))
def test_a_zip_of_garbage_arrays_raises_only_unsupported_dataset(content, name):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, b"\x93NUMPY\x01\x00" + content)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.npz"
        path.write_bytes(buffer.getvalue())
        with pytest.raises(UnsupportedDataset):
            list(datasets.iter_batches(path, "npz", 10))


def test_an_object_array_is_refused_without_being_unpickled(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))

    with pytest.raises(UnsupportedDataset, match="Python objects"):
        datasets.inspect(path, "npz")


def test_arrays_of_different_lengths_are_refused(tmp_path):
    path = tmp_path / "ragged.npz"
    np.savez(path, x=np.zeros((3, 2)), y=np.zeros(4))

    with pytest.raises(UnsupportedDataset, match="same first dimension"):
        datasets.inspect(path, "npz")


@pytest.mark.parametrize(
    ("declared", "written"), [("parquet", "csv"), ("csv", "parquet"), ("npz", "jsonl")]
)
def test_content_is_checked_against_the_declared_format(tmp_path, declared, written):
    path = tmp_path / "data"
    _write(pa.table({"a": [1, 2], "b": ["sx", "sy"]}), written, path)

    with pytest.raises(UnsupportedDataset, match=f"not valid {declared.upper()}"):
        datasets.inspect(path, declared)


@pytest.mark.parametrize(
    ("filename", "fmt"),
    [
        ("a.CSV", "csv"),
        ("a.parquet", "parquet"),
        ("a.pq", "parquet"),
        ("a.jsonl", "jsonl"),
        ("a.ndjson", "jsonl"),
        ("a.npz", "npz"),
    ],
)
def test_the_format_is_named_by_the_suffix(filename, fmt):
    assert datasets.format_of(filename) == fmt


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"a,b\n1," + b"x" * (2 << 20) + b"\n", "a row is longer than 1 MiB"),
        (
            b",".join(b"c%d" % i for i in range(300_000)) + b"\n",
            r"the header row\) is longer than 1 MiB",
        ),
        (b"x" * (2 << 20), r"the header row\) is longer than 1 MiB"),
        (b"", "Empty CSV file"),
    ],
)
def test_a_line_longer_than_a_block_is_named_as_such(tmp_path, content, reason):
    path = tmp_path / "long.csv"
    path.write_bytes(content)
    with pytest.raises(UnsupportedDataset, match=reason):
        list(datasets.iter_batches(path, "csv", 100))
