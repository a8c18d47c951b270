"""Datasets: upload (multipart, streamed into the artifact store), list, read, delete.

An upload is CSV, Parquet, JSONL or NPZ, named by its suffix; its content must parse as that
format (a CSV named .parquet is refused), and its rows, columns, size and sha256 are recorded.
"""

from __future__ import annotations

from flask import Response, current_app, request
from sqlalchemy import select

from db import registry
from db.base import utcnow
from db.models import Dataset
from kiln import dataset_probe, datasets
from kiln.artifacts import open_store
from kiln.errors import InUse, InvalidRequest, NotFound, UnsupportedDataset
from kiln.schemas import DatasetList, DatasetOut
from kiln.settings import Settings
from web import session
from web.api import bp
from web.api.body import answer
from web.auth import principal

_CHUNK = 1024 * 1024


@bp.post("/datasets")
def upload_dataset() -> Response:
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        raise InvalidRequest("send the file as multipart/form-data field 'file'")
    fmt = datasets.format_of(upload.filename)
    settings: Settings = current_app.config["KILN_SETTINGS"]
    store = open_store(settings)
    stored = store.put_chunks(
        iter(lambda: upload.stream.read(_CHUNK), b""), max_bytes=settings.max_upload_bytes
    )
    try:
        info = dataset_probe.inspect_isolated(stored.path, fmt)  # a crash ends a child, not us
    except UnsupportedDataset:
        # The store shares equal files: keep one that an earlier row already refers to.
        if not registry.digest_in_use(session.get(), stored.digest):
            store.discard(stored.digest)
        raise
    db = session.get()
    dataset = Dataset(
        owner=principal().owner,
        name=request.form.get("name") or upload.filename,
        format=info.format,
        rows=info.rows,
        columns=info.columns,
        size_bytes=stored.size,
        digest=stored.digest,
        created_at=utcnow(),
    )
    db.add(dataset)
    db.commit()
    return answer(
        DatasetOut.model_validate(dataset), 201, {"Location": f"/api/v1/datasets/{dataset.id}"}
    )


@bp.get("/datasets")
def list_datasets() -> Response:
    query = select(Dataset).order_by(Dataset.created_at.desc())
    owner = principal().visible_owner
    if owner is not None:
        query = query.where(Dataset.owner == owner)
    found = session.get().scalars(query)
    return answer(DatasetList(datasets=[DatasetOut.model_validate(d) for d in found]))


@bp.get("/datasets/<dataset_id>")
def get_dataset(dataset_id: str) -> Response:
    return answer(DatasetOut.model_validate(_owned(dataset_id)))


@bp.delete("/datasets/<dataset_id>")
def delete_dataset(dataset_id: str) -> Response:
    """Delete a dataset, refused (409) while a model version's lineage names its file."""
    db = session.get()
    dataset = _owned(dataset_id)
    users = registry.versions_trained_on(db, dataset)
    if users:
        shown = ", ".join(users[:5]) + (" ..." if len(users) > 5 else "")
        raise InUse(f"model versions were trained on this dataset ({shown}); delete them first")
    digest = dataset.digest
    db.delete(dataset)
    db.flush()
    # The store shares one file between identical uploads: keep it while anything refers to it.
    orphaned = not registry.digest_in_use(db, digest)
    db.commit()
    if orphaned:
        open_store(current_app.config["KILN_SETTINGS"]).discard(digest)
    return Response(status=204)


def _owned(dataset_id: str) -> Dataset:
    dataset = session.get().get(Dataset, dataset_id)
    owner = principal().visible_owner
    if dataset is None or (owner is not None and dataset.owner != owner):
        raise NotFound(f"no dataset {dataset_id}")
    return dataset
