"""Checkpoint files: safetensors plus JSON metadata, written atomically, optimizer round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from workers.ml import checkpoint as ckpt


def _saved(tmp_path: Path, value: float) -> Path:
    path = tmp_path / ckpt.FILENAME
    checkpoint = ckpt.Checkpoint(
        tensors={"model": {"w": torch.full((2, 2), value)}}, info={"position": {"epoch": value}}
    )
    ckpt.save(checkpoint, path)
    return path


def test_round_trip_keeps_tensors_by_part_and_the_json(tmp_path: Path) -> None:
    path = _saved(tmp_path, 3.0)
    loaded = ckpt.load(path)
    assert torch.equal(loaded.tensors["model"]["w"], torch.full((2, 2), 3.0))
    assert loaded.info == {"position": {"epoch": 3.0}}
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.FILENAME]  # no temp file left


def test_a_crash_while_writing_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _saved(tmp_path, 1.0)

    def die_half_way(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", die_half_way)
    monkeypatch.setattr(ckpt, "save_numpy", die_half_way)
    with pytest.raises(OSError, match="disk full"):
        _saved(tmp_path, 2.0)
    assert ckpt.load(path).info["position"]["epoch"] == 1.0


def test_the_file_is_plain_safetensors(tmp_path: Path) -> None:
    tensors = safetensors.torch.load_file(str(_saved(tmp_path, 5.0)))
    assert set(tensors) == {"model/w"}


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_optimizer_state_survives_the_split(name: str) -> None:
    model = torch.nn.Linear(3, 2)
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "adam": torch.optim.Adam}
    optimizer = make[name](model.parameters())
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    tensors, rest = ckpt.optimizer_parts(optimizer.state_dict())
    fresh = make[name](torch.nn.Linear(3, 2).parameters())
    fresh.load_state_dict(ckpt.optimizer_state(tensors, rest))
    for index, entries in optimizer.state_dict()["state"].items():
        for key, value in entries.items():
            assert torch.equal(fresh.state_dict()["state"][index][key], value)
