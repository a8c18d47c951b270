"""A job's resumable state in the artifact store (kiln/job_files.py): the checkpoint pointer
and batch_predict's chunk commit markers, over the local store and over S3 (moto's server).
Whatever was uploaded but not committed is never read as committed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from s3kit import BUCKET, moto_s3

from kiln.artifacts import ArtifactStore, RemoteArtifactStore
from kiln.job_files import JobFiles
from workers.ml import checkpoint as ckpt
from workers.runners import batch_parts


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch, moto_s3(patch) as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """The local artifact store, or one at s3:// (each test its own prefix)."""
    if request.param == "local":
        return ArtifactStore(tmp_path / "artifacts")
    endpoint = request.getfixturevalue("s3_endpoint")
    url = f"s3://{BUCKET}/{tmp_path.name}"
    return RemoteArtifactStore(url, tmp_path / "cache", {"endpoint_url": endpoint})


# --- job files -------------------------------------------------------------------------


def test_job_files_round_trip_and_are_private_to_their_job_and_folder(
    store: ArtifactStore, tmp_path: Path
) -> None:
    files = store.job_files("job-1", "batch")
    assert files.names() == []
    assert files.get_bytes("a.json") is None
    source = tmp_path / "part.bin"
    source.write_bytes(b"x" * 3_000_000)
    files.put_file("part.bin", source)
    files.put_bytes("a.json", b"{}")
    assert files.names() == ["a.json", "part.bin"]
    assert store.job_files("job-2", "batch").names() == []
    assert store.job_files("job-1", "checkpoint").names() == []
    assert files.get_file("part.bin", tmp_path / "back" / "part.bin")
    assert (tmp_path / "back" / "part.bin").read_bytes() == source.read_bytes()
    assert not files.get_file("missing.bin", tmp_path / "back" / "missing.bin")
    assert not (tmp_path / "back" / "missing.bin").exists()
    files.remove("a.json")
    assert files.names() == ["part.bin"]
    files.clear()
    assert files.names() == []


def test_discarding_a_job_removes_all_its_folders_and_no_other_jobs(
    store: ArtifactStore, tmp_path: Path
) -> None:
    for job_id in ("job-1", "job-2"):
        for folder in ("batch", "checkpoint"):
            store.job_files(job_id, folder).put_bytes("a.json", b"{}")
    store.discard_job_files("job-1")
    assert store.job_files("job-1", "batch").names() == []
    assert store.job_files("job-1", "checkpoint").names() == []
    assert store.job_files("job-2", "batch").names() == ["a.json"]
    store.discard_job_files("job-3")  # nothing stored: nothing to do


def test_job_files_refuse_names_that_leave_their_folder(store: ArtifactStore) -> None:
    with pytest.raises(ValueError, match="not a job id"):
        store.job_files("../other", "batch")
    files = store.job_files("job-1", "batch")
    for name in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="not a job file name"):
            files.put_bytes(name, b"")


def test_a_local_put_leaves_no_temporary_file(tmp_path: Path) -> None:
    files = ArtifactStore(tmp_path / "artifacts").job_files("job-1", "batch")
    files.put_bytes("a.json", b"1")
    folder = tmp_path / "artifacts" / "jobs" / "job-1" / "batch"
    assert sorted(p.name for p in folder.iterdir()) == ["a.json"]


# --- batch_predict chunks ----------------------------------------------------------------


def _chunk(index: int, rows: int = 5) -> tuple[pa.RecordBatch, pa.RecordBatch]:
    ids = list(range(index * rows, (index + 1) * rows))
    out = pa.RecordBatch.from_pydict({"id": ids, "value": [float(i) for i in ids]})
    errors = pa.RecordBatch.from_pydict({"row": pa.array([ids[0]], pa.int64()), "reason": ["bad"]})
    return errors, out


def _commit(work: Path, files: JobFiles, count: int) -> None:
    work.mkdir(parents=True, exist_ok=True)  # as write_manifest leaves it
    for index in range(count):
        batch_parts.commit_chunk(work, index, *_chunk(index), files)


def _ids(work: Path, count: int) -> list[int]:
    return [i for b in batch_parts.parts(work, "out", count) for i in b.column("id").to_pylist()]


