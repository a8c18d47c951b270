"""Dataset files built to crash or exhaust the reader: refused (422) without the web ever
running a parser on them that could take its process down."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln import dataset_probe, datasets
from kiln.errors import UnsupportedDataset
from kiln.safejson import MAX_DEPTH

#: pyarrow's JSON reader segfaults on this (it recurses per level, ~20,000 crash it).
_BOMB_DEPTH = 50_000


def deep_jsonl(depth: int, opener: str = "[") -> bytes:
    closer = "]" if opener == "[" else "}"
    head = opener if opener == "[" else '{"k": '
    value = head * depth + "1" + closer * depth
    return f'{{"a": 1, "x": 0}}\n{{"a": 2, "x": {value}}}\n'.encode()


def _assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["code"] == code
    return body


def test_a_deep_jsonl_upload_answers_422_and_keeps_nothing(client, alice, settings):
    content = deep_jsonl(_BOMB_DEPTH)
    assert len(content) < 110_000
    response = client.post(
        "/api/v1/datasets", data={"file": (io.BytesIO(content), "bomb.jsonl")}, headers=alice
    )
    body = _assert_problem(response, 422, "unsupported_dataset")
    assert f"deeper than {MAX_DEPTH} levels" in body["detail"]
    assert "line 2" in body["detail"]
    assert not [p for p in settings.data_dir.rglob("*") if p.stat().st_size == len(content)]
    # The process that served it is still here, and answers the next request.
    assert client.get("/api/v1/datasets", headers=alice).status_code == 200


def test_the_jsonl_reader_is_never_handed_the_bomb(tmp_path):
    """In a child process (a crash must not take the tests down): pyarrow alone segfaults on
    the file; kiln.datasets refuses it first, so the child exits normally."""
    bomb = tmp_path / "bomb.jsonl"
    bomb.write_bytes(deep_jsonl(_BOMB_DEPTH))
    read = (
        "import sys; from pathlib import Path; from kiln import datasets\n"
        "try:\n"
        "    list(datasets.iter_batches(Path(sys.argv[1]), 'jsonl', 10))\n"
        "except datasets.UnsupportedDataset as exc:\n"
        "    print(exc.message)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", read, str(bomb)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "nests deeper than" in done.stdout


@given(depths=st.lists(st.integers(1, 3 * MAX_DEPTH), min_size=1, max_size=5))
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_jsonl_line_is_refused_exactly_when_it_nests_past_the_limit(tmp_path, depths):
    # Each line nests `depth` levels: the row object and depth - 1 arrays (under a key of
    # its own, so rows need not agree on a type), with brackets in a string that do not count.
    lines = [
        json.dumps(
            {"s": "[[[[{{{{" * 10, f"v{i}": json.loads("[" * (d - 1) + "]" * (d - 1) or "0")}
        )
        for i, d in enumerate(depths)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    if max(depths) > MAX_DEPTH:
        with pytest.raises(UnsupportedDataset, match="deeper than"):
            datasets.inspect(path, "jsonl")
    else:
        assert datasets.inspect(path, "jsonl").rows == len(depths)


def test_a_line_longer_than_the_reader_takes_is_refused(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_bytes(b'{"a": "' + b"x" * (3 * 1024 * 1024) + b'"}\n')
    with pytest.raises(UnsupportedDataset, match="line 1 is longer than"):
        datasets.inspect(path, "jsonl")


def _npz(path: Path, **arrays: np.ndarray) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            archive.writestr(f"{name}.npy", buffer.getvalue())


def test_an_npz_that_inflates_past_the_bound_is_refused_from_its_directory(tmp_path, monkeypatch):
    path = tmp_path / "bomb.npz"
    _npz(path, x=np.zeros((100_000, 4), np.float64))  # 3.2 MB of zeros in a few KB
    assert path.stat().st_size < 50_000
    monkeypatch.setattr(datasets, "MAX_NPZ_BYTES", 1024 * 1024)
    with pytest.raises(UnsupportedDataset, match="uncompressed; at most 1048576"):
        datasets.inspect(path, "npz")


def test_an_npz_flattening_to_too_many_columns_is_refused_before_naming_them(tmp_path):
    path = tmp_path / "wide.npz"
    _npz(path, x=np.zeros((1, datasets.MAX_COLUMNS + 1), np.uint8))
    with pytest.raises(UnsupportedDataset, match="columns; at most"):
        datasets.inspect(path, "npz")


def test_an_npz_declaring_an_impossible_shape_is_refused(tmp_path):
    """A header may claim any shape: (2**40, 2**40) must neither overflow nor allocate."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f8", "fortran_order": False, "shape": (2, 2**40, 2**40)}
    )
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", buffer.getvalue() + b"\0" * 64)
    with pytest.raises(UnsupportedDataset, match="columns; at most"):
        datasets.inspect(path, "npz")


def test_a_reader_crash_in_the_probe_is_a_422_for_that_file(tmp_path, monkeypatch):
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    monkeypatch.setattr(dataset_probe, "_command", lambda *_: [sys.executable, "-c", crash])
    with pytest.raises(UnsupportedDataset, match=r"reader crashed on it \(SIGSEGV\)"):
        dataset_probe.inspect_isolated(tmp_path / "x.parquet", "parquet")


def test_a_probe_past_its_time_is_killed_and_the_file_refused(tmp_path, monkeypatch):
    hang = "import time; time.sleep(600)"
    monkeypatch.setattr(dataset_probe, "_command", lambda *_: [sys.executable, "-c", hang])
    with pytest.raises(UnsupportedDataset, match="took longer than 1 s"):
        dataset_probe.inspect_isolated(tmp_path / "x.csv", "csv", timeout_s=1)


def test_a_file_needing_more_memory_than_the_probe_has_is_refused(tmp_path):
    path = tmp_path / "big.npz"
    _npz(path, x=np.zeros((4096, 4096), np.float64))  # 128 MiB of rows to convert
    assert dataset_probe.inspect_isolated(path, "npz").rows == 4096  # a valid file
    # Which allocation fails first varies (numpy's, Arrow's, zlib's): all are a 422.
    with pytest.raises(UnsupportedDataset):
        dataset_probe.inspect_isolated(path, "npz", memory_bytes=256 * 1024**2)


def test_the_probe_answers_as_inspect_does(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,label\n1,x\n2,y\n")
    assert dataset_probe.inspect_isolated(path, "csv") == datasets.inspect(path, "csv")
    path.write_text("a,label\n")
    with pytest.raises(UnsupportedDataset, match="no rows"):
        dataset_probe.inspect_isolated(path, "csv")


def test_a_csv_with_more_columns_than_a_model_reads_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_COLUMNS", 50)
    path = tmp_path / "wide.csv"
    path.write_text(",".join(f"c{i}" for i in range(51)) + "\n" + ",".join(["1"] * 51) + "\n")
    with pytest.raises(UnsupportedDataset, match="51 columns; at most 50"):
        datasets.inspect(path, "csv")
