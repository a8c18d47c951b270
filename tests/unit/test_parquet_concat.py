"""Parquet files joined by copying their row groups: the file one writer would have written."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln import datasets, parquet_concat


def _batches(rows: int, per_batch: int) -> list[pa.RecordBatch]:
    """Batches of the columns a batch job writes, with nulls, strings, lists and booleans."""
    rng = np.random.default_rng(rows)
    labels = pa.array(["cat", "dog", "ünïcode"])
    batches = []
    for start in range(0, rows, per_batch):
        n = min(per_batch, rows - start)
        missing = rng.random(n) < 0.1
        batches.append(
            pa.RecordBatch.from_pydict(
                {
                    "id": pa.array(np.arange(start, start + n)),
                    "prediction": labels.take(pa.array(rng.integers(0, 3, n), mask=missing)),
                    "score": pa.array(rng.random(n, dtype=np.float32), mask=missing),
                    "embedding": pa.array(rng.random((n, 3)).tolist()),
                    "flag": pa.array(rng.random(n) < 0.5),
                }
            )
        )
    return batches


def _write(path: Path, batches: list[pa.RecordBatch]) -> Path:
    with datasets.TableWriter(path, "parquet", batches[0].schema) as writer:
        for batch in batches:
            writer.write(batch)
    return path


@pytest.mark.parametrize("cuts", [[0, 40], [0, 1, 2, 40], [0, 17, 23, 39, 40]])
def test_joined_parts_are_the_bytes_of_the_whole_file(tmp_path, cuts):
    """40 row groups: more than the 15 a short list header counts."""
    batches = _batches(4_000, 100)
    whole = _write(tmp_path / "whole.parquet", batches)
    parts = [
        _write(tmp_path / f"part{k}.parquet", batches[start:stop])
        for k, (start, stop) in enumerate(itertools.pairwise(cuts))
    ]
    copied: list[int] = []
    parquet_concat.concatenate(parts, tmp_path / "joined.parquet", copied.append)
    assert (tmp_path / "joined.parquet").read_bytes() == whole.read_bytes()
    assert copied == list(range(len(parts)))
    assert pq.read_table(tmp_path / "joined.parquet").equals(pq.read_table(whole))


def test_a_footer_decodes_and_encodes_to_its_own_bytes(tmp_path):
    raw = _write(tmp_path / "t.parquet", _batches(300, 100)).read_bytes()
    length = int.from_bytes(raw[-8:-4], "little")
    footer = raw[-8 - length : -8]
    assert parquet_concat.encode(parquet_concat.decode(footer)) == footer


def test_parts_of_different_schemas_are_refused_and_nothing_is_written(tmp_path):
    first = _write(tmp_path / "a.parquet", _batches(100, 50))
    other = pa.RecordBatch.from_pydict({"id": pa.array([1, 2])})
    second = _write(tmp_path / "b.parquet", [other])
    with pytest.raises(parquet_concat.Unsupported, match="differ"):
        parquet_concat.concatenate([first, second], tmp_path / "joined.parquet")
    assert not (tmp_path / "joined.parquet").exists()


def test_a_file_with_a_page_index_is_refused(tmp_path):
    table = pa.Table.from_batches(_batches(100, 50))
    pq.write_table(table, tmp_path / "indexed.parquet", write_page_index=True)
    with pytest.raises(parquet_concat.Unsupported, match="page index"):
        parquet_concat.concatenate([tmp_path / "indexed.parquet"] * 2, tmp_path / "j.parquet")


@pytest.mark.parametrize(
    "content",
    [b"", b"PAR1", b"not parquet at all", b"PAR1" + b"\x15" * 64 + b"\x40\x00\x00\x00PAR1"],
)
def test_what_is_not_a_plain_parquet_file_is_refused(tmp_path, content):
    path = tmp_path / "bad.parquet"
    path.write_bytes(content)
    with pytest.raises(parquet_concat.Unsupported):
        parquet_concat.concatenate([path], tmp_path / "joined.parquet")


def test_a_footer_nested_past_any_parquet_schema_is_refused():
    deep = b"\x1c" * 100 + b"\x00" * 101  # struct field 1 inside struct field 1 ...
    with pytest.raises(parquet_concat.Unsupported, match="deep"):
        parquet_concat.decode(deep)