def test_committed_chunks_resume_on_a_host_that_has_none_of_them(
    store: ArtifactStore, tmp_path: Path
) -> None:
    files = store.job_files("job-1", batch_parts.FOLDER)
    _commit(tmp_path / "host-a", files, 3)
    elsewhere = tmp_path / "host-b"
    assert batch_parts.restore(elsewhere, files) == 3
    progress = batch_parts.committed(elsewhere)
    assert (progress.chunks, progress.rows, progress.errors) == (3, 15, 3)
    assert _ids(elsewhere, 3) == list(range(15))
    assert batch_parts.restore(elsewhere, files) == 0  # the cache now holds them all


def test_parts_uploaded_without_their_commit_marker_are_not_committed(
    store: ArtifactStore, tmp_path: Path
) -> None:
    files = store.job_files("job-1", batch_parts.FOLDER)
    work = tmp_path / "host-a"
    _commit(work, files, 2)
    # Chunk 2 written here and uploaded, the worker killed before its marker went up.
    batch_parts.commit_chunk(work, 2, *_chunk(2))
    for kind in ("err", "out"):
        files.put_file(f"{kind}-000002.arrow", work / f"{kind}-000002.arrow")
    assert batch_parts.restore(work, files) == 0
    assert batch_parts.committed(work).chunks == 2
    assert not (work / "out-000002.arrow").exists()  # to be scored again, here too
    elsewhere = tmp_path / "host-b"
    batch_parts.restore(elsewhere, files)
    assert batch_parts.committed(elsewhere).chunks == 2


def test_a_part_that_does_not_match_its_marker_ends_the_committed_run(
    store: ArtifactStore, tmp_path: Path
) -> None:
    files = store.job_files("job-1", batch_parts.FOLDER)
    _commit(tmp_path / "host-a", files, 4)
    torn = tmp_path / "torn.arrow"
    torn.write_bytes((tmp_path / "host-a" / "out-000001.arrow").read_bytes()[:-9])
    files.put_file("out-000001.arrow", torn)  # as a crash would leave an unsynced file
    elsewhere = tmp_path / "host-b"
    assert batch_parts.restore(elsewhere, files) == 1
    assert batch_parts.committed(elsewhere).chunks == 1
    assert _ids(elsewhere, 1) == list(range(5))
    # The markers from the torn chunk on are gone: those chunks get committed afresh.
    assert [n for n in files.names() if n.startswith("commit-")] == ["commit-000000.json"]


def test_the_manifest_lives_in_the_store_and_clear_drops_everything(
    store: ArtifactStore, tmp_path: Path
) -> None:
    files = store.job_files("job-1", batch_parts.FOLDER)
    work = tmp_path / "host-a"
    batch_parts.write_manifest(work, {"key": "k"}, files)
    assert batch_parts.read_manifest(tmp_path / "host-b", files) == {"key": "k"}
    assert batch_parts.read_manifest(tmp_path / "host-b") is None  # not on that disk
    _commit(work, files, 1)
    batch_parts.clear(work, files)
    assert files.names() == []
    assert not work.exists()


# --- training checkpoints ------------------------------------------------------------


def _checkpoint(value: float) -> ckpt.Checkpoint:
    return ckpt.Checkpoint(
        tensors={"model": {"w": torch.full((64, 64), value)}},
        info={"position": {"epoch": int(value)}},
    )


