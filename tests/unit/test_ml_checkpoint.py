"""Checkpoint files: safetensors plus JSON metadata in two slots, torn slots detected,
optimizer round trip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from workers.ml import checkpoint as ckpt


def _checkpoint(value: float, sequence: int) -> ckpt.Checkpoint:
    return ckpt.Checkpoint(
        tensors={"model": {"w": torch.full((2, 2), value)}},
        info={"position": {"epoch": value}},
        sequence=sequence,
    )


def _saved(folder: Path, value: float, sequence: int = 1) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / ckpt.FILENAME
    ckpt.save(_checkpoint(value, sequence), path)
    return path


def test_round_trip_keeps_tensors_by_part_and_the_json(tmp_path: Path) -> None:
    path = _saved(tmp_path, 3.0)
    loaded = ckpt.load(path)
    assert torch.equal(loaded.tensors["model"]["w"], torch.full((2, 2), 3.0))
    assert loaded.info == {"position": {"epoch": 3.0}}
    assert loaded.sequence == 1
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.slots(path)[1].name]


def test_saves_alternate_between_two_slots_and_the_newest_is_loaded(tmp_path: Path) -> None:
    for sequence in (1, 2, 3):
        path = _saved(tmp_path, float(sequence), sequence)
    assert sorted(p.name for p in tmp_path.iterdir()) == [s.name for s in ckpt.slots(path)]
    assert ckpt.load(path).info["position"]["epoch"] == 3.0


def test_a_slot_that_held_a_longer_checkpoint_is_trimmed(tmp_path: Path) -> None:
    path = tmp_path / ckpt.FILENAME
    ckpt.save(ckpt.Checkpoint({"model": {"w": torch.zeros(1000)}}, {"n": 1}, sequence=1), path)
    ckpt.save(_checkpoint(7.0, 3), path)  # slot 1 again, far smaller
    assert torch.equal(ckpt.load(path).tensors["model"]["w"], torch.full((2, 2), 7.0))
    assert safetensors.torch.load_file(str(ckpt.slots(path)[1])).keys() == {"model/w"}


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = _saved(tmp_path, 1.0, sequence=1)
    _saved(tmp_path, 2.0, sequence=2)
    whole = _saved(tmp_path / "elsewhere", 3.0, sequence=3)  # what save 3 would write
    torn = ckpt.slots(whole)[1].read_bytes()[:-5]  # a crash cut it short
    ckpt.slots(path)[1].write_bytes(torn)
    assert ckpt.load(path).info["position"]["epoch"] == 2.0


def test_a_torn_slot_fails_its_crc_and_the_other_slot_is_used(tmp_path: Path) -> None:
    path = _saved(tmp_path, 1.0, sequence=1)
    _saved(tmp_path, 2.0, sequence=2)
    newest = ckpt.slots(path)[0]
    raw = bytearray(newest.read_bytes())
    raw[-1] ^= 0xFF  # same length, header intact: only the CRC can tell
    newest.write_bytes(bytes(raw))
    assert ckpt.load(path).info["position"]["epoch"] == 1.0


def test_with_every_slot_torn_load_says_so(tmp_path: Path) -> None:
    path = _saved(tmp_path, 1.0)
    ckpt.slots(path)[1].write_bytes(b"\x10\x00")
    loaded, reason = ckpt.load_or_none(path)
    assert loaded is None
    assert reason is not None
    assert reason.startswith("CheckpointError")
    with pytest.raises(FileNotFoundError):
        ckpt.load(tmp_path / "none")


def test_a_writer_resumed_from_save_n_writes_n_plus_1_into_the_other_slot(
    tmp_path: Path,
) -> None:
    path = _saved(tmp_path, 1.0, sequence=5)
    writer = ckpt.Writer(path, after=ckpt.load(path).sequence)
    writer.save(_checkpoint(2.0, 0))
    assert ckpt.load(path).sequence == 6
    assert ckpt.slots(path)[1].exists()  # save 5 is still there
    ckpt.remove(path)
    assert not ckpt.exists(path)


def test_the_slots_are_plain_safetensors(tmp_path: Path) -> None:
    path = _saved(tmp_path, 5.0)
    tensors = safetensors.torch.load_file(str(ckpt.slots(path)[1]))
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
    loaded = safetensors.torch.load_file(str(ckpt.slots(path)[0]))
    for name, tensor in tensors.items():
        assert loaded[f"part/{name}"].dtype == tensor.dtype
        assert torch.equal(loaded[f"part/{name}"], tensor), name
    assert ckpt.load(path).info == {"note": "x"}


def test_a_checkpoint_reads_back_when_the_kernel_writes_a_few_bytes_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwrite = os.pwrite

    def short_pwrite(descriptor: int, data: memoryview, offset: int) -> int:
        return real_pwrite(descriptor, data[:7], offset)

    monkeypatch.setattr(os, "pwrite", short_pwrite)
    path = tmp_path / ckpt.FILENAME
    ckpt.save(_checkpoint(3.0, 1), path)
    monkeypatch.undo()

    assert torch.equal(ckpt.load(path).tensors["model"]["w"], torch.full((2, 2), 3.0))


def test_a_writer_keeps_saving_as_the_layout_and_the_metadata_change(tmp_path: Path) -> None:
    # Each slot's file is laid out for the tensors of its first save; a save with other
    # tensors, or metadata past the header's room, lays the slot out anew.
    path = tmp_path / ckpt.FILENAME
    writer = ckpt.Writer(path)
    saves = [
        ({"w": torch.zeros(3)}, "a"),
        ({"w": torch.ones(3)}, "b"),
        ({"w": torch.full((3,), 2.0)}, "c" * 100_000),  # outgrows the header
        ({"w": torch.arange(5.0), "b": torch.tensor(True)}, "d"),  # new layout
        ({}, "e"),  # no tensors at all
        ({"w": torch.full((3,), 5.0)}, "f"),
    ]
    try:
        for tensors, note in saves:
            writer.save(ckpt.Checkpoint(tensors={"model": tensors}, info={"note": note}))
            loaded = ckpt.load(path)
            assert loaded.info == {"note": note}
            assert loaded.tensors.get("model", {}).keys() == tensors.keys()
            assert all(torch.equal(loaded.tensors["model"][k], v) for k, v in tensors.items())
    finally:
        writer.close()
    assert ckpt.load(path).sequence == len(saves)


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
