"""Training checkpoints: one safetensors file (every tensor: weights, optimizer moments, RNG
states) whose metadata holds the rest as JSON. Written to a temp file and renamed, so a
crashed worker leaves the previous checkpoint intact. Never pickle.

No fsync: a checkpoint per epoch of a small model would cost more in fsyncs than in
training. A process crash loses nothing (the kernel holds the written pages); after a
machine crash a torn file fails to load, and the job starts over (see load_or_none)."""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

FILENAME = "checkpoint.safetensors"
_META = "kiln_checkpoint"


@dataclass
class Checkpoint:
    """Tensors grouped by part (model, best, optim, rng) and the JSON-able rest."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def save(checkpoint: Checkpoint, path: Path) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
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
    """A checkpoint as the bytes of a safetensors file: the header, then every tensor's
    bytes back to back in one buffer."""

    header: bytes
    data: torch.Tensor  # uint8


def _snapshot(checkpoint: Checkpoint) -> Snapshot:
    """Copy every tensor into one buffer, so training may go on while it is written.

    The file is laid out here rather than by safetensors' writer: that one holds the GIL
    for about a millisecond per call (Python work per tensor, then serialisation), which
    the training thread feels beside epochs of tens of milliseconds. Writing a ready
    buffer releases the GIL; safetensors itself reads the file back (load)."""
    header: dict[str, Any] = {"__metadata__": {_META: json.dumps(checkpoint.info)}}
    raw, offset = [], 0
    for part, tensors in checkpoint.tensors.items():
        for name, tensor in tensors.items():
            value = tensor.detach().cpu().contiguous()
            flat = value.reshape(-1).view(torch.uint8)
            end = offset + flat.numel()
            header[f"{part}/{name}"] = {
                "dtype": _DTYPES[value.dtype],
                "shape": list(value.shape),
                "data_offsets": [offset, end],
            }
            raw.append(flat)
            offset = end
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes
    data = torch.cat(raw) if raw else torch.empty(0, dtype=torch.uint8)
    return Snapshot(len(encoded).to_bytes(8, "little") + encoded, data)


def _write(snapshot: Snapshot, path: Path) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    _write_file(snapshot, partial)
    os.replace(partial, path)


def _write_file(snapshot: Snapshot, path: Path) -> None:
    with path.open("wb") as file:
        file.write(snapshot.header)
        file.write(snapshot.data.numpy().data)


class BackgroundWriter:
    """Writes checkpoints on one long-lived thread, one at a time, so training does not
    wait on the disk; `close()` (call it before returning) re-raises a write's error."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future[None] | None = None

    def submit(self, checkpoint: Checkpoint, path: Path) -> None:
        snapshot = _snapshot(checkpoint)  # taken now: the state this moment describes
        self._settle()
        self._pending = self._pool.submit(_write, snapshot, path)

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
    """Read a checkpoint written by save() (safetensors: no code runs while loading)."""
    checkpoint = Checkpoint()
    with safe_open(str(path), framework="pt") as handle:
        checkpoint.info = json.loads((handle.metadata() or {})[_META])
        for key in handle.keys():  # noqa: SIM118  (safe_open has no __iter__)
            part, name = key.split("/", 1)
            checkpoint.tensors.setdefault(part, {})[name] = handle.get_tensor(key)
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
