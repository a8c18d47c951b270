"""What the retention tests share: finished jobs with log lines, metrics and stored outputs,
registered versions and uploaded datasets whose files are really in the store, and aging
files past the sweeper's grace period."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db import jobs, registry
from db.models import Dataset, Job, JobEvent, Metric, ModelVersion
from kiln import job_space
from kiln.artifacts import ArtifactStore, Stored
from kiln.settings import Settings
from kiln.states import JobState

CONFIG = {
    "arch": "mlp",
    "arch_params": {"hidden": [4], "dropout": 0.0},
    "feature_names": ["a", "b", "c"],
    "label_names": ["no", "yes"],
}


def store_of(settings: Settings) -> ArtifactStore:
    return ArtifactStore(settings.artifacts_dir)


def put(settings: Settings, content: bytes) -> Stored:
    return store_of(settings).put_bytes(content)


def age(path: Path, seconds: float) -> None:
    """Make a file, or a folder and what is in it, look `seconds` old."""
    then = time.time() - seconds
    for each in [*path.iterdir(), path] if path.is_dir() else [path]:
        os.utime(each, (then, then))


def finished_job(
    sessions: sessionmaker[Session],
    *,
    owner: str = "alice",
    kind: str = "batch_predict",
    spec: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    expires_after_s: int | None = 3600,
    state: JobState = JobState.SUCCEEDED,
) -> Job:
    """A job that ran (one log line, one metric point) and finished in `state`."""
    with sessions() as session:
        job = jobs.create(
            session,
            kind=kind,
            owner=owner,
            spec=spec or {"model": "m", "dataset": "d"},
            queue="cpu",
            expires_after_s=expires_after_s,
        )
        session.commit()
        attempt = jobs.claim(session, job.id, 0, "worker-1", "cpu")
        assert attempt == 1
        jobs.log(session, job.id, "scored 3 rows")
        jobs.record_metrics(session, job.id, [("rows_per_s", 1, 10.0)])
        if state is JobState.SUCCEEDED:
            assert jobs.succeed(session, job.id, attempt, result or {})
        elif result is not None:  # a failing batch job attaches its error file first
            assert jobs.attach_result(session, job.id, attempt, result)
        if state is JobState.FAILED:
            assert jobs.fail(session, job.id, attempt, "JobFailure", "bad rows")
        elif state is JobState.CANCELLED:
            assert jobs.mark_cancelled(session, job.id, attempt)
        session.commit()
        return session.get_one(Job, job.id)


def live_job(
    sessions: sessionmaker[Session],
    spec: dict[str, Any],
    *,
    kind: str = "predict",
    owner: str = "alice",
    running: bool = False,
) -> Job:
    """A queued (or running) job with this spec."""
    with sessions() as session:
        job = jobs.create(session, kind=kind, owner=owner, spec=spec, queue="cpu")
        session.commit()
        if running:
            assert jobs.claim(session, job.id, 0, "worker-1", "cpu") == 1
            session.commit()
        return session.get_one(Job, job.id)


def output_result(stored: Stored) -> dict[str, Any]:
    """A batch_predict result naming `stored` as its output file."""
    return {"rows": 3, "output": {"digest": stored.digest, "size": stored.size, "format": "csv"}}


def register(
    sessions: sessionmaker[Session],
    settings: Settings,
    name: str,
    content: bytes,
    *,
    owner: str = "alice",
    source_job_id: str | None = None,
) -> ModelVersion:
    stored = put(settings, content)
    with sessions() as session:
        version = registry.register_version(
            session,
            owner=owner,
            name=name,
            source_job_id=source_job_id,
            arch="mlp",
            config=CONFIG,
            metrics={},
            artifact_digest=stored.digest,
            artifact_size=stored.size,
            dataset_digest=None,
        )
        session.commit()
        return version


def dataset(
    sessions: sessionmaker[Session], settings: Settings, content: bytes, owner: str = "alice"
) -> Dataset:
    stored = put(settings, content)
    with sessions() as session:
        row = Dataset(
            owner=owner,
            name="d.csv",
            format="csv",
            rows=2,
            columns=[{"name": "a", "dtype": "int64"}],
            size_bytes=stored.size,
            digest=stored.digest,
        )
        session.add(row)
        session.commit()
        return row


def scratch(settings: Settings, job_id: str) -> Path:
    """A job's scratch folder with a checkpoint in it."""
    folder = job_space.scratch_dir(settings.data_dir, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "checkpoint.safetensors").write_bytes(b"ckpt")
    return folder


def count(
    sessions: sessionmaker[Session], table: type[JobEvent] | type[Metric], job_id: str
) -> int:
    with sessions() as session:
        query = select(func.count()).select_from(table).where(table.job_id == job_id)
        return int(session.scalar(query) or 0)


def job_row(sessions: sessionmaker[Session], job_id: str) -> Job | None:
    with sessions() as session:
        return session.get(Job, job_id)
