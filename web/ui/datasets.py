"""Datasets page: the user's uploads, and an upload form (XHR progress, or a plain POST)."""

from __future__ import annotations

from flask import flash, jsonify, redirect, render_template, request, url_for
from sqlalchemy import select
from werkzeug import Response

from db.models import Dataset
from kiln.errors import KilnError
from web import session
from web.api import datasets as api_datasets
from web.ui import auth, bp


@bp.get("/datasets")
@auth.signed_in
def datasets() -> str:
    return render_template("datasets.html", datasets=_visible(), error=None, name="")


@bp.post("/datasets")
@auth.signed_in
def upload() -> Response | tuple[str, int]:
    """Store the upload through the API's own upload view, so both accept the same files
    (it reads the session's principal, which auth.load_principal put in g.principal)."""
    try:
        answer = api_datasets.upload_dataset()
    except KilnError as exc:
        page = render_template(
            "datasets.html",
            datasets=_visible(),
            error=exc.message,
            name=request.form.get("name", ""),
        )
        return page, exc.status
    dataset = answer.get_json()
    flash(f"Uploaded {dataset['name']}: {dataset['rows']} rows.")
    target = url_for("ui.datasets")
    if request.headers.get("X-Requested-With") == "XMLHttpRequest":
        return jsonify(redirect=target, dataset=dataset)
    return redirect(target)


def _visible() -> list[Dataset]:
    query = select(Dataset).order_by(Dataset.created_at.desc())
    owner = auth.current().visible_owner
    if owner is not None:
        query = query.where(Dataset.owner == owner)
    return list(session.get().scalars(query))
