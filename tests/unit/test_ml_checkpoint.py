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

    def die_half_way(snapshot: ckpt.Snapshot, partial: Path) -> None:
        partial.write_bytes(snapshot.header[:10])
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_file", die_half_way)
    with pytest.raises(OSError, match="disk full"):
        _saved(tmp_path, 2.0)
    assert ckpt.load(path).info["position"]["epoch"] == 1.0


def test_the_file_is_plain_safetensors(tmp_path: Path) -> None:
    tensors = safetensors.torch.load_file(str(_saved(tmp_path, 5.0)))
    assert set(tensors) == {"model/w"}


def test_every_dtype_and_shape_a_checkpoint_holds_reads_back_through_safetensors(
    tmp_path: Path,
) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "step": torch.tensor(7.0),  # 0-d, as Adam's step
        "empty": torch.empty(0, 3),
        "rng": generator.get_state(),  # uint8
        "mask": torch.tensor([True, False, True]),
        "weights": torch.randn(3, 5, dtype=torch.bfloat16),
        "counts": torch.arange(6, dtype=torch.int64).reshape(2, 3).t(),  # not contiguous
        "half": torch.randn(4, dtype=torch.float16),
        "double": torch.randn(2, 2, dtype=torch.float64),
    }
    path = tmp_path / ckpt.FILENAME
    ckpt.save(ckpt.Checkpoint(tensors={"part": tensors}, info={"note": "x"}), path)
    loaded = safetensors.torch.load_file(str(path))
    for name, tensor in tensors.items():
        assert loaded[f"part/{name}"].dtype == tensor.dtype
        assert torch.equal(loaded[f"part/{name}"], tensor), name
    assert ckpt.load(path).info == {"note": "x"}


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
