"""Datasets: upload (multipart, streamed into the artifact store), list, read, delete.

An upload is CSV, Parquet, JSONL or NPZ, named by its suffix; its content must parse as that
format (a CSV named .parquet is refused), and its rows, columns, size and sha256 are recorded.
"""

from __future__ import annotations

from flask import Response, request

from db import datasets
from db.models import Dataset
from kiln.schemas import DatasetList, DatasetOut
from web import session, storage
from web.api import bp
from web.api.body import answer
from web.auth import principal


@bp.post("/datasets")
def upload_dataset() -> Response:
    dataset = storage.upload_dataset(
        session.get(), principal().owner, request.files.get("file"), request.form.get("name", "")
    )
    return answer(
        DatasetOut.model_validate(dataset), 201, {"Location": f"/api/v1/datasets/{dataset.id}"}
    )


@bp.get("/datasets")
def list_datasets() -> Response:
    found = datasets.listed(session.get(), principal().visible_owner)
    return answer(DatasetList(datasets=[DatasetOut.model_validate(d) for d in found]))


@bp.get("/datasets/<dataset_id>")
def get_dataset(dataset_id: str) -> Response:
    return answer(DatasetOut.model_validate(_owned(dataset_id)))


@bp.delete("/datasets/<dataset_id>")
def delete_dataset(dataset_id: str) -> Response:
    """Delete a dataset, refused (409) while a model version's lineage names its file."""
    storage.delete_dataset(session.get(), _owned(dataset_id))
    return Response(status=204)


def _owned(dataset_id: str) -> Dataset:
    return datasets.get_owned(session.get(), dataset_id, principal().visible_owner)
