"""The artifact store: content addressed, atomic, bounded."""

import errno
import hashlib
import os

import pytest

from kiln.artifacts import ArtifactStore
from kiln.errors import PayloadTooLarge


def test_stored_file_is_addressed_by_its_sha256(tmp_path) -> None:
    store = ArtifactStore(tmp_path)
    stored = store.put_chunks([b"hello ", b"world"])
    assert stored.digest == hashlib.sha256(b"hello world").hexdigest()
    assert stored.size == 11
    assert store.path(stored.digest).read_bytes() == b"hello world"


def test_same_bytes_twice_share_one_file(tmp_path) -> None:
    store = ArtifactStore(tmp_path)
    first, second = store.put_bytes(b"x"), store.put_bytes(b"x")
    assert first.path == second.path
    assert len(list(tmp_path.rglob("*"))) == 2  # the fan-out folder and the file


def test_too_large_stream_is_refused_and_leaves_nothing(tmp_path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(PayloadTooLarge):
        store.put_chunks([b"a" * 10, b"b" * 10], max_bytes=15)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("digest", ["../../etc/passwd", "ab", "Z" * 64])
def test_path_refuses_anything_but_a_digest(tmp_path, digest: str) -> None:
    with pytest.raises(ValueError, match="sha256"):
        ArtifactStore(tmp_path).path(digest)


def test_a_moved_file_is_stored_under_its_digest_and_leaves_its_place(tmp_path) -> None:
    store = ArtifactStore(tmp_path / "store")
    scratch = tmp_path / "output.parquet"
    scratch.write_bytes(b"rows")
    stored = store.move_file(scratch)
    assert stored.digest == hashlib.sha256(b"rows").hexdigest()
    assert (stored.size, store.path(stored.digest).read_bytes()) == (4, b"rows")
    assert not scratch.exists()


def test_moving_in_bytes_already_stored_keeps_the_stored_file(tmp_path) -> None:
    store = ArtifactStore(tmp_path / "store")
    first = store.put_bytes(b"rows")
    scratch = tmp_path / "again"
    scratch.write_bytes(b"rows")
    assert store.move_file(scratch).path == first.path
    assert not scratch.exists()
    assert [p.name for p in (tmp_path / "store").rglob("*") if p.is_file()] == [first.digest]


def test_a_file_on_another_file_system_is_copied_in(tmp_path, monkeypatch) -> None:
    store = ArtifactStore(tmp_path / "store")
    scratch = tmp_path / "output.csv"
    scratch.write_bytes(b"a,b\n")

    replace = os.replace

    def across_devices(source: object, target: object) -> None:
        if source == scratch:  # the rename of the scratch file itself
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        replace(source, target)

    monkeypatch.setattr(os, "replace", across_devices)
    stored = store.move_file(scratch)
    assert store.path(stored.digest).read_bytes() == b"a,b\n"
    assert not scratch.exists()
