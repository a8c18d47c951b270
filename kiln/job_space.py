"""A job's own files, found in one place: its scratch folder on this host, and (the hook
below) its per-job part of the artifact store.

Deleting a job (the web) and expiring one or clearing orphans (the sweeper, in
workers/sweeper.py) remove a job's files through `remove()`, so whatever a job keeps
apart from the shared, content-addressed artifacts is named here once. The shared artifacts
(outputs, weights, datasets) are not a job's alone: several rows may share a digest, and the
callers discard those only when nothing refers to them any more.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from kiln.artifacts import ArtifactStore

#: A job id (uuid4 hex): only folders named like one are ever taken for a job's scratch.
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def scratch_root(data_dir: Path) -> Path:
    """The folder holding every job's scratch folder on this host."""
    return data_dir / "work"


def scratch_dir(data_dir: Path, job_id: str) -> Path:
    """Where job `job_id` keeps (or kept) its scratch files on this host; it may not exist."""
    return scratch_root(data_dir) / job_id


@dataclass(frozen=True)
class ScratchFolder:
    job_id: str
    path: Path
    #: The newest modification time of the folder or anything directly in it.
    modified: datetime


def scratch_folders(data_dir: Path) -> list[ScratchFolder]:
    """Every job scratch folder on this host, by job id."""
    root = scratch_root(data_dir)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.is_dir() and _JOB_ID.match(path.name):
            found.append(ScratchFolder(path.name, path, _modified(path)))
    return found


def _modified(folder: Path) -> datetime:
    # A checkpoint rewritten in place changes its file's time, not the folder's.
    times = [folder.stat().st_mtime]
    for child in folder.iterdir():
        try:
            times.append(child.stat().st_mtime)
        except FileNotFoundError:  # removed while we looked: the folder's time is enough
            continue
    return datetime.fromtimestamp(max(times), UTC)


def remove(
    data_dir: Path, store: ArtifactStore, job_id: str, dry_run: bool = False
) -> list[tuple[str, str]]:
    """Remove (with `dry_run`: only name) the files job `job_id` keeps for itself: its
    scratch folder on this host and its per-job part of the artifact store. Returns what
    went (or would go): ("scratch", a folder) and ("stored", a store key) pairs."""
    gone = []
    scratch = scratch_dir(data_dir, job_id)
    if scratch.is_dir():
        gone.append(("scratch", str(scratch)))
        if not dry_run:
            shutil.rmtree(scratch, ignore_errors=True)
    gone += [("stored", key) for key in remove_stored(store, job_id, dry_run=dry_run)]
    return gone


def remove_stored(store: ArtifactStore, job_id: str, *, dry_run: bool = False) -> list[str]:
    """Remove (with `dry_run`: only name) job `job_id`'s part of the artifact store: its
    resumable state under `jobs/<job id>/` (checkpoints, committed batch chunks), which any
    host reads to resume the job; returns the keys of its folders."""
    return store.discard_job_files(job_id, dry_run=dry_run)
