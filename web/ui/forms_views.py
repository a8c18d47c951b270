"""New-job forms: one per kind in kiln.specs.KINDS, validated by the kind's own spec."""

from __future__ import annotations

from typing import Any

from flask import abort, redirect, render_template, request, url_for
from sqlalchemy import select
from werkzeug import Response

from db import jobs as job_store
from db.models import Dataset, Job, Model
from kiln import routing
from kiln.errors import InvalidSpec
from kiln.specs import KINDS, parse_spec
from web import dispatch, session
from web.ui import auth, bp, forms

#: The forms offered first, in this order; any other kind follows alphabetically.
_FIRST = ("train", "predict", "batch_predict")
_TITLES = {
    "train": "Train a model",
    "predict": "Predict with a model",
    "batch_predict": "Batch-score a dataset",
    "echo": "Echo (smoke test)",
}


def kinds_in_order() -> list[str]:
    return [k for k in _FIRST if k in KINDS] + sorted(k for k in KINDS if k not in _FIRST)


@bp.app_template_global("kind_title")
def kind_title(kind: str) -> str:
    return _TITLES.get(kind, kind.replace("_", " ").capitalize())


@bp.get("/jobs/new")
@auth.signed_in
def new_job_menu() -> str:
    return render_template("new_job_menu.html", kinds=kinds_in_order(), KINDS=KINDS)


@bp.route("/jobs/new/<kind>", methods=["GET", "POST"])
@auth.signed_in
def new_job(kind: str) -> Response | str | tuple[str, int]:
    spec_type = KINDS.get(kind)
    if spec_type is None:
        abort(404, f"there is no job kind {kind!r}")
    fields = forms.fields_for(spec_type)
    if request.method == "GET":
        values = {f.name: f.default for f in fields}
        values["priority"] = "0"
        if source_id := request.args.get("from"):
            source = _owned(source_id)
            values.update(forms.values_from_spec(fields, source.spec))
            values["priority"] = str(source.priority)
        # Links elsewhere pre-fill single fields: /jobs/new/train?dataset=<id>.
        values.update({k: v for k, v in request.args.items() if k in values})
        return _render(kind, fields, values, {}, [])
    return _submit(kind, fields)


def _submit(kind: str, fields: list[forms.FormField]) -> Response | tuple[str, int]:
    values = {f.name: request.form.get(f.name, "") for f in fields}
    values["priority"] = request.form.get("priority", "0")
    raw, errors = forms.spec_from_form(fields, request.form)
    general: list[str] = []
    priority = _priority(values["priority"], errors)
    spec = None
    try:
        spec = parse_spec(kind, raw)
    except InvalidSpec as exc:
        placed, general = forms.errors_by_field(fields, exc)
        errors = {**placed, **errors}
    if errors or general or spec is None:
        return _render(kind, fields, values, errors, general), 422
    db = session.get()
    job = job_store.create(
        db,
        kind=kind,
        owner=auth.current().owner,
        spec=spec.model_dump(mode="json"),
        queue=routing.queue_for(spec.device),
        priority=priority,
    )
    db.commit()
    dispatch.send_job(job)
    return redirect(url_for("ui.job", job_id=job.id))


def _priority(text: str, errors: dict[str, str]) -> int:
    if text.strip().isdecimal() and 0 <= int(text) <= 9:
        return int(text)
    errors["priority"] = "a whole number from 0 to 9"
    return 0


def _render(
    kind: str,
    fields: list[forms.FormField],
    values: dict[str, str],
    errors: dict[str, str],
    general: list[str],
) -> str:
    return render_template(
        "job_form.html",
        kind=kind,
        fields=fields,
        values=values,
        errors=errors,
        general=general,
        doc=(KINDS[kind].__doc__ or "").strip(),
        **_pickers(),
    )


def _pickers() -> dict[str, Any]:
    """Choices for the dataset and model inputs: built-ins and the user's own."""
    owner = auth.current().owner
    db = session.get()
    datasets = db.scalars(
        select(Dataset).where(Dataset.owner == owner).order_by(Dataset.created_at.desc())
    )
    models = db.scalars(select(Model).where(Model.owner == owner).order_by(Model.name))
    return {
        "builtin_datasets": forms.builtin_datasets(),
        "datasets": list(datasets),
        "models": list(models),
    }


def _owned(job_id: str) -> Job:
    return job_store.get_owned(session.get(), job_id, auth.current().visible_owner)
