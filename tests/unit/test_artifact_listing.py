"""ArtifactStore.listed(), which the sweeper reads: every stored artifact and when it was
stored, locally and at an fsspec URL; and the sweeper removing an orphan from a remote store
and this host's cache."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fsspec
import pytest

from db.base import utcnow
from kiln.artifacts import ArtifactStore, RemoteArtifactStore
from workers.sweeper import sweep


@pytest.fixture(params=["memory", "file"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh remote location: fsspec's in-memory object store, or a plain directory URL."""
    if request.param == "memory":
        yield f"memory://kiln-{uuid.uuid4().hex}/artifacts"
        fsspec.filesystem("memory").store.clear()
        return
    yield (tmp_path / "shared").as_uri()


def test_the_local_store_lists_its_artifacts_and_nothing_else(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    stored = [store.put_bytes(content) for content in (b"one", b"two")]
    (tmp_path / "artifacts" / ".incoming-x").write_bytes(b"half")  # an upload in flight
    (tmp_path / "artifacts" / stored[0].digest[:2] / "notes.txt").write_bytes(b"?")

    listed = dict(store.listed())

    assert set(listed) == {s.digest for s in stored}
    assert all(abs(at - datetime.now(UTC)) < timedelta(minutes=5) for at in listed.values())


def test_an_empty_store_lists_nothing(tmp_path: Path, url: str) -> None:
    assert list(ArtifactStore(tmp_path / "none").listed()) == []
    assert list(RemoteArtifactStore(url, tmp_path / "cache").listed()) == []


def test_a_remote_store_lists_what_is_at_the_url(url: str, tmp_path: Path) -> None:
    writer = RemoteArtifactStore(url, tmp_path / "a")
    stored = writer.put_bytes(b"weights")
    reader = RemoteArtifactStore(url, tmp_path / "b")  # another host: an empty cache

    listed = dict(reader.listed())

    assert list(listed) == [stored.digest]
    assert abs(listed[stored.digest] - datetime.now(UTC)) < timedelta(minutes=5)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_sweeper_removes_an_orphan_from_the_url_and_the_cache(
    url: str, tmp_path: Path, sessions, settings
) -> None:
    store = RemoteArtifactStore(url, tmp_path / "cache")
    orphan = store.put_bytes(b"an upload that never became a row")
    later = utcnow() + timedelta(seconds=settings.sweep_grace_s + 60)

    report = sweep(sessions, settings, store, now=later)

    assert [r.what for r in report.removals] == [orphan.digest]
    assert not store.exists(orphan.digest)
    assert not orphan.path.exists()
