"""Datasets page: the user's uploads, an upload form (XHR progress, or a plain POST) taking
every format the API takes (CSV, Parquet, JSONL, NPZ), and deleting an upload."""

from __future__ import annotations

from flask import flash, jsonify, redirect, render_template, request, url_for
from werkzeug import Response

from db import datasets as dataset_store
from db.models import Dataset
from kiln.datasets import FORMATS
from kiln.errors import InUse, KilnError
from kiln.schemas import DatasetOut
from web import session, storage
from web.ui import auth, bp, filters


@bp.get("/datasets")
@auth.signed_in
def datasets() -> str:
    return _page(error=None, name="")


@bp.post("/datasets")
@auth.signed_in
def upload() -> Response | tuple[str, int]:
    """Store the upload as the API does (web.storage), so both accept the same files."""
    name = request.form.get("name", "")
    upload = request.files.get("file")
    if upload is None or not upload.filename:  # the API's words name a multipart field
        return _page(error="Choose a file to upload.", name=name), 422
    try:
        dataset = storage.upload_dataset(session.get(), auth.current().owner, upload, name)
    except KilnError as exc:
        return _page(error=exc.message, name=name), exc.status
    flash(f"Uploaded {dataset.name}: {filters.rows(dataset.rows)}.")
    target = url_for("ui.datasets")
    if request.headers.get("X-Requested-With") == "XMLHttpRequest":
        shown = DatasetOut.model_validate(dataset).model_dump(mode="json")
        return jsonify(redirect=target, dataset=shown)
    return redirect(target)


@bp.route("/datasets/<dataset_id>/delete", methods=["GET", "POST"])
@auth.signed_in
def delete_dataset(dataset_id: str) -> Response | tuple[str, int] | str:
    """GET asks to confirm; POST deletes as the API does: refused (409, with the reason)
    while a model version was trained on the dataset."""
    dataset = _owned(dataset_id)
    page = {
        "what": f"dataset {dataset.name}",
        "consequence": "Jobs that name it will fail; the jobs that used it keep their results.",
        "action": url_for("ui.delete_dataset", dataset_id=dataset.id),
        "back": url_for("ui.datasets"),
    }
    if request.method == "GET":
        return render_template("confirm_delete.html", error=None, **page)
    try:
        storage.delete_dataset(session.get(), dataset)
    except InUse as exc:
        return render_template("confirm_delete.html", error=exc.message, **page), exc.status
    flash(f"Deleted {page['what']}.")
    return redirect(url_for("ui.datasets"))


def _page(error: str | None, name: str) -> str:
    visible = dataset_store.listed(session.get(), auth.current().visible_owner)
    accept = ",".join(f".{fmt}" for fmt in FORMATS)
    return render_template(
        "datasets.html", datasets=visible, error=error, name=name, formats=FORMATS, accept=accept
    )


def _owned(dataset_id: str) -> Dataset:
    return dataset_store.get_owned(session.get(), dataset_id, auth.current().visible_owner)
