"""Models page: each model's versions with their metrics side by side, family and task
(with an hf version's tokenizer and context length), aliases (set and removed), lineage,
deleting a version or a whole model, and registering a Hugging Face model directory."""

from __future__ import annotations

from flask import flash, redirect, render_template, request, url_for
from werkzeug import Response

from db import datasets as dataset_store
from db import jobs, registry
from db.models import Dataset, Model
from kiln.errors import InUse, InvalidRequest, KilnError, NotFound
from kiln.families import HF_TASKS
from web import session, storage
from web.api import hf_upload
from web.ui import auth, bp


@bp.get("/models")
@auth.signed_in
def models() -> str:
    return _page(upload_error=None, upload_name="")


@bp.post("/models/upload")
@auth.signed_in
def upload_model() -> Response | tuple[str, int]:
    """Register a Hugging Face model directory (several files, or one .tar/.tar.gz) as the
    API does (web/api/hf_upload.py), so both accept and refuse the same directories."""
    name = request.form.get("name", "").strip()
    try:
        version = hf_upload.register_directory(name)
    except KilnError as exc:
        return _page(upload_error=exc.message, upload_name=name), exc.status
    flash(f"Registered {name} v{version.number} ({version.family}, {version.task}).")
    return redirect(url_for("ui.models") + f"#model-{version.model_id}")


def _page(upload_error: str | None, upload_name: str) -> str:
    found = registry.listed(session.get(), auth.current().visible_owner)
    return render_template(
        "models.html",
        models=found,
        metric_names={m.id: _metric_names(m) for m in found},
        datasets=_datasets_by_digest(found),
        live_jobs=jobs.existing_ids(
            session.get(), {v.source_job_id for m in found for v in m.versions if v.source_job_id}
        ),
        hf_tasks=HF_TASKS,
        upload_error=upload_error,
        upload_name=upload_name,
    )


@bp.post("/models/<model_id>/aliases")
@auth.signed_in
def set_alias(model_id: str) -> Response:
    """Point an alias (production, by default) at one of the model's versions."""
    db = session.get()
    model = registry.get_owned(db, model_id, auth.current().visible_owner)
    alias = request.form.get("alias", "production").strip() or "production"
    version = request.form.get("version", "")
    if not version.isdecimal():
        raise InvalidRequest("version must be a version number")
    registry.set_alias(db, model, alias, int(version))
    db.commit()
    flash(f"{model.name}: {alias} now points at version {version}.")
    return redirect(url_for("ui.models") + f"#model-{model.id}")


@bp.post("/models/<model_id>/aliases/<alias>/delete")
@auth.signed_in
def remove_alias(model_id: str, alias: str) -> Response:
    """Remove an alias (the version stays), as DELETE /api/v1/models/<name>/aliases/<alias>."""
    db = session.get()
    model = registry.get_owned(db, model_id, auth.current().visible_owner)
    registry.remove_alias(db, model, alias)
    db.commit()
    flash(f"{model.name}: removed the alias {alias}.")
    return redirect(url_for("ui.models") + f"#model-{model.id}")


@bp.route("/models/<model_id>/versions/<int:number>/delete", methods=["GET", "POST"])
@auth.signed_in
def delete_version(model_id: str, number: int) -> Response | tuple[str, int] | str:
    """GET asks to confirm; POST deletes as the API does: refused (409, with the reason)
    while an alias points at the version."""
    db = session.get()
    model = registry.get_owned(db, model_id, auth.current().visible_owner)
    registry.resolve_version(db, model, number)  # 404 for a version it does not have
    page = {
        "what": f"{model.name} v{number}",
        "consequence": "Its weights and exports are removed; jobs that name it will fail.",
        "action": url_for("ui.delete_version", model_id=model.id, number=number),
        "back": url_for("ui.models") + f"#model-{model.id}",
    }
    if request.method == "GET":
        return render_template("confirm_delete.html", error=None, **page)
    try:
        storage.delete_version(db, model, number)
    except InUse as exc:
        return render_template("confirm_delete.html", error=exc.message, **page), exc.status
    flash(f"Deleted {page['what']}.")
    return redirect(page["back"])


@bp.get("/models/<model_id>/versions/<int:number>/download/<what>")
@auth.signed_in
def download_version_file(model_id: str, number: int, what: str) -> Response:
    """A version's weights or its TorchScript export, sent as the API sends them."""
    db = session.get()
    model = registry.get_owned(db, model_id, auth.current().visible_owner)
    if what not in storage.VERSION_FILES:
        raise NotFound(f"a version has no {what!r} file: weights or torchscript")
    version = registry.resolve_version(db, model, number)
    return storage.send_version_file(model.name, version, what)


@bp.route("/models/<model_id>/delete", methods=["GET", "POST"])
@auth.signed_in
def delete_model(model_id: str) -> Response | tuple[str, int] | str:
    """GET asks to confirm; POST deletes as the API does: refused (409, with the reason)
    while an alias points at a version or a queued or running job names the model."""
    db = session.get()
    model = registry.get_owned(db, model_id, auth.current().visible_owner)
    page = {
        "what": f"model {model.name}",
        "consequence": f"Its {len(model.versions)} versions, their weights and exports are "
        "removed; jobs that name it will fail.",
        "action": url_for("ui.delete_model", model_id=model.id),
        "back": url_for("ui.models") + f"#model-{model.id}",
    }
    if request.method == "GET":
        return render_template("confirm_delete.html", error=None, **page)
    try:
        storage.delete_model(db, model)
    except InUse as exc:
        return render_template("confirm_delete.html", error=exc.message, **page), exc.status
    flash(f"Deleted {page['what']}.")
    return redirect(url_for("ui.models"))


def _metric_names(model: Model) -> list[str]:
    names: set[str] = set()
    for version in model.versions:
        names.update(version.metrics)
    return sorted(names)


def _datasets_by_digest(found: list[Model]) -> dict[tuple[str, str], Dataset]:
    """The uploads the versions were trained on, by (owner, digest), for lineage links."""
    digests = {v.dataset_digest for m in found for v in m.versions if v.dataset_digest}
    return dataset_store.by_digest(session.get(), digests)
