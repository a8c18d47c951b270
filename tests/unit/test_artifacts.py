"""The artifact store: content addressed, atomic, bounded."""

import hashlib

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
