"""RemoteArtifactStore over fsspec: hosts share artifacts through a URL, each with its own cache."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import fsspec
import pytest

from kiln.artifacts import ArtifactStore, RemoteArtifactStore, open_store
from kiln.errors import PayloadTooLarge
from kiln.settings import Settings


@pytest.fixture(params=["memory", "file"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh remote location: fsspec's in-memory object store, or a plain directory URL."""
    if request.param == "memory":
        yield f"memory://kiln-{uuid.uuid4().hex}/artifacts"
        fsspec.filesystem("memory").store.clear()
        return
    yield (tmp_path / "shared").as_uri()


def test_a_second_host_reads_what_the_first_stored(url: str, tmp_path: Path) -> None:
    host_a = RemoteArtifactStore(url, tmp_path / "a")
    host_b = RemoteArtifactStore(url, tmp_path / "b")
    stored = host_a.put_bytes(b"weights")
    assert stored.digest == hashlib.sha256(b"weights").hexdigest()
    assert not (tmp_path / "b").exists()  # nothing is shared but the URL
    assert host_b.exists(stored.digest)
    assert host_b.path(stored.digest).read_bytes() == b"weights"
    assert host_b.path(stored.digest).is_relative_to(tmp_path / "b")


def test_an_artifact_is_uploaded_once(url: str, tmp_path: Path) -> None:
    store = RemoteArtifactStore(url, tmp_path / "a")
    store.put_bytes(b"x")
    other = RemoteArtifactStore(url, tmp_path / "b")
    other.put_bytes(b"x")
    files = [f for f in store.fs.find(store._base) if not f.endswith("/")]
    assert len(files) == 1
    assert not any(".incoming-" in f for f in files)


def test_a_corrupt_remote_object_never_enters_the_cache(url: str, tmp_path: Path) -> None:
    writer = RemoteArtifactStore(url, tmp_path / "a")
    digest = writer.put_bytes(b"good").digest
    with writer.fs.open(writer.remote_key(digest), "wb") as handle:
        handle.write(b"evil")
    reader = RemoteArtifactStore(url, tmp_path / "b")
    with pytest.raises(OSError, match="does not match"):
        reader.path(digest)
    assert [p for p in (tmp_path / "b").rglob("*") if p.is_file()] == []


def test_too_large_upload_reaches_neither_cache_nor_remote(url: str, tmp_path: Path) -> None:
    store = RemoteArtifactStore(url, tmp_path / "a")
    with pytest.raises(PayloadTooLarge):
        store.put_chunks([b"a" * 10, b"b" * 10], max_bytes=15)
    assert not store.fs.exists(store._base) or store.fs.find(store._base) == []
    assert [p for p in (tmp_path / "a").rglob("*") if p.is_file()] == []


def test_discard_removes_both_copies(url: str, tmp_path: Path) -> None:
    store = RemoteArtifactStore(url, tmp_path / "a")
    stored = store.put_bytes(b"unparseable")
    store.discard(stored.digest)
    assert not store.exists(stored.digest)
    assert not stored.path.exists()


def test_a_missing_artifact_is_a_missing_local_file(url: str, tmp_path: Path) -> None:
    store = RemoteArtifactStore(url, tmp_path / "a")
    assert not store.path("0" * 64).exists()


def test_open_store_follows_the_settings(tmp_path: Path) -> None:
    local = open_store(Settings(data_dir=tmp_path))
    assert type(local) is ArtifactStore
    assert local.root == tmp_path / "artifacts"
    remote = open_store(Settings(data_dir=tmp_path, artifacts_url="memory://bucket/kiln"))
    assert isinstance(remote, RemoteArtifactStore)
    assert remote.root == tmp_path / "artifacts"  # the data directory becomes the cache


def test_a_moved_file_goes_up_to_the_url(url: str, tmp_path: Path) -> None:
    scratch = tmp_path / "output.parquet"
    scratch.write_bytes(b"rows")
    stored = RemoteArtifactStore(url, tmp_path / "a").move_file(scratch)
    assert not scratch.exists()
    assert RemoteArtifactStore(url, tmp_path / "b").path(stored.digest).read_bytes() == b"rows"
