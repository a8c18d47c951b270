"""New-job forms: one per kind in kiln.specs.KINDS, validated by the kind's own spec.

The schedule form (web.ui.schedules) is this same form with a name and a cron line added,
so it reads and checks the job template through the functions here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flask import abort, current_app, redirect, render_template, request, url_for
from pydantic import ValidationError
from werkzeug import Response

from db import datasets as dataset_store
from db import jobs as job_store
from db import registry
from db.models import Job
from kiln.errors import InvalidSpec
from kiln.schemas import JobSubmission
from kiln.specs import KINDS, Spec, parse_spec
from web import session
from web.limits import QueueQuotaExceeded
from web.submit import submit
from web.ui import auth, bp, form_layout, forms, model_hints

#: The forms offered first, in this order; any other kind follows alphabetically.
_FIRST = ("train", "predict", "batch_predict")
_TITLES = {
    "train": "Train a model",
    "predict": "Predict with a model",
    "batch_predict": "Batch-score a dataset",
    "echo": "Echo (smoke test)",
}


@dataclass
class Filled:
    """A posted job form: what to show again, what is wrong, and the spec if it is valid."""

    values: dict[str, str]
    errors: dict[str, str]
    general: list[str]
    spec: Spec | None
    priority: int
    tags: dict[str, str] | None = None
    deadline_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.spec is not None and not self.errors and not self.general


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
    fields = job_fields(kind)
    if request.method == "GET":
        return render_form(kind, fields, initial_values(fields), {}, [])
    filled = read_form(kind, fields)
    if not filled.ok or filled.spec is None:
        return render_form(kind, fields, filled.values, filled.errors, filled.general), 422
    try:
        job = submit(
            session.get(),
            owner=auth.current().owner,
            kind=kind,
            spec=filled.spec,
            priority=filled.priority,
            tags=filled.tags,
            deadline_s=filled.deadline_s,
        )
    except QueueQuotaExceeded as exc:
        # The API answers 429 with Retry-After; a person gets the form back, values kept.
        page = render_form(kind, fields, filled.values, {}, [exc.message])
        return page, exc.status
    except InvalidSpec as exc:  # names what this user has not got (web.submit_checks)
        placed, general = forms.errors_by_field(fields, exc)
        return render_form(kind, fields, filled.values, placed, general), exc.status
    return redirect(url_for("ui.job", job_id=job.id))


def job_fields(kind: str) -> list[forms.FormField]:
    """The form fields of `kind`'s spec that this user is offered; 404 for a kind that
    does not exist."""
    spec_type = KINDS.get(kind)
    if spec_type is None:
        abort(404, f"there is no job kind {kind!r}")
    return form_layout.offered(kind, forms.fields_for(spec_type), chaos=_chaos_offered())


def _chaos_offered() -> bool:
    """Chaos switches (an echo job's crash) only for an admin, where KILN_CHAOS is on:
    elsewhere they would only make the job fail."""
    return bool(auth.current().is_admin and current_app.config["KILN_SETTINGS"].chaos)


def initial_values(fields: list[forms.FormField], extra: Iterable[str] = ()) -> dict[str, str]:
    """A new form's values: the spec's defaults, or a job's (?from=<id>), then ?field=value."""
    values = {f.name: f.default for f in fields}
    values.update({name: "" for name in extra})
    values.update(priority="0", tags="", deadline_s="")
    if source_id := request.args.get("from"):
        source = _owned(source_id)
        values.update(forms.values_from_spec(fields, source.spec))
        values["priority"] = str(source.priority)
        values["tags"] = " ".join(f"{key}={value}" for key, value in source.tags.items())
        values["deadline_s"] = f"{source.deadline_s:g}" if source.deadline_s else ""
    # Links elsewhere pre-fill single fields: /jobs/new/train?dataset=<id>.
    values.update({k: v for k, v in request.args.items() if k in values})
    return values


def read_form(kind: str, fields: list[forms.FormField], extra: Iterable[str] = ()) -> Filled:
    """The posted form checked by parse_spec (the API's own validation); errors by field."""
    values = {f.name: request.form.get(f.name, "") for f in fields}
    values.update({name: request.form.get(name, "") for name in extra})
    values["priority"] = request.form.get("priority", "0")
    values["tags"] = request.form.get("tags", "")
    values["deadline_s"] = request.form.get("deadline_s", "")
    raw, errors = forms.spec_from_form(fields, request.form)
    general: list[str] = []
    priority = _priority(values["priority"], errors)
    tags, deadline_s = _tags_and_deadline(values["tags"], values["deadline_s"], errors)
    spec = None
    try:
        spec = parse_spec(kind, raw)
    except InvalidSpec as exc:
        placed, general = forms.errors_by_field(fields, exc)
        errors = {**placed, **errors}
    return Filled(
        values=values,
        errors=errors,
        general=general,
        spec=spec,
        priority=priority,
        tags=tags,
        deadline_s=deadline_s,
    )


def _tags_and_deadline(
    tags_text: str, deadline_text: str, errors: dict[str, str]
) -> tuple[dict[str, str], float | None]:
    """The form's tags ("team=nlp env=prod") and deadline in seconds, checked by the API's
    own rules (JobSubmission); what is wrong goes to `errors` by field."""
    tags: dict[str, str] = {}
    for pair in tags_text.replace(",", " ").split():
        key, sep, value = pair.partition("=")
        if not sep:
            errors["tags"] = f"{pair!r}: write key=value, separated by spaces"
            return {}, None
        tags[key] = value
    body: dict[str, Any] = {"kind": "echo", "tags": tags}
    if deadline_text.strip():
        body["deadline_s"] = deadline_text.strip()
    try:
        checked = JobSubmission.model_validate(body)
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0])
            where = " ".join(str(part) for part in error["loc"][1:2])
            errors.setdefault(field, f"{where}: {error['msg']}" if where else error["msg"])
        return {}, None
    return checked.tags, checked.deadline_s


