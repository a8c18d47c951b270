"""The safetensors header check: real files pass, pickles, zips and malformed files do not."""

from __future__ import annotations

import io
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import save

from kiln import modelfile
from kiln.errors import InvalidModelFile, UnsafeModelFile


def weights_file(**tensors: np.ndarray) -> bytes:
    return save(tensors or {"w": np.ones((3, 2), np.float32), "b": np.zeros(3, np.float32)})


def check(content: bytes) -> modelfile.Header:
    """Run the header check and the length check the upload route runs."""
    stream = io.BytesIO(content)
    prefix, header = modelfile.read_header(stream.read)
    b"".join(modelfile.exact_chunks(prefix, stream, header.file_size))
    return header


def raw_file(header: dict, data: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def test_a_safetensors_file_passes_with_its_shapes_and_length() -> None:
    content = weights_file()

    header = check(content)

    assert header.shapes == {"w": [3, 2], "b": [3]}
    assert header.file_size == len(content)


def test_metadata_is_read() -> None:
    content = save({"w": np.ones(2, np.float32)}, metadata={"format": "pt"})
    assert check(content).metadata == {"format": "pt"}


@pytest.mark.parametrize(
    "make",
    [
        lambda: pickle.dumps({"w": [1.0, 2.0]}),
        lambda: pickle.dumps({"w": [1.0]}, protocol=2),
        lambda: _torch_save({"w": torch.ones(2)}),
        lambda: _torch_save({"w": torch.ones(2)}, zipfile=False),
    ],
    ids=["pickle", "pickle-protocol-2", "torch.save", "torch.save-legacy"],
)
def test_a_pickle_or_zip_is_refused_as_unsafe(make) -> None:
    with pytest.raises(UnsafeModelFile, match="can run code"):
        check(make())


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "too short"),
        (b"\x02\x00\x00\x00\x00\x00\x00\x00{", "ends inside its header"),
        (struct.pack("<Q", 10**12), "header length"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (raw_file([1, 2]), "not a JSON object"),  # type: ignore[arg-type]
        (raw_file({}), "no tensors"),
        (
            raw_file({"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
            "dtype",
        ),
        (
            raw_file({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "shape",
        ),
        (
            raw_file(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                },
                b"\0" * 8,
            ),
            "overlap or leave gaps",
        ),
        (weights_file()[:-1], "shorter"),
        (weights_file() + b"\0", "longer"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_malformed_file_is_refused_with_a_reason(content: bytes, reason: str) -> None:
    with pytest.raises(InvalidModelFile, match=reason):
        check(content)


def _torch_save(obj: object, zipfile: bool = True) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=zipfile)
    return buffer.getvalue()
