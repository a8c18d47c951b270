"""Concatenate Parquet files of one schema, written alike, into one file without decoding a
page: their row groups' bytes are copied in order, and one footer lists them all.

A sharded batch job's shards each write the Parquet an unsharded job writes for their rows
(one row group per chunk), so their row groups laid end to end, under a footer that lists
them with their new offsets, are byte for byte the file one worker would have written. The
join then costs a copy, where decoding and encoding again was the sharded job's longest
serial step.

The footer is parquet.thrift's FileMetaData in Thrift's compact protocol. pyarrow reads it
but cannot write an edited one, so it is decoded here as the protocol describes it (field
ids and types, no schema), the offsets that point into the file are moved, and it is encoded
again exactly as Thrift writes it. Files this does not handle (encrypted, with page indexes
or bloom filters, whose footers differ beyond their row groups) raise Unsupported; the
caller then joins them the slow way.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"PAR1"


class Unsupported(Exception):
    """These files cannot be joined by copying their bytes."""


# Compact protocol types (Thrift's TCompactProtocol).
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY = 1, 2, 3, 4, 5, 6, 7, 8
_LIST, _SET, _MAP, _STRUCT, _UUID = 9, 10, 11, 12, 13

# parquet.thrift field ids of what a concatenation changes or must refuse.
_FILE_NUM_ROWS, _FILE_ROW_GROUPS, _FILE_ENCRYPTION = 3, 4, 8
_GROUP_COLUMNS, _GROUP_FILE_OFFSET, _GROUP_ORDINAL = 1, 5, 7
_CHUNK_FILE_OFFSET, _CHUNK_META = 2, 3
#: ColumnChunk: offset and column index offsets (page indexes), crypto metadata, encrypted
#: metadata: none is moved here, so a file that has one is refused.
_CHUNK_REFUSED = {4, 6, 8, 9}
#: ColumnMetaData: data_page_offset, index_page_offset, dictionary_page_offset.
_META_OFFSETS = {9, 10, 11}
_META_BLOOM_FILTER = 14


@dataclass
class Field:
    id: int
    type: int
    value: Value


@dataclass
class Items:
    """A list or set: its element type and elements."""

    type: int
    values: list[Value]


#: A struct is its fields in the order they were read (Thrift writes them by id). A byte,
#: double or UUID is kept as its bytes, a binary as its bytes without their length.
Struct = list[Field]
Value = bool | int | bytes | Items | Struct

_INTS = (_I16, _I32, _I64)
_FIXED = {_BYTE: 1, _DOUBLE: 8, _UUID: 16}
_BOOLS = (_TRUE, _FALSE)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, count: int) -> bytes:
        if count < 0 or self.at + count > len(self.data):
            raise Unsupported("the Parquet footer ends early")
        self.at += count
        return self.data[self.at - count : self.at]

    def byte(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value = shift = 0
        while (byte := self.byte()) & 0x80:
            value |= (byte & 0x7F) << shift
            shift += 7
            if shift > 63:
                raise Unsupported("a varint in the Parquet footer is too long")
        return value | byte << shift

    def zigzag(self) -> int:
        value = self.varint()
        return (value >> 1) ^ -(value & 1)

    def value(self, kind: int, depth: int) -> Value:
        if depth > 32:
            raise Unsupported("the Parquet footer nests too deep")
        if kind in _BOOLS:  # an element of a list of booleans: one byte
            return self.byte() == _TRUE
        if kind in _INTS:
            return self.zigzag()
        if kind in _FIXED:
            return self.take(_FIXED[kind])
        if kind == _BINARY:
            return self.take(self.varint())
        if kind in (_LIST, _SET):
            header = self.byte()
            count = self.varint() if header >> 4 == 15 else header >> 4
            element = header & 0x0F
            return Items(element, [self.value(element, depth + 1) for _ in range(count)])
        if kind == _STRUCT:
            return self.struct(depth + 1)
        raise Unsupported(f"Thrift type {kind} in the Parquet footer")  # maps: none in it

    def struct(self, depth: int = 0) -> Struct:
        fields: Struct = []
        last = 0
        while (header := self.byte()) != 0:
            delta, kind = header >> 4, header & 0x0F
            last = last + delta if delta else self.zigzag()
            # A boolean field's value is its type.
            value = kind == _TRUE if kind in _BOOLS else self.value(kind, depth)
            fields.append(Field(last, kind, value))
        return fields


class _Writer:
    def __init__(self) -> None:
        self.out = bytearray()

    def varint(self, value: int) -> None:
        while value > 0x7F:
            self.out.append(value & 0x7F | 0x80)
            value >>= 7
        self.out.append(value)

    def zigzag(self, value: int) -> None:
        self.varint((value << 1) ^ (value >> 63))

    def value(self, kind: int, value: Value) -> None:
        if kind in _BOOLS:
            self.out.append(_TRUE if value else _FALSE)
        elif isinstance(value, bytes):
            if kind == _BINARY:
                self.varint(len(value))
            self.out += value
        elif isinstance(value, Items):
            count = len(value.values)
            self.out.append(min(count, 15) << 4 | value.type)
            if count >= 15:
                self.varint(count)
            for element in value.values:
                self.value(value.type, element)
        elif isinstance(value, list):
            self.struct(value)
        else:
            self.zigzag(value)

    def struct(self, fields: Struct) -> None:
        last = 0
        for field in fields:
            kind = field.type
            if kind in _BOOLS:
                kind = _TRUE if field.value else _FALSE
            delta = field.id - last
            if 0 < delta <= 15:
                self.out.append(delta << 4 | kind)
            else:
                self.out.append(kind)
                self.zigzag(field.id)
            if kind not in _BOOLS:
                self.value(kind, field.value)
            last = field.id
        self.out.append(0)


def decode(data: bytes) -> Struct:
    """A compact-protocol struct (a Parquet footer) as its fields."""
    reader = _Reader(data)
    fields = reader.struct()
    if reader.at != len(data):
        raise Unsupported("the Parquet footer has bytes after its end")
    return fields


def encode(fields: Struct) -> bytes:
    writer = _Writer()
    writer.struct(fields)
    return bytes(writer.out)


@dataclass
class _Part:
    path: Path
    footer: Struct
    #: Where its row groups' bytes end (after the leading magic, before the footer).
    data_end: int


def _read_part(path: Path) -> _Part:
    with path.open("rb") as handle:
        size = handle.seek(0, 2)
        if size < 12:
            raise Unsupported(f"{path.name} is too short for a Parquet file")
        handle.seek(size - 8)
        tail = handle.read(8)
        (length,) = struct.unpack("<I", tail[:4])
        handle.seek(0)
        if tail[4:] != MAGIC or handle.read(4) != MAGIC or length > size - 12:
            raise Unsupported(f"{path.name} is not a plain Parquet file")
        handle.seek(size - 8 - length)
        raw = handle.read(length)
    footer = decode(raw)
    if encode(footer) != raw:  # a writer this codec would not reproduce: leave it be
        raise Unsupported(f"{path.name}'s footer is not in Thrift's canonical encoding")
    return _Part(path, footer, size - 8 - length)


def _get(fields: Struct, field_id: int) -> Field | None:
    return next((f for f in fields if f.id == field_id), None)


def _int(value: Value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Unsupported("an offset or count in the Parquet footer is not an integer")
    return value


def _structs(value: Value) -> list[Struct]:
    if not isinstance(value, Items) or not all(isinstance(v, list) for v in value.values):
        raise Unsupported("a list of structs in the Parquet footer is not one")
    return value.values  # type: ignore[return-value]  # checked above


def _shift_group(group: Struct, shift: int, ordinal: int) -> None:
    """Make a RowGroup whose bytes moved by `shift` the file's `ordinal`-th."""
    for field in group:
        if field.id == _GROUP_FILE_OFFSET:
            field.value = _int(field.value) + shift
        elif field.id == _GROUP_ORDINAL:
            if ordinal > 0x7FFF:  # an i16
                raise Unsupported("more row groups than a row group ordinal counts")
            field.value = ordinal
        elif field.id == _GROUP_COLUMNS:
            for chunk in _structs(field.value):
                _shift_chunk(chunk, shift)