@pytest.fixture(autouse=True)
def _scratch(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()  # a job's scratch folder, where its checkpoint slots go


def test_a_published_checkpoint_resumes_on_another_host(
    store: ArtifactStore, tmp_path: Path
) -> None:
    files = store.job_files("job-1", ckpt.FOLDER)
    writer = ckpt.Writer(tmp_path / "a" / "checkpoint", on_save=ckpt.Publisher(files, 0.0))
    for value in (1.0, 2.0, 3.0):
        writer.save(_checkpoint(value))
    writer.close()
    # One save and its pointer: each publish drops the save before it.
    assert files.names() == ["000000003.safetensors", "committed.json"]
    there = tmp_path / "b" / "checkpoint"
    assert ckpt.fetch(files, there)
    loaded = ckpt.load(there)
    assert loaded.sequence == 3
    assert torch.equal(loaded.tensors["model"]["w"], torch.full((64, 64), 3.0))
    assert not ckpt.fetch(files, there)  # this host now has it


def test_a_save_uploaded_but_not_pointed_to_is_never_read(
    store: ArtifactStore, tmp_path: Path
) -> None:
    files = store.job_files("job-1", ckpt.FOLDER)
    writer = ckpt.Writer(tmp_path / "a" / "checkpoint", on_save=ckpt.Publisher(files, 0.0))
    writer.save(_checkpoint(1.0))
    writer.save(_checkpoint(2.0))
    writer.close()
    # Save 3 went up, the worker died before replacing the pointer; and a torn copy.
    files.put_bytes("000000003.safetensors", b"half a file")
    there = tmp_path / "b" / "checkpoint"
    ckpt.fetch(files, there)
    assert ckpt.load(there).sequence == 2
    assert json.loads(files.get_bytes("committed.json") or b"")["sequence"] == 2


def test_saves_are_published_first_then_once_an_interval_but_always_when_stopping(
    store: ArtifactStore, tmp_path: Path
) -> None:
    files = store.job_files("job-1", ckpt.FOLDER)
    writer = ckpt.Writer(tmp_path / "a" / "checkpoint", on_save=ckpt.Publisher(files, 3600.0))
    writer.save(_checkpoint(1.0))
    writer.save(_checkpoint(2.0))
    assert ckpt.fetch(files, tmp_path / "c" / "checkpoint")
    assert ckpt.load(tmp_path / "c" / "checkpoint").sequence == 1  # the interval runs
    writer.save(_checkpoint(3.0), stopping=True)
    writer.close()
    assert ckpt.fetch(files, tmp_path / "b" / "checkpoint")
    assert ckpt.load(tmp_path / "b" / "checkpoint").sequence == 3


def test_a_newer_save_on_this_host_wins_over_the_published_one(
    store: ArtifactStore, tmp_path: Path
) -> None:
    files = store.job_files("job-1", ckpt.FOLDER)
    path = tmp_path / "a" / "checkpoint"
    writer = ckpt.Writer(path, on_save=ckpt.Publisher(files, 3600.0))
    writer.save(_checkpoint(1.0))  # the first: published
    writer.save(_checkpoint(2.0))  # only here
    writer.close()
    assert not ckpt.fetch(files, path)
    assert ckpt.load(path).sequence == 2
    ckpt.discard(path, files)
    assert files.names() == []
    assert not ckpt.exists(path)


def test_a_published_save_is_a_copy_that_later_saves_to_its_slot_leave_alone(
    store: ArtifactStore, tmp_path: Path
) -> None:
    """Slots are overwritten in place: the published save must not share the slot's file."""
    files = store.job_files("job-1", ckpt.FOLDER)
    writer = ckpt.Writer(tmp_path / "a" / "checkpoint", on_save=ckpt.Publisher(files, 3600.0))
    writer.save(_checkpoint(1.0))  # slot 1, published (the first save)
    writer.save(_checkpoint(2.0))  # slot 0
    writer.save(_checkpoint(3.0))  # slot 1 again, in place
    writer.close()
    there = tmp_path / "b" / "checkpoint"
    assert ckpt.fetch(files, there)
    loaded = ckpt.load(there)
    assert loaded.sequence == 1
    assert torch.equal(loaded.tensors["model"]["w"], torch.full((64, 64), 1.0))


def test_a_local_store_links_batch_parts_instead_of_copying_them(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    files = store.job_files("job-1", batch_parts.FOLDER)
    work = tmp_path / "work"
    _commit(work, files, 1)
    stored = tmp_path / "artifacts" / "jobs" / "job-1" / "batch" / "out-000000.arrow"
    assert stored.stat().st_ino == (work / "out-000000.arrow").stat().st_ino
    # Scored anew (its marker was dropped): the new part replaces the stored one.
    batch_parts.commit_chunk(work, 0, *_chunk(7), files)
    assert stored.stat().st_ino == (work / "out-000000.arrow").stat().st_ino
    assert batch_parts.restore(tmp_path / "elsewhere", files) == 1
    assert _ids(tmp_path / "elsewhere", 1) == list(range(35, 40))
