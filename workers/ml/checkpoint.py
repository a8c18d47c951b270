"""Training checkpoints: safetensors files (every tensor: weights, optimizer moments, RNG
states) whose metadata holds the rest as JSON. Never pickle.

A checkpoint lives in two slot files, `<stem>.0.safetensors` and `<stem>.1.safetensors`,
written in turn: save number n goes to slot n % 2, so a crash while writing one slot leaves
the checkpoint in the other intact, and load() takes the newest slot whose CRC matches.
Slots are overwritten in place rather than written to a temp file and renamed: on ext4,
renaming over a file (or truncating one to zero) starts writeback of the new data, ten
times the cost of the write itself, paid every epoch.

No fsync: a checkpoint per epoch of a small model would cost more in fsyncs than in
training. A process crash loses nothing (the kernel holds the written pages); after a
machine crash a torn slot fails its CRC and the other slot, or a fresh start, is used.

The slots are this host's copy, a cache. A Publisher copies saves to the job's files in
the artifact store (kiln/job_files.py): the first, then at most every checkpoint_every_s,
and always when the job stops at a step, so an attempt on another host resumes too. Each
save goes up as a new object `<sequence>.safetensors`, then the small pointer
`committed.json` is replaced to name it (that put is the commit; a save uploaded but not
pointed to is never read).
fetch() brings the committed save down into a slot when it is newer than this host's."""

from __future__ import annotations

import json
import mmap
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from kiln.job_files import JobFiles

#: The checkpoint's name in a job's scratch folder; its slots sit beside it.
FILENAME = "checkpoint"
#: The folder of a job's files (kiln/job_files.py) that holds its published checkpoint.
FOLDER = "checkpoint"
_POINTER = "committed.json"
_META = "kiln_checkpoint"

#: Called after each save with the slot file written, its sequence, and whether the run
#: stops here (the save must then leave this host at once).
OnSave = Callable[[Path, int, bool], None]


class CheckpointError(Exception):
    """No slot of a checkpoint holds a whole, readable file."""


