"""The artifact store: immutable files addressed by their sha256, written atomically.

A file is streamed to a temporary name beside its final place, fsynced, then renamed (a
worker's finished scratch file is fsynced and renamed where it lies), so a crash leaves no
half file under a digest. The same bytes stored twice share one file.

`open_store(settings)` picks the store: files under the data directory, or, when
KILN_ARTIFACTS_URL names an fsspec URL (s3://bucket/prefix), a RemoteArtifactStore that
keeps the artifacts there and this host's copies in the data directory as a cache, so
workers on several hosts share models and datasets through the URL alone.

`store.job_files(job_id, folder)` is a job's resumable state (checkpoints, committed batch
chunks) in the same store, under `jobs/<job_id>/<folder>/` (kiln/job_files.py).
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import PayloadTooLarge
from kiln.job_files import JobFiles, LocalJobFiles, RemoteJobFiles, upload

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

    from kiln.settings import Settings

_CHUNK = 1024 * 1024
#: Object stores whose single put is atomic: a reader sees the whole object or none.
_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "memory"}


#: The folder of jobs' resumable state beside the artifacts (digests sit under two hex digits).
_JOBS = "jobs"


def _part(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"not a job id or folder name: {name!r}")
    return name


@dataclass(frozen=True)
class Stored:
    digest: str
    size: int
    #: A local file holding the bytes (for a remote store: this host's cached copy).
    path: Path


class ArtifactStore:
    """Artifacts as files under `root` on this host (or a file system every host mounts)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: str) -> Path:
        """The local file holding `digest` (it may not exist, if nothing stored it)."""
        return self._local(digest)

    def exists(self, digest: str) -> bool:
        return self._local(digest).exists()

    def discard(self, digest: str) -> None:
        """Remove an artifact nothing refers to (an upload that failed to parse)."""
        self._local(digest).unlink(missing_ok=True)

    def listed(self) -> Iterator[tuple[str, datetime]]:
        """Every stored artifact: its digest and when it was last stored (the sweeper
        removes those nothing refers to once they are old enough)."""
        if not self.root.is_dir():
            return
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or not _is_prefix(folder.name):
                continue
            for path in sorted(folder.iterdir()):
                if _is_digest(path.name) and path.name.startswith(folder.name):
                    try:
                        when = path.stat().st_mtime
                    except FileNotFoundError:  # discarded while we looked
                        continue
                    yield path.name, datetime.fromtimestamp(when, UTC)

    def job_files(self, job_id: str, folder: str) -> JobFiles:
        """Job `job_id`'s resumable state named `folder` (checkpoint, batch)."""
        return LocalJobFiles(self.root / _JOBS / _part(job_id) / _part(folder))

    def discard_job_files(self, job_id: str, *, dry_run: bool = False) -> list[str]:
        """Remove (with `dry_run`: only name) every folder of job `job_id`'s resumable
        state (the job is deleted or expired); returns their keys (`jobs/<id>/<folder>`)."""
        folder = self._job_folder(job_id)
        present = [f"{_JOBS}/{job_id}/{name}" for name in folder.names()]
        if present and not dry_run:
            folder.clear()
        return present

    def _job_folder(self, job_id: str) -> JobFiles:
        return LocalJobFiles(self.root / _JOBS / _part(job_id))

    def put_chunks(self, chunks: Iterable[bytes], max_bytes: int | None = None) -> Stored:
        """Store a stream; raises PayloadTooLarge (and keeps nothing) past `max_bytes`."""
        self.root.mkdir(parents=True, exist_ok=True)
        sha, size = hashlib.sha256(), 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise PayloadTooLarge(f"the file is larger than {max_bytes} bytes")
                    sha.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            return self._place(tmp, sha.hexdigest(), size)
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, data: bytes) -> Stored:
        return self.put_chunks([data])

    def put_file(self, source: Path) -> Stored:
        """Store a finished local file (a worker's output) by streaming it in."""
        with source.open("rb") as handle:
            return self.put_chunks(iter(lambda: handle.read(_CHUNK), b""))

    def move_file(self, source: Path) -> Stored:
        """Store a finished scratch file by moving it in (the caller is done with it):
        hashed and fsynced where it lies, then renamed under its digest, so a large output
        is not written a second time. From another file system it is copied in."""
        sha, size = hashlib.sha256(), 0
        with source.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                sha.update(chunk)
                size += len(chunk)
            os.fsync(handle.fileno())
        try:
            return self._place(source, sha.hexdigest(), size)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            return self.put_file(source)
        finally:
            source.unlink(missing_ok=True)

    def _local(self, digest: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / digest[:2] / digest

    def _place(self, tmp: Path, digest: str, size: int) -> Stored:
        final = self._local(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        if not final.exists():
            os.replace(tmp, final)
        else:
            # Stored again: young again, so the sweeper's grace period covers the new
            # row about to refer to it, as it covers a new file.
            os.utime(final)
        return Stored(digest=digest, size=size, path=final)


class RemoteArtifactStore(ArtifactStore):
    """Artifacts at an fsspec URL; `root` is this host's cache of the ones it used.

    Writes land in the cache first (the digest is known only once the stream ends), then
    go up under their digest; reads fetch into the cache once, checking the sha256.
    """

    def __init__(self, url: str, cache: Path, storage_options: dict[str, Any] | None = None):
        from fsspec.core import url_to_fs

        super().__init__(cache)
        self.url = url.rstrip("/")
        self.fs: AbstractFileSystem
        self.fs, self._base = url_to_fs(self.url, **(storage_options or {}))
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self._atomic_put = bool(_ATOMIC_PUT.intersection(protocols))

    def remote_key(self, digest: str) -> str:
        self._local(digest)  # validates the digest
        return f"{self._base}/{digest[:2]}/{digest}"

    def path(self, digest: str) -> Path:
        """The cached local copy, fetched first if this host has none (and the URL has it)."""
        local = self._local(digest)
        if not local.exists() and self.exists(digest):
            self._fetch(digest, local)
        return local

    def exists(self, digest: str) -> bool:
        return bool(self.fs.exists(self.remote_key(digest)))

    def listed(self) -> Iterator[tuple[str, datetime]]:
        """The artifacts at the URL (this host's cache holds copies of some of them). One
        whose store reports no time is listed as stored now: never taken for old."""
        if not self.fs.exists(self._base):
            return
        for key, info in sorted(self.fs.find(self._base, detail=True).items()):
            prefix, _, name = key.rstrip("/").rpartition("/")
            if _is_digest(name) and prefix.rsplit("/", 1)[-1] == name[:2]:
                yield name, _stored_at(info)

    def discard(self, digest: str) -> None:
        key = self.remote_key(digest)
        if self.fs.exists(key):
            self.fs.rm(key)
        super().discard(digest)

    def _place(self, tmp: Path, digest: str, size: int) -> Stored:
        stored = super()._place(tmp, digest, size)
        key = self.remote_key(digest)
        if not self.fs.exists(key):
            self._upload(stored.path, key)
        return stored

    def _upload(self, source: Path, key: str) -> None:
        upload(self.fs, source, key, self._atomic_put)

    def job_files(self, job_id: str, folder: str) -> JobFiles:
        prefix = f"{self._base}/{_JOBS}/{_part(job_id)}/{_part(folder)}"
        return RemoteJobFiles(self.fs, prefix, self._atomic_put)

    def _job_folder(self, job_id: str) -> JobFiles:
        return RemoteJobFiles(self.fs, f"{self._base}/{_JOBS}/{_part(job_id)}", self._atomic_put)

    def _fetch(self, digest: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".fetching-")
        tmp = Path(tmp_name)
        try:
            sha = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, self.fs.open(self.remote_key(digest), "rb") as src:
                while chunk := src.read(_CHUNK):
                    sha.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            # The address is the content: a corrupt or tampered object never enters the cache.
            if sha.hexdigest() != digest:
                raise OSError(f"artifact {digest} at {self.url} does not match its digest")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)


def _is_digest(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _is_prefix(name: str) -> bool:
    return len(name) == 2 and all(c in "0123456789abcdef" for c in name)


def _stored_at(info: dict[str, Any]) -> datetime:
    """An fsspec listing entry's modification time (s3: LastModified; local: mtime;
    memory: created), else now."""
    for field in ("LastModified", "last_modified", "mtime", "created"):
        value = info.get(field)
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, UTC)
    return datetime.now(UTC)


def open_store(settings: Settings) -> ArtifactStore:
    """The store the settings name: KILN_ARTIFACTS_URL when set, else the data directory."""
    if not settings.artifacts_url:
        return ArtifactStore(settings.artifacts_dir)
    options: dict[str, Any] = {}
    if settings.artifacts_endpoint_url:
        options["endpoint_url"] = settings.artifacts_endpoint_url
    return RemoteArtifactStore(settings.artifacts_url, settings.artifacts_dir, options)
