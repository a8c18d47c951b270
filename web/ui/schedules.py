"""Schedules page: the user's cron schedules, pause/resume/delete, and the new-schedule form.

A new schedule is the kind's job form (web.ui.forms_views) with a name and a cron line
added, so its job template is checked by the kind's spec exactly as a submitted job is.
The rows are read and written with db.schedules, the API's own helpers and owner rules.
"""

from __future__ import annotations

import json
from datetime import datetime

from flask import flash, redirect, render_template, request, url_for
from pydantic import ValidationError
from werkzeug import Response

from db import schedules as schedule_rows
from db.models import Schedule
from kiln.errors import InvalidSpec
from kiln.schemas import ScheduleRequest
from web import session
from web.ui import auth, bp, filters, forms_views

#: The run times listed per schedule (as the API's `upcoming`).
_UPCOMING = 3
#: The inputs the schedule form adds to the job form.
_EXTRA = ("name", "cron")


@bp.get("/schedules")
@auth.signed_in
def schedules() -> str:
    found = schedule_rows.listed(session.get(), auth.current().visible_owner)
    return render_template(
        "schedules.html",
        schedules=found,
        upcoming={s.id: _upcoming(s) for s in found},
        specs={s.id: json.dumps(s.spec, indent=2) for s in found},
        kinds=forms_views.kinds_in_order(),
    )


def _upcoming(schedule: Schedule) -> list[datetime]:
    """The next run times; none while paused (resuming counts from then)."""
    if not schedule.enabled:
        return []
    after = schedule.next_run_at
    return [after, *schedule_rows.upcoming(schedule.cron, after, _UPCOMING - 1)]


@bp.route("/schedules/new/<kind>", methods=["GET", "POST"])
@auth.signed_in
def new_schedule(kind: str) -> Response | str | tuple[str, int]:
    """The kind's job form plus name and cron; ?from=<job id> starts from that job's spec."""
    fields = forms_views.job_fields(kind)
    if request.method == "GET":
        values = forms_views.initial_values(fields, extra=_EXTRA)
        return forms_views.render_form(kind, fields, values, {}, [], schedule=True)
    filled = forms_views.read_form(kind, fields, extra=_EXTRA)
    name, cron = filled.values["name"].strip(), filled.values["cron"].strip()
    filled.errors.update(_template_errors(kind, name, cron))
    if not filled.ok or filled.spec is None:
        page = forms_views.render_form(
            kind, fields, filled.values, filled.errors, filled.general, schedule=True
        )
        return page, 422
    db = session.get()
    created = schedule_rows.create(
        db,
        owner=auth.current().owner,
        name=name,
        cron=cron,
        kind=kind,
        spec=filled.spec.model_dump(mode="json"),
        priority=filled.priority,
        enabled=True,
        tags=filled.tags,
        deadline_s=filled.deadline_s,
    )
    db.commit()
    flash(f"Schedule {created.name} created; it runs next at {filters.when(created.next_run_at)}.")
    return redirect(url_for("ui.schedules") + f"#schedule-{created.id}")


def _template_errors(kind: str, name: str, cron: str) -> dict[str, str]:
    """Errors in the name and cron inputs, by the API's own rules (ScheduleRequest, cron)."""
    errors: dict[str, str] = {}
    try:
        ScheduleRequest(name=name, cron=cron, kind=kind)
    except ValidationError as exc:
        for error in exc.errors():
            errors.setdefault(str(error["loc"][0]), error["msg"])
    if not name:
        errors["name"] = "give the schedule a name"
    if "cron" not in errors:
        try:
            schedule_rows.check_cron(cron)
        except InvalidSpec as exc:
            errors["cron"] = exc.message
    return errors


@bp.post("/schedules/<schedule_id>/pause")
@auth.signed_in
def pause_schedule(schedule_id: str) -> Response:
    return _set_enabled(schedule_id, enabled=False)


@bp.post("/schedules/<schedule_id>/resume")
@auth.signed_in
def resume_schedule(schedule_id: str) -> Response:
    return _set_enabled(schedule_id, enabled=True)


def _set_enabled(schedule_id: str, *, enabled: bool) -> Response:
    db = session.get()
    schedule = schedule_rows.set_enabled(db, _owned(schedule_id), enabled)
    db.commit()
    if enabled:
        flash(f"Resumed {schedule.name}; it runs next at {filters.when(schedule.next_run_at)}.")
    else:
        flash(f"Paused {schedule.name}.")
    return redirect(url_for("ui.schedules") + f"#schedule-{schedule.id}")


@bp.route("/schedules/<schedule_id>/delete", methods=["GET", "POST"])
@auth.signed_in
def delete_schedule(schedule_id: str) -> Response | str:
    """GET asks to confirm, as every delete does; POST deletes the schedule (the jobs it
    already submitted stay)."""
    db = session.get()
    schedule = _owned(schedule_id)
    page = {
        "what": f"schedule {schedule.name}",
        "consequence": "It submits no more jobs; the jobs it already submitted stay.",
        "action": url_for("ui.delete_schedule", schedule_id=schedule.id),
        "back": url_for("ui.schedules") + f"#schedule-{schedule.id}",
    }
    if request.method == "GET":
        return render_template("confirm_delete.html", error=None, **page)
    db.delete(schedule)
    db.commit()
    flash(f"Deleted {page['what']}.")
    return redirect(url_for("ui.schedules"))


def _owned(schedule_id: str) -> Schedule:
    return schedule_rows.get_owned(session.get(), schedule_id, auth.current().visible_owner)