def _shift_chunk(chunk: Struct, shift: int) -> None:
    for field in chunk:
        if field.id in _CHUNK_REFUSED:
            raise Unsupported("a page index or encryption: not joined by copying")
        if field.id == _CHUNK_FILE_OFFSET and field.value:  # deprecated: Arrow writes 0
            field.value = _int(field.value) + shift
        elif field.id == _CHUNK_META:
            if not isinstance(field.value, list):
                raise Unsupported("a column chunk's metadata is not a struct")
            for meta in field.value:
                if meta.id == _META_BLOOM_FILTER:
                    raise Unsupported("a bloom filter: not joined by copying")
                if meta.id in _META_OFFSETS:
                    meta.value = _int(meta.value) + shift


def _rest(footer: Struct) -> bytes:
    """The footer less what concatenation changes: it must be the same in every part."""
    return encode([f for f in footer if f.id not in (_FILE_NUM_ROWS, _FILE_ROW_GROUPS)])


def _joined_footer(parts: list[_Part]) -> bytes:
    """The first part's footer, listing every part's row groups at their new offsets."""
    first = parts[0].footer
    if _get(first, _FILE_ENCRYPTION) is not None:
        raise Unsupported("an encrypted footer: not joined by copying")
    if any(_rest(part.footer) != _rest(first) for part in parts[1:]):
        raise Unsupported("the parts differ in schema, metadata or writer")
    groups: list[Value] = []
    rows, shift = 0, 0
    for part in parts:
        listed = _get(part.footer, _FILE_ROW_GROUPS)
        for group in _structs(listed.value) if listed else []:
            _shift_group(group, shift, len(groups))
            groups.append(group)
        count = _get(part.footer, _FILE_NUM_ROWS)
        rows += _int(count.value) if count else 0
        shift += part.data_end - len(MAGIC)
    changed: dict[int, Value] = {_FILE_NUM_ROWS: rows, _FILE_ROW_GROUPS: Items(_STRUCT, groups)}
    return encode([Field(f.id, f.type, changed.get(f.id, f.value)) for f in first])


def concatenate(
    paths: list[Path], target: Path, on_part: Callable[[int], None] | None = None
) -> None:
    """Write the row groups of `paths`, in order, as one Parquet file at `target`;
    `on_part(k)` after the k-th part's bytes are copied (to report, or to stop by raising).
    Raises Unsupported, before writing anything, where the parts cannot be joined so."""
    if not paths:
        raise Unsupported("no parts to join")
    parts = [_read_part(path) for path in paths]
    footer = _joined_footer(parts)
    with target.open("wb") as out:
        out.write(MAGIC)
        for index, part in enumerate(parts):
            with part.path.open("rb") as source:
                source.seek(len(MAGIC))
                _copy(source, out, part.data_end - len(MAGIC))
            if on_part is not None:
                on_part(index)
        out.write(footer)
        out.write(struct.pack("<I", len(footer)) + MAGIC)


def _copy(source: BinaryIO, out: BinaryIO, count: int) -> None:
    """`count` bytes from `source`'s position to `out`."""
    left = count
    while left:
        block = source.read(min(left, 1 << 20))
        if not block:
            raise OSError("a part of the Parquet join shrank while it was copied")
        out.write(block)
        left -= len(block)
