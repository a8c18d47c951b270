"""What the web does with rows that own files in the artifact store, for the API and the UI
alike: store an uploaded dataset, delete a dataset, a model version, a model or a finished
job (and the files only it used), and send a job's result file. Each checks nothing about
who asks: the caller has found the row with the owner rule (db.datasets.get_owned,
db.jobs.get_owned, ...)."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app, send_file
from sqlalchemy.orm import Session
from werkzeug.datastructures import FileStorage

from db import datasets as dataset_store
from db import references, registry, retention
from db.models import Dataset, Job, Model, ModelVersion
from kiln import dataset_probe, datasets, job_space
from kiln.artifacts import ArtifactStore, open_store
from kiln.errors import ExportMissing, InvalidRequest, NoOutput, NotFound, UnsupportedDataset
from kiln.settings import Settings

_CHUNK = 1024 * 1024
#: The datasets.name column's size.
MAX_DATASET_NAME = 255

_MEDIA_TYPES = {
    "parquet": "application/vnd.apache.parquet",
    "csv": "text/csv",
    "jsonl": "application/x-ndjson",
    "arrow": "application/vnd.apache.arrow.file",
}


def upload_dataset(db: Session, owner: str, upload: FileStorage | None, name: str) -> Dataset:
    """Stream the upload into the store, check it parses as the format its suffix names
    (CSV, Parquet, JSONL or NPZ), and record it (committed)."""
    if upload is None or not upload.filename:
        raise InvalidRequest("send the file as multipart/form-data field 'file'")
    name = name or upload.filename
    if len(name) > MAX_DATASET_NAME:  # the column's size; checked before any byte is stored
        raise InvalidRequest(
            f"a dataset's name is at most {MAX_DATASET_NAME} characters (the 'name' field, "
            "else the file's name)",
            [{"loc": ["name"], "msg": f"at most {MAX_DATASET_NAME} characters"}],
        )
    fmt = datasets.format_of(upload.filename)
    settings = _settings()
    store = open_store(settings)
    stored = store.put_chunks(
        iter(lambda: upload.stream.read(_CHUNK), b""), max_bytes=settings.max_upload_bytes
    )
    try:
        info = dataset_probe.inspect_isolated(stored.path, fmt)  # a crash ends a child, not us
    except UnsupportedDataset:
        # The store shares equal files: keep one that an earlier row already refers to.
        if not references.digest_in_use(db, stored.digest):
            store.discard(stored.digest)
        raise
    dataset = dataset_store.create(
        db,
        owner=owner,
        name=name,
        info=info,
        size_bytes=stored.size,
        digest=stored.digest,
    )
    db.commit()
    return dataset


def delete_dataset(db: Session, dataset: Dataset) -> None:
    """Delete the dataset (InUse while a version was trained on it), committed, then its
    file if nothing else refers to it."""
    orphan = dataset_store.delete(db, dataset)
    db.commit()
    if orphan is not None:
        _store().discard(orphan)


def delete_version(db: Session, model: Model, ref: str | int) -> None:
    """Delete a version (InUse while an alias points at it), committed, then the files only
    it used."""
    orphans = registry.delete_version(db, model, ref)
    db.commit()
    store = _store()
    for digest in orphans:
        store.discard(digest)


def delete_model(db: Session, model: Model) -> None:
    """Delete a model and its versions (InUse while an alias points at one of them or a
    queued or running job names the model), committed, then the files only they used."""
    orphans = registry.delete_model(db, model)
    db.commit()
    store = _store()
    for digest in orphans:
        store.discard(digest)


def delete_job(db: Session, job: Job) -> None:
    """Delete a finished job (IllegalTransition while it is queued or running; InUse while a
    live job resumes from it) with its log lines and metrics, committed; then its output
    files that nothing else refers to, and its own files (kiln.job_space). A model version it
    registered stays, still naming it as its source job."""
    job_id = job.id
    orphans = retention.delete_job(db, job)
    db.commit()
    settings = _settings()
    store = open_store(settings)
    for digest in orphans:
        store.discard(digest)
    job_space.remove(settings.data_dir, store, job_id)


def stored_file(job: Job, entry: str) -> dict[str, Any] | None:
    """The job result's description of a stored file (digest, format, rows), if it has one."""
    described = (job.result or {}).get(entry)
    return described if isinstance(described, dict) and "digest" in described else None


def send_result_file(job: Job, entry: str) -> Response:
    """Stream the file a job's result names under `entry` ("output" or "error_file")."""
    described = stored_file(job, entry)
    if described is not None and job.expired:
        # The same words as `kiln sweep` (workers/sweeper.py): "kept until" is expires_at,
        # and when the sweep removed the files is said apart.
        until = job.expires_at.isoformat(timespec="seconds") if job.expires_at else "its expiry"
        removed = f" at {job.expired_at.isoformat(timespec='seconds')}" if job.expired_at else ""
        raise NoOutput(
            f"job {job.id} expired: it was kept until {until}; its files were removed{removed}"
        )
    if described is None and entry == "output" and (job.result or {}).get("parts"):
        raise NoOutput(
            f"job {job.id} wrote its output in parts (output_layout: parts): result.parts "
            "lists them, each served as its shard's output (GET /api/v1/jobs/<shard id>/output)"
        )
    if described is None:
        what = "output" if entry == "output" else "error file"
        raise NoOutput(f"job {job.id} has no {what} (state: {job.state})")
    fmt = str(described.get("format", "bin"))
    suffix = "errors" if entry == "error_file" else "output"
    return send_file(
        _store().path(described["digest"]),
        mimetype=_MEDIA_TYPES.get(fmt, "application/octet-stream"),
        as_attachment=True,
        download_name=f"{job.id}-{suffix}.{fmt}",
        etag=described["digest"],
        conditional=True,
    )


#: A model version's files: its weights, and each export made of it, by file name suffix.
VERSION_FILES = {"weights": ".safetensors", "torchscript": ".torchscript.pt"}


def send_version_file(name: str, version: ModelVersion, what: str) -> Response:
    """Send version `version` of model `name`'s weights or export `what` (a VERSION_FILES
    key) as `<name>-v<N><suffix>`; ExportMissing until an export job made it."""
    if what == "weights":
        digest = version.artifact_digest
    elif (made := version.exports.get(what)) is not None:
        digest = made["digest"]
    else:
        raise ExportMissing(
            f"version {version.number} of {name!r} has no {what} export yet: submit a job "
            f'{{"kind": "export", "spec": {{"model": "{name}", "version": {version.number}}}}} '
            "and download once it has succeeded"
        )
    path = _store().path(digest)
    if not path.is_file():
        raise NotFound("the stored file is missing from the artifact store")
    return send_file(
        path,
        mimetype="application/octet-stream",
        as_attachment=True,
        download_name=f"{name}-v{version.number}{VERSION_FILES[what]}",
        etag=digest,
        conditional=True,
    )


def _settings() -> Settings:
    return current_app.config["KILN_SETTINGS"]


def _store() -> ArtifactStore:
    return open_store(_settings())