@dataclass
class Checkpoint:
    """Tensors grouped by part (model, best, optim, rng) and the JSON-able rest.

    `sequence` numbers the saves to one path: the newest whole slot wins on load, and a
    writer that resumed from save n writes n + 1 next, into the other slot."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    sequence: int = 0


def slots(path: Path) -> tuple[Path, Path]:
    """The two files a checkpoint alternates between."""
    name = path.name
    return path.with_name(f"{name}.0.safetensors"), path.with_name(f"{name}.1.safetensors")


def exists(path: Path) -> bool:
    return any(slot.exists() for slot in slots(path))


def remove(path: Path) -> None:
    for slot in slots(path):
        slot.unlink(missing_ok=True)


def save(checkpoint: Checkpoint, path: Path) -> None:
    """Write `checkpoint` as save number checkpoint.sequence (set it one past the last): a
    one-off save; training saves through a Writer."""
    writer = Writer(path, after=checkpoint.sequence - 1)
    try:
        writer.save(checkpoint)
    finally:
        writer.close()


#: The safetensors format's names for the dtypes a checkpoint holds.
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class Writer:
    """Writes the saves of one training run to `path`, numbered on from `after` (the
    sequence of the checkpoint training resumed from, if any). Call close() when done.

    A save must cost little beside epochs of tens of milliseconds. Each slot file stays
    open with its data section mapped into memory while the run's tensors keep their
    shapes (every save but a slot's first), so a save copies all the tensors into the page
    cache in one call, checksums them, and writes the header in front. It happens in the
    training thread: a background thread would need a copy of every tensor first, and
    then contends with training for the GIL."""

    def __init__(self, path: Path, after: int = 0, on_save: OnSave | None = None) -> None:
        self.path, self.sequence, self.on_save = path, after, on_save
        self._slots: dict[int, _MappedSlot] = {}

    def save(self, checkpoint: Checkpoint, stopping: bool = False) -> None:
        """Write the next save; `stopping`: the run stops after it (publish it now)."""
        self.sequence += 1
        checkpoint.sequence = self.sequence
        keys = [f"{part}/{name}" for part, group in checkpoint.tensors.items() for name in group]
        tensors = [tensor for group in checkpoint.tensors.values() for tensor in group.values()]
        info = json.dumps(checkpoint.info)
        index = self.sequence % 2
        slot = self._slots.get(index)
        if slot is None or not slot.holds(keys, tensors, info):
            if slot is not None:
                slot.close()
            slot = self._slots[index] = _MappedSlot(slots(self.path)[index], keys, tensors, info)
        slot.write(tensors, info, self.sequence)
        if self.on_save is not None:
            self.on_save(slots(self.path)[index], self.sequence, stopping)

    def close(self) -> None:
        for slot in self._slots.values():
            slot.close()
        self._slots.clear()


class _MappedSlot:
    """A slot file laid out for one list of tensors: the 8-byte header length, the header
    (JSON, padded with spaces to whole pages, so it can grow in place), then every
    tensor's bytes, mapped into memory and viewed as the tensors themselves."""

    def __init__(self, file: Path, keys: list[str], tensors: list[torch.Tensor], info: str):
        self.keys, self.shapes = keys, [(tensor.dtype, tensor.shape) for tensor in tensors]
        # Widest elements first: each view then starts at a multiple of its element size.
        order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
        layout, spans, size = {}, [(0, 0)] * len(tensors), 0
        for i in order:
            tensor = tensors[i]
            end = size + tensor.numel() * tensor.element_size()
            layout[keys[i]] = {
                "dtype": _DTYPES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [size, end],
            }
            spans[i], size = (size, end), end
        #: The header's tensor entries, written after its metadata.
        self.entries = json.dumps(layout)[1:-1]
        # Room for twice today's header, so a longer position or schedule state fits in place.
        self.room = -(-2 * self._header_bound(info) // mmap.PAGESIZE) * mmap.PAGESIZE
        self.descriptor = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self.descriptor, self.room + size)  # O_RDWR, no O_TRUNC: in place
        self.data = torch.empty(0, dtype=torch.uint8)
        if size:  # the views hold the mapping; it goes when they do
            mapped = mmap.mmap(self.descriptor, size, offset=self.room)
            self.data = torch.frombuffer(mapped, dtype=torch.uint8)
        self.views = [
            self.data[start:end].view(tensor.dtype).view(tensor.shape)
            for (start, end), tensor in zip(spans, tensors, strict=True)
        ]

    def _header_bound(self, info: str) -> int:
        # json.dumps escapes at most one character in two of its ASCII input.
        return 8 + 2 * len(info) + len(self.entries) + 128

    def holds(self, keys: list[str], tensors: list[torch.Tensor], info: str) -> bool:
        return (
            keys == self.keys
            and [(tensor.dtype, tensor.shape) for tensor in tensors] == self.shapes
            and self._header_bound(info) <= self.room
        )

    def write(self, tensors: list[torch.Tensor], info: str, sequence: int) -> None:
        if self.views:
            with torch.no_grad():
                torch._foreach_copy_(self.views, tensors)  # one call, however many tensors
        metadata = {
            _META: info,
            "sequence": str(sequence),
            # An ndarray is a buffer; numpy's stubs do not say so to zlib's signature.
            "crc32": str(zlib.crc32(self.data.numpy())),  # type: ignore[arg-type]
        }
        entries = f", {self.entries}" if self.entries else ""
        header = f'{{"__metadata__": {json.dumps(metadata)}{entries}}}'.encode()
        length = self.room - 8
        _pwrite_all(self.descriptor, length.to_bytes(8, "little") + header.ljust(length))

    def close(self) -> None:
        self.views, self.data = [], torch.empty(0)
        os.close(self.descriptor)


def _pwrite_all(descriptor: int, data: bytes) -> None:
    """Write `data` at the start of the file, however few bytes each call takes."""
    view, done = memoryview(data), 0
    while done < len(data):
        done += os.pwrite(descriptor, view[done:], done)


def load(path: Path) -> Checkpoint:
    """The newest whole checkpoint saved to `path` (safetensors: no code runs while
    loading); FileNotFoundError when none was saved, CheckpointError when every slot is torn."""
    found, torn = [], []
    for slot in slots(path):
        try:
            found.append(_load_slot(slot))
        except FileNotFoundError:
            continue
        except Exception as exc:  # torn by a crash mid-write: the other slot may be whole
            torn.append(f"{slot.name}: {type(exc).__name__}: {exc}")
    if found:
        return max(found, key=lambda checkpoint: checkpoint.sequence)
    if torn:
        raise CheckpointError("; ".join(torn))
    raise FileNotFoundError(f"no checkpoint at {path}")


def _load_slot(slot: Path) -> Checkpoint:
    raw = slot.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    metadata = json.loads(raw[8 : 8 + length])["__metadata__"]
    if str(zlib.crc32(memoryview(raw)[8 + length :])) != metadata["crc32"]:
        raise CheckpointError("the data does not match its CRC (a torn write)")
    checkpoint = Checkpoint(info=json.loads(metadata[_META]), sequence=int(metadata["sequence"]))
    for key, tensor in safetensors.torch.load(raw).items():
        part, name = key.split("/", 1)
        checkpoint.tensors.setdefault(part, {})[name] = tensor
    return checkpoint


def load_or_none(path: Path) -> tuple[Checkpoint | None, str | None]:
    """The checkpoint at `path`, or None and why it cannot be used (torn by a machine crash)."""
    try:
        return load(path), None
    except Exception as exc:  # any unreadable file means the same: start without it
        return None, f"{type(exc).__name__}: {exc}"


def optimizer_parts(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into its tensors and its JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                rest.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "state": rest}


def optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of optimizer_parts: a state_dict optimizer.load_state_dict accepts."""
    state: dict[int, dict[str, Any]] = {
        int(index): dict(entries) for index, entries in rest["state"].items()
    }
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    return {"state": state, "param_groups": rest["param_groups"]}


class Publisher:
    """An OnSave that copies saves to a job's files: the first save, then at most every
    `every_s` seconds (an upload per epoch of a small model would cost more than the
    epoch), and always when the run stops at a step (shutdown, preemption, cancellation):
    another host may go on."""

    def __init__(self, files: JobFiles, every_s: float) -> None:
        self.files, self.every_s = files, every_s
        self._due = 0.0  # the first save goes up at once
        self._previous = _committed(files)

    def __call__(self, slot: Path, sequence: int, stopping: bool) -> None:
        now = time.monotonic()
        if not stopping and now < self._due:
            return
        name = f"{sequence:09d}.safetensors"
        self.files.put_file(name, slot)
        pointer = {"sequence": sequence, "object": name, "size": slot.stat().st_size}
        self.files.put_bytes(_POINTER, json.dumps(pointer).encode())  # the commit
        if self._previous is not None and self._previous["object"] != name:
            self.files.remove(self._previous["object"])
        self._previous, self._due = pointer, time.monotonic() + self.every_s


def _committed(files: JobFiles) -> dict[str, Any] | None:
    """The pointer to the committed save, if one was published and it reads back."""
    raw = files.get_bytes(_POINTER)
    if raw is None:
        return None
    try:
        pointer = json.loads(raw)
        return pointer if isinstance(pointer, dict) and "object" in pointer else None
    except ValueError:
        return None


def fetch(files: JobFiles, path: Path) -> bool:
    """Bring the committed save in `files` down into a slot of `path` when this host has
    no newer whole save there; True if it did. load() then reads the newest, checking its
    CRC as for any slot."""
    pointer = _committed(files)
    if pointer is None:
        return False
    local, _ = load_or_none(path)
    sequence = int(pointer["sequence"])
    if local is not None and local.sequence >= sequence:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    return files.get_file(pointer["object"], slots(path)[sequence % 2])


def discard(path: Path, files: JobFiles) -> None:
    """Drop the checkpoint: this host's slots and the published saves."""
    remove(path)
    files.clear()
