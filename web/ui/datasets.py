"""Datasets page: the user's uploads, and an upload form (XHR progress, or a plain POST)."""

from __future__ import annotations

from flask import flash, jsonify, redirect, render_template, request, url_for
from werkzeug import Response

from db import datasets as dataset_store
from db.models import Dataset
from kiln.errors import KilnError
from kiln.schemas import DatasetOut
from web import session, storage
from web.ui import auth, bp


@bp.get("/datasets")
@auth.signed_in
def datasets() -> str:
    return render_template("datasets.html", datasets=_visible(), error=None, name="")


@bp.post("/datasets")
@auth.signed_in
def upload() -> Response | tuple[str, int]:
    """Store the upload as the API does (web.storage), so both accept the same files."""
    name = request.form.get("name", "")
    try:
        dataset = storage.upload_dataset(
            session.get(), auth.current().owner, request.files.get("file"), name
        )
    except KilnError as exc:
        page = render_template("datasets.html", datasets=_visible(), error=exc.message, name=name)
        return page, exc.status
    flash(f"Uploaded {dataset.name}: {dataset.rows} rows.")
    target = url_for("ui.datasets")
    if request.headers.get("X-Requested-With") == "XMLHttpRequest":
        shown = DatasetOut.model_validate(dataset).model_dump(mode="json")
        return jsonify(redirect=target, dataset=shown)
    return redirect(target)


def _visible() -> list[Dataset]:
    return dataset_store.listed(session.get(), auth.current().visible_owner)
