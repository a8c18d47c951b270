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
machine crash a torn slot fails its CRC and the other slot, or a fresh start, is used."""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

#: The checkpoint's name in a job's scratch folder; its slots sit beside it.
FILENAME = "checkpoint"
_META = "kiln_checkpoint"


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
    """Write `checkpoint` as save number checkpoint.sequence (set it one past the last)."""
    _write(_snapshot(checkpoint), path)


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


@dataclass(frozen=True)
class Snapshot:
    """A checkpoint about to become a safetensors file: where each tensor lies, the info
    as JSON, and every tensor's bytes back to back in one buffer."""

    layout: dict[str, dict[str, Any]]
    info: str
    data: torch.Tensor  # uint8
    sequence: int


def _snapshot(checkpoint: Checkpoint) -> Snapshot:
    """Copy every tensor into one buffer, so training may go on while it is written.

    The file is laid out here rather than by safetensors' writer: that one holds the GIL
    for about a millisecond per call (Python work per tensor, then serialisation), which
    the training thread feels beside epochs of tens of milliseconds."""
    layout: dict[str, dict[str, Any]] = {}
    raw, offset = [], 0
    for part, tensors in checkpoint.tensors.items():
        for name, tensor in tensors.items():
            value = tensor.detach().cpu().contiguous()
            flat = value.reshape(-1).view(torch.uint8)
            end = offset + flat.numel()
            layout[f"{part}/{name}"] = {
                "dtype": _DTYPES[value.dtype],
                "shape": list(value.shape),
                "data_offsets": [offset, end],
            }
            raw.append(flat)
            offset = end
    data = torch.cat(raw) if raw else torch.empty(0, dtype=torch.uint8)
    return Snapshot(layout, json.dumps(checkpoint.info), data, checkpoint.sequence)


def _write(snapshot: Snapshot, path: Path) -> None:
    """Overwrite the slot of snapshot.sequence, then trim it to the bytes written (the
    slot may have held a longer checkpoint)."""
    data = snapshot.data.numpy().data
    metadata = {
        _META: snapshot.info,
        "sequence": str(snapshot.sequence),
        "crc32": str(zlib.crc32(data)),
    }
    header = json.dumps({"__metadata__": metadata, **snapshot.layout}).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
    # O_CREAT without O_TRUNC: an existing slot is overwritten in place (see above).
    descriptor = os.open(slots(path)[snapshot.sequence % 2], os.O_WRONLY | os.O_CREAT, 0o644)
    with open(descriptor, "wb") as file:
        file.write(len(header).to_bytes(8, "little"))
        file.write(header)
        file.write(data)
        file.truncate()


class BackgroundWriter:
    """Writes checkpoints to `path` on one long-lived thread, one at a time, so training
    does not wait on the disk; `close()` (call it before returning) re-raises a write's
    error. `after`: the sequence of the checkpoint training resumed from, if any."""

    def __init__(self, path: Path, after: int = 0) -> None:
        self.path, self.sequence = path, after
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future[None] | None = None

    def submit(self, checkpoint: Checkpoint) -> None:
        self.sequence += 1
        checkpoint.sequence = self.sequence
        snapshot = _snapshot(checkpoint)  # taken now: the state this moment describes
        self._settle()
        self._pending = self._pool.submit(_write, snapshot, self.path)

    def _settle(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self._settle()
        finally:
            self._pool.shutdown(wait=True)


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
