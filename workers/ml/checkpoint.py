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

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

FILENAME = "checkpoint.safetensors"
_META = "kiln_checkpoint"


@dataclass
class Checkpoint:
    """Tensors grouped by part (model, best, optim, rng) and the JSON-able rest."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def save(checkpoint: Checkpoint, path: Path) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    _write(*_snapshot(checkpoint), path)


Snapshot = dict[str, torch.Tensor] | dict[str, np.ndarray]


def _snapshot(checkpoint: Checkpoint) -> tuple[Snapshot, str]:
    """Copies of every tensor and the JSON, so training may go on while they are written.

    As NumPy arrays where every dtype allows it: safetensors' NumPy writer spends about
    half the time its torch writer does in Python, and the writer thread holds the GIL for
    that long while training goes on (noticeable beside epochs of tens of ms)."""
    flat = {
        f"{part}/{name}": tensor.detach().cpu().contiguous().clone()
        for part, tensors in checkpoint.tensors.items()
        for name, tensor in tensors.items()
    }
    info = json.dumps(checkpoint.info)
    if any(t.dtype == torch.bfloat16 for t in flat.values()):  # NumPy has no bfloat16
        return flat, info
    return {name: t.numpy() for name, t in flat.items()}, info


def _write(flat: Snapshot, info: str, path: Path) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    as_numpy = all(isinstance(t, np.ndarray) for t in flat.values())
    save = save_numpy if as_numpy else save_file
    save(flat, str(partial), metadata={_META: info})  # type: ignore[arg-type]
    os.replace(partial, path)


class BackgroundWriter:
    """Writes checkpoints on one long-lived thread, one at a time, so training does not
    wait on the disk; `close()` (call it before returning) re-raises a write's error."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future[None] | None = None

    def submit(self, checkpoint: Checkpoint, path: Path) -> None:
        snapshot = _snapshot(checkpoint)  # taken now: the state this moment describes
        self._settle()
        self._pending = self._pool.submit(_write, *snapshot, path)

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
