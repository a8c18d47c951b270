"""Check an uploaded weights file is plain safetensors, without torch and without loading it.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes. Nothing in it can run code, which
is why it is the only format Kiln accepts: a pickle (torch.save, pickle.dumps) or a zip
archive (torch.save, TorchScript, torch.export's .pt2) can run code when loaded, so those are
refused by their first bytes with a message that says so, whatever the file is called.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO

from kiln import safejson
from kiln.errors import InvalidModelFile, UnsafeModelFile

#: The safetensors library's own limit on the header.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Weights are floating point; bytes per element of each dtype Kiln loads.
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Header:
    #: Tensor name to shape.
    shapes: dict[str, list[int]]
    metadata: dict[str, str]
    #: The whole file's expected length: length prefix, header and data.
    file_size: int


def refuse_unsafe(start: bytes) -> None:
    """UnsafeModelFile when the first bytes are those of a pickle or a zip archive."""
    if start.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise UnsafeModelFile(
            "this is a zip archive (what torch.save, TorchScript and torch.export write), "
            "which can run code when loaded; upload the weights as safetensors instead "
            "(safetensors.torch.save_file(model.state_dict(), path))"
        )
    if len(start) >= 2 and start[0] == 0x80 and 2 <= start[1] <= 5:
        raise UnsafeModelFile(
            "this is a Python pickle (what torch.save and pickle.dumps write), which can run "
            "code when loaded; upload the weights as safetensors instead "
            "(safetensors.torch.save_file(model.state_dict(), path))"
        )


def read_header(
    read: Callable[[int], bytes], dtypes: Mapping[str, int] = FLOAT_DTYPES
) -> tuple[bytes, Header]:
    """Read and check the header from a stream; returns the bytes read and the header.
    `dtypes`: the tensor dtypes allowed, with their bytes per element."""
    prefix = _read_exactly(read, 8)
    refuse_unsafe(prefix)
    if len(prefix) < 8:
        raise InvalidModelFile("the file is too short to be safetensors")
    length = int.from_bytes(prefix, "little")
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise InvalidModelFile("not a safetensors file: its header length is implausible")
    raw = _read_exactly(read, length)
    if len(raw) < length:
        raise InvalidModelFile("not a safetensors file: it ends inside its header")
    return prefix + raw, parse_header(raw, dtypes)


def parse_header(raw: bytes, dtypes: Mapping[str, int] = FLOAT_DTYPES) -> Header:
    """Check the JSON header: float tensors whose byte ranges tile the data exactly."""
    try:
        header = safejson.loads(raw, "the safetensors header")
    except (safejson.InvalidJson, safejson.InvalidNumber) as exc:
        raise InvalidModelFile(
            f"not a safetensors file: its header is not JSON Kiln reads ({exc.message})"
        ) from None
    if not isinstance(header, dict):
        raise InvalidModelFile("not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidModelFile("safetensors __metadata__ must map strings to strings")
    if not header:
        raise InvalidModelFile("the safetensors file holds no tensors")
    shapes: dict[str, list[int]] = {}
    ranges: list[tuple[int, int]] = []
    for name, entry in header.items():
        shape, begin, end = _check_tensor(name, entry, dtypes)
        shapes[name] = shape
        ranges.append((begin, end))
    position = 0
    for begin, end in sorted(ranges):
        if begin != position:
            raise InvalidModelFile("safetensors tensors overlap or leave gaps in the data")
        position = end
    return Header(shapes=shapes, metadata=metadata, file_size=8 + len(raw) + position)


def _check_tensor(
    name: str, entry: object, dtypes: Mapping[str, int]
) -> tuple[list[int], int, int]:
    if not isinstance(entry, dict):
        raise InvalidModelFile(f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise InvalidModelFile(
            f"tensor {name!r} has dtype {dtype!r}; weights must be one of {', '.join(dtypes)}"
        )
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidModelFile(f"tensor {name!r}: shape must be a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise InvalidModelFile(f"tensor {name!r}: data_offsets must be [begin, end]")
    if offsets[1] - offsets[0] != math.prod(shape) * dtypes[dtype]:
        raise InvalidModelFile(f"tensor {name!r}: its byte range does not match its shape")
    return shape, offsets[0], offsets[1]


def exact_chunks(prefix: bytes, stream: IO[bytes], expected: int) -> Iterator[bytes]:
    """The whole file in chunks, failing (before the store keeps anything) unless it is
    exactly as long as its header says: no truncated data, nothing appended."""
    size = len(prefix)
    yield prefix
    while chunk := stream.read(_CHUNK):
        size += len(chunk)
        if size > expected:
            raise InvalidModelFile("the file is longer than its safetensors header says")
        yield chunk
    if size != expected:
        raise InvalidModelFile("the file is shorter than its safetensors header says")


def _read_exactly(read: Callable[[int], bytes], size: int) -> bytes:
    parts: list[bytes] = []
    left = size
    while left > 0:
        chunk = read(min(left, _CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)