def _priority(text: str, errors: dict[str, str]) -> int:
    if text.strip().isdecimal() and 0 <= int(text) <= 9:
        return int(text)
    errors["priority"] = "a whole number from 0 to 9"
    return 0


def render_form(
    kind: str,
    fields: list[forms.FormField],
    values: dict[str, str],
    errors: dict[str, str],
    general: list[str],
    *,
    schedule: bool = False,
) -> str:
    """The job form; with schedule=True it also asks for a name and a cron line."""
    action = url_for("ui.new_schedule" if schedule else "ui.new_job", kind=kind)
    pickers = _pickers(describe_models=any(f.widget == "model" for f in fields))
    return render_template(
        "job_form.html",
        kind=kind,
        groups=form_layout.grouped(kind, fields, values, errors),
        chosen_version=model_hints.resolve(
            pickers["described"], values.get("model", ""), values.get("version", "")
        ),
        values=values,
        errors=errors,
        general=general,
        schedule=schedule,
        action=action,
        doc=(KINDS[kind].__doc__ or "").strip(),
        builtin_dataset_kinds=form_layout.BUILTIN_DATASET_KINDS,
        **pickers,
    )


def _pickers(*, describe_models: bool) -> dict[str, Any]:
    """Choices for the dataset and model inputs: built-ins and the user's own; with
    `describe_models`, each model's versions and input schemas too."""
    owner = auth.current().owner
    db = session.get()
    models = registry.listed(db, owner)
    return {
        "builtin_datasets": forms.builtin_datasets(),
        "datasets": dataset_store.listed(db, owner),
        "models": models,
        "described": model_hints.describe(models) if describe_models else {},
    }


def _owned(job_id: str) -> Job:
    return job_store.get_owned(session.get(), job_id, auth.current().visible_owner)
